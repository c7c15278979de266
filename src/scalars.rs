//! The scalars slot: loss, squared norm, step size, verdict, halt state and the
//! real-valued options, in one small storage buffer the kernels share, and its
//! readback copies (one per step of a pipelined run).

use crate::buffers::read_mapped;
use crate::config::PolyakConfig;
use crate::context::GpuContext;
use crate::error::Result;
use std::sync::{Arc, Mutex};

/// The scalars slot as read back after a step's first submission, widened to f64
/// (exactly: they are of the parameters' precision).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scalars {
    /// The loss the objective wrote (or the host loss written for it).
    pub loss: f64,
    /// The squared gradient norm.
    pub sqnorm: f64,
    /// The step size the norm pass computed.
    pub step: f64,
    /// What became of the update of this step.
    pub verdict: Verdict,
    /// The step sizes for which the update writes only finite values, where the
    /// optimizer checks that ([`PolyakConfig::check_overflow`]).
    pub bounds: Option<(f64, f64)>,
    /// Whether they came from f32 storage.
    single: bool,
}

/// What the norm pass decided about a step's update (`scalars[4]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The update runs.
    Applied,
    /// A non-finite loss, norm or step under `Refuse`: the update does not run.
    Refused,
    /// An earlier step of a pipelined run halted it: the update does not run.
    Skipped,
}

impl Scalars {
    /// The first four scalars (six with the bounds), stored with `real` bytes
    /// each. Allocates nothing: this runs every step.
    fn from_bytes(bytes: &[u8], real: u64, bounds: bool) -> Self {
        let r = real as usize;
        let v = |i: usize| -> f64 {
            let b = &bytes[i * r..(i + 1) * r];
            if real == 4 {
                f64::from(bytemuck::pod_read_unaligned::<f32>(b))
            } else {
                bytemuck::pod_read_unaligned::<f64>(b)
            }
        };
        Scalars {
            loss: v(0),
            sqnorm: v(1),
            step: v(2),
            verdict: match v(3) {
                0.0 => Verdict::Applied,
                1.0 => Verdict::Refused,
                _ => Verdict::Skipped,
            },
            bounds: bounds.then(|| (v(4), v(5))),
            single: real == 4,
        }
    }

    /// Whether the update with `step` writes only finite values (always, where the
    /// optimizer does not check).
    pub fn allows(&self, step: f64) -> bool {
        self.bounds
            .is_none_or(|(lowest, highest)| lowest <= step && step <= highest)
    }

    /// jaxopt's `error`: the square root of the squared norm, in its precision.
    pub fn error(&self) -> f64 {
        if self.single {
            f64::from((self.sqnorm as f32).sqrt())
        } else {
            self.sqnorm.sqrt()
        }
    }
}

/// Scalars in the slot (see `rule.wgsl`): the loss the objective writes, then the
/// readback (the loss the step used, squared norm, step, verdict, the lowest and
/// highest safe step), halted, halts, stop threshold, momentum, max_stepsize, delta,
/// fun_min.
pub(crate) const SCALARS: u64 = 14;
/// Index of the first scalar read back (the loss the step used).
const READBACK: u64 = 1;
/// Index of the step size (then the verdict).
const STEP: u64 = 3;
/// Index of the first of the scalars `write_halt` writes (halted, halts, threshold).
const HALTED: u64 = 7;
/// Index of the first of the options (momentum, max_stepsize, delta, fun_min).
const OPTIONS: u64 = 10;

/// Scalars copied back per step: loss, squared norm, step, verdict, and the bounds
/// where the optimizer checks them (`bounds`).
fn reals_read(bounds: bool) -> u64 {
    if bounds { 6 } else { 4 }
}

/// The slot on the GPU and its MAP_READ readback buffer.
#[derive(Debug)]
pub(crate) struct ScalarSlot {
    ctx: GpuContext,
    /// `SCALARS` reals (see `rule.wgsl`).
    pub buffer: wgpu::Buffer,
    /// A NaN, copied into the loss after an evaluation that no norm pass follows
    /// (which would set it to NaN itself once read), then a real of scratch.
    nan: wgpu::Buffer,
    /// Copies of the first four scalars (six with the bounds), one slot per step
    /// of a pipelined run.
    staging: wgpu::Buffer,
    map_result: Arc<Mutex<Option<bool>>>,
    /// Bytes per scalar: 4 (f32 parameters) or 8 (f64).
    real: u64,
    /// Whether the readback carries the bounds of the overflow check.
    bounds: bool,
    /// Readback slots: the most steps a pipelined run can submit per wait.
    pub slots: usize,
}

impl ScalarSlot {
    /// A zeroed slot of reals of `real` bytes with `readback_slots` readback copies,
    /// of the bounds of the overflow check too if `bounds`.
    pub(crate) fn new(ctx: &GpuContext, real: u64, readback_slots: usize, bounds: bool) -> Self {
        let device = ctx.device();
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("polyak scalars"),
            size: SCALARS * real,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let nan = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("polyak NaN loss, scratch"),
            size: 2 * real,
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("polyak scalars readback"),
            size: reals_read(bounds) * real * readback_slots.max(1) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let slot = ScalarSlot {
            ctx: ctx.clone(),
            buffer,
            nan,
            staging,
            map_result: Arc::new(Mutex::new(None)),
            real,
            bounds,
            slots: readback_slots.max(1),
        };
        slot.write(&slot.nan, 0, &[f64::NAN]);
        slot.write(&slot.buffer, 0, &[f64::NAN]);
        slot
    }

    /// Device bytes of the slot and its readback buffer.
    pub(crate) fn bytes(&self) -> u64 {
        self.buffer.size() + self.nan.size() + self.staging.size()
    }

    /// The loss, where a GPU objective writes it.
    pub(crate) fn loss_binding(&self) -> wgpu::BufferBinding<'_> {
        wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: 0,
            size: wgpu::BufferSize::new(self.real),
        }
    }

    /// Bytes of one readback slot: loss, squared norm, step and verdict, and the
    /// bounds where the optimizer checks them.
    fn slot_bytes(&self) -> u64 {
        reals_read(self.bounds) * self.real
    }

    /// Records the copy of loss, squared norm, step and verdict (and the bounds)
    /// into readback slot `slot`.
    pub(crate) fn encode_readback(&self, encoder: &mut wgpu::CommandEncoder, slot: usize) {
        let size = self.slot_bytes();
        let from = READBACK * self.real;
        encoder.copy_buffer_to_buffer(&self.buffer, from, &self.staging, size * slot as u64, size);
    }

    /// Waits for the submitted readback copy of slot 0. Allocates nothing of its own.
    pub(crate) fn read(&self) -> Result<Scalars> {
        read_mapped(&self.ctx, &self.staging, &self.map_result, |bytes| {
            Scalars::from_bytes(bytes, self.real, self.bounds)
        })
    }

    /// Waits for the submitted readback copies and puts those of the first `count`
    /// slots in `out` (whose capacity is reused).
    pub(crate) fn read_slots(&self, count: usize, out: &mut Vec<Scalars>) -> Result<()> {
        out.clear();
        let size = self.slot_bytes() as usize;
        read_mapped(&self.ctx, &self.staging, &self.map_result, |bytes| {
            out.extend(
                bytes
                    .chunks_exact(size)
                    .take(count)
                    .map(|b| Scalars::from_bytes(b, self.real, self.bounds)),
            );
        })
    }

    /// Queues `values` into `target` from real `first` on, in the parameters'
    /// precision (applied before the next submission's commands).
    /// Encodes on the stack (at most four values): it runs every step.
    fn write(&self, target: &wgpu::Buffer, first: u64, values: &[f64]) {
        let r = self.real as usize;
        let mut bytes = [0u8; 32];
        let n = values.len() * r;
        for (chunk, &v) in bytes[..n].chunks_exact_mut(r).zip(values) {
            if r == 4 {
                chunk.copy_from_slice(&(v as f32).to_le_bytes());
            } else {
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
        self.ctx
            .queue()
            .write_buffer(target, first * self.real, &bytes[..n]);
    }

    /// Queues the options the kernels read from the scalars: momentum,
    /// max_stepsize, delta and fun_min (once, at build).
    pub(crate) fn write_options(&self, config: &PolyakConfig) {
        let options = [
            config.momentum,
            config.max_stepsize,
            config.delta,
            config.fun_min,
        ];
        self.write(&self.buffer, OPTIONS, &options);
    }

    /// Queues what halts a pipelined run for the next submissions: `halts` = 0.0
    /// (nothing), 1.0 (a refusal) or 2.0 (a refusal or `sqnorm <= threshold`), with the
    /// halted flag cleared.
    pub(crate) fn write_halt(&self, halts: f64, threshold: f64) {
        self.write(&self.buffer, HALTED, &[0.0, halts, threshold]);
    }

    /// Records a clear of the refusal flag, so the next update runs whatever the
    /// norm pass decided (benchmarks only).
    pub(crate) fn clear_refusal(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.clear_buffer(&self.buffer, (STEP + 1) * self.real, Some(self.real));
    }

    /// Records setting the loss to NaN, after an evaluation that no norm pass
    /// follows (the norm pass sets it to NaN once it has read it): a loss the next
    /// evaluation does not write then refuses its step.
    pub(crate) fn encode_unwritten_loss(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.copy_buffer_to_buffer(&self.nan, 0, &self.buffer, 0, self.real);
    }

    /// Records putting the loss the last norm pass used back into the loss slot,
    /// for a norm pass run again without an evaluation (benchmarks only; through
    /// the scratch real: a copy within one buffer is not allowed).
    pub(crate) fn encode_reused_loss(&self, encoder: &mut wgpu::CommandEncoder) {
        let r = self.real;
        encoder.copy_buffer_to_buffer(&self.buffer, READBACK * r, &self.nan, r, r);
        encoder.copy_buffer_to_buffer(&self.nan, r, &self.buffer, 0, r);
    }

    /// Queues a loss into the loss slot, for the next submission: the host's loss
    /// for the GPU's step-size rule (applied before that submission's commands, so
    /// an objective that returns [`crate::Loss::Host`] must leave the slot alone).
    pub(crate) fn write_loss(&self, loss: f64) {
        self.write(&self.buffer, 0, &[loss]);
    }

    /// Queues a step size computed on the host for the next update, replacing the
    /// one the norm pass wrote, and clears the refusal (the host already checked).
    pub(crate) fn write_step(&self, step: f64) {
        self.write(&self.buffer, STEP, &[step, 0.0]);
    }
}
