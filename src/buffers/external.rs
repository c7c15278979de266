//! Tensors whose storage belongs to the user, and the checks at registration.

use crate::error::{Error, Result};
use crate::layout::TensorSpec;
use std::ops::Range;

/// A tensor whose parameter and gradient storage belong to the user: the optimizer
/// reads and updates them in place and never copies them.
///
/// Both regions hold `spec.len()` f32 values from their byte offset. Requirements,
/// checked at registration with [`Error::Registration`]: `STORAGE` usage, regions
/// inside their buffers and not overlapping any other tensor's, parameters and
/// gradient in two different buffers (wgpu refuses one buffer bound writable and
/// read-only in one dispatch), buffers of the optimizer's device, and for each *run* (below) an offset that is a multiple of the device's
/// `min_storage_buffer_offset_alignment` and a length that is a multiple of 4 (the
/// kernels read `vec4<f32>`; pad with zeros). Uploading or downloading through the
/// optimizer also needs `COPY_DST` / `COPY_SRC`.
///
/// **Runs.** Tensors registered one after another whose parameters lie back to back
/// in one buffer and whose gradients lie back to back in one buffer form a run: the
/// kernels treat it as one vector, one dispatch per segment instead of one per
/// tensor (a model of many small tensors in your own arena costs what one tensor
/// costs). Only the run's first offset must be aligned and only its total length
/// a multiple of 4; a tensor inside it may have any length and may straddle two
/// segments (then its `params_bindings` are two pieces at offsets that need not be
/// aligned: bind your arena in your own kernels). Tensors in separate buffers are
/// one run each, a segment each, whose norm and update share dispatches with up to 9
/// other small segments: fewer dispatches than tensors, but more than one run.
///
/// The device check relies on wgpu's validation, which catches a buffer of another
/// device of the same `wgpu::Instance`; wgpu offers no way to recognise a buffer of
/// another instance, so build the [`crate::GpuContext`] with [`crate::GpuContext::from_device`] on
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
    /// Checks everything of this tensor alone but the device (checked when the
    /// kernels are bound); [`runs`] checks what depends on its neighbours.
    /// `real_bytes` is the size of one element: 4 (f32) or 8 (f64 parameters).
    pub(crate) fn validate(&self, real_bytes: u64) -> Result<()> {
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
        let bytes = (len as u64).saturating_mul(real_bytes);
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
            if !off.is_multiple_of(real_bytes) {
                return bad(format!(
                    "{what} offset {off} is not a multiple of {real_bytes}"
                ));
            }
            if off.checked_add(bytes).is_none_or(|end| end > buf.size()) {
                return bad(format!(
                    "{what} range {off}..{} exceeds the buffer's {} bytes",
                    off.saturating_add(bytes),
                    buf.size()
                ));
            }
        }
        if self.params == self.grads {
            return bad(
                "params and grads are in the same buffer: wgpu does not let one dispatch \
                 bind a buffer writable (the parameters) and read-only (the gradient); \
                 use two buffers"
                    .into(),
            );
        }
        Ok(())
    }

    /// The parameter and gradient byte ranges, named (after [`Self::validate`]).
    fn regions(&self, real_bytes: u64) -> [(&'static str, &wgpu::Buffer, u64, u64); 2] {
        let bytes = self.spec.len() as u64 * real_bytes;
        [
            ("params", &self.params, self.params_offset, bytes),
            ("grads", &self.grads, self.grads_offset, bytes),
        ]
    }
}

/// Splits `tensors` (each validated) into runs: consecutive tensors whose
/// parameters follow one another in one buffer and whose gradients do too. Each
/// run must start at offsets aligned for a storage binding and hold a multiple of
/// 4 elements (whole `vec4`s).
pub(crate) fn runs(
    tensors: &[ExternalTensor],
    limits: &wgpu::Limits,
    real_bytes: u64,
) -> Result<Vec<Range<usize>>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let follows = |prev: &ExternalTensor| {
            let end = |off: u64| off + prev.spec.len() as u64 * real_bytes;
            t.params == prev.params
                && t.grads == prev.grads
                && t.params_offset == end(prev.params_offset)
                && t.grads_offset == end(prev.grads_offset)
        };
        match runs.last_mut() {
            Some(run) if follows(&tensors[i - 1]) => run.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    let align = u64::from(limits.min_storage_buffer_offset_alignment);
    for run in &runs {
        let first = &tensors[run.start];
        let bad = |reason: String| {
            Err(Error::Registration {
                tensor: first.spec.name.clone(),
                reason,
            })
        };
        for (what, off) in [
            ("params", first.params_offset),
            ("grads", first.grads_offset),
        ] {
            if !off.is_multiple_of(align) {
                return bad(format!(
                    "{what} offset {off} is not a multiple of {align} (it does not \
                     follow the previous tensor in the same buffers)"
                ));
            }
        }
        let len: usize = tensors[run.clone()].iter().map(|t| t.spec.len()).sum();
        if !len.is_multiple_of(4) {
            let what = if run.len() == 1 {
                format!("length {len}")
            } else {
                format!(
                    "with the {} tensors after it back to back, the length {len}",
                    run.len() - 1
                )
            };
            return bad(format!(
                "{what} is not a multiple of 4; pad the buffers with zeros"
            ));
        }
    }
    Ok(runs)
}

/// Errors if two tensors' regions overlap in one buffer: each would be updated
/// (and counted in the norm) once per tensor, silently. One tensor's own params
/// and grads are checked by [`ExternalTensor::validate`].
pub(crate) fn check_disjoint(tensors: &[ExternalTensor], real_bytes: u64) -> Result<()> {
    for (j, b) in tensors.iter().enumerate() {
        for a in &tensors[..j] {
            for (what_b, buf_b, off_b, len_b) in b.regions(real_bytes) {
                for (what_a, buf_a, off_a, len_a) in a.regions(real_bytes) {
                    if buf_a == buf_b && off_a < off_b + len_b && off_b < off_a + len_a {
                        return Err(Error::Registration {
                            tensor: b.spec.name.clone(),
                            reason: format!(
                                "its {what_b} range overlaps the {what_a} range of tensor {:?} \
                                 in the same buffer",
                                a.spec.name
                            ),
                        });
                    }
                }
            }
        }
    }
    Ok(())
}
