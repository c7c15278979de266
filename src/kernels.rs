//! The WGSL kernels (`shaders/`): pipelines and bind groups, made once per optimizer.

use crate::buffers::{ParamBuffers, Region, Segment};
use crate::config::{NonFinitePolicy, PolyakConfig, Variant};
use crate::context::GpuContext;
use wgpu::util::DeviceExt;

mod batch;

pub(crate) use batch::BatchLimits;
use batch::{BATCH, BatchGeometry, MAX_ITERATIONS, Sharing, batches, clash, expand, unroll};
pub(crate) use batch::{Geometry, grid};

/// Mirrors `Rule` in `rule.wgsl`: the partial count, the variant, the
/// non-finite policy and the overflow check (the real-valued options live in the
/// scalars slot).
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RuleUniform {
    n: u32,
    variant: u32,
    refuse: u32,
    guard: u32,
}

impl RuleUniform {
    fn new(partials: u32, config: &PolyakConfig) -> Self {
        RuleUniform {
            n: partials,
            variant: match config.variant {
                Variant::SpsMax => 0,
                Variant::SpsPlus => 1,
            },
            refuse: match config.nonfinite {
                NonFinitePolicy::Propagate => 0,
                NonFinitePolicy::Refuse => 1,
                NonFinitePolicy::Skip => 2,
            },
            guard: u32::from(config.check_overflow),
        }
    }
}

/// Which kernel a pipeline of [`Kernels`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// The first norm pass (`norm_partials.wgsl`, or `norm_guard.wgsl`).
    Norm,
    /// Both norm passes and the rule in one workgroup (`norm_partials.wgsl`'s
    /// `single`).
    Single,
    /// The update (`update.wgsl`).
    Update,
    /// The norm, the rule and the update in one workgroup (`update.wgsl`'s `step_`
    /// entry points).
    Step,
}

/// One recorded dispatch: which of [`Kernels`]' pipelines, its bind group, its grid.
#[derive(Debug)]
struct Dispatch {
    pipeline: usize,
    group: wgpu::BindGroup,
    grid: (u32, u32),
}

/// Everything the norm and the update need, built once.
#[derive(Debug)]
pub(crate) struct Kernels {
    /// The norm and update pipelines the dispatches use.
    pipelines: Vec<wgpu::ComputePipeline>,
    /// (kernel, batch size, index in `pipelines`) of each pipeline compiled.
    compiled: Vec<(Pass, usize, usize)>,
    /// The first norm pass: one dispatch per segment or batch of small segments
    /// (none when the objective computes the norm), or the one-pass norm.
    norm: Vec<Dispatch>,
    /// The final sum and the rule (`norm_final.wgsl`), unless the norm is one pass.
    finish: Option<(wgpu::ComputePipeline, wgpu::BindGroup)>,
    /// The update: one dispatch per segment or batch of small segments.
    update: Vec<Dispatch>,
    /// The whole step in one dispatch of one workgroup, for the GPU's step-size
    /// rule, where the gradient is small enough for the one-pass norm and its
    /// segments fit one update batch.
    step: Option<Dispatch>,
    /// The final pass's `Rule` (partial count, variant, policy, check).
    rule: wgpu::Buffer,
    /// The partials the final pass sums.
    partial_count: u32,
    partials_bytes: u64,
    uniform_bytes: u64,
}

/// The step-size rule (`decide`), put in front of the kernels that end the norm.
const RULE: &str = include_str!("../shaders/rule.wgsl");
/// A workgroup's sum of g*g (`share`), put in front of the kernels that sum it.
const SQUARE_SUM: &str = include_str!("../shaders/square_sum.wgsl");

/// `len` elements of `region`, as a binding.
fn resource(region: &Region, len: usize) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(region.binding(len))
}

/// Bind group entries of a batch's vectors as the update and the checking norm
/// lay them out: the parameters, the gradient and the velocity (where there is
/// one) of segment `k` at bindings `first + 3k`, `+ 1` and `+ 2`.
fn vector_entries(segs: &[Segment], first: u32) -> Vec<(u32, wgpu::BindingResource<'_>)> {
    let mut entries = Vec::with_capacity(3 * segs.len());
    for (k, s) in (first..).step_by(3).zip(segs) {
        entries.push((k, resource(&s.params, s.len)));
        entries.push((k + 1, resource(&s.grads, s.len)));
        if let Some(v) = &s.velocity {
            entries.push((k + 2, resource(v, s.len)));
        }
    }
    entries
}

/// The same layout as the shaders' placeholders: `$K` and the bindings `$BP`,
/// `$BG`, `$BV` of segment `k`.
fn vector_placeholders(first: usize) -> impl Fn(usize) -> Vec<(&'static str, usize)> {
    move |k| {
        vec![
            ("$K", k),
            ("$BP", first + 3 * k),
            ("$BG", first + 1 + 3 * k),
            ("$BV", first + 2 + 3 * k),
        ]
    }
}

pub(crate) fn pipeline(
    ctx: &GpuContext,
    module: &wgpu::ShaderModule,
    entry: &str,
    constants: &[(&str, f64)],
) -> wgpu::ComputePipeline {
    ctx.device()
        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                ..Default::default()
            },
            cache: None,
        })
}

pub(crate) fn module(
    ctx: &GpuContext,
    label: &str,
    source: impl Into<std::borrow::Cow<'static, str>>,
) -> wgpu::ShaderModule {
    ctx.device()
        .create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        })
}

/// What the kernels' precision prelude defines for f32 parameters: `real`, `real4`,
/// jnp's float32 eps, the overflow check's limit and smallest normal number, and
/// NaN / infinity by bits (WGSL lets a compiler assume arithmetic never meets them,
/// so these do not compare floats; a constant NaN or infinity is a shader-creation
/// error, so they are made at run time).
const PRELUDE_F32: &str = "\
alias real = f32;
alias real4 = vec4<f32>;
const EPS: real = 1.1920929e-7;
const LIMIT: real = 3.3995004e38; // 99.9% of the largest f32 (1 - 2^-10)
const TINY: real = 1.1754943508222875e-38; // the smallest normal f32
fn finite4(x: real4) -> bool {
    return all((bitcast<vec4<u32>>(x) & vec4<u32>(0x7f800000u)) != vec4<u32>(0x7f800000u));
}
fn is_nan(x: real) -> bool { return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u; }
fn is_finite(x: real) -> bool { return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u; }
fn nan() -> real { var bits = 0x7fc00000u; return bitcast<f32>(bits); }
fn inf_with_sign_of(x: real) -> real {
    var bits = 0x7f800000u;
    return bitcast<f32>(bits | (bitcast<u32>(x) & 0x80000000u));
}
";

/// The same for f64 parameters (`SHADER_F64`). naga has no bitcast from f64 to
/// integers, and a compiler may fold f64 arithmetic as if NaN and infinity never
/// occurred (lavapipe folds `x - x` to 0 and `1 / 0` to 0), so these classify by
/// the bits of an f32 conversion: NaN and infinity survive it, and scaling by
/// 2^-1000 first keeps every finite f64 finite in f32.
const PRELUDE_F64: &str = "\
alias real = f64;
alias real4 = vec4<f64>;
const EPS: real = 2.220446049250313e-16;
const LIMIT: real = 1.7959375751603017e308; // 99.9% of the largest f64 (1 - 2^-10)
const TINY: real = 2.2250738585072014e-308; // the smallest normal f64
fn bits32(x: real) -> u32 { return bitcast<u32>(f32(x)); }
fn finite4(x: real4) -> bool {
    let bits = bitcast<vec4<u32>>(vec4<f32>(x * 9.332636185032189e-302));
    return all((bits & vec4<u32>(0x7f800000u)) != vec4<u32>(0x7f800000u));
}
fn is_nan(x: real) -> bool { return (bits32(x) & 0x7fffffffu) > 0x7f800000u; }
fn is_finite(x: real) -> bool {
    return (bits32(x * 9.332636185032189e-302) & 0x7f800000u) != 0x7f800000u;
}
fn nan() -> real { var bits = 0x7fc00000u; return real(bitcast<f32>(bits)); }
fn inf_with_sign_of(x: real) -> real {
    var bits = 0x7f800000u;
    return real(bitcast<f32>(bits | (bits32(x) & 0x80000000u)));
}
";

/// `source` with the precision prelude in front: `real` of `real_bytes` (4 or 8),
/// and `velocity4` for a velocity of `velocity_bytes` per element (2: f16) with
/// `to_velocity`, its conversion from `real4`. An f16 velocity saturates at
/// +-65504 (f16's largest finite value) rather than overflow to infinity, which
/// the next step would carry into the parameters.
pub(crate) fn with_prelude(source: &str, real_bytes: u64, velocity_bytes: u64) -> String {
    let (enable, velocity) = if velocity_bytes == 2 {
        (
            "enable f16;\n",
            "vec4<f16>;\nfn to_velocity(v: real4) -> velocity4 \
             { return velocity4(clamp(v, real4(-65504.0), real4(65504.0))); }",
        )
    } else {
        (
            "",
            "real4;\nfn to_velocity(v: real4) -> velocity4 { return v; }",
        )
    };
    let prelude = if real_bytes == 8 {
        PRELUDE_F64
    } else {
        PRELUDE_F32
    };
    format!("{enable}{prelude}alias velocity4 = {velocity}\n{source}")
}

pub(crate) fn uniform<T: bytemuck::Pod>(ctx: &GpuContext, value: &T) -> wgpu::Buffer {
    ctx.device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("polyak uniform"),
            contents: bytemuck::bytes_of(value),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
}

pub(crate) fn bind_group(
    ctx: &GpuContext,
    pipeline: &wgpu::ComputePipeline,
    resources: &[(u32, wgpu::BindingResource<'_>)],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = resources
        .iter()
        .map(|(binding, resource)| wgpu::BindGroupEntry {
            binding: *binding,
            resource: resource.clone(),
        })
        .collect();
    ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

impl Kernels {
    /// Compiles the kernels for `config` (momentum, step-size rule) and binds them
    /// to `bufs`.
    pub fn new(ctx: &GpuContext, bufs: &ParamBuffers, config: &PolyakConfig) -> Self {
        let geometries = Self::geometries(ctx, bufs);
        let limits = BatchLimits::of(ctx, config.check_overflow);
        let one_pass = Self::fits_one_pass(ctx, bufs, config, limits);
        Self::with_geometries(ctx, bufs, config, geometries, limits, one_pass)
    }

    /// Whether one workgroup computes the norm and the step size in one dispatch:
    /// a gradient of at most [`GpuContext::one_pass_limit`] elements in one batch,
    /// which the kernels reduce themselves without the overflow check (the check's
    /// bounds stay in two passes).
    fn fits_one_pass(
        ctx: &GpuContext,
        bufs: &ParamBuffers,
        config: &PolyakConfig,
        limits: BatchLimits,
    ) -> bool {
        let lens: Vec<usize> = bufs.segments.iter().map(|s| s.len).collect();
        let total: usize = lens.iter().sum();
        // Each invocation's loop stays under the walk's iteration cap.
        let most = ctx.workgroup_size() as usize * MAX_ITERATIONS as usize * 4;
        bufs.objective_norm.is_none()
            && !config.check_overflow
            && total <= ctx.one_pass_limit().min(most)
            && batches(&lens, limits.norm, |_, _| false).len() == 1
    }

    /// The geometry of each segment alone.
    fn geometries(ctx: &GpuContext, bufs: &ParamBuffers) -> Vec<Geometry> {
        bufs.segments
            .iter()
            .map(|s| {
                Geometry::new(
                    (s.len / 4) as u32,
                    ctx.max_workgroups(),
                    ctx.workgroup_size(),
                )
            })
            .collect()
    }

    /// As [`Kernels::new`] with the dispatch geometry of each segment given, at
    /// most `limits` small segments per dispatch, and the norm in one pass or two.
    fn with_geometries(
        ctx: &GpuContext,
        bufs: &ParamBuffers,
        config: &PolyakConfig,
        geometries: Vec<Geometry>,
        limits: BatchLimits,
        one_pass: bool,
    ) -> Self {
        bufs.scalars.write_options(config);

        let lens: Vec<usize> = bufs.segments.iter().map(|s| s.len).collect();
        // Segments of a batch share its workgroups where those run a few at a time.
        let sharing = if ctx.contiguous_invocations() {
            Sharing::All
        } else {
            Sharing::Apart {
                most: ctx.max_workgroups(),
            }
        };
        // The norm pass binds every vector read-only: any small segments may share
        // its dispatches. None when the objective computes the norm.
        let mut ours = 0; // norm partials: one per workgroup of every batch
        // In one pass one workgroup walks every segment.
        let one_workgroup = || {
            let one: Vec<_> = geometries.iter().map(|g| g.spread(1)).collect();
            BatchGeometry::new(&one, 0, Sharing::All)
        };
        let norm_batches: Vec<_> = match bufs.objective_norm {
            Some(_) => Vec::new(),
            None if one_pass => vec![(0..lens.len(), one_workgroup())],
            None => batches(&lens, limits.norm, |_, _| false)
                .into_iter()
                .map(|batch| {
                    let geometry = BatchGeometry::new(&geometries[batch.clone()], ours, sharing);
                    ours += geometry.groups;
                    (batch, geometry)
                })
                .collect(),
        };
        // The final pass sums our per-workgroup partials, or the objective's own,
        // and with the overflow check intersects our two bounds per workgroup.
        let scratch = |label, reals: u64| {
            ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: reals.max(1) * bufs.real_bytes(),
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let workgroups = u64::from(ours); // 0 when the objective computes the norm
        let partials = scratch("polyak norm partials", workgroups);
        let checked = u64::from(config.check_overflow);
        let bounds = scratch("polyak step bounds", 2 * workgroups * checked);
        let (summed, count) = match &bufs.objective_norm {
            Some(o) => (&o.partials, o.count),
            None => (&partials, ours),
        };
        let rule = uniform(ctx, &RuleUniform::new(count, config));
        // rule.wgsl's bindings, in norm_final.wgsl and the one-pass norm.
        let scalars = (2, bufs.scalars.buffer.as_entire_binding());
        let rule_entry = (3, rule.as_entire_binding());
        let finish = (!one_pass).then(|| {
            let text = with_prelude(
                &(RULE.to_string() + include_str!("../shaders/norm_final.wgsl")),
                bufs.real_bytes(),
                config.velocity_bytes(),
            );
            let finish = pipeline(ctx, &module(ctx, "norm_final", text), "main", &[]);
            let entries = [
                (0, summed.as_entire_binding()),
                (1, bounds.as_entire_binding()),
                scalars.clone(),
                rule_entry.clone(),
            ];
            let group = bind_group(ctx, &finish, &entries);
            (finish, group)
        });
        let mut kernels = Kernels {
            pipelines: Vec::new(),
            compiled: Vec::new(),
            norm: Vec::new(),
            finish,
            update: Vec::new(),
            step: None,
            uniform_bytes: rule.size(),
            rule: rule.clone(), // (a handle: the bindings above borrow this one)
            partial_count: count,
            partials_bytes: partials.size() + bounds.size(),
        };
        let pass = if one_pass { Pass::Single } else { Pass::Norm };
        for (batch, geometry) in norm_batches {
            let segs = &bufs.segments[batch];
            let pipeline = kernels.pipeline_for(ctx, bufs, config, pass, segs.len());
            let geo = geometry.uniform(ctx);
            kernels.uniform_bytes += geo.size();
            // norm_partials.wgsl: partials 0 (or the scalars 2 and the rule 3 in
            // one pass), geometry 1, each gradient from 4; norm_guard.wgsl: bounds
            // 2, scalars 3, then params, gradient and velocity of each segment
            // from 4.
            let mut entries = vec![(1, geo.as_entire_binding())];
            if one_pass {
                entries.extend([scalars.clone(), rule_entry.clone()]);
            } else {
                entries.push((0, partials.as_entire_binding()));
            }
            if config.check_overflow {
                entries.push((2, bounds.as_entire_binding()));
                if bufs.has_velocity() {
                    // (only `momentum` reads it)
                    entries.push((3, bufs.scalars.buffer.as_entire_binding()));
                }
                entries.extend(vector_entries(segs, 4));
            } else {
                for (k, s) in (4..).zip(segs) {
                    entries.push((k, resource(&s.grads, s.len)));
                }
            }
            kernels.norm.push(Dispatch {
                group: bind_group(ctx, &kernels.pipelines[pipeline], &entries),
                pipeline,
                grid: geometry.grid(),
            });
        }
        let segments = &bufs.segments;
        let update_batches = batches(&lens, limits.update, |i, j| {
            clash(&segments[i], &segments[j])
        });
        for batch in &update_batches {
            let geometry = BatchGeometry::new(&geometries[batch.clone()], 0, sharing);
            let dispatch =
                kernels.update_dispatch(ctx, bufs, config, Pass::Update, batch.clone(), geometry);
            kernels.update.push(dispatch);
        }
        // The whole step in one workgroup: the one-pass norm's walk (every segment
        // that one workgroup's), the update's bindings.
        if let ([batch], true) = (&update_batches[..], one_pass) {
            let geometry = one_workgroup();
            let dispatch =
                kernels.update_dispatch(ctx, bufs, config, Pass::Step, batch.clone(), geometry);
            kernels.step = Some(dispatch);
        }
        kernels
    }

    /// The dispatch of `pass` (the update, or the whole step) over segments `batch`
    /// laid out by `geometry`: update.wgsl's geometry 1, scalars 2 (the rule 3 in a
    /// whole step), then params, gradient and velocity of each segment from 4.
    fn update_dispatch(
        &mut self,
        ctx: &GpuContext,
        bufs: &ParamBuffers,
        config: &PolyakConfig,
        pass: Pass,
        batch: std::ops::Range<usize>,
        geometry: BatchGeometry,
    ) -> Dispatch {
        let segs = &bufs.segments[batch];
        let pipeline = self.pipeline_for(ctx, bufs, config, pass, segs.len());
        let geo = geometry.uniform(ctx);
        self.uniform_bytes += geo.size();
        let mut entries = vec![
            (1, geo.as_entire_binding()),
            (2, bufs.scalars.buffer.as_entire_binding()),
        ];
        if pass == Pass::Step {
            entries.push((3, self.rule.as_entire_binding()));
        }
        entries.extend(vector_entries(segs, 4));
        Dispatch {
            group: bind_group(ctx, &self.pipelines[pipeline], &entries),
            pipeline,
            grid: geometry.grid(),
        }
    }

    /// The index of `pass`'s pipeline for batches of `m` segments, compiled the
    /// first time it is asked for.
    fn pipeline_for(
        &mut self,
        ctx: &GpuContext,
        bufs: &ParamBuffers,
        config: &PolyakConfig,
        pass: Pass,
        m: usize,
    ) -> usize {
        if let Some(&(.., i)) = self.compiled.iter().find(|c| (c.0, c.1) == (pass, m)) {
            return i;
        }
        // The precision prelude, then batch.wgsl, then the kernel (after the rule
        // and the square sum where it uses them), unrolled as the context says and
        // written out for m.
        let source = |text: &str, subst: &dyn Fn(usize) -> Vec<(&'static str, usize)>| {
            let text = unroll(&(BATCH.to_string() + text), ctx.unroll());
            let text = expand(&text, m, subst);
            with_prelude(&text, bufs.real_bytes(), config.velocity_bytes())
        };
        let entry = if bufs.has_velocity() {
            "momentum"
        } else {
            "plain"
        };
        let constants = ctx.kernel_constants();
        let compiled = match pass {
            Pass::Update | Pass::Step => {
                let text = [RULE, SQUARE_SUM, include_str!("../shaders/update.wgsl")].concat();
                let text = source(&text, &vector_placeholders(4));
                let entry = match pass {
                    Pass::Step => format!("step_{entry}"),
                    _ => entry.to_string(),
                };
                pipeline(ctx, &module(ctx, "update", text), &entry, &constants)
            }
            Pass::Norm if config.check_overflow => {
                let text = source(
                    include_str!("../shaders/norm_guard.wgsl"),
                    &vector_placeholders(4),
                );
                pipeline(ctx, &module(ctx, "norm_guard", text), entry, &constants)
            }
            Pass::Norm | Pass::Single => {
                let text = [
                    RULE,
                    SQUARE_SUM,
                    include_str!("../shaders/norm_partials.wgsl"),
                ]
                .concat();
                let text = source(&text, &|k| vec![("$K", k), ("$BG", 4 + k)]);
                let entry = if pass == Pass::Single {
                    "single"
                } else {
                    "main"
                };
                pipeline(ctx, &module(ctx, "norm_partials", text), entry, &constants)
            }
        };
        self.pipelines.push(compiled);
        self.compiled.push((pass, m, self.pipelines.len() - 1));
        self.pipelines.len() - 1
    }

    /// Queues `config`'s step-size rule and its real-valued options (momentum,
    /// max_stepsize, delta, fun_min) for the next submissions; the kernels stay as
    /// they are, so `config` must keep the shape they were built for.
    pub fn set_options(&self, ctx: &GpuContext, bufs: &ParamBuffers, config: &PolyakConfig) {
        bufs.scalars.write_options(config);
        let rule = RuleUniform::new(self.partial_count, config);
        ctx.queue()
            .write_buffer(&self.rule, 0, bytemuck::bytes_of(&rule));
    }

    /// Bytes of device memory the kernels use besides the vectors: the norm partials
    /// and the uniforms.
    pub fn scratch_bytes(&self) -> u64 {
        self.partials_bytes + self.uniform_bytes
    }

    /// Compute dispatches in one step: the norm of each segment or batch of small
    /// segments (none when the objective computes the norm), the final sum, the
    /// update of each. It grows with the segment count, never the tensor count.
    /// With the step size from the GPU (`device_rule`) a small step is one.
    pub fn dispatches_per_step(&self, device_rule: bool) -> usize {
        if device_rule && self.step.is_some() {
            return 1;
        }
        self.norm.len() + usize::from(self.finish.is_some()) + self.update.len()
    }

    /// Records `dispatches` into `pass`, setting each pipeline when it changes.
    fn record(&self, pass: &mut wgpu::ComputePass<'_>, dispatches: &[Dispatch]) {
        let mut current = usize::MAX;
        for d in dispatches {
            if d.pipeline != current {
                pass.set_pipeline(&self.pipelines[d.pipeline]);
                current = d.pipeline;
            }
            pass.set_bind_group(0, &d.group, &[]);
            pass.dispatch_workgroups(d.grid.0, d.grid.1, 1);
        }
    }

    /// Records the norm passes (one or two): the squared gradient norm lands in
    /// `scalars[2]`, the step size of the rule in `scalars[3]` and the refusal
    /// verdict in `scalars[4]`, and the loss they used in `scalars[1]` (the loss
    /// slot `scalars[0]` is NaN after).
    pub fn encode_norm(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("polyak norm"),
            timestamp_writes: timestamps,
        });
        self.record(&mut pass, &self.norm);
        if let Some((finish, group)) = &self.finish {
            pass.set_pipeline(finish);
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(1, 1, 1);
        }
    }

    /// Records a whole step with the step size from the GPU: the norm passes and
    /// the update, or the one dispatch that does both where the step is small.
    pub fn encode_step(&self, encoder: &mut wgpu::CommandEncoder) {
        match &self.step {
            Some(step) => {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("polyak step"),
                    timestamp_writes: None,
                });
                self.record(&mut pass, std::slice::from_ref(step));
            }
            None => {
                self.encode_norm(encoder, None);
                self.encode_update(encoder, None);
            }
        }
    }

    /// Records the fused update of every segment, with the step in `scalars[3]`
    /// (skipped whole if `scalars[4]` is not 0).
    pub fn encode_update(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("polyak update"),
            timestamp_writes: timestamps,
        });
        self.record(&mut pass, &self.update);
    }
}

#[cfg(test)]
mod tests;
