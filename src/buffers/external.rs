//! Tensors whose storage belongs to the user, and the checks at registration.

use crate::error::{Error, Result};
use crate::layout::TensorSpec;

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

    /// The parameter and gradient byte ranges, named (after [`Self::validate`]).
    fn regions(&self, real_bytes: u64) -> [(&'static str, &wgpu::Buffer, u64, u64); 2] {
        let bytes = self.spec.len() as u64 * real_bytes;
        [
            ("params", &self.params, self.params_offset, bytes),
            ("grads", &self.grads, self.grads_offset, bytes),
        ]
    }
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
