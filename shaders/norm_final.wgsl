// Squared L2 norm, pass 2 of 2: one workgroup sums all partials of pass 1 (every
// segment) in a fixed order, with the overflow check also intersects the step
// intervals of norm_guard.wgsl, and its first invocation applies the step-size rule
// (`decide`, `scalars` and `rule` from rule.wgsl, which the host puts in front with
// the precision prelude: kernels.rs).

// binding 0: the partial sums written by norm_partials.wgsl (or by the objective).
@group(0) @binding(0) var<storage, read> partials: array<real>;
// binding 1: with the overflow check, the lowest and the highest step each partial's
// share allows (norm_guard.wgsl); unread without it.
@group(0) @binding(1) var<storage, read> bounds: array<real>;

const WG: u32 = 256u;
var<workgroup> sums: array<real, WG>;
var<workgroup> lows: array<real, WG>;
var<workgroup> highs: array<real, WG>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
    var acc = real(0.0);
    var low = -LIMIT;
    var high = LIMIT;
    for (var i = lid; i < rule.n; i += WG) {
        acc += partials[i];
        if (rule.guard != 0u) {
            low = max(low, bounds[2u * i]);
            high = min(high, bounds[2u * i + 1u]);
        }
    }
    sums[lid] = acc;
    lows[lid] = low;
    highs[lid] = high;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            sums[lid] += sums[lid + s];
            lows[lid] = max(lows[lid], lows[lid + s]);
            highs[lid] = min(highs[lid], highs[lid + s]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        decide(sums[0], lows[0], highs[0]);
    }
}
