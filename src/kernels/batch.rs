//! How a dispatch covers its segments: each segment's geometry, the batches of
//! small segments that share a dispatch, and the kernels' per-segment blocks
//! written out for a batch (`shaders/batch.wgsl`).

use crate::buffers::Segment;
use crate::context::GpuContext;
use wgpu::util::DeviceExt;

/// Most workgroups along one dispatch dimension (WebGPU's and every adapter's limit).
pub(super) const MAX_DIM: u32 = 65_535;
/// Most loop iterations of one invocation. lavapipe was seen to stop a loop after
/// 65,535 iterations; the geometry adds workgroups rather than go near that.
pub(super) const MAX_ITERATIONS: u32 = 4096;

/// Segments of at most this many elements share dispatches, up to
/// [`BatchLimits`] of them: a model of many small tensors in separate user
/// buffers would otherwise pay a dispatch's fixed cost twice per tensor. Larger
/// segments get dispatches of their own.
pub(super) const SMALL_SEGMENT: usize = 1 << 20;

/// Most segments in one batch of the update (the storage bindings of a stage allow
/// fewer on some devices: three per segment).
const MAX_BATCH: usize = 10;
/// Most segments in one batch of the norm pass, which binds one buffer per segment.
const MAX_NORM_BATCH: usize = 30;

/// Most small segments one dispatch of each kernel takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchLimits {
    /// The first norm pass: one storage binding per segment (three with the
    /// overflow check).
    pub norm: usize,
    /// The update: three storage bindings per segment.
    pub update: usize,
}

impl BatchLimits {
    /// What the device's storage bindings per stage allow. Each kernel also binds
    /// a scratch buffer or two, maybe the scalars, and the batch's uniform, which
    /// counts too (Metal
    /// counts every buffer of a stage against one limit, which wgpu reports as the
    /// storage one).
    pub fn of(ctx: &GpuContext, check_overflow: bool) -> Self {
        let bindings = ctx.limits().max_storage_buffers_per_shader_stage as usize;
        let norm = if check_overflow {
            bindings.saturating_sub(4) / 3 // partials, bounds, scalars, batch; p, g, v
        } else {
            bindings.saturating_sub(2) // partials, batch; g each
        };
        BatchLimits {
            norm: norm.clamp(1, MAX_NORM_BATCH),
            update: (bindings.saturating_sub(2) / 3).clamp(1, MAX_BATCH),
        }
    }

    /// At most `most` segments per dispatch in both kernels (tests).
    #[cfg(test)]
    pub fn both(most: usize) -> Self {
        BatchLimits {
            norm: most,
            update: most,
        }
    }
}

/// What the norm and update kernels share (`Geometry`, the batch, the walk).
pub(super) const BATCH: &str = include_str!("../../shaders/batch.wgsl");

/// How the workgroups of a dispatch walk one segment; mirrors `Geometry` in
/// `shaders/batch.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Geometry {
    /// Length of the segment in vec4s.
    pub n4: u32,
    /// vec4s of one workgroup's share (the contiguous walk).
    pub chunk: u32,
    /// Workgroups sharing the segment (the stride of the grid-stride walk).
    pub groups: u32,
    /// The first of them in the dispatch (0 but in a batch of segments that each
    /// have their own workgroups).
    pub first: u32,
}

impl Geometry {
    /// Splits `n4` vec4s into at most `max_groups` contiguous chunks, one per
    /// workgroup of `wg` invocations (more if a chunk would need over
    /// `MAX_ITERATIONS` loop iterations per invocation).
    pub fn new(n4: u32, max_groups: u32, wg: u32) -> Self {
        let fewest = n4.div_ceil(wg * MAX_ITERATIONS);
        let wanted = n4.div_ceil(wg).clamp(1, max_groups.max(fewest).max(1));
        let chunk = n4.div_ceil(wanted).max(1);
        let groups = n4.div_ceil(chunk).max(1);
        Geometry {
            n4,
            chunk,
            groups,
            first: 0,
        }
    }

    /// The same segment shared by `groups` workgroups (at least as many as
    /// [`Geometry::new`] gave it), some of which may find no share.
    pub(super) fn spread(&self, groups: u32) -> Self {
        Geometry {
            chunk: self.n4.div_ceil(groups).max(1),
            groups,
            ..*self
        }
    }

    /// The same segment walked by workgroups `first..first + groups` of a dispatch.
    fn from(&self, first: u32) -> Self {
        Geometry { first, ..*self }
    }

    /// The `(x, y)` workgroup counts to dispatch.
    pub fn dispatch(&self) -> (u32, u32) {
        grid(self.groups)
    }
}

/// `groups` workgroups laid out as `(x, y)` with `x <= 65,535`; the kernels skip the
/// `x * y - groups` extra ones.
pub(crate) fn grid(groups: u32) -> (u32, u32) {
    let x = groups.clamp(1, MAX_DIM);
    (x, groups.div_ceil(x))
}

/// Splits segments of lengths `lens` into batches that share dispatches: runs of
/// consecutive segments of at most [`SMALL_SEGMENT`] elements, at most `most` long,
/// no two of which `clash`; every other segment alone.
pub(super) fn batches(
    lens: &[usize],
    most: usize,
    clash: impl Fn(usize, usize) -> bool,
) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, &len) in lens.iter().enumerate() {
        let small = len <= SMALL_SEGMENT;
        match out.last_mut() {
            Some(b)
                if small
                    && lens[b.start] <= SMALL_SEGMENT
                    && b.len() < most
                    && !b.clone().any(|j| clash(i, j)) =>
            {
                b.end = i + 1;
            }
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// Whether segments `a` and `b` cannot share an update's dispatch: one's parameters
/// (bound writable) in the buffer of the other's gradient (bound read-only), which
/// wgpu refuses within one dispatch, as user tensors may have it. (The norm pass
/// binds them all read-only: any segments may share its dispatches.)
pub(super) fn clash(a: &Segment, b: &Segment) -> bool {
    a.params.buffer == b.grads.buffer || a.grads.buffer == b.params.buffer
}

/// How the segments of a batch share the workgroups of its dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sharing {
    /// As many workgroups as the largest segment wants, each walking its share of
    /// every segment: a batch of tiny segments is one workgroup, not one per
    /// segment. Best where workgroups run a few at a time (CPU adapters).
    All,
    /// Each segment a range of workgroups of its own, one after the other, as many
    /// as it would have alone, scaled down to about `most` in all (the workgroups
    /// of one segment as long as the batch). Best on a GPU, where one workgroup
    /// walking 30 segments in turn leaves the device idle (300 tensors of 3,333
    /// parameters were 4 workgroups a dispatch on an H200), and where 30 segments'
    /// workgroups unscaled (98,000 at 1e8 in 300 tensors, one vec4 per invocation,
    /// each workgroup ending in a reduction) made the norm pass ten times slower.
    Apart { most: u32 },
}

/// A batch's dispatch, one norm partial per workgroup.
pub(super) struct BatchGeometry {
    /// Each segment's geometry within the batch's workgroups.
    segments: Vec<Geometry>,
    /// The batch's workgroups.
    pub(super) groups: u32,
    /// Index of the batch's first norm partial.
    partial_base: u32,
}

impl BatchGeometry {
    pub(super) fn new(geometries: &[Geometry], partial_base: u32, sharing: Sharing) -> Self {
        let (segments, groups) = match (geometries, sharing) {
            ([one], _) => (vec![*one], one.groups), // alone: as Geometry::new laid it out
            (_, Sharing::All) => {
                let groups = geometries.iter().map(|g| g.groups).max().unwrap_or(1);
                (
                    geometries.iter().map(|g| g.spread(groups)).collect(),
                    groups,
                )
            }
            (_, Sharing::Apart { most }) => {
                let wanted: u64 = geometries.iter().map(|g| u64::from(g.groups)).sum();
                let most = u64::from(most.max(1));
                let mut next = 0;
                let segments = geometries
                    .iter()
                    .map(|g| {
                        let g = if wanted <= most {
                            *g
                        } else {
                            g.spread((u64::from(g.groups) * most).div_ceil(wanted) as u32)
                        };
                        next += g.groups;
                        g.from(next - g.groups)
                    })
                    .collect();
                (segments, next)
            }
        };
        BatchGeometry {
            segments,
            groups,
            partial_base,
        }
    }

    /// The `(x, y)` workgroup counts to dispatch.
    pub(super) fn grid(&self) -> (u32, u32) {
        grid(self.groups)
    }

    /// The uniform `Batch` of `shaders/batch.wgsl`: the grid's width, the
    /// workgroups, the first partial, then each segment's geometry.
    pub(super) fn uniform(&self, ctx: &GpuContext) -> wgpu::Buffer {
        let head = [self.grid().0, self.groups, self.partial_base, 0];
        let mut bytes = bytemuck::bytes_of(&head).to_vec();
        bytes.extend_from_slice(bytemuck::cast_slice(&self.segments));
        ctx.device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("polyak batch geometry"),
                contents: &bytes,
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }
}

/// `source` with each block of lines between an `open` line and a `close` line
/// written out `count` times, copy `k` through `inside(k, line)`, and every other
/// line through `outside`. What `expand` and `unroll` share.
fn repeat_blocks(
    source: &str,
    (open, close): (&str, &str),
    count: usize,
    inside: impl Fn(usize, &str) -> String,
    outside: impl Fn(&str) -> String,
) -> String {
    let mut out = String::new();
    let mut block: Option<Vec<&str>> = None;
    for line in source.lines() {
        match (line.trim(), &mut block) {
            (l, _) if l == open => block = Some(Vec::new()),
            (l, Some(lines)) if l == close => {
                for k in 0..count {
                    for l in lines.iter() {
                        out.push_str(&inside(k, l));
                        out.push('\n');
                    }
                }
                block = None;
            }
            (_, Some(lines)) => lines.push(line),
            (_, None) => {
                out.push_str(&outside(line));
                out.push('\n');
            }
        }
    }
    out
}

/// `source` with its loops unrolled `u` times: each block of lines between a
/// `// @unrolled` line and a `// @end unrolled` line is kept (dropped when `u` is 1),
/// each block between `// @repeat` and `// @end repeat` written out `u` times with
/// `$u` the copy's index, and `$U` set to `u`. The other placeholders stay for
/// [`expand`].
pub(super) fn unroll(source: &str, u: u32) -> String {
    let kept = repeat_blocks(
        source,
        ("// @unrolled", "// @end unrolled"),
        usize::from(u != 1),
        |_, line| line.to_string(),
        str::to_string,
    );
    repeat_blocks(
        &kept,
        ("// @repeat", "// @end repeat"),
        u as usize,
        |k, line| line.replace("$u", &k.to_string()),
        |line| line.replace("$U", &u.to_string()),
    )
}

/// `source` with each block of lines between a `// @each` line and a `// @end` line
/// repeated once per segment of a batch of `m`, with the placeholders `subst(k)`
/// gives for segment `k` replaced, and `$M` set to `m`.
pub(super) fn expand(
    source: &str,
    m: usize,
    subst: impl Fn(usize) -> Vec<(&'static str, usize)>,
) -> String {
    repeat_blocks(
        source,
        ("// @each", "// @end"),
        m,
        |k, line| {
            subst(k)
                .iter()
                .fold(line.to_string(), |l, (placeholder, value)| {
                    l.replace(placeholder, &value.to_string())
                })
        },
        |line| line.replace("$M", &m.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_covers_every_vec4_once() {
        for &(n4, max) in &[
            (1u32, 8u32),
            (255, 8),
            (257, 8),
            (1 << 20, 8192),
            (1000, 3),
            (5, 100_000),
        ] {
            for wg in [32, 256, 1024] {
                let g = Geometry::new(n4, max, wg);
                let what = format!("{n4} {max} {wg}: {g:?}");
                // capped, unless a chunk would need too many loop iterations
                assert!(
                    g.groups <= max.max(1) || g.chunk <= wg * MAX_ITERATIONS,
                    "{what}"
                );
                assert!(g.chunk.div_ceil(wg) <= MAX_ITERATIONS, "{what}");
                assert!(g.groups * g.chunk >= n4, "{what}");
                assert!((g.groups - 1) * g.chunk < n4, "empty group {what}");
                let (x, y) = g.dispatch();
                assert!(x <= MAX_DIM && x * y >= g.groups);
            }
        }
    }

    #[test]
    fn a_batch_shares_its_workgroups_or_gives_each_segment_its_own() {
        let geos = [4u32, 1, 3].map(|groups| Geometry::new(groups * 256, 1 << 20, 256));
        assert_eq!(geos.map(|g| g.groups), [4, 1, 3]);
        let firsts = |b: &BatchGeometry| b.segments.iter().map(|g| g.first).collect::<Vec<_>>();
        // GPU: one range after the other, each as the segment alone
        let own = BatchGeometry::new(&geos, 7, Sharing::Apart { most: 8 });
        assert_eq!(own.groups, 8);
        assert_eq!(firsts(&own), [0, 4, 5]);
        for (g, alone) in own.segments.iter().zip(&geos) {
            assert_eq!(Geometry { first: 0, ..*g }, *alone);
        }
        // ... scaled down to about `most` in all, each segment still covered
        let few = BatchGeometry::new(&geos, 7, Sharing::Apart { most: 4 });
        let groups: Vec<u32> = few.segments.iter().map(|g| g.groups).collect();
        assert_eq!(groups, [2, 1, 2]);
        assert_eq!((few.groups, firsts(&few)), (5, vec![0, 2, 3]));
        for g in &few.segments {
            assert!(g.groups * g.chunk >= g.n4, "{g:?}");
        }
        // CPU adapter: every segment over all of the largest's workgroups
        let shared = BatchGeometry::new(&geos, 7, Sharing::All);
        assert_eq!(shared.groups, 4);
        for g in &shared.segments {
            assert_eq!((g.groups, g.first), (4, 0));
            assert!(g.groups * g.chunk >= g.n4);
        }
        // alone: the same either way
        for sharing in [Sharing::All, Sharing::Apart { most: 1 }] {
            let one = BatchGeometry::new(&geos[..1], 0, sharing);
            assert_eq!((one.groups, one.segments.as_slice()), (4, &geos[..1]));
        }
    }

    #[test]
    fn small_segments_batch_up_to_the_limit() {
        let big = SMALL_SEGMENT + 4;
        let none = |_, _| false;
        assert_eq!(
            batches(&[4, 8, big, 4, 4, 4], 2, none),
            vec![0..2, 2..3, 3..5, 5..6]
        );
        assert_eq!(batches(&[big, 4, big], 10, none), vec![0..1, 1..2, 2..3]);
        assert_eq!(batches(&[4; 3], 1, none), vec![0..1, 1..2, 2..3]);
        assert_eq!(batches(&[SMALL_SEGMENT; 3], 10, none), vec![0..3]);
        // segment 2 clashes with segment 0: it starts a batch of its own
        let clash = |i: usize, j: usize| (i.min(j), i.max(j)) == (0, 2);
        assert_eq!(batches(&[4; 5], 10, clash), vec![0..2, 2..5]);
    }

    #[test]
    fn expand_repeats_each_block_per_segment() {
        let src = "const M = $Mu;\n// @each\nvar x_$K = $B;\n// @end\nswitch {\n  // @each\n  case $Ku: {}\n  // @end\n}\n";
        let out = expand(src, 2, |k| vec![("$K", k), ("$B", 10 + k)]);
        assert_eq!(
            out,
            "const M = 2u;\nvar x_0 = 10;\nvar x_1 = 11;\nswitch {\n  case 0u: {}\n  case 1u: {}\n}\n"
        );
    }

    #[test]
    fn unroll_repeats_and_drops_blocks() {
        let src = "const U = $Uu;\nvar i = 0;\n// @unrolled\nloop {\n  // @repeat\n  let a$u = f(i + $uu);\n  // @end repeat\n}\n// @end unrolled\nrest($K);\n";
        assert_eq!(
            unroll(src, 2),
            "const U = 2u;\nvar i = 0;\nloop {\n  let a0 = f(i + 0u);\n  let a1 = f(i + 1u);\n}\nrest($K);\n"
        );
        assert_eq!(unroll(src, 1), "const U = 1u;\nvar i = 0;\nrest($K);\n");
    }

    #[test]
    fn geometry_goes_2d_past_65535_groups() {
        let g = Geometry::new(1 << 25, 100_000, 256);
        let (x, y) = g.dispatch();
        assert!(g.groups > MAX_DIM);
        assert_eq!(x, MAX_DIM);
        assert_eq!(y, 2);
    }
}
