//! What the objective sees while it computes the loss and the gradient.

use crate::buffers::ParamBuffers;
use crate::context::GpuContext;
use crate::error::Result;

/// Handed to the objective once per evaluation.
///
/// A GPU objective records its forward/backward dispatches into [`Evaluation::encoder`]
/// (they run in the same submission as the norm, before it), reading the parameters
/// and writing the gradient through bind groups it made once from
/// [`ParamBuffers::params_bindings`] / [`ParamBuffers::grads_bindings`].
///
/// A small problem may instead use the host path: [`Evaluation::read_params`] and
/// [`Evaluation::write_grads`]. That copies the parameters through the CPU every step,
/// so it is meant for tests and toy sizes only.
pub struct Evaluation<'a> {
    pub(crate) ctx: &'a GpuContext,
    pub(crate) buffers: &'a ParamBuffers,
    pub(crate) encoder: &'a mut wgpu::CommandEncoder,
}

impl<'a> Evaluation<'a> {
    /// The device context.
    pub fn context(&self) -> &GpuContext {
        self.ctx
    }

    /// The optimizer's buffers (parameters, gradients, loss slot).
    pub fn buffers(&self) -> &ParamBuffers {
        self.buffers
    }

    /// The command encoder of this step's first submission; record the gradient
    /// kernels here.
    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.encoder
    }

    /// Host path: the current parameters, tensors concatenated in layout order
    /// (rounded to f32 with f64 parameters: use [`Evaluation::read_params_f64`]).
    pub fn read_params(&self) -> Result<Vec<f32>> {
        self.buffers.download_params()
    }

    /// Host path: sets the whole gradient (tensors concatenated in layout order).
    pub fn write_grads(&self, grads: &[f32]) -> Result<()> {
        self.buffers.upload_grads(grads)
    }

    /// Host path in f64 (exact with [`crate::ParamDtype::F64`]): the parameters.
    pub fn read_params_f64(&self) -> Result<Vec<f64>> {
        self.buffers.download_params_f64()
    }

    /// Host path in f64: sets the whole gradient.
    pub fn write_grads_f64(&self, grads: &[f64]) -> Result<()> {
        self.buffers.upload_grads_f64(grads)
    }
}
