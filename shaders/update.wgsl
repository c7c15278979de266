// The fused Polyak update, one pass over each segment of a batch (one large segment
// alone, or up to ten small ones; see norm_partials.wgsl):
//   with momentum:    v = momentum * v - step * g;  p = p + v      (entry point `momentum`)
//   without momentum: p = p + (-step) * g, no velocity traffic     (entry point `plain`)
//
// `real4` (vec4 of f32 or f64) and `velocity4`, the velocity's storage type, come
// from the precision prelude the host puts in front (kernels.rs): `velocity4` is
// `real4`, or `vec4<f16>` after `enable f16;` for an f16 velocity (the update
// computes in `real` either way and rounds only what it stores, through
// `to_velocity`, which saturates an f16 velocity at +-65504).
//
// The host writes out each block between `@each` and `@end` once per segment of the
// batch, with `$K` the segment's index in the batch and `$BP`, `$BG`, `$BV` its
// bindings, and sets `$M` to the batch's size.

struct Geometry {
    n4: u32,           // length of the segment in vec4s
    chunk: u32,        // vec4s handled by one workgroup
    groups_x: u32,     // (unused: the batch has one dispatch grid)
    groups: u32,       // workgroups of this segment
    partial_base: u32, // (unused here)
    first: u32,        // the batch's first workgroup working on this segment
    _pad0: u32,
    _pad1: u32,
}

const M: u32 = $Mu;

struct Batch {
    groups_x: u32, // workgroups along x in the dispatch (2-D when over 65,535)
    total: u32,    // workgroups with work, all segments together
    _pad0: u32,
    _pad1: u32,
    seg: array<Geometry, M>,
}

// binding 0: the scalars slot of norm_final.wgsl: [2] = the step size, [3] = not 0.0
// if this update must not run (refused, or the run halted), [7] = the momentum.
@group(0) @binding(0) var<storage, read> scalars: array<real, 12>;
// binding 1: the batch's dispatch grid and each segment's geometry.
@group(0) @binding(1) var<uniform> batch: Batch;

// @each
// bindings $BP, $BG, $BV: the parameters (updated in place), the gradient and the
// velocity (only bound by `momentum`) of segment $K of the batch.
@group(0) @binding($BP) var<storage, read_write> params_$K: array<real4>;
@group(0) @binding($BG) var<storage, read> grads_$K: array<real4>;
@group(0) @binding($BV) var<storage, read_write> velocity_$K: array<velocity4>;
fn momentum_$K(w: vec3<u32>, step: real, momentum: real) {
    for (var i = w.x; i < w.y; i += w.z) {
        let v = momentum * real4(velocity_$K[i]) - step * grads_$K[i];
        velocity_$K[i] = to_velocity(v);
        params_$K[i] = params_$K[i] + v;
    }
}
fn plain_$K(w: vec3<u32>, neg_step: real) {
    for (var i = w.x; i < w.y; i += w.z) {
        params_$K[i] = params_$K[i] + neg_step * grads_$K[i];
    }
}
// @end

const WG: u32 = 256u;
// How invocations share a segment. GPUs (false): a grid-stride loop, workgroup
// `group` starting at vec4 `group * WG` and all invocations striding by the whole
// grid, so neighbouring invocations load neighbouring vec4s. CPU adapters (true),
// which run a workgroup's SIMD batches one after another: workgroup `group` takes
// the contiguous chunk `group * chunk ..` and each invocation one contiguous run of
// it. Set per device at pipeline creation.
override CONTIGUOUS: bool = false;

// Invocation `lid` of the segment's workgroup `group`: first index, end and stride.
fn walk(geo: Geometry, group: u32, lid: u32) -> vec3<u32> {
    if (CONTIGUOUS) {
        let start = group * geo.chunk;
        let end = min(start + geo.chunk, geo.n4);
        let per = (end - start + WG - 1u) / WG;
        let first = start + lid * per;
        return vec3<u32>(first, min(first + per, end), 1u);
    }
    return vec3<u32>(group * WG + lid, geo.n4, geo.groups * WG);
}

// The segment of the batch that workgroup `g` works on.
fn segment_of(g: u32) -> u32 {
    var k = 0u;
    for (var j = 1u; j < M; j++) {
        if (g >= batch.seg[j].first) {
            k = j;
        }
    }
    return k;
}

@compute @workgroup_size(256)
fn momentum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = wid.y * batch.groups_x + wid.x;
    if (g >= batch.total || scalars[3] != 0.0) {
        return;
    }
    let k = segment_of(g);
    let geo = batch.seg[k];
    let w = walk(geo, g - geo.first, lid);
    let step = scalars[2];
    let momentum = scalars[7];
    switch k {
        // @each
        case $Ku: { momentum_$K(w, step, momentum); }
        // @end
        default: {}
    }
}

@compute @workgroup_size(256)
fn plain(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = wid.y * batch.groups_x + wid.x;
    if (g >= batch.total || scalars[3] != 0.0) {
        return;
    }
    let k = segment_of(g);
    let geo = batch.seg[k];
    let w = walk(geo, g - geo.first, lid);
    let neg_step = -scalars[2];
    switch k {
        // @each
        case $Ku: { plain_$K(w, neg_step); }
        // @end
        default: {}
    }
}
