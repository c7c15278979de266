//! Where each named tensor lives: the parameter arena split into segments.
//!
//! All tensors share one logical vector (one global norm, one update), stored as a
//! list of *segments*: one storage buffer each for parameters, gradients and
//! velocity, at most one binding long. A tensor starts at an offset aligned to the
//! device's `min_storage_buffer_offset_alignment` (so a user kernel can bind it
//! alone); a tensor that fits in a segment never straddles two; a tensor larger
//! than a segment continues in the next ones. Gaps are zero in every vector and
//! stay zero. The kernels run once per segment, never once per tensor.

use crate::error::{Error, Result};

/// A tensor to place: its name and shape (row-major; an empty shape is a scalar).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Unique name, e.g. `"layer1.weight"`.
    pub name: String,
    /// Dimensions; the element count is their product.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// A tensor called `name` with dimensions `shape`.
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One contiguous piece of a tensor inside one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Index of the segment.
    pub segment: usize,
    /// First element inside the segment.
    pub offset: usize,
    /// Elements in this piece.
    pub len: usize,
    /// First element of this piece inside the tensor.
    pub tensor_offset: usize,
}

/// A placed tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlacement {
    /// The tensor's name and shape.
    pub spec: TensorSpec,
    /// Its pieces, in order; one unless it is larger than a segment.
    pub parts: Vec<Part>,
}

/// The placement of all tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    tensors: Vec<TensorPlacement>,
    /// Length of each segment in elements, a multiple of 4 (one `vec4<f32>`).
    segment_lens: Vec<usize>,
    align: usize,
    capacity: usize,
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

impl Layout {
    /// Places `tensors` in order. `align` is the tensor start alignment in elements
    /// (rounded up to a multiple of 4); `capacity` the most elements in one segment
    /// (rounded down to a multiple of `align`).
    pub fn new(tensors: &[TensorSpec], align: usize, capacity: usize) -> Result<Self> {
        if tensors.is_empty() {
            return Err(Error::EmptyParameters("no tensors given".into()));
        }
        let align = round_up(align.max(4), 4);
        let capacity = (capacity / align) * align;
        if capacity == 0 {
            return Err(Error::InvalidOption {
                option: "max_segment_elements",
                value: capacity.to_string(),
                reason: "must hold at least one aligned block",
            });
        }
        let mut placed: Vec<TensorPlacement> = Vec::with_capacity(tensors.len());
        let mut segment_lens = vec![0usize];
        for spec in tensors {
            if spec.is_empty() {
                return Err(Error::EmptyParameters(format!("tensor {:?}", spec.name)));
            }
            if placed.iter().any(|t| t.spec.name == spec.name) {
                return Err(Error::Tensor(spec.name.clone(), "given twice"));
            }
            let len = spec.len();
            let mut seg = segment_lens.len() - 1;
            let mut off = round_up(segment_lens[seg], align);
            // A tensor that fits in one segment never straddles two.
            if off >= capacity || (len <= capacity && off + len > capacity) {
                segment_lens.push(0);
                seg += 1;
                off = 0;
            }
            let mut parts = Vec::new();
            let mut done = 0;
            while done < len {
                if off >= capacity {
                    segment_lens.push(0);
                    seg += 1;
                    off = 0;
                }
                let n = (len - done).min(capacity - off);
                parts.push(Part {
                    segment: seg,
                    offset: off,
                    len: n,
                    tensor_offset: done,
                });
                done += n;
                off += n;
                segment_lens[seg] = off;
            }
            placed.push(TensorPlacement {
                spec: spec.clone(),
                parts,
            });
        }
        for l in &mut segment_lens {
            *l = round_up(*l, 4);
        }
        Ok(Layout {
            tensors: placed,
            segment_lens,
            align,
            capacity,
        })
    }

    /// The placed tensors, in the order given.
    pub fn tensors(&self) -> &[TensorPlacement] {
        &self.tensors
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Result<&TensorPlacement> {
        self.tensors
            .iter()
            .find(|t| t.spec.name == name)
            .ok_or_else(|| Error::Tensor(name.to_string(), "no such tensor"))
    }

    /// Segment lengths in elements (each a multiple of 4).
    pub fn segment_lens(&self) -> &[usize] {
        &self.segment_lens
    }

    /// Sum of all tensor lengths (the logical parameter count).
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(|t| t.spec.len()).sum()
    }

    /// Tensor start alignment in elements.
    pub fn align(&self) -> usize {
        self.align
    }

    /// Most elements in one segment.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(lens: &[usize]) -> Vec<TensorSpec> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| TensorSpec::new(format!("t{i}"), &[n]))
            .collect()
    }

    #[test]
    fn aligned_starts_and_padded_segments() {
        let l = Layout::new(&specs(&[3, 10, 1]), 8, 1 << 20).unwrap();
        let offs: Vec<usize> = l.tensors().iter().map(|t| t.parts[0].offset).collect();
        assert_eq!(offs, vec![0, 8, 24]);
        assert_eq!(l.segment_lens(), &[28]);
        assert_eq!(l.num_params(), 14);
    }

    #[test]
    fn a_tensor_that_fits_moves_to_the_next_segment() {
        // capacity 16: t0 takes 0..10, t1 (8) would end at 24 > 16 -> segment 1.
        let l = Layout::new(&specs(&[10, 8, 7]), 8, 16).unwrap();
        let t = l.tensors();
        assert_eq!(
            t[1].parts,
            vec![Part {
                segment: 1,
                offset: 0,
                len: 8,
                tensor_offset: 0
            }]
        );
        assert_eq!(
            t[2].parts,
            vec![Part {
                segment: 1,
                offset: 8,
                len: 7,
                tensor_offset: 0
            }]
        );
        assert_eq!(l.segment_lens(), &[12, 16]);
    }

    #[test]
    fn a_large_tensor_spans_segments() {
        let l = Layout::new(&specs(&[5, 40]), 8, 16).unwrap();
        let p = &l.tensors()[1].parts;
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].segment, p[0].offset, p[0].len, p[0].tensor_offset),
            (0, 8, 8, 0)
        );
        assert_eq!(
            (p[1].segment, p[1].offset, p[1].len, p[1].tensor_offset),
            (1, 0, 16, 8)
        );
        assert_eq!(
            (p[2].segment, p[2].offset, p[2].len, p[2].tensor_offset),
            (2, 0, 16, 24)
        );
        assert_eq!(l.segment_lens(), &[16, 16, 16]);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(
            Layout::new(&[], 8, 16),
            Err(Error::EmptyParameters(_))
        ));
        assert!(matches!(
            Layout::new(&specs(&[0]), 8, 16),
            Err(Error::EmptyParameters(_))
        ));
        let dup = vec![TensorSpec::new("a", &[2]), TensorSpec::new("a", &[3])];
        assert!(matches!(Layout::new(&dup, 8, 16), Err(Error::Tensor(..))));
        assert!(Layout::new(&specs(&[4]), 8, 4).is_err());
    }
}
