//! Where each named tensor lives: the parameter vector split into segments.
//!
//! All tensors share one logical vector (one global norm, one update), stored as a
//! list of *segments*: one storage binding each for parameters, gradients and
//! velocity. Tensors the optimizer owns are packed into arena segments: each starts
//! at an offset aligned to the device's `min_storage_buffer_offset_alignment` (so a
//! user kernel can bind it alone); a tensor that fits in a segment never straddles
//! two; a tensor larger than a segment continues in the next ones. Gaps are zero in
//! every vector and stay zero. Tensors whose buffers the user owns get segments of
//! their own, shared by a run of them laid back to back in the user's buffers.
//! The kernels run once per segment, never once per tensor.

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

    /// Number of elements (`usize::MAX` where the product of the dimensions
    /// overflows; such a tensor is refused when it is placed).
    pub fn len(&self) -> usize {
        self.checked_len().unwrap_or(usize::MAX)
    }

    /// Number of elements, or `None` where the product of the dimensions overflows
    /// `usize` (a zero dimension makes it 0 whatever the others are).
    pub fn checked_len(&self) -> Option<usize> {
        if self.shape.contains(&0) {
            return Some(0);
        }
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A handle to a tensor: its index in layout order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorId(pub usize);

/// Anything that names a tensor: its name (`&str`) or its [`TensorId`].
pub trait TensorKey {
    /// Finds the tensor in `layout`.
    fn find(self, layout: &Layout) -> Result<&TensorPlacement>;
}

impl TensorKey for &str {
    fn find(self, layout: &Layout) -> Result<&TensorPlacement> {
        layout
            .tensors
            .iter()
            .find(|t| t.spec.name == self)
            .ok_or_else(|| Error::Tensor(self.to_string(), "no such tensor"))
    }
}

impl TensorKey for &String {
    fn find(self, layout: &Layout) -> Result<&TensorPlacement> {
        TensorKey::find(self.as_str(), layout)
    }
}

impl TensorKey for TensorId {
    fn find(self, layout: &Layout) -> Result<&TensorPlacement> {
        layout
            .tensors
            .get(self.0)
            .ok_or_else(|| Error::Tensor(format!("#{}", self.0), "no such tensor"))
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
    /// Whether its buffers belong to the user.
    pub external: bool,
}

/// The placement of all tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    tensors: Vec<TensorPlacement>,
    /// Length of each segment in elements, a multiple of 4 (one `vec4<f32>`).
    segment_lens: Vec<usize>,
    /// Whether the last segment is an arena segment that can take more tensors.
    arena_open: bool,
    align: usize,
    capacity: usize,
}

/// Most segments in one layout: 65,536 storage buffers per vector is far beyond
/// any device (2^45 f32 parameters with an H200's 2 GiB segments).
pub const MAX_SEGMENTS: usize = 1 << 16;

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

impl Layout {
    /// Places `tensors` in order in arena segments. `align` is the tensor start
    /// alignment in elements (rounded up to a multiple of 4); `capacity` the most
    /// elements in one segment (rounded down to a multiple of `align`).
    pub fn new(tensors: &[TensorSpec], align: usize, capacity: usize) -> Result<Self> {
        let mut layout = Self::empty(align, capacity)?;
        for t in tensors {
            layout.place(t)?;
        }
        layout.finish()
    }

    /// A layout with no tensors yet.
    pub(crate) fn empty(align: usize, capacity: usize) -> Result<Self> {
        let align = round_up(align.max(4), 4);
        if capacity < align {
            return Err(Error::InvalidOption {
                option: "max_segment_elements",
                value: format!("{capacity} (this device aligns tensors to {align} elements)"),
                reason: "must hold at least one aligned block",
            });
        }
        let capacity = (capacity / align) * align;
        Ok(Layout {
            tensors: Vec::new(),
            segment_lens: Vec::new(),
            arena_open: false,
            align,
            capacity,
        })
    }

    /// Checks a tensor before it is placed: not empty, not too large, a new name.
    fn check_new(&self, spec: &TensorSpec) -> Result<()> {
        let Some(len) = spec.checked_len() else {
            return Err(Error::Tensor(
                spec.name.clone(),
                "the product of its dimensions overflows usize",
            ));
        };
        if len == 0 {
            return Err(Error::EmptyParameters(format!("tensor {:?}", spec.name)));
        }
        // Refused before the placement loop, which would otherwise run (and
        // allocate) once per segment of an absurd size.
        if self.segment_lens.len() + len.div_ceil(self.capacity) > MAX_SEGMENTS {
            return Err(Error::OutOfMemory(format!(
                "tensor {:?} ({len} elements) would take the model past {MAX_SEGMENTS} \
                 segments of {} elements: more than a device holds (or a \
                 max_segment_elements far too small)",
                spec.name, self.capacity
            )));
        }
        if self.tensors.iter().any(|t| t.spec.name == spec.name) {
            return Err(Error::Tensor(spec.name.clone(), "given twice"));
        }
        Ok(())
    }

    fn new_segment(&mut self, arena: bool) -> usize {
        self.segment_lens.push(0);
        self.arena_open = arena;
        self.segment_lens.len() - 1
    }

    /// Places an optimizer-owned tensor in the arena.
    pub(crate) fn place(&mut self, spec: &TensorSpec) -> Result<TensorId> {
        self.check_new(spec)?;
        let len = spec.len();
        let (mut seg, mut off) = if self.arena_open {
            let seg = self.segment_lens.len() - 1;
            (seg, round_up(self.segment_lens[seg], self.align))
        } else {
            (self.new_segment(true), 0)
        };
        // A tensor that fits in one segment never straddles two.
        if off >= self.capacity || (len <= self.capacity && off + len > self.capacity) {
            seg = self.new_segment(true);
            off = 0;
        }
        self.lay(spec, seg, off, false);
        Ok(TensorId(self.tensors.len() - 1))
    }

    /// Cuts `spec` into parts from element `off` of segment `seg` on, opening a new
    /// segment whenever one is full; records the placement and returns where it
    /// ended.
    fn lay(
        &mut self,
        spec: &TensorSpec,
        mut seg: usize,
        mut off: usize,
        external: bool,
    ) -> (usize, usize) {
        let len = spec.len();
        let mut parts = Vec::new();
        let mut done = 0;
        while done < len {
            if off >= self.capacity {
                seg = self.new_segment(!external);
                off = 0;
            }
            let n = (len - done).min(self.capacity - off);
            parts.push(Part {
                segment: seg,
                offset: off,
                len: n,
                tensor_offset: done,
            });
            done += n;
            off += n;
            self.segment_lens[seg] = off;
        }
        self.tensors.push(TensorPlacement {
            spec: spec.clone(),
            parts,
            external,
        });
        (seg, off)
    }

    /// Places a run of user-owned tensors that lie back to back in the user's
    /// buffers in segments of their own, as one vector cut every `capacity`
    /// elements (its total length must be a multiple of 4; the caller checks).
    pub(crate) fn place_external<'a>(
        &mut self,
        run: impl IntoIterator<Item = &'a TensorSpec>,
    ) -> Result<()> {
        let mut at = None; // (segment, elements used) of the run so far
        for spec in run {
            self.check_new(spec)?;
            let (seg, off) = at.unwrap_or_else(|| (self.new_segment(false), 0));
            at = Some(self.lay(spec, seg, off, true));
        }
        self.arena_open = false;
        Ok(())
    }

    /// Pads arena segments to whole vec4s; errors if there is no tensor at all.
    pub(crate) fn finish(mut self) -> Result<Self> {
        if self.tensors.is_empty() {
            return Err(Error::EmptyParameters("no tensors given".into()));
        }
        for l in &mut self.segment_lens {
            *l = round_up(*l, 4);
        }
        Ok(self)
    }

    /// The placed tensors, in layout order.
    pub fn tensors(&self) -> &[TensorPlacement] {
        &self.tensors
    }

    /// A tensor by name or id.
    pub fn tensor(&self, key: impl TensorKey) -> Result<&TensorPlacement> {
        key.find(self)
    }

    /// The id of tensor `name`.
    pub fn id(&self, name: &str) -> Result<TensorId> {
        self.tensors
            .iter()
            .position(|t| t.spec.name == name)
            .map(TensorId)
            .ok_or_else(|| Error::Tensor(name.to_string(), "no such tensor"))
    }

    /// Segment lengths in elements (each a multiple of 4).
    pub fn segment_lens(&self) -> &[usize] {
        &self.segment_lens
    }

    /// Whether each segment holds user-owned tensors (a run of them, whole).
    pub fn external_segments(&self) -> Vec<bool> {
        let mut external = vec![false; self.segment_lens.len()];
        for t in self.tensors.iter().filter(|t| t.external) {
            for p in &t.parts {
                external[p.segment] = true;
            }
        }
        external
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

    fn part(segment: usize, offset: usize, len: usize, tensor_offset: usize) -> Part {
        Part {
            segment,
            offset,
            len,
            tensor_offset,
        }
    }

    #[test]
    fn aligned_starts_and_padded_segments() {
        let l = Layout::new(&specs(&[3, 10, 1]), 8, 1 << 20).unwrap();
        let offs: Vec<usize> = l.tensors().iter().map(|t| t.parts[0].offset).collect();
        assert_eq!(offs, vec![0, 8, 24]);
        assert_eq!(l.segment_lens(), &[28]);
        assert_eq!(l.num_params(), 14);
        assert_eq!(l.id("t2").unwrap(), TensorId(2));
        assert_eq!(l.tensor(TensorId(1)).unwrap().spec.name, "t1");
    }

    #[test]
    fn a_tensor_that_fits_moves_to_the_next_segment() {
        // capacity 16: t0 takes 0..10, t1 (8) would end at 24 > 16 -> segment 1.
        let l = Layout::new(&specs(&[10, 8, 7]), 8, 16).unwrap();
        let t = l.tensors();
        assert_eq!(t[1].parts, vec![part(1, 0, 8, 0)]);
        assert_eq!(t[2].parts, vec![part(1, 8, 7, 0)]);
        assert_eq!(l.segment_lens(), &[12, 16]);
    }

    #[test]
    fn a_large_tensor_spans_segments() {
        let l = Layout::new(&specs(&[5, 40]), 8, 16).unwrap();
        let p = &l.tensors()[1].parts;
        assert_eq!(
            p,
            &[part(0, 8, 8, 0), part(1, 0, 16, 8), part(2, 0, 16, 24)]
        );
        assert_eq!(l.segment_lens(), &[16, 16, 16]);
    }

    #[test]
    fn external_tensors_get_their_own_segments() {
        let mut l = Layout::empty(8, 16).unwrap();
        l.place(&TensorSpec::new("a", &[3])).unwrap();
        l.place_external([&TensorSpec::new("x", &[36])]).unwrap();
        l.place(&TensorSpec::new("b", &[5])).unwrap();
        let l = l.finish().unwrap();
        let t = l.tensors();
        assert_eq!(
            t[1].parts,
            vec![part(1, 0, 16, 0), part(2, 0, 16, 16), part(3, 0, 4, 32)]
        );
        assert!(t[1].external && !t[0].external);
        // an owned tensor after an external one starts a fresh arena segment
        assert_eq!(t[2].parts, vec![part(4, 0, 5, 0)]);
        assert_eq!(l.segment_lens(), &[4, 16, 16, 4, 8]);
    }

    #[test]
    fn a_run_of_external_tensors_shares_segments() {
        // 3 + 10 + 7 + 20 = 40 elements back to back, cut every 16 elements
        // whatever the tensor boundaries; the next run starts a segment.
        let mut l = Layout::empty(8, 16).unwrap();
        let run = specs(&[3, 10, 7, 20]);
        l.place_external(&run).unwrap();
        l.place_external([&TensorSpec::new("y", &[4])]).unwrap();
        let l = l.finish().unwrap();
        let parts: Vec<_> = l.tensors().iter().map(|t| t.parts.clone()).collect();
        assert_eq!(
            parts,
            vec![
                vec![part(0, 0, 3, 0)],
                vec![part(0, 3, 10, 0)],
                vec![part(0, 13, 3, 0), part(1, 0, 4, 3)],
                vec![part(1, 4, 12, 0), part(2, 0, 8, 12)],
                vec![part(3, 0, 4, 0)],
            ]
        );
        assert_eq!(l.segment_lens(), &[16, 16, 8, 4]);
        assert!(l.tensors().iter().all(|t| t.external));
        // names are still checked within a run
        let mut l = Layout::empty(8, 16).unwrap();
        let dup = [TensorSpec::new("a", &[4]), TensorSpec::new("a", &[4])];
        assert!(matches!(l.place_external(&dup), Err(Error::Tensor(..))));
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
        let l = Layout::new(&specs(&[4]), 8, 16).unwrap();
        assert!(matches!(l.tensor("zz"), Err(Error::Tensor(..))));
        // A shape whose product overflows: refused by name, not taken as empty (and
        // no overflow panic in debug builds).
        let huge = TensorSpec::new("huge", &[1 << 40, 1 << 40]);
        assert_eq!(huge.checked_len(), None);
        assert_eq!(huge.len(), usize::MAX);
        assert!(matches!(
            Layout::new(&[huge], 8, 16),
            Err(Error::Tensor(name, _)) if name == "huge"
        ));
        assert_eq!(
            TensorSpec::new("z", &[1 << 40, 1 << 40, 0]).checked_len(),
            Some(0)
        );
        assert_eq!(TensorSpec::new("s", &[]).checked_len(), Some(1));
        assert!(matches!(l.tensor(TensorId(1)), Err(Error::Tensor(..))));
    }

    #[test]
    fn absurd_sizes_are_refused_before_placement() {
        // 2^60 elements in segments of 16 would be 2^56 parts: refused at once.
        let r = Layout::new(&specs(&[1 << 60]), 8, 16);
        assert!(matches!(r, Err(Error::OutOfMemory(m)) if m.contains("65536 segments")));
        // Exactly MAX_SEGMENTS segments is fine; one element more is not.
        let l = Layout::new(&specs(&[16 * MAX_SEGMENTS]), 8, 16).unwrap();
        assert_eq!(l.segment_lens().len(), MAX_SEGMENTS);
        assert!(Layout::new(&specs(&[16 * MAX_SEGMENTS + 1]), 8, 16).is_err());
        // The limit counts the segments already placed.
        assert!(Layout::new(&specs(&[16, 16 * MAX_SEGMENTS - 16]), 8, 16).is_ok());
        assert!(Layout::new(&specs(&[16, 16 * MAX_SEGMENTS]), 8, 16).is_err());
    }
}
