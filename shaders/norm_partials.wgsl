// Squared L2 norm, pass 1 of 2: each workgroup sums g*g over its share of one
// gradient segment and writes a single partial. Fixed order, no atomics, so the
// result is bitwise repeatable on one adapter. One dispatch covers a batch of
// segments (one segment alone when it is large; up to ten small ones, which would
// otherwise each pay a dispatch's fixed cost): workgroup `g` of the dispatch works on
// the segment whose workgroups start at or before it. `real` / `real4` (f32 or f64)
// come from the precision prelude the host puts in front (kernels.rs).
//
// WGSL cannot index bindings, so the host (kernels.rs) writes out each block between
// `@each` and `@end` once per segment of the batch, with `$K` the segment's index in
// the batch and `$BG` its binding, and sets `$M` to the batch's size.

struct Geometry {
    n4: u32,           // length of the segment in vec4s
    chunk: u32,        // vec4s handled by one workgroup
    groups_x: u32,     // (unused: the batch has one dispatch grid)
    groups: u32,       // workgroups of this segment
    partial_base: u32, // index of this segment's first partial in `partials`
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

// binding 0: one partial sum per workgroup of every segment.
@group(0) @binding(0) var<storage, read_write> partials: array<real>;
// binding 1: the batch's dispatch grid and each segment's geometry.
@group(0) @binding(1) var<uniform> batch: Batch;

// @each
// binding $BG: the gradient of segment $K of the batch, read only (zero in padding
// and gaps).
@group(0) @binding($BG) var<storage, read> grads_$K: array<real4>;
fn sum_$K(w: vec3<u32>) -> real4 {
    var acc = real4(0.0);
    for (var i = w.x; i < w.y; i += w.z) {
        let g = grads_$K[i];
        acc += g * g;
    }
    return acc;
}
// @end

const WG: u32 = 256u;
// How invocations share a segment: see update.wgsl.
override CONTIGUOUS: bool = false;
var<workgroup> sums: array<real, WG>;

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

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = wid.y * batch.groups_x + wid.x;
    if (g >= batch.total) {
        return; // workgroup-uniform: the whole group leaves together
    }
    var k = 0u;
    for (var j = 1u; j < M; j++) {
        if (g >= batch.seg[j].first) {
            k = j;
        }
    }
    let geo = batch.seg[k];
    let group = g - geo.first;
    let w = walk(geo, group, lid);
    var acc = real4(0.0);
    switch k {
        // @each
        case $Ku: { acc = sum_$K(w); }
        // @end
        default: {}
    }
    sums[lid] = (acc.x + acc.y) + (acc.z + acc.w);
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            sums[lid] += sums[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        partials[geo.partial_base + group] = sums[0];
    }
}
