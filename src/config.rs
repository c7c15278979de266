//! Solver options, named as in `jaxopt.PolyakSGD`.

use crate::error::{Error, Result};
use crate::stepsize::Precision;
use std::fmt;
use std::str::FromStr;

/// Which Polyak step-size rule to use (jaxopt's `variant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Variant {
    /// `min((value - fun_min) / (sqnorm + delta), max_stepsize)`.
    #[default]
    SpsMax,
    /// `0` if `sqnorm <= eps`, else `max((value - fun_min) / sqnorm, 0)`; ignores
    /// `max_stepsize` and `delta`.
    SpsPlus,
}

impl FromStr for Variant {
    type Err = Error;
    /// Parses jaxopt's spelling: `"SPS_max"` or `"SPS+"`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "SPS_max" => Ok(Variant::SpsMax),
            "SPS+" => Ok(Variant::SpsPlus),
            other => Err(Error::UnknownVariant(other.to_string())),
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Variant::SpsMax => "SPS_max",
            Variant::SpsPlus => "SPS+",
        })
    }
}

/// What to do when the loss, the squared gradient norm or the step size of a step
/// is NaN or infinite. This is checked before the update runs: on the CPU under
/// [`StepSizeMode::Host`], on the GPU under [`StepSizeMode::Device`]. An update
/// that would overflow from finite inputs is caught only with
/// [`PolyakConfig::check_overflow`], and then handled the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum NonFinitePolicy {
    /// Refuse the step with [`Error::NonFinite`]; parameters and velocity stay as they
    /// were. The default: a NaN never reaches the parameters through this optimizer.
    #[default]
    Refuse,
    /// Do what jaxopt does: apply the step anyway, so NaN spreads into the parameters
    /// (e.g. the 0/0 step at an exact optimum with `delta = 0`). Used by the
    /// conformance runner.
    Propagate,
    /// Skip the step and go on, as a training loop over noisy batches wants: the
    /// parameters and velocity stay as they were, `update` returns the state with
    /// `iter_num` unchanged, `num_skipped` one higher and the step's non-finite
    /// value, error and step size; `run_iterator` moves on to the next batch. `run`
    /// stops where jaxopt's would (a NaN `error` ends its loop) or after `maxiter`
    /// evaluations.
    Skip,
}

/// Where the step size of each update is computed. Not a jaxopt option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepSizeMode {
    /// On the CPU, in f64 from the loss and squared norm, then rounded to the
    /// parameters' precision. A step is two submissions: the objective and the norm,
    /// a wait for the readback, then the update. The default.
    #[default]
    Host,
    /// On the GPU, in the parameters' precision (f32 as jaxopt's float32 path
    /// computes it, or f64), by the kernel that finishes the norm; the update reads
    /// it there. A step is one submission and one wait for the readback of loss,
    /// squared norm, step size and verdict: less fixed cost per step at small N. The
    /// non-finite check is made on the GPU too: a refused step writes nothing. In f32
    /// the step may differ from `Host`'s by an f32 rounding or two (the order of the
    /// f32 operations and WGSL's division); a [`crate::Loss::Host`] value is rounded
    /// to the parameters' precision before it enters the rule.
    Device,
}

/// The precision of the parameters, the gradient, the velocity and the step-size
/// arithmetic on the GPU. Not a jaxopt option (jaxopt follows the parameters' dtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ParamDtype {
    /// f32: jaxopt's float32 path. The default.
    #[default]
    F32,
    /// f64: jaxopt's float64 path (`jax_enable_x64`), on adapters with the
    /// `SHADER_F64` feature ([`crate::GpuContext::new`] asks for it where the adapter
    /// has it). Twice the memory and traffic of f32; GPUs other than data-center
    /// ones run f64 arithmetic slowly, but a step is memory-bound. Use the `_f64`
    /// upload and download methods to move values exactly; objectives write f64
    /// gradients and an f64 loss.
    F64,
}

impl ParamDtype {
    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            ParamDtype::F32 => 4,
            ParamDtype::F64 => 8,
        }
    }

    /// The matching [`Precision`] of the CPU rule (and of SPS+'s eps).
    pub fn precision(self) -> Precision {
        match self {
            ParamDtype::F32 => Precision::F32,
            ParamDtype::F64 => Precision::F64,
        }
    }
}

/// How the velocity is stored (momentum only). Not a jaxopt option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum VelocityDtype {
    /// The parameters' precision (f32, or f64 with [`ParamDtype::F64`]): with f32, 24
    /// bytes of traffic per parameter and step. The default.
    #[default]
    Full,
    /// f16 (IEEE half, rounded to nearest): 2 bytes less memory and 4 bytes less
    /// traffic per parameter (20 per step). The update still computes in f32 and adds
    /// the unrounded velocity to the parameters; only the stored velocity is rounded,
    /// so magnitudes under about 6e-5 lose precision and under 6e-8 become 0, and
    /// magnitudes over 65504 are stored as +-65504 (saturated, never infinite). Needs
    /// the device feature `SHADER_F16` ([`crate::GpuContext::new`] asks for it where
    /// the adapter has it).
    F16,
}

impl VelocityDtype {
    /// Bytes per element next to parameters of `params`.
    pub fn bytes(self, params: ParamDtype) -> u64 {
        match self {
            VelocityDtype::Full => params.bytes(),
            VelocityDtype::F16 => 2,
        }
    }
}

/// The most steps a pipelined run submits per wait: each takes a readback slot (16
/// bytes, 32 with f64 parameters, half as much again with the overflow check)
/// allocated with the optimizer.
pub const MAX_SYNC_EVERY: usize = 65_536;

/// Options of the Polyak SGD solver, with jaxopt 0.8.5's defaults.
///
/// ```
/// use polyak_gpu::{PolyakConfig, Variant};
/// let config = PolyakConfig::default()
///     .momentum(0.9)
///     .max_stepsize(0.5)
///     .variant(Variant::SpsMax)
///     .maxiter(100);
/// assert!(config.validate().is_ok());
/// assert!(PolyakConfig::default().momentum(1.0).validate().is_err());
/// ```
///
/// Build it from `default()` with the setters (or assign its fields): new options
/// may come in later versions, so it cannot be written as a struct literal.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PolyakConfig {
    /// Upper bound on the step size (SPS_max only). Default 1.0.
    pub max_stepsize: f64,
    /// Added to the squared norm in the SPS_max denominator. Default 0.0.
    pub delta: f64,
    /// Heavy-ball momentum in `[0, 1)`. 0 (the default) keeps no velocity at all.
    pub momentum: f64,
    /// Estimate of the optimal loss value. Default 0.0.
    pub fun_min: f64,
    /// Step-size rule. Default SPS_max.
    pub variant: Variant,
    /// Maximum number of updates in `run` / `run_iterator`. Default 500.
    pub maxiter: usize,
    /// `run` stops once the gradient norm is not above this. Default 1e-3.
    pub tol: f64,
    /// Log every iteration through the `log` crate (at `info` level).
    pub verbose: bool,
    /// What to do with a non-finite loss, norm or step size. Default: refuse.
    pub nonfinite: NonFinitePolicy,
    /// Where the step size is computed. Default: on the host.
    pub stepsize_mode: StepSizeMode,
    /// Under [`StepSizeMode::Device`], how many steps `run` and `run_iterator` submit
    /// before they wait for the scalars of those steps. Default 1 (a wait per step).
    /// Above 1 the GPU keeps going while the CPU records the next steps: once a step
    /// is refused or `run`'s stopping rule holds, the GPU skips the later steps
    /// already submitted, so the results are those of waiting every step, but the
    /// objective may be called up to `sync_every - 1` times past the last step (its
    /// kernels run, their gradients are ignored) and `run_iterator` may take as many
    /// batches more from its iterator. Ignored when a `pre_update` hook is set.
    pub sync_every: usize,
    /// How the velocity is stored. Default: like the parameters.
    pub velocity_dtype: VelocityDtype,
    /// The precision of parameters, gradients and the GPU's arithmetic. Default f32.
    pub dtype: ParamDtype,
    /// Also refuse (or skip, under [`NonFinitePolicy::Skip`]) a step whose update
    /// would write a NaN or an infinity into the parameters or the velocity from
    /// finite inputs: an overflow of `p + v` or of `momentum * v - step * g`, or
    /// parameters or velocity already non-finite. Not a jaxopt option. The norm
    /// pass then also reads the parameters and the velocity (8 more bytes per
    /// parameter with momentum, 4 without) and finds the step sizes for which every
    /// updated value stays within 99.9% of the largest finite value; a step outside
    /// them is [`Error::NonFiniteUpdate`]. Default off: the check of the loss, norm
    /// and step alone cannot see these. Needs a policy that refuses or skips, and
    /// the optimizer's own norm pass (not
    /// [`crate::PolyakSgdBuilder::norm_from_objective`]).
    pub check_overflow: bool,
}

impl Default for PolyakConfig {
    fn default() -> Self {
        PolyakConfig {
            max_stepsize: 1.0,
            delta: 0.0,
            momentum: 0.0,
            fun_min: 0.0,
            variant: Variant::SpsMax,
            maxiter: 500,
            tol: 1e-3,
            verbose: false,
            nonfinite: NonFinitePolicy::Refuse,
            stepsize_mode: StepSizeMode::Host,
            sync_every: 1,
            velocity_dtype: VelocityDtype::Full,
            dtype: ParamDtype::F32,
            check_overflow: false,
        }
    }
}

impl PolyakConfig {
    /// Sets `max_stepsize`.
    pub fn max_stepsize(mut self, v: f64) -> Self {
        self.max_stepsize = v;
        self
    }
    /// Sets `delta`.
    pub fn delta(mut self, v: f64) -> Self {
        self.delta = v;
        self
    }
    /// Sets `momentum`.
    pub fn momentum(mut self, v: f64) -> Self {
        self.momentum = v;
        self
    }
    /// Sets `fun_min`.
    pub fn fun_min(mut self, v: f64) -> Self {
        self.fun_min = v;
        self
    }
    /// Sets `variant`.
    pub fn variant(mut self, v: Variant) -> Self {
        self.variant = v;
        self
    }
    /// Sets `maxiter`.
    pub fn maxiter(mut self, v: usize) -> Self {
        self.maxiter = v;
        self
    }
    /// Sets `tol`.
    pub fn tol(mut self, v: f64) -> Self {
        self.tol = v;
        self
    }
    /// Sets `verbose`.
    pub fn verbose(mut self, v: bool) -> Self {
        self.verbose = v;
        self
    }
    /// Sets the non-finite policy (not a jaxopt option; see [`NonFinitePolicy`]).
    pub fn nonfinite(mut self, v: NonFinitePolicy) -> Self {
        self.nonfinite = v;
        self
    }

    /// Sets where the step size is computed (not a jaxopt option; see
    /// [`StepSizeMode`]).
    pub fn stepsize_mode(mut self, v: StepSizeMode) -> Self {
        self.stepsize_mode = v;
        self
    }

    /// Sets how many steps `run` and `run_iterator` submit per wait (not a jaxopt
    /// option; needs [`StepSizeMode::Device`] above 1; at most
    /// [`MAX_SYNC_EVERY`]).
    pub fn sync_every(mut self, v: usize) -> Self {
        self.sync_every = v;
        self
    }

    /// Sets how the velocity is stored (not a jaxopt option; see [`VelocityDtype`]).
    pub fn velocity_dtype(mut self, v: VelocityDtype) -> Self {
        self.velocity_dtype = v;
        self
    }

    /// Sets the precision of parameters, gradients and the GPU's arithmetic (not a
    /// jaxopt option; see [`ParamDtype`]).
    pub fn dtype(mut self, v: ParamDtype) -> Self {
        self.dtype = v;
        self
    }

    /// Sets whether a step whose update would write a NaN or an infinity from
    /// finite inputs is refused too (not a jaxopt option; see
    /// [`PolyakConfig::check_overflow`]).
    pub fn check_overflow(mut self, v: bool) -> Self {
        self.check_overflow = v;
        self
    }

    /// Bytes per velocity element the optimizer allocates: 0 without momentum.
    pub(crate) fn velocity_bytes(&self) -> u64 {
        if self.momentum == 0.0 {
            0
        } else {
            self.velocity_dtype.bytes(self.dtype)
        }
    }

    /// Checks that this configuration fits an optimizer built with `built`, whose
    /// buffers and kernels it cannot change: the same `dtype`, momentum zero or not
    /// as before (and the same `velocity_dtype` with it), the same
    /// `check_overflow`, and `sync_every` at most `slots` (its readback slots).
    pub(crate) fn fits(&self, built: &PolyakConfig, slots: usize) -> Result<()> {
        if self.dtype != built.dtype {
            return invalid(
                "dtype",
                format!("{:?}", self.dtype),
                "fixed when the optimizer is built",
            );
        }
        if (self.momentum == 0.0) != (built.momentum == 0.0) {
            return invalid(
                "momentum",
                self.momentum.to_string(),
                "may change, but not to or from 0 (the velocity is allocated at build)",
            );
        }
        if self.velocity_bytes() != built.velocity_bytes() {
            return invalid(
                "velocity_dtype",
                format!("{:?}", self.velocity_dtype),
                "fixed when the optimizer is built",
            );
        }
        if self.check_overflow != built.check_overflow {
            return invalid(
                "check_overflow",
                self.check_overflow.to_string(),
                "fixed when the optimizer is built (it has its own norm kernel)",
            );
        }
        if self.sync_every > slots {
            return invalid(
                "sync_every",
                self.sync_every.to_string(),
                "at most the value the optimizer was built with (its readback slots)",
            );
        }
        Ok(())
    }

    /// Checks every option's domain; the solvers call this before doing anything.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.momentum) {
            return invalid("momentum", self.momentum, "must be in [0, 1)");
        }
        if !(self.delta >= 0.0 && self.delta.is_finite()) {
            return invalid("delta", self.delta, "must be finite and >= 0");
        }
        if self.max_stepsize.is_nan() || self.max_stepsize <= 0.0 {
            return invalid("max_stepsize", self.max_stepsize, "must be > 0 (not NaN)");
        }
        if self.fun_min.is_nan() {
            return invalid("fun_min", self.fun_min, "must not be NaN");
        }
        if self.tol.is_nan() {
            return invalid("tol", self.tol, "must not be NaN");
        }
        if self.dtype == ParamDtype::F64 && self.velocity_dtype == VelocityDtype::F16 {
            return invalid(
                "velocity_dtype",
                16.0,
                "an f16 velocity goes with f32 parameters only",
            );
        }
        if self.sync_every == 0 || self.sync_every > MAX_SYNC_EVERY {
            return invalid(
                "sync_every",
                self.sync_every as f64,
                "must be in 1..=65536 (a readback slot per step)",
            );
        }
        if self.sync_every > 1 && self.stepsize_mode != StepSizeMode::Device {
            return invalid(
                "sync_every",
                self.sync_every as f64,
                "above 1 needs stepsize_mode Device (the host rule waits every step)",
            );
        }
        if self.check_overflow && self.nonfinite == NonFinitePolicy::Propagate {
            return invalid(
                "check_overflow",
                true,
                "refuses or skips steps: not with NonFinitePolicy::Propagate",
            );
        }
        Ok(())
    }
}

/// [`Error::InvalidOption`] for `option` at `value`.
fn invalid(option: &'static str, value: impl ToString, reason: &'static str) -> Result<()> {
    Err(Error::InvalidOption {
        option,
        value: value.to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_parses_jaxopt_names_only() {
        assert_eq!("SPS_max".parse::<Variant>().unwrap(), Variant::SpsMax);
        assert_eq!("SPS+".parse::<Variant>().unwrap(), Variant::SpsPlus);
        assert!(matches!(
            "sps_max".parse::<Variant>(),
            Err(Error::UnknownVariant(s)) if s == "sps_max"
        ));
        assert_eq!(Variant::SpsPlus.to_string(), "SPS+");
    }

    #[test]
    fn validate_rejects_each_bad_option() {
        let c = PolyakConfig::default;
        assert!(c().validate().is_ok());
        assert!(c().momentum(0.999).validate().is_ok());
        let option_of = |cfg: PolyakConfig| match cfg.validate() {
            Err(Error::InvalidOption { option, .. }) => option,
            other => panic!("expected InvalidOption, got {other:?}"),
        };
        assert_eq!(option_of(c().momentum(1.0)), "momentum");
        assert_eq!(option_of(c().momentum(-0.1)), "momentum");
        assert_eq!(option_of(c().momentum(f64::NAN)), "momentum");
        assert_eq!(option_of(c().delta(-1e-9)), "delta");
        assert_eq!(option_of(c().delta(f64::INFINITY)), "delta");
        assert_eq!(option_of(c().max_stepsize(0.0)), "max_stepsize");
        assert_eq!(option_of(c().max_stepsize(f64::NAN)), "max_stepsize");
        assert_eq!(option_of(c().fun_min(f64::NAN)), "fun_min");
        assert_eq!(option_of(c().tol(f64::NAN)), "tol");
        assert_eq!(option_of(c().sync_every(0)), "sync_every");
        let device = || c().stepsize_mode(StepSizeMode::Device);
        assert!(device().sync_every(MAX_SYNC_EVERY).validate().is_ok());
        assert_eq!(
            option_of(device().sync_every(MAX_SYNC_EVERY + 1)),
            "sync_every"
        );
        assert_eq!(option_of(device().sync_every(usize::MAX)), "sync_every");
        assert_eq!(option_of(c().sync_every(8)), "sync_every");
        let propagate = || c().nonfinite(NonFinitePolicy::Propagate);
        assert_eq!(
            option_of(propagate().check_overflow(true)),
            "check_overflow"
        );
        assert!(propagate().validate().is_ok());
        assert!(c().check_overflow(true).validate().is_ok());
        assert!(
            c().sync_every(8)
                .stepsize_mode(StepSizeMode::Device)
                .validate()
                .is_ok()
        );
    }
}
