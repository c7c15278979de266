//! Moving vectors between the host and the GPU: uploads and downloads of tensors,
//! parameters, gradients and velocity in f32 or f64, converted to and from the
//! storage type (f16, f32, f64); and the mapped reads every readback goes through.
//! Nothing here is on a step's path but [`read_mapped`].

use super::{ParamBuffers, Region, Segment};
use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::layout::{Part, TensorKey, TensorPlacement};
use std::borrow::Cow;
use std::sync::{Arc, Mutex};

impl Region {
    /// Reads elements `first..first + len` as `T` (submits and waits).
    fn read<T: Elem>(&self, ctx: &GpuContext, first: usize, len: usize) -> Result<Vec<T>> {
        self.read_raw(ctx, first, len, |bytes| T::from_bytes(bytes, self.elem))
    }

    /// Hands the stored bytes of elements `first..first + len` to `f` (submits and
    /// waits). Copies move whole 4-byte words: an f16 range that starts or ends
    /// mid-word is read with the neighbouring element.
    fn read_raw<T>(
        &self,
        ctx: &GpuContext,
        first: usize,
        len: usize,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        let at = self.offset + first as u64 * self.elem;
        let size = len as u64 * self.elem;
        let (lo, hi) = (at - at % 4, (at + size).next_multiple_of(4));
        read_bytes_with(ctx, &self.buffer, lo, hi - lo, |b| {
            f(&b[(at - lo) as usize..][..size as usize])
        })
    }

    /// Queues `data` into elements `first..`, converted to the region's type (rounded
    /// to nearest where it is narrower).
    fn write<T: Elem>(&self, ctx: &GpuContext, first: usize, data: &[T]) -> Result<()> {
        self.write_raw(ctx, first, &T::to_bytes(data, self.elem))
    }

    /// Queues `bytes`, elements of the region's type, into elements `first..`.
    /// Writes move whole 4-byte words: an f16 range that starts or ends mid-word
    /// keeps the other half of each edge word as it was (the velocity of the next or
    /// previous tensor in a run of user tensors, or padding), read back first.
    fn write_raw(&self, ctx: &GpuContext, first: usize, bytes: &[u8]) -> Result<()> {
        let at = self.offset + first as u64 * self.elem;
        let end = at + bytes.len() as u64;
        if at.is_multiple_of(4) && end.is_multiple_of(4) {
            return ctx.checked(|| ctx.queue().write_buffer(&self.buffer, at, bytes));
        }
        let (lo, hi) = (at - at % 4, end.next_multiple_of(4));
        let mut words = vec![0u8; (hi - lo) as usize];
        if lo < at {
            words[..4].copy_from_slice(&read_bytes(ctx, &self.buffer, lo, 4)?);
        }
        if end < hi {
            let last = words.len() - 4;
            words[last..].copy_from_slice(&read_bytes(ctx, &self.buffer, hi - 4, 4)?);
        }
        words[(at - lo) as usize..][..bytes.len()].copy_from_slice(bytes);
        ctx.checked(|| ctx.queue().write_buffer(&self.buffer, lo, &words))
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
    /// of a large upload), converted otherwise (to f16 saturated at +-65504).
    fn to_bytes(data: &[Self], elem: u64) -> Cow<'_, [u8]> {
        if elem as usize == std::mem::size_of::<Self>() {
            return Cow::Borrowed(bytemuck::cast_slice(data));
        }
        Cow::Owned(match elem {
            // Saturated like the update kernel's stores: an infinite velocity would
            // carry into the parameters at the next step.
            2 => data
                .iter()
                .flat_map(|v| {
                    let x = v.to_f64().clamp(-F16_MAX, F16_MAX);
                    half::f16::from_f64(x).to_le_bytes()
                })
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

impl ParamBuffers {
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
        self.flush()?; // a deferred update must not land after this write
        for p in &t.parts {
            let r = pick(&self.segments[p.segment]).ok_or_else(no_velocity)?;
            needs(&r.buffer, wgpu::BufferUsages::COPY_DST, &t.spec.name)?;
            let src = &data[p.tensor_offset..p.tensor_offset + p.len];
            r.write(&self.ctx, p.offset, src)?;
        }
        Ok(())
    }

    fn read_tensor<T: Elem>(
        &self,
        t: &TensorPlacement,
        pick: impl Fn(&Segment) -> Option<&Region>,
    ) -> Result<Vec<T>> {
        self.flush()?;
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
        self.upload_tensor_as(key, data)
    }

    /// [`ParamBuffers::upload_tensor`] from f64 (exact for f64 parameters, rounded
    /// to f32 otherwise).
    pub fn upload_tensor_f64(&self, key: impl TensorKey, data: &[f64]) -> Result<()> {
        self.upload_tensor_as(key, data)
    }

    fn upload_tensor_as<T: Elem>(&self, key: impl TensorKey, data: &[T]) -> Result<()> {
        let t = self.layout.tensor(key)?;
        Self::check_len(&t.spec.name, t.spec.len(), data.len())?;
        self.write_tensor(t, data, |s| Some(&s.params))
    }

    /// Downloads one tensor's parameters (allocates; not part of a step).
    pub fn download_tensor(&self, key: impl TensorKey) -> Result<Vec<f32>> {
        self.read_tensor(self.layout.tensor(key)?, |s| Some(&s.params))
    }

    /// [`ParamBuffers::download_tensor`] as f64 (exact whatever the precision).
    pub fn download_tensor_f64(&self, key: impl TensorKey) -> Result<Vec<f64>> {
        self.read_tensor(self.layout.tensor(key)?, |s| Some(&s.params))
    }

    /// Uploads all parameters, tensors concatenated in layout order.
    pub fn upload_params(&self, data: &[f32]) -> Result<()> {
        self.upload_flat(data, "parameters", |s| Some(&s.params))
    }

    /// Uploads the velocity, tensors concatenated in layout order (to resume a run;
    /// an error when momentum is 0, which keeps no velocity).
    pub fn upload_velocity(&self, data: &[f32]) -> Result<()> {
        self.upload_velocity_as(data)
    }

    /// [`ParamBuffers::upload_velocity`] from f64 (exact for f64 parameters).
    pub fn upload_velocity_f64(&self, data: &[f64]) -> Result<()> {
        self.upload_velocity_as(data)
    }

    fn upload_velocity_as<T: Elem>(&self, data: &[T]) -> Result<()> {
        if !self.has_velocity() {
            return Err(no_velocity());
        }
        self.upload_flat(data, "velocity", |s| s.velocity.as_ref())
    }

    /// The region of segment `segment` holding the parameters or the velocity.
    fn region(&self, segment: usize, velocity: bool) -> Option<&Region> {
        let s = &self.segments[segment];
        if velocity {
            s.velocity.as_ref()
        } else {
            Some(&s.params)
        }
    }

    /// One tensor's parameters or velocity as stored (`elem` bytes an element: f16,
    /// f32 or f64), read in copies of at most [`CHUNK_BYTES`] into one vector that
    /// checkpoints write as it is: the tensor's bytes are on the host once,
    /// unconverted, beside one chunk of staging memory.
    pub(crate) fn download_placed_bytes(
        &self,
        t: &TensorPlacement,
        velocity: bool,
        elem: u64,
    ) -> Result<Vec<u8>> {
        self.flush()?;
        let mut out = Vec::with_capacity(t.spec.len() * elem as usize);
        for p in &t.parts {
            let Some(r) = self.region(p.segment, velocity) else {
                out.resize(out.len() + p.len * elem as usize, 0);
                continue;
            };
            needs(&r.buffer, wgpu::BufferUsages::COPY_SRC, &t.spec.name)?;
            for (first, len) in chunks(p.len, r.elem) {
                r.read_raw(&self.ctx, p.offset + first, len, |b| {
                    out.extend_from_slice(b)
                })?;
            }
        }
        Ok(out)
    }

    /// Errors unless one tensor's parameters or velocity can be written from the
    /// host (a velocity exists, user buffers have `COPY_DST`): checkpoints check
    /// every tensor before they upload any.
    pub(crate) fn check_writable(&self, t: &TensorPlacement, velocity: bool) -> Result<()> {
        writable(t, |p| self.region(p.segment, velocity))
    }

    /// Uploads one tensor's parameters or velocity from elements of `elem` bytes
    /// (f16, f32 or f64) that `read(byte offset in the tensor, buffer)` provides, in
    /// pieces of at most [`CHUNK_BYTES`] (checkpoints, which read a file): as they
    /// are where the storage type matches, converted otherwise. `queued` counts the
    /// bytes written since the last wait; past [`CHUNK_BYTES`] the writes are
    /// submitted and waited for, so their staging memory stays bounded however
    /// large the model.
    pub(crate) fn upload_placed_from(
        &self,
        t: &TensorPlacement,
        velocity: bool,
        elem: u64,
        queued: &mut u64,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        self.flush()?; // a deferred update must not land after this write
        let mut buf = Vec::new();
        for p in &t.parts {
            let r = self.region(p.segment, velocity).ok_or_else(no_velocity)?;
            needs(&r.buffer, wgpu::BufferUsages::COPY_DST, &t.spec.name)?;
            for (first, len) in chunks(p.len, elem.max(r.elem)) {
                buf.resize(len * elem as usize, 0);
                read((p.tensor_offset + first) as u64 * elem, &mut buf)?;
                if elem == r.elem {
                    r.write_raw(&self.ctx, p.offset + first, &buf)?;
                } else {
                    r.write(&self.ctx, p.offset + first, &f64::from_bytes(&buf, elem))?;
                }
                *queued += (len as u64) * r.elem;
                if *queued >= CHUNK_BYTES {
                    self.ctx.queue().submit([]);
                    self.ctx.wait()?;
                    *queued = 0;
                }
            }
        }
        Ok(())
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
        // Every tensor is checked before any is written: an error leaves all as
        // they were, not the first tensors written.
        for t in self.layout.tensors() {
            writable(t, |p| pick(&self.segments[p.segment]))?;
        }
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

    /// [`ParamBuffers::download_grads`] as f64.
    pub fn download_grads_f64(&self) -> Result<Vec<f64>> {
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
        self.flush()?;
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
}

/// f16's largest finite value: an f16 velocity saturates there.
const F16_MAX: f64 = 65504.0;

/// The most bytes one checkpoint copy moves between the host and the GPU: a bound
/// on the staging memory beside the tensor being saved or loaded.
pub(crate) const CHUNK_BYTES: u64 = 64 << 20;

/// `(first, len)` pieces of `len` elements of `elem` bytes, each at most
/// [`CHUNK_BYTES`] long and starting on an even element (a 4-byte boundary for f16).
fn chunks(len: usize, elem: u64) -> impl Iterator<Item = (usize, usize)> {
    let step = (CHUNK_BYTES / elem) as usize;
    (0..len)
        .step_by(step)
        .map(move |first| (first, step.min(len - first)))
}

fn no_velocity() -> Error {
    Error::Tensor(
        "velocity".into(),
        "the optimizer keeps no velocity (momentum is 0)",
    )
}

/// Errors unless every part of `t` has a region (`region`) the host may write.
fn writable<'a>(t: &TensorPlacement, region: impl Fn(&Part) -> Option<&'a Region>) -> Result<()> {
    for p in &t.parts {
        let r = region(p).ok_or_else(no_velocity)?;
        needs(&r.buffer, wgpu::BufferUsages::COPY_DST, &t.spec.name)?;
    }
    Ok(())
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
    read_bytes_with(ctx, buffer, offset, size, <[u8]>::to_vec)
}

/// Hands `size` bytes of `buffer` from `offset` to `f` (submits and waits), from
/// a staging buffer made for the call.
fn read_bytes_with<T>(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    offset: u64,
    size: u64,
    f: impl FnOnce(&[u8]) -> T,
) -> Result<T> {
    let device = ctx.device();
    let staging = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("polyak download"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    ctx.checked(|| {
        let mut encoder = device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
        ctx.queue().submit([encoder.finish()]);
    })?;
    read_mapped(ctx, &staging, &Arc::new(Mutex::new(None)), f)
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
