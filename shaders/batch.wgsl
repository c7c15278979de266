// What norm_partials.wgsl and update.wgsl share, put in front of both by the host
// (kernels.rs): one dispatch covers a batch of segments (a large segment alone, or
// up to ten small ones, which would otherwise each pay a dispatch's fixed cost), and
// workgroup `g` of the dispatch works on the segment whose workgroups start at or
// before it.
//
// WGSL cannot index bindings, so the host writes out each block of a kernel between
// `@each` and `@end` once per segment of the batch, with `$K` the segment's index in
// the batch and the `$B..` placeholders its bindings, and sets `$M` to the batch's
// size.

struct Geometry {
    n4: u32,           // length of the segment in vec4s
    chunk: u32,        // vec4s handled by one workgroup
    groups_x: u32,     // (unused: the batch has one dispatch grid)
    groups: u32,       // workgroups of this segment
    partial_base: u32, // index of this segment's first partial (the norm's)
    first: u32,        // the batch's first workgroup working on this segment
    _pad0: u32,
    _pad1: u32,
}

const M: u32 = $Mu; // segments in the batch

struct Batch {
    groups_x: u32, // workgroups along x in the dispatch (2-D when over 65,535)
    total: u32,    // workgroups with work, all segments together
    _pad0: u32,
    _pad1: u32,
    seg: array<Geometry, M>,
}

// binding 1 of both kernels: the batch's dispatch grid and each segment's geometry.
@group(0) @binding(1) var<uniform> batch: Batch;

const WG: u32 = 256u;
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
