// The sum of g*g over a workgroup's share of every gradient segment of its batch, in
// a fixed order (no atomics: bitwise repeatable on one adapter). Put by the host in
// front of norm_partials.wgsl and update.wgsl (whose one-dispatch step sums the
// norm too), after batch.wgsl; each of them declares `grads_$K`, the gradient of
// segment $K of the batch, as an array<real4>.

// @each
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

// The sum of g*g over workgroup `g`'s share of every segment of the batch (called
// by the whole workgroup, in uniform control flow).
fn share(g: u32, lid: u32) -> real {
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
    return sums[0];
}
