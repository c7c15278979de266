// Squared L2 norm, pass 1 of 2: each workgroup sums g*g over its share of the
// gradient segments of its batch and writes a single partial. Fixed order, no atomics, so the
// result is bitwise repeatable on one adapter. `real` / `real4` (f32 or f64) come
// from the precision prelude, and the batch (`batch`, `segment_of`, `walk`) from
// batch.wgsl, which the host puts in front (kernels.rs).

// binding 0: one partial sum per workgroup of every segment.
@group(0) @binding(0) var<storage, read_write> partials: array<real>;

// @each
// binding $BG: the gradient of segment $K of the batch, read only (zero in padding
// and gaps).
@group(0) @binding($BG) var<storage, read> grads_$K: array<real4>;
fn sum_$K(w: vec3<u32>) -> real4 {
    var acc = real4(0.0);
    var i = w.x;
    // @unrolled
    for (; i + (UNROLL - 1u) * w.z < w.y; i += UNROLL * w.z) {
        // @repeat
        let g$u = grads_$K[i + $uu * w.z];
        // @end repeat
        // @repeat
        acc += g$u * g$u;
        // @end repeat
    }
    // @end unrolled
    for (; i < w.y; i += w.z) {
        let g = grads_$K[i];
        acc += g * g;
    }
    return acc;
}
// @end

var<workgroup> sums: array<real, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = workgroup_index(wid);
    if (g >= batch.total) {
        return; // workgroup-uniform: the whole group leaves together
    }
    var acc = real4(0.0);
    // @each
    acc += sum_$K(walk(batch.seg[$K], g, lid));
    // @end
    sums[lid] = (acc.x + acc.y) + (acc.z + acc.w);
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            sums[lid] += sums[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        partials[batch.partial_base + g] = sums[0];
    }
}
