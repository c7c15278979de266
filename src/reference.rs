//! The same algorithm in f64 on the CPU: the yardstick for the GPU path in tests and
//! the baseline in benchmarks. It is never used in place of the GPU path.

use crate::config::{NonFinitePolicy, PolyakConfig};
use crate::error::{Error, Result};
use crate::state::State;
use crate::stepsize::{Precision, polyak_stepsize};

/// Squared L2 norm, summed in order in f64.
pub fn sqnorm_f64(g: &[f64]) -> f64 {
    g.iter().map(|x| x * x).sum()
}

/// jaxopt's `PolyakSGD` in f64. The objective writes the gradient at `params` into
/// its second argument and returns `(loss, aux)`.
///
/// ```
/// use polyak_gpu::{reference::CpuPolyakSgd, PolyakConfig};
/// let mut opt = CpuPolyakSgd::new(PolyakConfig::default(), vec![3.0, -1.0]).unwrap();
/// let state = opt
///     .run(|x: &[f64], g: &mut [f64]| {
///         g.copy_from_slice(x);
///         Ok((0.5 * (x[0] * x[0] + x[1] * x[1]), ()))
///     })
///     .unwrap();
/// // for 0.5|x|^2 the Polyak step is always 0.5: x halves until |x| <= tol
/// assert_eq!(state.iter_num, 13);
/// assert_eq!(opt.params(), &[3.0 / 8192.0, -1.0 / 8192.0]);
/// ```
#[derive(Debug, Clone)]
pub struct CpuPolyakSgd {
    config: PolyakConfig,
    params: Vec<f64>,
    velocity: Option<Vec<f64>>,
    grad: Vec<f64>,
}

impl CpuPolyakSgd {
    /// Starts at `init_params`.
    pub fn new(config: PolyakConfig, init_params: Vec<f64>) -> Result<Self> {
        config.validate()?;
        if init_params.is_empty() {
            return Err(Error::EmptyParameters("init_params".into()));
        }
        let n = init_params.len();
        Ok(CpuPolyakSgd {
            velocity: (config.momentum != 0.0).then(|| vec![0.0; n]),
            config,
            params: init_params,
            grad: vec![0.0; n],
        })
    }

    /// The current parameters.
    pub fn params(&self) -> &[f64] {
        &self.params
    }

    /// Replaces the parameters.
    pub fn set_params(&mut self, p: &[f64]) -> Result<()> {
        if p.len() != self.params.len() {
            return Err(Error::LengthMismatch {
                what: "parameters".into(),
                expected: self.params.len(),
                got: p.len(),
            });
        }
        self.params.copy_from_slice(p);
        Ok(())
    }

    /// The velocity (`None` when momentum is 0).
    pub fn velocity(&self) -> Option<&[f64]> {
        self.velocity.as_deref()
    }

    /// The options.
    pub fn config(&self) -> &PolyakConfig {
        &self.config
    }

    /// jaxopt's `init_state`: one evaluation (for `aux`), velocity zeroed.
    pub fn init_state<A>(
        &mut self,
        f: impl FnOnce(&[f64], &mut [f64]) -> Result<(f64, A)>,
    ) -> Result<State<A>> {
        let (_, aux) = f(&self.params, &mut self.grad)?;
        if let Some(v) = &mut self.velocity {
            v.fill(0.0);
        }
        Ok(State::initial(aux))
    }

    /// jaxopt's `update`, with the same non-finite policy as the GPU path.
    pub fn update<A>(
        &mut self,
        state: &State<A>,
        f: impl FnOnce(&[f64], &mut [f64]) -> Result<(f64, A)>,
    ) -> Result<State<A>> {
        let (value, aux) = f(&self.params, &mut self.grad)?;
        let sqnorm = sqnorm_f64(&self.grad);
        let stepsize = polyak_stepsize(value, sqnorm, &self.config, Precision::F64);
        let finite = value.is_finite() && sqnorm.is_finite() && stepsize.is_finite();
        match self.config.nonfinite {
            _ if finite => {}
            NonFinitePolicy::Refuse => {
                return Err(Error::NonFinite {
                    iter_num: state.iter_num,
                    value,
                    sqnorm,
                    stepsize,
                });
            }
            NonFinitePolicy::Skip => return Ok(state.skipped(value, sqnorm.sqrt(), stepsize, aux)),
            NonFinitePolicy::Propagate => {}
        }
        match &mut self.velocity {
            Some(v) => {
                let m = self.config.momentum;
                for ((p, v), g) in self.params.iter_mut().zip(v.iter_mut()).zip(&self.grad) {
                    *v = m * *v - stepsize * g;
                    *p += *v;
                }
            }
            None => {
                for (p, g) in self.params.iter_mut().zip(&self.grad) {
                    *p += -stepsize * g;
                }
            }
        }
        Ok(state.updated(value, sqnorm.sqrt(), stepsize, aux))
    }

    /// jaxopt's `run` (same stopping rule as [`crate::PolyakSgd::run`]).
    pub fn run<A>(
        &mut self,
        mut f: impl FnMut(&[f64], &mut [f64]) -> Result<(f64, A)>,
    ) -> Result<State<A>> {
        let mut state = self.init_state(&mut f)?;
        for _ in 0..self.config.maxiter {
            state = self.update(&state, &mut f)?;
            if !state.should_continue(self.config.tol) {
                break;
            }
        }
        Ok(state)
    }

    /// jaxopt's `run_iterator` (first batch to `init_state`, then `maxiter` updates).
    pub fn run_iterator<A, B>(
        &mut self,
        mut f: impl FnMut(&[f64], &mut [f64], &B) -> Result<(f64, A)>,
        batches: impl IntoIterator<Item = B>,
    ) -> Result<State<A>> {
        let mut it = batches.into_iter();
        let first = it.next().ok_or(Error::EmptyIterator)?;
        let mut state = self.init_state(|p, g| f(p, g, &first))?;
        for batch in it.take(self.config.maxiter) {
            state = self.update(&state, |p, g| f(p, g, &batch))?;
        }
        Ok(state)
    }

    /// jaxopt's `l2_optimality_error` at the current parameters.
    pub fn l2_optimality_error<A>(
        &mut self,
        f: impl FnOnce(&[f64], &mut [f64]) -> Result<(f64, A)>,
    ) -> Result<f64> {
        f(&self.params, &mut self.grad)?;
        Ok(sqnorm_f64(&self.grad).sqrt())
    }
}
