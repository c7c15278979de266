//! The solver state (jaxopt's `PolyakSGDState`) and the loss an objective reports.

/// State after some number of updates, as in jaxopt's `PolyakSGDState`.
///
/// As in jaxopt, `value` and `error` describe the point the last update started
/// from, not the parameters it produced. The velocity stays on the GPU
/// ([`crate::PolyakSgd::download_velocity`]).
#[derive(Debug, Clone, PartialEq)]
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
        }
    }

    /// Whether `run` goes on after this state: `error > tol` (a NaN error stops it).
    pub fn should_continue(&self, tol: f64) -> bool {
        self.error > tol
    }
}

/// Where the objective put the loss of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    /// The loss, computed on the host.
    Host(f64),
    /// The objective's kernels wrote the loss as one `f32` into the optimizer's loss
    /// slot ([`crate::ParamBuffers::loss_binding`]); it comes back together with the
    /// norm in one 16-byte readback.
    Device,
}
