//! # polyak-gpu
//!
//! SGD with the Polyak step size on the GPU through wgpu compute shaders, with the
//! semantics of `jaxopt.PolyakSGD` (jaxopt 0.8.5).
//!
//! Parameters, gradients and velocity live in GPU storage buffers. Two WGSL kernels
//! compute the squared gradient norm (per-workgroup partials, then one workgroup
//! sums them) and one does the fused momentum/Polyak update. Only the loss and the
//! squared norm come back to the CPU, where [`polyak_stepsize`] computes the step
//! (or, under [`StepSizeMode::Device`], the kernel that finishes the norm computes it
//! and the update runs in the same submission: one round trip per step). Everything
//! runs in f32 or, with [`ParamDtype::F64`], in f64.
//!
//! - [`GpuContext`]: the headless device (or one you already have).
//! - [`PolyakConfig`]: jaxopt's options, with `Default` and builder setters.
//! - [`PolyakSgd`]: `init_state`, `update`, `run`, `run_iterator`,
//!   `l2_optimality_error`; `update_batches` (epochs of a training loop);
//!   `set_config` (schedules); `save_checkpoint` / `load_checkpoint`.
//! - [`ExternalTensor`]: tensors whose buffers you own, updated in place; many of
//!   them laid back to back in one pair of buffers form a run, which costs what one
//!   tensor costs.
//! - Options beyond jaxopt's: [`StepSizeMode`], `sync_every` (pipelined runs),
//!   [`NonFinitePolicy`] with [`PolyakConfig::check_overflow`] (steps whose update
//!   would overflow), [`ParamDtype`] (f32 or f64), [`VelocityDtype`] (f16
//!   velocity), and [`PolyakSgdBuilder::norm_from_objective`] for a gradient kernel
//!   that computes the norm itself.
//! - [`reference::CpuPolyakSgd`]: the same algorithm in f64 on the CPU, for tests and
//!   as a baseline; never used as a fallback.
//! - [`conformance`]: replays jaxopt's recorded trajectories.

#![warn(missing_docs)]

pub mod bench;
pub mod buffers;
mod checkpoint;
pub mod config;
pub mod conformance;
pub mod context;
pub mod error;
pub mod evaluation;
mod kernels;
pub mod layout;
mod pipeline;
pub mod reference;
mod scalars;
pub mod solver;
pub mod state;
pub mod stepsize;

pub use buffers::{ExternalTensor, ParamBuffers};
pub use config::{NonFinitePolicy, ParamDtype, PolyakConfig, StepSizeMode, Variant, VelocityDtype};
pub use context::{
    AdapterChoice, ContextOptions, DEFAULT_ONE_PASS_LIMIT, DEFAULT_WAIT_TIMEOUT, GpuContext,
    WaitMode,
};
pub use error::{Error, Result};
pub use evaluation::Evaluation;
pub use layout::{Layout, TensorId, TensorKey, TensorSpec};
pub use solver::{PhaseTimes, PolyakSgd, PolyakSgdBuilder, PreUpdate};
pub use state::{Loss, State};
pub use stepsize::{Precision, polyak_stepsize};

/// The README's Rust examples, compiled as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

// What a training loop needs of these types, checked when the crate compiles: an
// optimizer moves to another thread (or behind a `Mutex`), a context is shared
// between threads, and errors go into `Box<dyn Error + Send + Sync>` or `anyhow`.
const _: () = {
    const fn send<T: Send>() {}
    const fn shared<T: Send + Sync>() {}
    send::<PolyakSgd>();
    send::<State<()>>();
    shared::<GpuContext>();
    shared::<PolyakConfig>();
    shared::<Error>();
};
