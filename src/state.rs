//! The solver state (jaxopt's `PolyakSGDState`) and the loss an objective reports.

use crate::stepsize::Precision;

/// State after some number of updates, as in jaxopt's `PolyakSGDState`.
///
/// As in jaxopt, `value` and `error` describe the point the last update started
/// from, not the parameters it produced. The velocity stays on the GPU
/// ([`crate::PolyakSgd::download_velocity`]).
///
/// Made by the optimizer ([`State::initial`] for a run of your own); new fields
/// may come in later versions.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct State<A = ()> {
    /// Number of updates done.
    pub iter_num: usize,
    /// Loss at the point the last update started from (`+inf` after `init_state`).
    pub value: f64,
    /// Gradient norm at that point (`+inf` after `init_state`).
    pub error: f64,
    /// Step size of the last update (1.0 after `init_state`).
    pub stepsize: f64,
    /// Auxiliary output of the last objective evaluation (`has_aux`).
    pub aux: A,
    /// Objective evaluations so far, counting the one in `init_state`.
    pub num_fun_eval: usize,
    /// Gradient evaluations so far.
    pub num_grad_eval: usize,
    /// Steps skipped as non-finite under [`crate::NonFinitePolicy::Skip`] (not a
    /// jaxopt field).
    pub num_skipped: usize,
}

impl<A> State<A> {
    /// The state `init_state` returns, holding `aux` from its evaluation.
    pub fn initial(aux: A) -> Self {
        State {
            iter_num: 0,
            value: f64::INFINITY,
            error: f64::INFINITY,
            stepsize: 1.0,
            aux,
            num_fun_eval: 1,
            num_grad_eval: 0,
            num_skipped: 0,
        }
    }

    /// The state after an update that ran from this one, with the step's value,
    /// error and step size.
    pub(crate) fn updated<B>(&self, value: f64, error: f64, stepsize: f64, aux: B) -> State<B> {
        State {
            iter_num: self.iter_num + 1,
            value,
            error,
            stepsize,
            aux,
            num_fun_eval: self.num_fun_eval + 1,
            num_grad_eval: self.num_grad_eval + 1,
            num_skipped: self.num_skipped,
        }
    }

    /// The state after a step that was evaluated but skipped as non-finite: no
    /// update counted, the step's own value, error and step size.
    pub(crate) fn skipped<B>(&self, value: f64, error: f64, stepsize: f64, aux: B) -> State<B> {
        State {
            iter_num: self.iter_num,
            value,
            error,
            stepsize,
            aux,
            num_fun_eval: self.num_fun_eval + 1,
            num_grad_eval: self.num_grad_eval + 1,
            num_skipped: self.num_skipped + 1,
        }
    }

    /// The same state with another `aux` (e.g. after
    /// [`crate::PolyakSgd::load_checkpoint`], which restores none).
    pub fn with_aux<B>(self, aux: B) -> State<B> {
        State {
            iter_num: self.iter_num,
            value: self.value,
            error: self.error,
            stepsize: self.stepsize,
            aux,
            num_fun_eval: self.num_fun_eval,
            num_grad_eval: self.num_grad_eval,
            num_skipped: self.num_skipped,
        }
    }

    /// Whether `run` goes on after this state: `error > tol` (a NaN error stops it).
    pub fn should_continue(&self, tol: f64) -> bool {
        continues(self.error, tol)
    }
}

/// jaxopt's loop condition (past the first iteration).
fn continues(error: f64, tol: f64) -> bool {
    error > tol
}

/// The stopping rule in the GPU's terms: the largest squared norm `s` of the
/// parameters' precision at which `run` stops, i.e. `!(error(s) > tol)` with
/// jaxopt's `error`, the square root in that precision (the rule is monotone in
/// `s`), or -1 if no squared norm stops it. With it the GPU decides
/// `sqnorm <= threshold` exactly as [`State::should_continue`] decides on the CPU,
/// without a WGSL `sqrt`.
pub(crate) fn stop_threshold(tol: f64, precision: Precision) -> f64 {
    // Non-negative floats are ordered as their bits: bisect those. `value` gives a
    // bit pattern's squared norm and its error, both as f64.
    type Decode = fn(u64) -> (f64, f64);
    let (value, top): (Decode, u64) = match precision {
        Precision::F32 => (
            |bits| {
                let s = f32::from_bits(bits as u32);
                (f64::from(s), f64::from(s.sqrt()))
            },
            u64::from(f32::INFINITY.to_bits()),
        ),
        Precision::F64 => (
            |bits| {
                let s = f64::from_bits(bits);
                (s, s.sqrt())
            },
            f64::INFINITY.to_bits(),
        ),
    };
    let stops = |bits: u64| !continues(value(bits).1, tol);
    let (mut lo, mut hi) = (0u64, top);
    if !stops(lo) {
        return -1.0;
    }
    if stops(hi) {
        return f64::INFINITY;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if stops(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    value(lo).0
}

/// Where the objective put the loss of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    /// The loss, computed on the host.
    Host(f64),
    /// The objective's kernels wrote the loss as one `f32` (`f64` with f64
    /// parameters) into the optimizer's loss slot
    /// ([`crate::ParamBuffers::loss_binding`]); it comes back together with the norm
    /// in one 16-byte readback (32 bytes with f64 parameters). The slot is NaN
    /// until the objective writes it: a loss left unwritten refuses the step.
    Device,
}

impl Loss {
    /// The loss value of a step whose scalars came back as `scalars`.
    pub(crate) fn value(self, scalars: &crate::scalars::Scalars) -> f64 {
        match self {
            Loss::Host(v) => v,
            Loss::Device => scalars.loss,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_threshold_agrees_with_should_continue() {
        let mut rng = crate::conformance::SplitMix64::new(5);
        for tol in [
            -1.0,
            0.0,
            1e-30,
            1e-6,
            1e-3,
            0.5,
            1.0,
            3.7,
            1e19,
            1e30,
            f64::INFINITY,
        ] {
            // f32: the threshold is an f32 and error = sqrt_f32
            let t = stop_threshold(tol, Precision::F32);
            assert_eq!(f64::from(t as f32), t, "tol {tol}");
            let t32 = t as f32;
            let check = |s: f32| {
                let state = State {
                    error: f64::from(s.sqrt()),
                    ..State::initial(())
                };
                assert_eq!(
                    s <= t32,
                    !state.should_continue(tol),
                    "tol {tol} s {s} t {t}"
                );
            };
            for s in [
                0.0,
                f32::MIN_POSITIVE,
                1e-12,
                1e-6,
                0.25,
                1.0,
                13.69,
                1e38,
                f32::MAX,
            ] {
                check(s);
            }
            check(t32);
            if (0.0..f32::INFINITY).contains(&t32) {
                check(f32::from_bits(t32.to_bits() + 1));
            }
            for _ in 0..1000 {
                check(f32::from_bits((rng.next_u64() >> 33) as u32 & 0x7f7f_ffff));
            }
            // f64: error = sqrt_f64
            let t = stop_threshold(tol, Precision::F64);
            let check = |s: f64| {
                let state = State {
                    error: s.sqrt(),
                    ..State::initial(())
                };
                assert_eq!(s <= t, !state.should_continue(tol), "tol {tol} s {s} t {t}");
            };
            for s in [
                0.0,
                f64::MIN_POSITIVE,
                1e-300,
                1e-12,
                0.25,
                1.0,
                13.69,
                1e300,
                f64::MAX,
            ] {
                check(s);
            }
            check(t);
            if (0.0..f64::INFINITY).contains(&t) {
                check(f64::from_bits(t.to_bits() + 1));
            }
            for _ in 0..1000 {
                check(f64::from_bits(
                    (rng.next_u64() >> 2) & 0x7fef_ffff_ffff_ffff,
                ));
            }
        }
        assert_eq!(stop_threshold(-1.0, Precision::F32), -1.0);
        assert_eq!(stop_threshold(f64::INFINITY, Precision::F64), f64::INFINITY);
    }
}
