//! The Polyak step-size rule: a pure function of the loss and the squared norm.

use crate::config::{PolyakConfig, Variant};

/// Machine epsilon of the working precision, used by SPS+'s guard
/// (`jnp.finfo(dtype).eps`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Precision {
    /// f32 parameters (the GPU path): eps = 1.1920929e-07.
    F32,
    /// f64 parameters (the CPU reference): eps = 2.220446049250313e-16.
    F64,
}

impl Precision {
    /// `jnp.finfo(dtype).eps` as f64.
    pub fn eps(self) -> f64 {
        match self {
            Precision::F32 => f32::EPSILON as f64,
            Precision::F64 => f64::EPSILON,
        }
    }

    /// Rounds a value to this precision ("gamma is cast to the params dtype").
    pub fn round(self, x: f64) -> f64 {
        match self {
            Precision::F32 => x as f32 as f64,
            Precision::F64 => x,
        }
    }
}

/// `jnp.minimum`: NaN if either side is NaN (unlike `f64::min`).
fn nan_min(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}

/// `jnp.maximum`: NaN if either side is NaN.
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Polyak step size for loss `value` and squared gradient norm `sqnorm`, computed in
/// f64 and rounded to `precision`, exactly as jaxopt 0.8.5's `PolyakSGD.update`:
///
/// - SPS_max: `min((value - fun_min) / (sqnorm + delta), max_stepsize)`
/// - SPS+: `0` if `sqnorm <= eps`, else `max((value - fun_min) / sqnorm, 0)`
///
/// NaN propagates as in `jnp.minimum` / `jnp.maximum`; no clamping of negative steps
/// (a `fun_min` above the true minimum gives negative steps under SPS_max).
///
/// ```
/// use polyak_gpu::{polyak_stepsize, PolyakConfig, Precision};
/// let cfg = PolyakConfig::default();
/// assert_eq!(polyak_stepsize(2.0, 4.0, &cfg, Precision::F64), 0.5);
/// assert_eq!(polyak_stepsize(8.0, 4.0, &cfg, Precision::F64), 1.0); // capped
/// assert!(polyak_stepsize(0.0, 0.0, &cfg, Precision::F64).is_nan()); // 0/0 as in jaxopt
/// ```
pub fn polyak_stepsize(
    value: f64,
    sqnorm: f64,
    config: &PolyakConfig,
    precision: Precision,
) -> f64 {
    let gap = value - config.fun_min;
    let gamma = match config.variant {
        Variant::SpsMax => nan_min(gap / (sqnorm + config.delta), config.max_stepsize),
        Variant::SpsPlus => {
            if sqnorm <= precision.eps() {
                0.0
            } else {
                nan_max(gap / sqnorm, 0.0)
            }
        }
    };
    precision.round(gamma)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolyakConfig;

    const F64: Precision = Precision::F64;

    #[test]
    fn sps_max_ratio_and_cap() {
        let c = PolyakConfig::default().max_stepsize(2.0);
        assert_eq!(polyak_stepsize(3.0, 4.0, &c, F64), 0.75);
        assert_eq!(polyak_stepsize(30.0, 4.0, &c, F64), 2.0);
        let c = c.fun_min(1.0).delta(1.0);
        assert_eq!(polyak_stepsize(3.0, 3.0, &c, F64), 0.5);
    }

    #[test]
    fn sps_max_negative_gap_is_not_clamped() {
        let c = PolyakConfig::default().fun_min(5.0);
        assert_eq!(polyak_stepsize(3.0, 4.0, &c, F64), -0.5);
    }

    #[test]
    fn sps_max_nan_propagates_like_jnp_minimum() {
        let c = PolyakConfig::default();
        assert!(polyak_stepsize(0.0, 0.0, &c, F64).is_nan());
        assert!(polyak_stepsize(f64::NAN, 1.0, &c, F64).is_nan());
        assert!(polyak_stepsize(1.0, f64::NAN, &c, F64).is_nan());
        // with delta the 0/0 is gone: gamma = 0/delta = 0
        assert_eq!(polyak_stepsize(0.0, 0.0, &c.clone().delta(1e-3), F64), 0.0);
        // an infinite ratio is capped; an infinite loss gives max_stepsize
        assert_eq!(polyak_stepsize(1.0, 0.0, &c, F64), 1.0);
        assert_eq!(polyak_stepsize(f64::INFINITY, 1.0, &c, F64), 1.0);
    }

    #[test]
    fn sps_plus_eps_guard_depends_on_precision() {
        let c = PolyakConfig::default()
            .variant(Variant::SpsPlus)
            .max_stepsize(0.1);
        // max_stepsize ignored
        assert_eq!(polyak_stepsize(3.0, 2.0, &c, F64), 1.5);
        // negative gap clamps to 0
        assert_eq!(polyak_stepsize(1.0, 2.0, &c.clone().fun_min(3.0), F64), 0.0);
        // sqnorm just below f32 eps: 0 in f32, a huge step in f64
        let s = 1.0e-7;
        assert_eq!(polyak_stepsize(1.0, s, &c, Precision::F32), 0.0);
        assert_eq!(polyak_stepsize(1.0, s, &c, F64), 1.0e7);
        assert_eq!(polyak_stepsize(0.0, 0.0, &c, F64), 0.0);
        assert!(polyak_stepsize(f64::NAN, 1.0, &c, F64).is_nan());
    }

    #[test]
    fn f32_rounding_of_the_step() {
        let c = PolyakConfig::default();
        let g = polyak_stepsize(1.0, 3.0, &c, Precision::F32);
        assert_eq!(g, (1.0f64 / 3.0) as f32 as f64);
        assert_ne!(g, 1.0 / 3.0);
        let c = PolyakConfig::default().max_stepsize(0.01);
        assert_eq!(
            polyak_stepsize(5.0, 1.0, &c, Precision::F32),
            0.01f32 as f64
        );
    }
}
