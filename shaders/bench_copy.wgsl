// Benchmark ceiling: copies `src` to `dst` with the same geometry and walk as the
// optimizer's kernels. Its bytes per second (8 per element) set the floor that
// polyak-bench compares a step against.

struct Geometry {
    n4: u32,       // vec4s to copy
    chunk: u32,    // vec4s per workgroup
    groups: u32,   // workgroups with work
    groups_x: u32, // workgroups along x
}

// binding 0: the source.
@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
// binding 1: the destination.
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;
// binding 2: the dispatch geometry.
@group(0) @binding(2) var<uniform> geo: Geometry;

// As in the optimizer's kernels: contiguous runs per invocation on CPU adapters,
// and the same invocations per workgroup.
override CONTIGUOUS: bool = false;
override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.y * geo.groups_x + wid.x;
    if (group >= geo.groups) {
        return;
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
    for (; i < stop; i += stride) {
        dst[i] = src[i];
    }
}
