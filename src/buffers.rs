//! The GPU storage the optimizer owns: parameters, gradients, velocity, scratch.

use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::layout::{Layout, TensorPlacement};
use std::sync::{Arc, Mutex};

/// The three vectors of one segment.
#[derive(Debug)]
pub(crate) struct Segment {
    pub params: wgpu::Buffer,
    pub grads: wgpu::Buffer,
    /// `None` when momentum is 0: no velocity memory and no velocity traffic.
    pub velocity: Option<wgpu::Buffer>,
    /// Length in elements (a multiple of 4).
    pub len: usize,
}

/// Parameters, gradients and velocity on the GPU, laid out by a [`Layout`], plus the
/// 8-byte scalars slot (loss, squared norm) and its readback buffer.
///
/// A user's kernels bind tensors through [`ParamBuffers::params_bindings`] and
/// [`ParamBuffers::grads_bindings`] and write the loss through
/// [`ParamBuffers::loss_binding`].
#[derive(Debug)]
pub struct ParamBuffers {
    ctx: GpuContext,
    layout: Layout,
    pub(crate) segments: Vec<Segment>,
    /// `[loss, sqnorm]` as f32.
    pub(crate) scalars: wgpu::Buffer,
    /// MAP_READ copy of `scalars`, read once per step.
    staging: wgpu::Buffer,
    map_result: Arc<Mutex<Option<bool>>>,
}

/// The most f32 elements one segment may hold on this device.
pub(crate) fn device_segment_capacity(limits: &wgpu::Limits) -> usize {
    let bytes = limits
        .max_storage_buffer_binding_size
        .min(limits.max_buffer_size);
    (bytes / 4) as usize
}

impl ParamBuffers {
    /// Allocates zeroed buffers for `layout`; velocity only if `with_velocity`.
    pub(crate) fn new(ctx: &GpuContext, layout: Layout, with_velocity: bool) -> Self {
        let device = ctx.device();
        let storage = |label: &str, len: usize| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: (len * 4) as u64,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let segments = layout
            .segment_lens()
            .iter()
            .map(|&len| Segment {
                params: storage("polyak params", len),
                grads: storage("polyak grads", len),
                velocity: with_velocity.then(|| storage("polyak velocity", len)),
                len,
            })
            .collect();
        let scalars = storage("polyak scalars", 2);
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("polyak scalars readback"),
            size: 8,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        ParamBuffers {
            ctx: ctx.clone(),
            layout,
            segments,
            scalars,
            staging,
            map_result: Arc::new(Mutex::new(None)),
        }
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

    /// Bytes of device memory held for parameters, gradients and velocity.
    pub fn device_bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| (s.len * 4 * if s.velocity.is_some() { 3 } else { 2 }) as u64)
            .sum()
    }

    /// The 4-byte slot the objective's kernel writes the loss into (`f32`), for
    /// [`crate::Loss::Device`].
    pub fn loss_binding(&self) -> wgpu::BufferBinding<'_> {
        wgpu::BufferBinding {
            buffer: &self.scalars,
            offset: 0,
            size: wgpu::BufferSize::new(4),
        }
    }

    /// The buffer holding `[loss, sqnorm]` (for copying a loss computed elsewhere
    /// into offset 0).
    pub fn scalars_buffer(&self) -> &wgpu::Buffer {
        &self.scalars
    }

    fn bindings<'a>(
        &'a self,
        name: &str,
        pick: impl Fn(&'a Segment) -> &'a wgpu::Buffer,
    ) -> Result<Vec<wgpu::BufferBinding<'a>>> {
        let t = self.layout.tensor(name)?;
        Ok(t.parts
            .iter()
            .map(|p| wgpu::BufferBinding {
                buffer: pick(&self.segments[p.segment]),
                offset: (p.offset * 4) as u64,
                size: wgpu::BufferSize::new((p.len * 4) as u64),
            })
            .collect())
    }

    /// Bindings of tensor `name`'s parameters: one per piece (one unless the tensor is
    /// larger than a segment). Offsets respect `min_storage_buffer_offset_alignment`.
    pub fn params_bindings(&self, name: &str) -> Result<Vec<wgpu::BufferBinding<'_>>> {
        self.bindings(name, |s| &s.params)
    }

    /// Bindings of tensor `name`'s gradient, where the user's kernels write it.
    pub fn grads_bindings(&self, name: &str) -> Result<Vec<wgpu::BufferBinding<'_>>> {
        self.bindings(name, |s| &s.grads)
    }

    /// Parameter buffer of segment `i` (all tensors of a one-segment layout live in
    /// segment 0).
    pub fn params_buffer(&self, i: usize) -> Option<&wgpu::Buffer> {
        self.segments.get(i).map(|s| &s.params)
    }

    /// Gradient buffer of segment `i`.
    pub fn grads_buffer(&self, i: usize) -> Option<&wgpu::Buffer> {
        self.segments.get(i).map(|s| &s.grads)
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

    fn write_tensor(
        &self,
        t: &TensorPlacement,
        data: &[f32],
        pick: impl Fn(&Segment) -> &wgpu::Buffer,
    ) {
        for p in &t.parts {
            let src = &data[p.tensor_offset..p.tensor_offset + p.len];
            self.ctx.queue().write_buffer(
                pick(&self.segments[p.segment]),
                (p.offset * 4) as u64,
                bytemuck::cast_slice(src),
            );
        }
    }

    /// Uploads tensor `name`'s parameters.
    pub fn upload_tensor(&self, name: &str, data: &[f32]) -> Result<()> {
        let t = self.layout.tensor(name)?;
        Self::check_len(name, t.spec.len(), data.len())?;
        self.write_tensor(t, data, |s| &s.params);
        Ok(())
    }

    /// Uploads all parameters, tensors concatenated in layout order.
    pub fn upload_params(&self, data: &[f32]) -> Result<()> {
        self.upload_flat(data, "parameters", |s| &s.params)
    }

    /// Uploads the whole gradient, tensors concatenated in layout order (the host
    /// path for small problems; GPU objectives write the gradient buffers directly).
    pub fn upload_grads(&self, data: &[f32]) -> Result<()> {
        self.upload_flat(data, "gradient", |s| &s.grads)
    }

    fn upload_flat(
        &self,
        data: &[f32],
        what: &str,
        pick: impl Fn(&Segment) -> &wgpu::Buffer + Copy,
    ) -> Result<()> {
        Self::check_len(what, self.num_params(), data.len())?;
        let mut at = 0;
        for t in self.layout.tensors() {
            let n = t.spec.len();
            self.write_tensor(t, &data[at..at + n], pick);
            at += n;
        }
        Ok(())
    }

    /// Downloads tensor `name`'s parameters (allocates; not for the step loop).
    pub fn download_tensor(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.layout.tensor(name)?;
        let mut out = Vec::with_capacity(t.spec.len());
        for p in &t.parts {
            let seg = &self.segments[p.segment].params;
            out.extend(read_buffer(
                &self.ctx,
                seg,
                (p.offset * 4) as u64,
                (p.len * 4) as u64,
            )?);
        }
        Ok(out)
    }

    /// Downloads all parameters, tensors concatenated in layout order.
    pub fn download_params(&self) -> Result<Vec<f32>> {
        self.download_flat(|s| Some(&s.params))
    }

    /// Downloads the gradient buffer.
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

    fn gather(t: &TensorPlacement, segs: &[Vec<f32>]) -> Vec<f32> {
        let mut out = vec![0.0; t.spec.len()];
        for p in &t.parts {
            out[p.tensor_offset..p.tensor_offset + p.len]
                .copy_from_slice(&segs[p.segment][p.offset..p.offset + p.len]);
        }
        out
    }

    fn download_flat(&self, pick: impl Fn(&Segment) -> Option<&wgpu::Buffer>) -> Result<Vec<f32>> {
        let segs = self.download_segments(pick)?;
        let mut out = Vec::with_capacity(self.num_params());
        for t in self.layout.tensors() {
            out.extend(Self::gather(t, &segs));
        }
        Ok(out)
    }

    /// Copies whole segments back to the host, one at a time.
    fn download_segments(
        &self,
        pick: impl Fn(&Segment) -> Option<&wgpu::Buffer>,
    ) -> Result<Vec<Vec<f32>>> {
        self.segments
            .iter()
            .map(|s| match pick(s) {
                Some(b) => read_buffer(&self.ctx, b, 0, (s.len * 4) as u64),
                None => Ok(vec![0.0; s.len]),
            })
            .collect()
    }

    /// Zeroes the velocity (jaxopt's `init_state`).
    pub(crate) fn clear_velocity(&self, encoder: &mut wgpu::CommandEncoder) {
        for s in &self.segments {
            if let Some(v) = &s.velocity {
                encoder.clear_buffer(v, 0, None);
            }
        }
    }

    /// Records the copy of `[loss, sqnorm]` into the readback buffer.
    pub(crate) fn encode_scalars_readback(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.copy_buffer_to_buffer(&self.scalars, 0, &self.staging, 0, 8);
    }

    /// Waits for the submitted readback copy and returns `[loss, sqnorm]`. Allocates
    /// nothing of its own.
    pub(crate) fn read_scalars(&self) -> Result<[f32; 2]> {
        *self.map_result.lock().unwrap() = None;
        let slot = Arc::clone(&self.map_result);
        self.staging
            .slice(..)
            .map_async(wgpu::MapMode::Read, move |r| {
                *slot.lock().unwrap() = Some(r.is_ok());
            });
        self.ctx.wait()?;
        if *self.map_result.lock().unwrap() != Some(true) {
            return Err(Error::Device("mapping the scalars readback failed".into()));
        }
        let out = {
            let view = self
                .staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::Device(e.to_string()))?;
            let v: &[f32] = bytemuck::cast_slice(&view);
            [v[0], v[1]]
        };
        self.staging.unmap();
        Ok(out)
    }
}

/// Reads `size` bytes of `buffer` (which needs COPY_SRC) from `offset` into a new
/// host vector, through a temporary MAP_READ buffer.
pub(crate) fn read_buffer(
    ctx: &GpuContext,
    buffer: &wgpu::Buffer,
    offset: u64,
    size: u64,
) -> Result<Vec<f32>> {
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
    let ok = Arc::new(Mutex::new(None));
    let slot = Arc::clone(&ok);
    staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        *slot.lock().unwrap() = Some(r.is_ok());
    });
    ctx.wait()?;
    if *ok.lock().unwrap() != Some(true) {
        return Err(Error::Device("mapping a download buffer failed".into()));
    }
    let out = {
        let view = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| Error::Device(e.to_string()))?;
        bytemuck::cast_slice::<u8, f32>(&view).to_vec()
    };
    staging.unmap();
    Ok(out)
}
