// What norm_partials.wgsl and update.wgsl share, put in front of both by the host
// (kernels.rs): one dispatch covers a batch of segments (a large segment alone, or
// up to 30 small ones, which would otherwise each pay a dispatch's fixed cost). Each
// segment has its own range of the dispatch's workgroups: on a GPU the ranges
// follow one another (every workgroup walks one segment, as alone), on a CPU
// adapter they all are the whole dispatch (every workgroup walks its share of every
// segment: a batch of tiny segments is one workgroup, not one per segment).
//
// WGSL cannot index bindings, so the host writes out each block of a kernel between
// `@each` and `@end` once per segment of the batch, with `$K` the segment's index in
// the batch and the `$B..` placeholders its bindings, and sets `$M` to the batch's
// size. It also unrolls the walks' loops (`ContextOptions::unroll`): the lines
// between `@repeat` and `@end repeat` are written out `$U` times with `$u` the copy's
// index, inside a loop between `@unrolled` and `@end unrolled` that takes `$U`
// elements per iteration (dropped when `$U` is 1); a plain loop does the rest. Each
// invocation visits its elements in the same order whatever `$U`: the same bits.

struct Geometry {
    n4: u32,     // length of the segment in vec4s
    chunk: u32,  // vec4s of one workgroup's share (the contiguous walk)
    groups: u32, // workgroups sharing the segment (the stride of the grid-stride walk)
    first: u32,  // the first of them in the dispatch
}

const M: u32 = $Mu; // segments in the batch
const UNROLL: u32 = $Uu; // elements per iteration of the unrolled loops

struct Batch {
    groups_x: u32,     // workgroups along x in the dispatch (2-D when over 65,535)
    total: u32,        // workgroups with work
    partial_base: u32, // index of the batch's first norm partial
    _pad: u32,
    seg: array<Geometry, M>,
}

// binding 1 of both kernels: the batch's dispatch grid and each segment's geometry.
@group(0) @binding(1) var<uniform> batch: Batch;

// Invocations per workgroup: 256 unless the context says otherwise
// (`ContextOptions::workgroup_size`, a power of two). Set at pipeline creation.
override WG: u32 = 256u;
// How invocations share a segment. GPUs (false): a grid-stride loop, workgroup
// `group` starting at vec4 `group * WG` and all invocations striding by the whole
// grid, so neighbouring invocations load neighbouring vec4s. CPU adapters (true),
// which run a workgroup's SIMD batches one after another: workgroup `group` takes
// the contiguous chunk `group * chunk ..` and each invocation one contiguous run of
// it. Set per device at pipeline creation.
override CONTIGUOUS: bool = false;

// The index in the dispatch of workgroup `wid`, or `batch.total` and above for the
// workgroups of a 2-D grid past the last (they return at once: workgroup-uniform).
fn workgroup_index(wid: vec3<u32>) -> u32 {
    return wid.y * batch.groups_x + wid.x;
}

// Invocation `lid` of workgroup `group`'s share of a segment: first index, end and
// stride (an empty range where the segment has no share for this workgroup).
fn walk(geo: Geometry, workgroup: u32, lid: u32) -> vec3<u32> {
    // Workgroups outside the segment's range have no share of it (uniform).
    if (workgroup < geo.first || workgroup - geo.first >= geo.groups) {
        return vec3<u32>(0u, 0u, 1u);
    }
    let group = workgroup - geo.first;
    if (CONTIGUOUS) {
        let start = min(group * geo.chunk, geo.n4);
        let end = min(start + geo.chunk, geo.n4);
        let per = (end - start + WG - 1u) / WG;
        let first = min(start + lid * per, end);
        return vec3<u32>(first, min(first + per, end), 1u);
    }
    return vec3<u32>(group * WG + lid, geo.n4, geo.groups * WG);
}
