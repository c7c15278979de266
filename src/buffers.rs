//! The GPU storage of the optimizer: parameters, gradients, velocity and scratch in
//! segments, and the bindings a user's kernels take of them. `external`: tensors
//! whose buffers the user owns; `transfer`: uploads, downloads and readbacks.

use crate::config::PolyakConfig;
use crate::context::GpuContext;
use crate::error::Result;
use crate::layout::{Layout, TensorKey};
use crate::scalars::ScalarSlot;
use std::sync::Mutex;
use wgpu::util::DeviceExt;

mod external;
mod transfer;

pub use external::ExternalTensor;
pub(crate) use external::{check_disjoint, runs as external_runs};
pub(crate) use transfer::{Elem, read_bytes, read_mapped};

/// A range of a buffer: where one segment's vector starts.
#[derive(Debug, Clone)]
pub(crate) struct Region {
    pub buffer: wgpu::Buffer,
    /// Byte offset.
    pub offset: u64,
    /// Bytes per element: 4 (f32), or 2 for an f16 velocity.
    pub elem: u64,
}

impl Region {
    /// The binding of `len` elements from the start of the region.
    pub fn binding(&self, len: usize) -> wgpu::BufferBinding<'_> {
        wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: wgpu::BufferSize::new(len as u64 * self.elem),
        }
    }
}

/// Where an objective that computes the squared gradient norm itself writes it: `count`
/// partial sums, summed in order by the norm's final pass. Before each evaluation the
/// partials are set to NaN from `unwritten`, so one the objective leaves unwritten
/// makes the norm NaN (and the step refused) instead of stale.
#[derive(Debug)]
pub(crate) struct ObjectiveNorm {
    pub partials: wgpu::Buffer,
    unwritten: wgpu::Buffer,
    pub count: u32,
}

/// The three vectors of one segment.
#[derive(Debug)]
pub(crate) struct Segment {
    pub params: Region,
    pub grads: Region,
    /// `None` when momentum is 0: no velocity memory and no velocity traffic.
    pub velocity: Option<Region>,
    /// Length in elements (a multiple of 4).
    pub len: usize,
}

/// Parameters, gradients and velocity on the GPU, laid out by a [`Layout`], plus the
/// scalars slot (loss, squared norm, step size, verdict, halt state, options) and its
/// readback buffer.
///
/// A user's kernels bind tensors through [`ParamBuffers::params_bindings`] and
/// [`ParamBuffers::grads_bindings`] and write the loss through
/// [`ParamBuffers::loss_binding`].
#[derive(Debug)]
pub struct ParamBuffers {
    ctx: GpuContext,
    layout: Layout,
    pub(crate) segments: Vec<Segment>,
    /// Loss, norm, step, verdict, halt state and options (see `scalars.rs`).
    pub(crate) scalars: ScalarSlot,
    /// The squared-norm partials the objective writes, when it computes the norm.
    pub(crate) objective_norm: Option<ObjectiveNorm>,
    /// Bytes per parameter, gradient and scalar: 4 (f32) or 8 (f64).
    real: u64,
    /// A recorded update not yet submitted (deferred updates): it goes out with the
    /// next submission, or alone on [`ParamBuffers::flush`].
    pending: Mutex<Option<wgpu::CommandBuffer>>,
}

/// Bytes of vectors the optimizer allocates for `layout`: parameters and gradients of
/// the segments it owns, and a velocity of `velocity_bytes` per element (0: none)
/// for every segment.
pub(crate) fn vector_bytes(layout: &Layout, real_bytes: u64, velocity_bytes: u64) -> u64 {
    layout
        .segment_lens()
        .iter()
        .zip(layout.external_segments())
        .map(|(&len, ext)| len as u64 * (2 * real_bytes * u64::from(!ext) + velocity_bytes))
        .sum()
}

/// The most elements of `real_bytes` one segment may hold on this device.
pub(crate) fn device_segment_capacity(limits: &wgpu::Limits, real_bytes: u64) -> usize {
    let bytes = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    (bytes / real_bytes) as usize
}

impl ParamBuffers {
    /// Allocates zeroed buffers for the arena segments of `layout` (in `config`'s
    /// precision, with a velocity for every segment where it has momentum) and uses
    /// the user's buffers for the segments of external tensors, given in layout
    /// order.
    pub(crate) fn new(
        ctx: &GpuContext,
        layout: Layout,
        config: &PolyakConfig,
        external: &[ExternalTensor],
        objective_partials: Option<u32>,
    ) -> Self {
        let (real_bytes, velocity_bytes) = (config.dtype.bytes(), config.velocity_bytes());
        let device = ctx.device();
        let storage = |label: &str, bytes: u64| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let own = |len: usize| Region {
            buffer: storage("polyak vector", len as u64 * real_bytes),
            offset: 0,
            elem: real_bytes,
        };
        // Which user region each external segment starts at: the byte of the
        // segment's element 0, which may lie in an earlier tensor of its run.
        let mut user: Vec<Option<(Region, Region)>> = vec![None; layout.segment_lens().len()];
        for (t, ext) in layout.tensors().iter().filter(|t| t.external).zip(external) {
            for p in &t.parts {
                let start = |offset: u64| {
                    offset + p.tensor_offset as u64 * real_bytes - p.offset as u64 * real_bytes
                };
                user[p.segment].get_or_insert_with(|| {
                    (
                        Region {
                            buffer: ext.params.clone(),
                            offset: start(ext.params_offset),
                            elem: real_bytes,
                        },
                        Region {
                            buffer: ext.grads.clone(),
                            offset: start(ext.grads_offset),
                            elem: real_bytes,
                        },
                    )
                });
            }
        }
        let segments = layout
            .segment_lens()
            .iter()
            .zip(user)
            .map(|(&len, user)| {
                let (params, grads) = user.unwrap_or_else(|| (own(len), own(len)));
                Segment {
                    params,
                    grads,
                    velocity: (velocity_bytes > 0).then(|| Region {
                        buffer: storage("polyak velocity", len as u64 * velocity_bytes),
                        offset: 0,
                        elem: velocity_bytes,
                    }),
                    len,
                }
            })
            .collect();
        let scalars = ScalarSlot::new(ctx, real_bytes, config.sync_every, config.check_overflow);
        let objective_norm = objective_partials.map(|count| {
            let unwritten = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("polyak objective norm: NaN"),
                contents: &f64::to_bytes(&vec![f64::NAN; count as usize], real_bytes),
                usage: wgpu::BufferUsages::COPY_SRC,
            });
            ObjectiveNorm {
                partials: storage(
                    "polyak objective norm partials",
                    u64::from(count) * real_bytes,
                ),
                unwritten,
                count,
            }
        });
        ParamBuffers {
            ctx: ctx.clone(),
            layout,
            segments,
            scalars,
            objective_norm,
            real: real_bytes,
            pending: Mutex::new(None),
        }
    }

    /// Bytes per parameter, gradient and scalar: 4 (f32) or 8 (f64).
    pub(crate) fn real_bytes(&self) -> u64 {
        self.real
    }

    /// Submits a deferred update, if one is waiting, so that work submitted next
    /// sees the updated parameters. Every method here that reads or writes a vector
    /// does this first; call it before submitting your own work that reads the
    /// parameters outside the objective when updates are deferred.
    ///
    /// [`Error::Validation`](crate::Error::Validation) if wgpu rejects the update
    /// (a user buffer destroyed since it was recorded); it is then dropped.
    pub fn flush(&self) -> Result<()> {
        let pending = self.pending.lock().map(|mut p| p.take()).unwrap_or(None);
        match pending {
            Some(cb) => self.ctx.checked(|| self.ctx.queue().submit([cb])).map(drop),
            None => Ok(()),
        }
    }

    /// Keeps `cb` to go out with the next submission.
    pub(crate) fn defer(&self, cb: wgpu::CommandBuffer) -> Result<()> {
        self.flush()?;
        if let Ok(mut p) = self.pending.lock() {
            *p = Some(cb);
        }
        Ok(())
    }

    /// Whether a deferred update waits for the next submission.
    pub(crate) fn has_pending(&self) -> bool {
        self.pending.lock().is_ok_and(|p| p.is_some())
    }

    /// Submits `cb` after any deferred update, in one submission.
    pub(crate) fn submit(&self, cb: wgpu::CommandBuffer) {
        let pending = self.pending.lock().map(|mut p| p.take()).unwrap_or(None);
        self.ctx.queue().submit(pending.into_iter().chain([cb]));
    }

    /// The tensor layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Logical number of parameters (sum of tensor lengths).
    pub fn num_params(&self) -> usize {
        self.layout.num_params()
    }

    /// Whether a velocity buffer exists (momentum != 0).
    pub fn has_velocity(&self) -> bool {
        self.segments.iter().any(|s| s.velocity.is_some())
    }

    /// Bytes of device memory this optimizer allocated for vectors: parameters and
    /// gradients of the tensors it owns, and the velocity (user-owned buffers and the
    /// few-KiB scratch of the norm are not counted).
    pub fn device_bytes(&self) -> u64 {
        let velocity = self.segments.first().and_then(|s| s.velocity.as_ref());
        vector_bytes(&self.layout, self.real, velocity.map_or(0, |v| v.elem))
    }

    /// Bytes of the scalars slot and its readback buffer, and of the objective's
    /// norm partials.
    pub(crate) fn scalar_bytes(&self) -> u64 {
        let objective = self
            .objective_norm
            .as_ref()
            .map_or(0, |o| o.partials.size() + o.unwritten.size());
        self.scalars.bytes() + objective
    }

    /// Where the objective writes the squared gradient norm, when the optimizer was
    /// built with [`crate::PolyakSgdBuilder::norm_from_objective`]: that many f32
    /// partial sums of `g_i^2`, over disjoint shares that together cover every
    /// gradient element, each written once per evaluation. The optimizer sums them
    /// in order and reads the gradient no more (20 bytes per parameter with
    /// momentum instead of 24). A partial left unwritten reads as NaN, so the step
    /// is refused rather than taken with a wrong norm. `None` otherwise.
    pub fn norm_partials_binding(&self) -> Option<wgpu::BufferBinding<'_>> {
        self.objective_norm
            .as_ref()
            .map(|o| o.partials.as_entire_buffer_binding())
    }

    /// Records the NaN fill of the objective's norm partials, where it computes the
    /// norm, before each evaluation. (The loss needs none: the norm pass that
    /// reads it sets it to NaN.)
    pub(crate) fn encode_unwritten_partials(&self, encoder: &mut wgpu::CommandEncoder) {
        if let Some(o) = &self.objective_norm {
            encoder.copy_buffer_to_buffer(&o.unwritten, 0, &o.partials, 0, o.partials.size());
        }
    }

    /// Records the NaN fill of what the objective writes besides the gradient (the
    /// loss and, if it computes the norm, its partials) after an evaluation that no
    /// norm pass follows (`init_state`).
    pub(crate) fn encode_unwritten(&self, encoder: &mut wgpu::CommandEncoder) {
        self.scalars.encode_unwritten_loss(encoder);
        self.encode_unwritten_partials(encoder);
    }

    /// The slot the objective's kernel writes the loss into (one `f32`, or one `f64`
    /// with f64 parameters), for [`crate::Loss::Device`]. It is NaN until the
    /// objective writes it (the norm pass sets it to NaN again once read), so a
    /// loss left unwritten refuses the step (a non-finite value) instead of
    /// reusing the last one.
    pub fn loss_binding(&self) -> wgpu::BufferBinding<'_> {
        self.scalars.loss_binding()
    }

    /// The buffer holding the loss at offset 0 (f32, or f64 with f64 parameters; for
    /// copying a loss computed elsewhere there), then the optimizer's own scalars
    /// (the loss the last step used, squared norm, step size, verdict, halt state,
    /// options).
    pub fn scalars_buffer(&self) -> &wgpu::Buffer {
        &self.scalars.buffer
    }

    fn bindings<'a>(
        &'a self,
        key: impl TensorKey,
        pick: impl Fn(&'a Segment) -> &'a Region,
    ) -> Result<Vec<wgpu::BufferBinding<'a>>> {
        let t = self.layout.tensor(key)?;
        Ok(t.parts
            .iter()
            .map(|p| {
                let r = pick(&self.segments[p.segment]);
                wgpu::BufferBinding {
                    buffer: &r.buffer,
                    offset: r.offset + p.offset as u64 * r.elem,
                    size: wgpu::BufferSize::new(p.len as u64 * r.elem),
                }
            })
            .collect())
    }

    /// Bindings of tensor `name`'s parameters: one per piece (one unless the tensor is
    /// larger than a segment), each of its piece's elements in the parameters'
    /// precision (f32, or f64 with [`crate::ParamDtype::F64`]). Offsets of the
    /// optimizer's own tensors respect `min_storage_buffer_offset_alignment`; a user
    /// tensor inside a run starts where it lies in your buffer (see
    /// [`ExternalTensor`]).
    pub fn params_bindings(&self, key: impl TensorKey) -> Result<Vec<wgpu::BufferBinding<'_>>> {
        self.bindings(key, |s| &s.params)
    }

    /// Bindings of tensor `name`'s gradient, where the user's kernels write it.
    pub fn grads_bindings(&self, key: impl TensorKey) -> Result<Vec<wgpu::BufferBinding<'_>>> {
        self.bindings(key, |s| &s.grads)
    }

    /// Zeroes the velocity (jaxopt's `init_state`).
    pub(crate) fn clear_velocity(&self, encoder: &mut wgpu::CommandEncoder) {
        for s in &self.segments {
            if let Some(v) = &s.velocity {
                encoder.clear_buffer(&v.buffer, 0, None);
            }
        }
    }
}

impl Drop for ParamBuffers {
    /// A deferred update still goes out: user-owned buffers outlive the optimizer
    /// (unless wgpu rejects it: nothing to report it to here).
    fn drop(&mut self) {
        let _ = self.flush();
    }
}
