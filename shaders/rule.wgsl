// The Polyak step-size rule, put by the host in front of the kernels that finish a
// squared norm (norm_final.wgsl, and norm_partials.wgsl's one-pass entry at small
// sizes): `decide` applies it to the squared norm in the parameters' precision
// (`real`: f32, as jaxopt's float32 path, or f64) and writes the step and the
// verdict that the update reads. `real`, `EPS`, `LIMIT` and the classification
// helpers (`is_nan`, `is_finite`, `nan`, `inf_with_sign_of`) come from the precision
// prelude (kernels.rs). Under the host step-size mode the CPU overwrites the step
// and the verdict before the update runs.
//
// Pipelined runs (several steps submitted per readback) arm a halt: once a step is
// refused, or `run`'s stopping rule holds after a step, the later steps already
// submitted are skipped whole, so the parameters end as if the CPU had stopped there.

struct Rule {
    n: u32,            // number of partials (norm_final.wgsl)
    variant: u32,      // 0 = SPS_max, 1 = SPS+
    refuse: u32,       // a non-finite loss, norm or step: 0 = apply (Propagate), 1 = refuse
                       // and halt a pipelined run (Refuse), 2 = skip and go on (Skip)
    guard: u32,        // 1 = the overflow check: the step must lie in [low, high]
}

// binding 2: the scalars slot: [0] = the loss, written by the objective's kernel (or
// by the host) and set to NaN once read, so that a loss the next evaluation leaves
// unwritten refuses its step instead of reusing this one; from [1] on, the readback:
// [1] = the loss the step used, [2] = squared norm, [3] = step size, [4] = verdict:
// 0.0 = the update runs, 1.0 = refused (a non-finite step, or one the overflow check
// refuses), 2.0 = skipped (an earlier step halted the run); [5], [6] = the lowest and
// highest step the overflow check allows; then [7] = 1.0 once halted; [8] = what
// halts (written by the CPU): 0.0 = nothing (single updates), 1.0 = a refusal
// (run_iterator), 2.0 = a refusal or the stopping rule (run); [9] = the squared norm
// at or below which `run` stops (its `error <= tol` in the GPU's terms); written once
// by the host: [10] = momentum (update.wgsl), [11] = max_stepsize, [12] = delta,
// [13] = fun_min.
@group(0) @binding(2) var<storage, read_write> scalars: array<real, 14>;
// binding 3: the partial count, the variant, the non-finite policy, the check.
@group(0) @binding(3) var<uniform> rule: Rule;

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
    let gap = loss - scalars[13];
    if (rule.variant == 0u) {
        return nan_min(div(gap, sqnorm + scalars[12]), scalars[11]);
    }
    if (sqnorm <= EPS) {
        return real(0.0);
    }
    return nan_max(div(gap, sqnorm), real(0.0));
}

// Takes the loss, applies the rule to it and the squared norm `sqnorm`, and writes
// the step, the verdict and the halt (one invocation). With the overflow check the
// step must lie in [low, high].
fn decide(sqnorm: real, low: real, high: real) {
    let loss = scalars[0];
    scalars[0] = nan();
    scalars[1] = loss;
    let step = polyak_step(loss, sqnorm);
    let finite = is_finite(loss) && is_finite(sqnorm) && is_finite(step);
    // (a NaN step fails `finite`; the comparisons only see finite ones)
    let safe = rule.guard == 0u || (low <= step && step <= high);
    let refused = rule.refuse != 0u && !(finite && safe);
    scalars[2] = sqnorm;
    scalars[3] = step;
    scalars[5] = low;
    scalars[6] = high;
    let halts = scalars[8];
    if (halts != 0.0 && scalars[7] != 0.0) {
        scalars[4] = real(2.0);
        return;
    }
    scalars[4] = select(real(0.0), real(1.0), refused);
    // `run` stops once !(error > tol): a NaN norm stops it too.
    let stop = halts == 2.0 && (is_nan(sqnorm) || sqnorm <= scalars[9]);
    if ((halts != 0.0 && refused && rule.refuse == 1u) || stop) {
        scalars[7] = real(1.0);
    }
}
