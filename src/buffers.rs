//! The GPU storage the optimizer owns: parameters, gradients, velocity, scratch.

use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::layout::{Layout, TensorKey, TensorPlacement, TensorSpec};
use crate::scalars::ScalarSlot;
use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

/// A tensor whose parameter and gradient storage belong to the user: the optimizer
/// reads and updates them in place and never copies them.
///
/// Both regions hold `spec.len()` f32 values from their byte offset. Requirements,
/// checked at registration with [`Error::Registration`]: `STORAGE` usage, offsets
/// that are multiples of the device's `min_storage_buffer_offset_alignment`, a length
/// that is a multiple of 4 (the kernels read `vec4<f32>`; pad with zeros), regions
/// inside their buffers and not overlapping each other, buffers of the optimizer's
/// device. Uploading or downloading through the optimizer also needs `COPY_DST` /
/// `COPY_SRC`.
///
/// The device check relies on wgpu's validation, which catches a buffer of another
/// device of the same `wgpu::Instance`; wgpu offers no way to recognise a buffer of
/// another instance, so build the [`GpuContext`] with [`GpuContext::from_device`] on
/// the device that made the buffers.
#[derive(Debug, Clone)]
pub struct ExternalTensor {
    /// Name and shape.
    pub spec: TensorSpec,
    /// Buffer holding the parameters (f32, or f64 with [`crate::ParamDtype::F64`]).
    pub params: wgpu::Buffer,
    /// Byte offset of the parameters in `params`.
    pub params_offset: u64,
    /// Buffer the user's kernels write the gradient into.
    pub grads: wgpu::Buffer,
    /// Byte offset of the gradient in `grads`.
    pub grads_offset: u64,
}

impl ExternalTensor {
    /// Checks everything but the device (checked when the kernels are bound).
    /// `real_bytes` is the size of one element: 4 (f32) or 8 (f64 parameters).
    pub(crate) fn validate(&self, limits: &wgpu::Limits, real_bytes: u64) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::Registration {
                tensor: self.spec.name.clone(),
                reason,
            })
        };
        let Some(len) = self.spec.checked_len() else {
            return bad("the product of its dimensions overflows usize".into());
        };
        if len == 0 {
            return Err(Error::EmptyParameters(format!(
                "tensor {:?}",
                self.spec.name
            )));
        }
        if !len.is_multiple_of(4) {
            return bad(format!(
                "length {len} is not a multiple of 4; pad the buffers with zeros"
            ));
        }
        let bytes = (len as u64).saturating_mul(real_bytes);
        let align = u64::from(limits.min_storage_buffer_offset_alignment);
        for (what, buf, off) in [
            ("params", &self.params, self.params_offset),
            ("grads", &self.grads, self.grads_offset),
        ] {
            if !buf.usage().contains(wgpu::BufferUsages::STORAGE) {
                return bad(format!(
                    "{what} buffer lacks STORAGE usage ({:?})",
                    buf.usage()
                ));
            }
            if !off.is_multiple_of(align) {
                return bad(format!("{what} offset {off} is not a multiple of {align}"));
            }
            if off.checked_add(bytes).is_none_or(|end| end > buf.size()) {
                return bad(format!(
                    "{what} range {off}..{} exceeds the buffer's {} bytes",
                    off.saturating_add(bytes),
                    buf.size()
                ));
            }
        }
        if self.params == self.grads && self.params_offset.abs_diff(self.grads_offset) < bytes {
            return bad("params and grads regions overlap".into());
        }
        Ok(())
    }
}

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

    /// Reads elements `first..first + len` as `T` (submits and waits).
    fn read<T: Elem>(&self, ctx: &GpuContext, first: usize, len: usize) -> Result<Vec<T>> {
        let at = self.offset + first as u64 * self.elem;
        let bytes = read_bytes(ctx, &self.buffer, at, len as u64 * self.elem)?;
        Ok(T::from_bytes(&bytes, self.elem))
    }

    /// Queues `data` into elements `first..`, converted to the region's type (rounded
    /// to nearest where it is narrower).
    fn write<T: Elem>(&self, queue: &wgpu::Queue, first: usize, data: &[T]) {
        let at = self.offset + first as u64 * self.elem;
        queue.write_buffer(&self.buffer, at, &T::to_bytes(data, self.elem));
    }
}

/// A host element type of the upload and download API (f32 or f64), converted to and
/// from the storage type of a region: f16 (2 bytes), f32 (4) or f64 (8).
pub(crate) trait Elem: Copy + bytemuck::Pod {
    /// The value as f64 (exact).
    fn to_f64(self) -> f64;
    /// `v` rounded to this type.
    fn from_f64(v: f64) -> Self;

    /// Elements stored with `elem` bytes each, as `Self`.
    fn from_bytes(bytes: &[u8], elem: u64) -> Vec<Self> {
        match elem {
            2 => bytemuck::pod_collect_to_vec::<u8, half::f16>(bytes)
                .iter()
                .map(|h| Self::from_f64(h.to_f64()))
                .collect(),
            4 if std::mem::size_of::<Self>() == 4 => bytemuck::pod_collect_to_vec(bytes),
            4 => bytemuck::pod_collect_to_vec::<u8, f32>(bytes)
                .iter()
                .map(|&v| Self::from_f64(f64::from(v)))
                .collect(),
            _ if std::mem::size_of::<Self>() == 8 => bytemuck::pod_collect_to_vec(bytes),
            _ => bytemuck::pod_collect_to_vec::<u8, f64>(bytes)
                .iter()
                .map(|&v| Self::from_f64(v))
                .collect(),
        }
    }

    /// `data` as elements of `elem` bytes: borrowed when they already are (no copy
    /// of a large upload), converted otherwise.
    fn to_bytes(data: &[Self], elem: u64) -> Cow<'_, [u8]> {
        if elem as usize == std::mem::size_of::<Self>() {
            return Cow::Borrowed(bytemuck::cast_slice(data));
        }
        Cow::Owned(match elem {
            2 => data
                .iter()
                .flat_map(|v| half::f16::from_f64(v.to_f64()).to_le_bytes())
                .collect(),
            4 => data
                .iter()
                .flat_map(|v| (v.to_f64() as f32).to_le_bytes())
                .collect(),
            _ => data.iter().flat_map(|v| v.to_f64().to_le_bytes()).collect(),
        })
    }
}

impl Elem for f32 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Elem for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
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
    let mut external = vec![false; layout.segment_lens().len()];
    for t in layout.tensors().iter().filter(|t| t.external) {
        for p in &t.parts {
            external[p.segment] = true;
        }
    }
    layout
        .segment_lens()
        .iter()
        .zip(external)
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
    /// Allocates zeroed buffers for the arena segments of `layout` (a velocity of
    /// `velocity_bytes` per element for every segment, none if 0) and uses the
    /// user's buffers for the segments of external tensors, given in layout order.
    pub(crate) fn new(
        ctx: &GpuContext,
        layout: Layout,
        real_bytes: u64,
        velocity_bytes: u64,
        external: &[ExternalTensor],
        readback_slots: usize,
        objective_partials: Option<u32>,
    ) -> Self {
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
        // Which user region each external segment starts at.
        let mut user: Vec<Option<(Region, Region)>> = vec![None; layout.segment_lens().len()];
        for (t, ext) in layout.tensors().iter().filter(|t| t.external).zip(external) {
            for p in &t.parts {
                let at = p.tensor_offset as u64 * real_bytes;
                user[p.segment] = Some((
                    Region {
                        buffer: ext.params.clone(),
                        offset: ext.params_offset + at,
                        elem: real_bytes,
                    },
                    Region {
                        buffer: ext.grads.clone(),
                        offset: ext.grads_offset + at,
                        elem: real_bytes,
                    },
                ));
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
        let scalars = ScalarSlot::new(ctx, real_bytes, readback_slots);
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
    pub fn flush(&self) {
        let pending = self.pending.lock().map(|mut p| p.take()).unwrap_or(None);
        if let Some(cb) = pending {
            self.ctx.queue().submit([cb]);
        }
    }

    /// Keeps `cb` to go out with the next submission.
    pub(crate) fn defer(&self, cb: wgpu::CommandBuffer) {
        self.flush();
        if let Ok(mut p) = self.pending.lock() {
            *p = Some(cb);
        }
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

    /// Records the NaN fill of what the objective writes besides the gradient (the
    /// loss and, if it computes the norm, its partials), before the objective.
    pub(crate) fn encode_unwritten(&self, encoder: &mut wgpu::CommandEncoder) {
        self.scalars.encode_unwritten_loss(encoder);
        if let Some(o) = &self.objective_norm {
            encoder.copy_buffer_to_buffer(&o.unwritten, 0, &o.partials, 0, o.partials.size());
        }
    }

    /// The slot the objective's kernel writes the loss into (one `f32`, or one `f64`
    /// with f64 parameters), for [`crate::Loss::Device`]. It is set to NaN before
    /// each evaluation, so a loss left unwritten refuses the step (a non-finite
    /// value) instead of reusing the last one.
    pub fn loss_binding(&self) -> wgpu::BufferBinding<'_> {
        self.scalars.loss_binding()
    }

    /// The buffer holding the loss at offset 0 (f32, or f64 with f64 parameters; for
    /// copying a loss computed elsewhere there), then the optimizer's own scalars
    /// (squared norm, step size, verdict, halt state, options).
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
                    offset: r.offset + (p.offset * 4) as u64,
                    size: wgpu::BufferSize::new((p.len * 4) as u64),
                }
            })
            .collect())
    }

    /// Bindings of tensor `name`'s parameters: one per piece (one unless the tensor is
    /// larger than a segment). Offsets respect `min_storage_buffer_offset_alignment`.
    pub fn params_bindings(&self, key: impl TensorKey) -> Result<Vec<wgpu::BufferBinding<'_>>> {
        self.bindings(key, |s| &s.params)
    }

    /// Bindings of tensor `name`'s gradient, where the user's kernels write it.
    pub fn grads_bindings(&self, key: impl TensorKey) -> Result<Vec<wgpu::BufferBinding<'_>>> {
        self.bindings(key, |s| &s.grads)
    }

    fn check_len(what: &str, expected: usize, got: usize) -> Result<()> {
        if expected != got {
            return Err(Error::LengthMismatch {
                what: what.to_string(),
                expected,
                got,
            });
        }
        Ok(())
    }

    fn write_tensor<T: Elem>(
        &self,
        t: &TensorPlacement,
        data: &[T],
        pick: impl Fn(&Segment) -> Option<&Region>,
    ) -> Result<()> {
        self.flush(); // a deferred update must not land after this write
        for p in &t.parts {
            let r = pick(&self.segments[p.segment]).ok_or_else(no_velocity)?;
            needs(&r.buffer, wgpu::BufferUsages::COPY_DST, &t.spec.name)?;
            let src = &data[p.tensor_offset..p.tensor_offset + p.len];
            r.write(self.ctx.queue(), p.offset, src);
        }
        Ok(())
    }

    fn read_tensor<T: Elem>(
        &self,
        t: &TensorPlacement,
        pick: impl Fn(&Segment) -> Option<&Region>,
    ) -> Result<Vec<T>> {
        self.flush();
        let mut out = Vec::with_capacity(t.spec.len());
        for p in &t.parts {
            match pick(&self.segments[p.segment]) {
                Some(r) => {
                    needs(&r.buffer, wgpu::BufferUsages::COPY_SRC, &t.spec.name)?;
                    out.extend(r.read::<T>(&self.ctx, p.offset, p.len)?);
                }
                None => out.extend(std::iter::repeat_n(T::from_f64(0.0), p.len)),
            }
        }
        Ok(out)
    }

    /// Uploads one tensor's parameters.
    pub fn upload_tensor(&self, key: impl TensorKey, data: &[f32]) -> Result<()> {
        let t = self.layout.tensor(key)?;
        Self::check_len(&t.spec.name, t.spec.len(), data.len())?;
        self.write_tensor(t, data, |s| Some(&s.params))
    }

    /// Downloads one tensor's parameters (allocates; not part of a step).
    pub fn download_tensor(&self, key: impl TensorKey) -> Result<Vec<f32>> {
        let t = self.layout.tensor(key)?;
        self.read_tensor(t, |s| Some(&s.params))
    }

    /// Uploads all parameters, tensors concatenated in layout order.
    pub fn upload_params(&self, data: &[f32]) -> Result<()> {
        self.upload_flat(data, "parameters", |s| Some(&s.params))
    }

    /// Uploads the velocity, tensors concatenated in layout order (to resume a run;
    /// an error when momentum is 0, which keeps no velocity).
    pub fn upload_velocity(&self, data: &[f32]) -> Result<()> {
        if !self.has_velocity() {
            return Err(no_velocity());
        }
        self.upload_flat(data, "velocity", |s| s.velocity.as_ref())
    }

    /// Uploads one tensor's parameters or velocity (checkpoints).
    pub(crate) fn upload_placed<T: Elem>(
        &self,
        t: &TensorPlacement,
        velocity: bool,
        data: &[T],
    ) -> Result<()> {
        Self::check_len(&t.spec.name, t.spec.len(), data.len())?;
        if velocity {
            self.write_tensor(t, data, |s| s.velocity.as_ref())
        } else {
            self.write_tensor(t, data, |s| Some(&s.params))
        }
    }

    /// Downloads one tensor's parameters or velocity (checkpoints; a velocity is
    /// zeros without momentum).
    pub(crate) fn download_placed<T: Elem>(
        &self,
        t: &TensorPlacement,
        velocity: bool,
    ) -> Result<Vec<T>> {
        if velocity {
            self.read_tensor(t, |s| s.velocity.as_ref())
        } else {
            self.read_tensor(t, |s| Some(&s.params))
        }
    }

    /// [`ParamBuffers::upload_params`] from f64 (exact for f64 parameters, rounded to
    /// f32 otherwise).
    pub fn upload_params_f64(&self, data: &[f64]) -> Result<()> {
        self.upload_flat(data, "parameters", |s| Some(&s.params))
    }

    /// [`ParamBuffers::upload_grads`] from f64.
    pub fn upload_grads_f64(&self, data: &[f64]) -> Result<()> {
        self.upload_flat(data, "gradient", |s| Some(&s.grads))
    }

    /// [`ParamBuffers::download_params`] as f64 (exact whatever the precision).
    pub fn download_params_f64(&self) -> Result<Vec<f64>> {
        self.download_flat(|s| Some(&s.params))
    }

    /// [`ParamBuffers::download_velocity`] as f64.
    pub fn download_velocity_f64(&self) -> Result<Option<Vec<f64>>> {
        if !self.has_velocity() {
            return Ok(None);
        }
        self.download_flat(|s| s.velocity.as_ref()).map(Some)
    }

    /// Uploads the whole gradient, tensors concatenated in layout order (the host
    /// path for small problems; GPU objectives write the gradient buffers directly).
    pub fn upload_grads(&self, data: &[f32]) -> Result<()> {
        self.upload_flat(data, "gradient", |s| Some(&s.grads))
    }

    fn upload_flat<T: Elem>(
        &self,
        data: &[T],
        what: &str,
        pick: impl Fn(&Segment) -> Option<&Region> + Copy,
    ) -> Result<()> {
        Self::check_len(what, self.num_params(), data.len())?;
        let mut at = 0;
        for t in self.layout.tensors() {
            let n = t.spec.len();
            self.write_tensor(t, &data[at..at + n], pick)?;
            at += n;
        }
        Ok(())
    }

    /// Downloads all parameters, tensors concatenated in layout order (rounded to
    /// f32 with f64 parameters: [`ParamBuffers::download_params_f64`] is exact).
    pub fn download_params(&self) -> Result<Vec<f32>> {
        self.download_flat(|s| Some(&s.params))
    }

    /// Downloads the gradient.
    pub fn download_grads(&self) -> Result<Vec<f32>> {
        self.download_flat(|s| Some(&s.grads))
    }

    /// Downloads the velocity (`None` when momentum is 0).
    pub fn download_velocity(&self) -> Result<Option<Vec<f32>>> {
        if !self.has_velocity() {
            return Ok(None);
        }
        self.download_flat(|s| s.velocity.as_ref()).map(Some)
    }

    /// Downloads a whole vector with one copy per segment (not one per tensor piece,
    /// which would be hundreds of round trips for a many-tensor model).
    fn download_flat<T: Elem>(&self, pick: impl Fn(&Segment) -> Option<&Region>) -> Result<Vec<T>> {
        self.flush();
        let mut segments = Vec::with_capacity(self.segments.len());
        for (i, s) in self.segments.iter().enumerate() {
            segments.push(match pick(s) {
                Some(r) => {
                    let owner = self
                        .layout
                        .tensors()
                        .iter()
                        .find(|t| t.parts.iter().any(|p| p.segment == i));
                    needs(
                        &r.buffer,
                        wgpu::BufferUsages::COPY_SRC,
                        owner.map_or("?", |t| &t.spec.name),
                    )?;
                    Some(r.read(&self.ctx, 0, s.len)?)
                }
                None => None,
            });
        }
        let mut out = Vec::with_capacity(self.num_params());
        for p in self.layout.tensors().iter().flat_map(|t| &t.parts) {
            match &segments[p.segment] {
                Some(v) => out.extend_from_slice(&v[p.offset..p.offset + p.len]),
                None => out.extend(std::iter::repeat_n(T::from_f64(0.0), p.len)),
            }
        }
        Ok(out)
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
    /// A deferred update still goes out: user-owned buffers outlive the optimizer.
    fn drop(&mut self) {
        self.flush();
    }
}

fn no_velocity() -> Error {
    Error::Tensor(
        "velocity".into(),
        "the optimizer keeps no velocity (momentum is 0)",
    )
}

/// Errors unless `buffer` has `usage` (user buffers may lack the copy flags).
fn needs(buffer: &wgpu::Buffer, usage: wgpu::BufferUsages, tensor: &str) -> Result<()> {
    if buffer.usage().contains(usage) {
        Ok(())
    } else {
        Err(Error::Registration {
            tensor: tensor.to_string(),
            reason: format!("its buffer lacks {usage:?} usage for this copy"),
        })
    }
}

/// Reads `size` bytes of `buffer` from `offset` (submits and waits).
pub(crate) fn read_bytes(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    offset: u64,
    size: u64,
) -> Result<Vec<u8>> {
    let device = ctx.device();
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("polyak download"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
    ctx.queue().submit([encoder.finish()]);
    read_mapped(ctx, &staging, &Arc::new(Mutex::new(None)), <[u8]>::to_vec)
}

/// Maps `staging` (MAP_READ) once the submitted work is done, hands its bytes to `f`
/// and unmaps it. `slot` receives the map result; the step path passes one it keeps,
/// so reading the loss and norm allocates nothing of ours.
pub(crate) fn read_mapped<T>(
    ctx: &GpuContext,
    staging: &wgpu::Buffer,
    slot: &Arc<Mutex<Option<bool>>>,
    f: impl FnOnce(&[u8]) -> T,
) -> Result<T> {
    let set = |v| {
        if let Ok(mut s) = slot.lock() {
            *s = v;
        }
    };
    set(None);
    let callback_slot = Arc::clone(slot);
    staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        if let Ok(mut s) = callback_slot.lock() {
            *s = Some(r.is_ok());
        }
    });
    if let Err(e) = ctx.wait() {
        // Abort the map still pending (a timeout), so the buffer can take the next
        // copy instead of failing wgpu's validation.
        staging.unmap();
        return Err(e);
    }
    if slot.lock().map(|s| *s).ok().flatten() != Some(true) {
        return Err(Error::Device("mapping a readback buffer failed".into()));
    }
    let out = {
        let view = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| Error::Device(e.to_string()))?;
        f(&view)
    };
    staging.unmap();
    Ok(out)
}
