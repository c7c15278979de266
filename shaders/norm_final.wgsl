// Squared L2 norm, pass 2 of 2: one workgroup sums all partials of pass 1 (every
// segment) in a fixed order and writes the squared norm next to the loss (with the
// overflow check, it also intersects the step intervals of norm_guard.wgsl). Its
// first invocation then applies the Polyak step-size rule in the parameters'
// precision (`real`: f32, as jaxopt's float32 path, or f64) and writes the step and
// the verdict that the update reads. `real`, `EPS` and the classification helpers (`is_nan`,
// `is_finite`, `nan`, `inf_with_sign_of`) come from the precision prelude the host
// puts in front (kernels.rs). Under the host step-size
// mode the CPU overwrites both before the update runs.
//
// Pipelined runs (several steps submitted per readback) arm a halt: once a step is
// refused, or `run`'s stopping rule holds after a step, the later steps already
// submitted are skipped whole, so the parameters end as if the CPU had stopped there.

struct Rule {
    n: u32,            // number of partials
    variant: u32,      // 0 = SPS_max, 1 = SPS+
    refuse: u32,       // a non-finite loss, norm or step: 0 = apply (Propagate), 1 = refuse
                       // and halt a pipelined run (Refuse), 2 = skip and go on (Skip)
    guard: u32,        // 1 = the overflow check: `bounds` holds a step interval per partial
}

// binding 0: the partial sums written by norm_partials.wgsl.
@group(0) @binding(0) var<storage, read> partials: array<real>;
// binding 1: the scalars slot: [0] = loss (written by the objective), [1] = squared
// norm, [2] = step size, [3] = verdict: 0.0 = the update runs, 1.0 = refused (a
// non-finite step, or one the overflow check refuses), 2.0 = skipped (an earlier
// step halted the run); [4], [5] = the lowest and highest step the overflow check
// allows; [6] = 1.0 once halted; [7] = what halts (written by the CPU): 0.0 =
// nothing (single updates), 1.0 = a refusal (run_iterator), 2.0 = a refusal or the
// stopping rule (run); [8] = the squared norm at or below which `run` stops (its
// `error <= tol` in the GPU's terms); written once by the host: [9] = momentum
// (update.wgsl), [10] = max_stepsize, [11] = delta, [12] = fun_min.
@group(0) @binding(1) var<storage, read_write> scalars: array<real, 14>;
// binding 2: the partial count, the variant, the non-finite policy, the check.
@group(0) @binding(2) var<uniform> rule: Rule;
// binding 3: with the overflow check, the lowest and the highest step each partial's
// share allows (norm_guard.wgsl); unread without it.
@group(0) @binding(3) var<storage, read> bounds: array<real>;

const WG: u32 = 256u;
var<workgroup> sums: array<real, WG>;
var<workgroup> lows: array<real, WG>;
var<workgroup> highs: array<real, WG>;

// a / b, with the IEEE result spelled out where b is zero (x/0 = ±inf, 0/0 = NaN).
fn div(a: real, b: real) -> real {
    if (is_nan(a) || is_nan(b)) {
        return nan();
    }
    if (b == 0.0) {
        if (a == 0.0) {
            return nan();
        }
        return inf_with_sign_of(a);
    }
    return a / b;
}

// jnp.minimum / jnp.maximum: NaN if either side is NaN.
fn nan_min(a: real, b: real) -> real {
    if (is_nan(a) || is_nan(b)) {
        return nan();
    }
    return select(b, a, a < b);
}

fn nan_max(a: real, b: real) -> real {
    if (is_nan(a) || is_nan(b)) {
        return nan();
    }
    return select(b, a, a > b);
}

// The rule of stepsize.rs (`polyak_stepsize`) in `real`.
fn polyak_step(loss: real, sqnorm: real) -> real {
    let gap = loss - scalars[12];
    if (rule.variant == 0u) {
        return nan_min(div(gap, sqnorm + scalars[11]), scalars[10]);
    }
    if (sqnorm <= EPS) {
        return real(0.0);
    }
    return nan_max(div(gap, sqnorm), real(0.0));
}

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
        let loss = scalars[0];
        let sqnorm = sums[0];
        let step = polyak_step(loss, sqnorm);
        let finite = is_finite(loss) && is_finite(sqnorm) && is_finite(step);
        // (a NaN step fails `finite`; the comparisons only see finite ones)
        let safe = rule.guard == 0u || (lows[0] <= step && step <= highs[0]);
        let refused = rule.refuse != 0u && !(finite && safe);
        scalars[1] = sqnorm;
        scalars[2] = step;
        scalars[4] = lows[0];
        scalars[5] = highs[0];
        let halts = scalars[7];
        if (halts != 0.0 && scalars[6] != 0.0) {
            scalars[3] = real(2.0);
            return;
        }
        scalars[3] = select(real(0.0), real(1.0), refused);
        // `run` stops once !(error > tol): a NaN norm stops it too.
        let stop = halts == 2.0 && (is_nan(sqnorm) || sqnorm <= scalars[8]);
        if ((halts != 0.0 && refused && rule.refuse == 1u) || stop) {
            scalars[6] = real(1.0);
        }
    }
}
