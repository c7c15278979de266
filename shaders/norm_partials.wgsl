// Squared L2 norm, pass 1 of 2: each workgroup sums g*g over its share of one
// gradient segment and writes a single partial. Fixed order, no atomics, so the
// result is bitwise repeatable on one adapter. `real` / `real4` (f32 or f64) come
// from the precision prelude the host puts in front (kernels.rs).

struct Geometry {
    n4: u32,           // length of the segment in vec4s
    chunk: u32,        // vec4s handled by one workgroup
    groups_x: u32,     // workgroups along x in the dispatch (2-D when over 65,535)
    groups: u32,       // workgroups that have work (the rest of the grid returns)
    partial_base: u32, // index of this segment's first partial in `partials`
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// binding 0: the gradient segment, read only (zero in padding and gaps).
@group(0) @binding(0) var<storage, read> grads: array<real4>;
// binding 1: one partial sum per workgroup of every segment.
@group(0) @binding(1) var<storage, read_write> partials: array<real>;
// binding 2: this segment's dispatch geometry.
@group(0) @binding(2) var<uniform> geo: Geometry;

const WG: u32 = 256u;
// How invocations share the segment: a grid-stride loop on GPUs (false), contiguous
// chunks per workgroup and runs per invocation on CPU adapters (true); see update.wgsl.
override CONTIGUOUS: bool = false;
var<workgroup> sums: array<real, WG>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.y * geo.groups_x + wid.x;
    if (group >= geo.groups) {
        return; // workgroup-uniform: the whole group leaves together
    }
    var i = group * WG + lid;
    var stop = geo.n4;
    var stride = geo.groups * WG;
    if (CONTIGUOUS) {
        let start = group * geo.chunk;
        let end = min(start + geo.chunk, geo.n4);
        let per = (end - start + WG - 1u) / WG;
        i = start + lid * per;
        stop = min(i + per, end);
        stride = 1u;
    }
    var acc = real4(0.0);
    for (; i < stop; i += stride) {
        let g = grads[i];
        acc += g * g;
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
