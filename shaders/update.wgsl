// The fused Polyak update over one segment, one pass:
//   with momentum:    v = momentum * v - step * g;  p = p + v      (entry point `momentum`)
//   without momentum: p = p + (-step) * g, no velocity traffic     (entry point `plain`)
// Invocations share the segment as in the norm (see `walk`).
//
// `real4` (vec4 of f32 or f64) and `velocity4`, the velocity's storage type, come
// from the precision prelude the host puts in front (kernels.rs): `velocity4` is
// `real4`, or `vec4<f16>` after `enable f16;` for an f16 velocity (the update
// computes in `real` either way and rounds only what it stores, through
// `to_velocity`, which saturates an f16 velocity at +-65504).

struct Geometry {
    n4: u32,           // length of the segment in vec4s
    chunk: u32,        // vec4s handled by one workgroup
    groups_x: u32,     // workgroups along x in the dispatch
    groups: u32,       // workgroups that have work
    partial_base: u32, // unused here (shared struct with the norm)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// binding 0: the parameter segment, updated in place.
@group(0) @binding(0) var<storage, read_write> params: array<real4>;
// binding 1: the gradient segment at the current parameters.
@group(0) @binding(1) var<storage, read> grads: array<real4>;
// binding 2: the velocity segment (only bound by `momentum`).
@group(0) @binding(2) var<storage, read_write> velocity: array<velocity4>;
// binding 3: this segment's dispatch geometry.
@group(0) @binding(3) var<uniform> geo: Geometry;
// binding 4: the scalars slot of norm_final.wgsl: [2] = the step size, [3] = not 0.0
// if this update must not run (refused, or the run halted), [7] = the momentum.
@group(0) @binding(4) var<storage, read> scalars: array<real, 12>;

const WG: u32 = 256u;
// How invocations share the segment. GPUs (false): a grid-stride loop, workgroup
// `group` starting at vec4 `group * WG` and all invocations striding by the whole
// grid, so neighbouring invocations load neighbouring vec4s. CPU adapters (true),
// which run a workgroup's SIMD batches one after another: workgroup `group` takes
// the contiguous chunk `group * chunk ..` and each invocation one contiguous run of
// it. Set per device at pipeline creation.
override CONTIGUOUS: bool = false;

// Invocation `lid` of workgroup `group`: first index, end and stride.
fn walk(group: u32, lid: u32) -> vec3<u32> {
    if (CONTIGUOUS) {
        let start = group * geo.chunk;
        let end = min(start + geo.chunk, geo.n4);
        let per = (end - start + WG - 1u) / WG;
        let first = start + lid * per;
        return vec3<u32>(first, min(first + per, end), 1u);
    }
    return vec3<u32>(group * WG + lid, geo.n4, geo.groups * WG);
}

@compute @workgroup_size(256)
fn momentum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.y * geo.groups_x + wid.x;
    if (group >= geo.groups) {
        return;
    }
    if (scalars[3] != 0.0) {
        return;
    }
    let step = scalars[2];
    let momentum = scalars[7];
    let w = walk(group, lid);
    for (var i = w.x; i < w.y; i += w.z) {
        let v = momentum * real4(velocity[i]) - step * grads[i];
        velocity[i] = to_velocity(v);
        params[i] = params[i] + v;
    }
}

@compute @workgroup_size(256)
fn plain(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.y * geo.groups_x + wid.x;
    if (group >= geo.groups) {
        return;
    }
    if (scalars[3] != 0.0) {
        return;
    }
    let neg_step = -scalars[2];
    let w = walk(group, lid);
    for (var i = w.x; i < w.y; i += w.z) {
        params[i] = params[i] + neg_step * grads[i];
    }
}
