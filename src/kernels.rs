//! The WGSL kernels (`shaders/`): pipelines and bind groups, made once per optimizer.

use crate::buffers::{ParamBuffers, Region};
use crate::config::{NonFinitePolicy, PolyakConfig, Variant};
use crate::context::GpuContext;
use wgpu::util::DeviceExt;

mod batch;

use batch::{BATCH, BatchGeometry, MAX_BATCH, batches, clash, expand};
pub(crate) use batch::{Geometry, grid};

/// Invocations per workgroup in every kernel (`WG` in the shaders).
pub(crate) const WORKGROUP: u32 = 256;
/// Mirrors `Rule` in `norm_final.wgsl`: the partial count, the variant and the
/// non-finite policy (the real-valued options live in the scalars slot).
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RuleUniform {
    n: u32,
    variant: u32,
    refuse: u32,
    pad: u32,
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
            pad: 0,
        }
    }
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
    /// The norm and update pipelines the dispatches use, for each batch size.
    pipelines: Vec<wgpu::ComputePipeline>,
    /// (batch size, its norm pipeline, its update pipeline) of each size compiled.
    compiled: Vec<(usize, usize, usize)>,
    final_pipeline: wgpu::ComputePipeline,
    /// The first norm pass: one dispatch per segment or batch of small segments
    /// (none when the objective computes the norm).
    norm: Vec<Dispatch>,
    /// The update: one dispatch per segment or batch of small segments.
    update: Vec<Dispatch>,
    final_group: wgpu::BindGroup,
    partials_bytes: u64,
    uniform_bytes: u64,
}

/// `len` elements of `region`, as a binding.
fn resource(region: &Region, len: usize) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(region.binding(len))
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
/// jnp's float32 eps, and NaN / infinity by bits (WGSL lets a compiler assume
/// arithmetic never meets them, so these do not compare floats; a constant NaN or
/// infinity is a shader-creation error, so they are made at run time).
const PRELUDE_F32: &str = "\
alias real = f32;
alias real4 = vec4<f32>;
const EPS: real = 1.1920929e-7;
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
fn bits32(x: real) -> u32 { return bitcast<u32>(f32(x)); }
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
        Self::with_geometries(ctx, bufs, config, geometries, Self::batch_limit(ctx))
    }

    /// The geometry of each segment alone.
    fn geometries(ctx: &GpuContext, bufs: &ParamBuffers) -> Vec<Geometry> {
        bufs.segments
            .iter()
            .map(|s| Geometry::new((s.len / 4) as u32, ctx.max_workgroups()))
            .collect()
    }

    /// As [`Kernels::new`] with the dispatch geometry of each segment given, and at
    /// most `most` small segments per dispatch.
    fn with_geometries(
        ctx: &GpuContext,
        bufs: &ParamBuffers,
        config: &PolyakConfig,
        geometries: Vec<Geometry>,
        most: usize,
    ) -> Self {
        let source = |text: &str| with_prelude(text, bufs.real_bytes(), config.velocity_bytes());
        let final_mod = module(
            ctx,
            "norm_final",
            source(include_str!("../shaders/norm_final.wgsl")),
        );
        let final_pipeline = pipeline(ctx, &final_mod, "main", &[]);
        bufs.scalars.write_options(config);

        let lens: Vec<usize> = bufs.segments.iter().map(|s| s.len).collect();
        let segments = &bufs.segments;
        let mut ours = 0; // norm partials: one per workgroup of every batch
        let batched: Vec<_> = batches(&lens, most, |i, j| clash(&segments[i], &segments[j]))
            .into_iter()
            .map(|batch| {
                let geometry = BatchGeometry::new(&geometries[batch.clone()], ours);
                ours += geometry.groups;
                (batch, geometry)
            })
            .collect();
        // The final pass sums our per-workgroup partials, or the objective's own.
        let partials = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("polyak norm partials"),
            size: if bufs.objective_norm.is_some() {
                bufs.real_bytes()
            } else {
                u64::from(ours) * bufs.real_bytes()
            },
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let (summed, count) = match &bufs.objective_norm {
            Some(o) => (&o.partials, o.count),
            None => (&partials, ours),
        };
        let rule = uniform(ctx, &RuleUniform::new(count, config));
        let final_group = bind_group(
            ctx,
            &final_pipeline,
            &[
                (0, summed.as_entire_binding()),
                (1, bufs.scalars.buffer.as_entire_binding()),
                (2, rule.as_entire_binding()),
            ],
        );
        let mut kernels = Kernels {
            pipelines: Vec::new(),
            compiled: Vec::new(),
            final_pipeline,
            norm: Vec::new(),
            update: Vec::new(),
            final_group,
            partials_bytes: partials.size(),
            uniform_bytes: rule.size(),
        };
        for (batch, geometry) in batched {
            let segs = &bufs.segments[batch];
            let (norm_pipeline, update_pipeline) =
                kernels.pipelines_for(ctx, bufs, config, segs.len());
            let (geo, grid) = (geometry.uniform(ctx), geometry.grid());
            kernels.uniform_bytes += geo.size();
            if bufs.objective_norm.is_none() {
                // norm_partials.wgsl: partials 0, geometry 1, each gradient from 2.
                let mut entries = vec![
                    (0, partials.as_entire_binding()),
                    (1, geo.as_entire_binding()),
                ];
                for (k, s) in (2..).zip(segs) {
                    entries.push((k, resource(&s.grads, s.len)));
                }
                kernels.norm.push(Dispatch {
                    group: bind_group(ctx, &kernels.pipelines[norm_pipeline], &entries),
                    pipeline: norm_pipeline,
                    grid,
                });
            }
            // update.wgsl: scalars 0, geometry 1, then params, gradient and velocity
            // of each segment from 2.
            let mut entries = vec![
                (0, bufs.scalars.buffer.as_entire_binding()),
                (1, geo.as_entire_binding()),
            ];
            for (k, s) in (2..).step_by(3).zip(segs) {
                entries.push((k, resource(&s.params, s.len)));
                entries.push((k + 1, resource(&s.grads, s.len)));
                if let Some(v) = &s.velocity {
                    entries.push((k + 2, resource(v, s.len)));
                }
            }
            kernels.update.push(Dispatch {
                group: bind_group(ctx, &kernels.pipelines[update_pipeline], &entries),
                pipeline: update_pipeline,
                grid,
            });
        }
        kernels
    }

    /// The indices of the norm and update pipelines for batches of `m` segments,
    /// compiled the first time they are asked for.
    fn pipelines_for(
        &mut self,
        ctx: &GpuContext,
        bufs: &ParamBuffers,
        config: &PolyakConfig,
        m: usize,
    ) -> (usize, usize) {
        if let Some(&(_, n, u)) = self.compiled.iter().find(|c| c.0 == m) {
            return (n, u);
        }
        // The precision prelude, then batch.wgsl, then the kernel, written out for m.
        let source = |text: &str, subst: &dyn Fn(usize) -> Vec<(&'static str, usize)>| {
            let text = expand(&(BATCH.to_string() + text), m, subst);
            with_prelude(&text, bufs.real_bytes(), config.velocity_bytes())
        };
        let norm = source(include_str!("../shaders/norm_partials.wgsl"), &|k| {
            vec![("$K", k), ("$BG", 2 + k)]
        });
        let update = source(include_str!("../shaders/update.wgsl"), &|k| {
            vec![
                ("$K", k),
                ("$BP", 2 + 3 * k),
                ("$BG", 3 + 3 * k),
                ("$BV", 4 + 3 * k),
            ]
        });
        let entry = if bufs.has_velocity() {
            "momentum"
        } else {
            "plain"
        };
        let constants = ctx.kernel_constants();
        let norm = module(ctx, "norm_partials", norm);
        let update = module(ctx, "update", update);
        self.pipelines
            .push(pipeline(ctx, &norm, "main", &constants));
        self.pipelines
            .push(pipeline(ctx, &update, entry, &constants));
        let (n, u) = (self.pipelines.len() - 2, self.pipelines.len() - 1);
        self.compiled.push((m, n, u));
        (n, u)
    }

    /// Most small segments one dispatch takes: three storage bindings each in the
    /// update, beside the scalars slot and the batch's uniform (Metal counts every
    /// buffer of a stage against one limit, which wgpu reports as the storage one).
    pub fn batch_limit(ctx: &GpuContext) -> usize {
        let bindings = ctx.limits().max_storage_buffers_per_shader_stage as usize;
        (bindings.saturating_sub(2) / 3).clamp(1, MAX_BATCH)
    }

    /// Bytes of device memory the kernels use besides the vectors: the norm partials
    /// and the uniforms.
    pub fn scratch_bytes(&self) -> u64 {
        self.partials_bytes + self.uniform_bytes
    }

    /// Compute dispatches in one step: the norm of each segment or batch of small
    /// segments (none when the objective computes the norm), the final sum, the
    /// update of each. It grows with the segment count, never the tensor count.
    pub fn dispatches_per_step(&self) -> usize {
        self.norm.len() + 1 + self.update.len()
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

    /// Records both norm passes: the squared gradient norm lands in `scalars[1]`, the
    /// f32 step size of the rule in `scalars[2]` and the refusal verdict in
    /// `scalars[3]`.
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
        pass.set_pipeline(&self.final_pipeline);
        pass.set_bind_group(0, &self.final_group, &[]);
        pass.dispatch_workgroups(1, 1, 1);
    }

    /// Records the fused update of every segment, with the step in `scalars[2]`
    /// (skipped whole if `scalars[3]` is not 0).
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
mod tests {
    use super::*;

    /// One vec4 per workgroup forces more than 65,535 workgroups at a small size, so
    /// the 2-D dispatch path of both kernels runs on any adapter.
    #[test]
    fn two_dimensional_dispatch_norm_and_update() {
        use super::batch::MAX_DIM;
        use crate::config::{ParamDtype, VelocityDtype};
        use crate::conformance::SplitMix64;
        use crate::layout::{Layout, TensorSpec};
        let ctx = GpuContext::software()
            .or_else(|_| GpuContext::new())
            .expect("an adapter");
        for dtype in [VelocityDtype::Full, VelocityDtype::F16] {
            let n = 4 * 70_001 - 3;
            let layout = Layout::new(&[TensorSpec::new("p", &[n])], 8, 1 << 30).unwrap();
            let bufs =
                ParamBuffers::new(&ctx, layout, 4, dtype.bytes(ParamDtype::F32), &[], 1, None);
            let n4 = (bufs.segments[0].len / 4) as u32;
            let geo = Geometry {
                n4,
                chunk: 1,
                groups: n4,
                pad: 0,
            };
            assert_eq!(geo.dispatch(), (MAX_DIM, 2));
            let config = PolyakConfig::default()
                .momentum(0.5)
                .max_stepsize(100.0)
                .velocity_dtype(dtype);
            let kernels = Kernels::with_geometries(&ctx, &bufs, &config, vec![geo], 1);
            let mut rng = SplitMix64::new(11);
            let g: Vec<f32> = (0..n).map(|_| rng.upm1() as f32).collect();
            let p: Vec<f32> = (0..n).map(|_| rng.upm1() as f32).collect();
            bufs.upload_grads(&g).unwrap();
            bufs.upload_params(&p).unwrap();
            bufs.scalars.write_loss(1000.0);
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            bufs.clear_velocity(&mut enc);
            kernels.encode_norm(&mut enc, None);
            bufs.scalars.encode_readback(&mut enc, 0);
            ctx.queue().submit([enc.finish()]);
            let s = bufs.scalars.read().unwrap();
            let exact: f64 = g.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            assert!((s.sqnorm - exact).abs() <= 1e-5 * exact, "{s:?} vs {exact}");
            // The rule's step, in f32 on the GPU: 1000 / sqnorm (below the cap of 100).
            let want = 1000.0 / s.sqnorm;
            assert!(
                (s.step - want).abs() <= 4.0 * f64::from(f32::EPSILON) * want,
                "{s:?}"
            );
            assert_eq!(s.verdict, crate::scalars::Verdict::Applied);

            bufs.scalars.write_step(0.25);
            let mut enc = ctx.device().create_command_encoder(&Default::default());
            kernels.encode_update(&mut enc, None);
            ctx.queue().submit([enc.finish()]);
            let got = bufs.download_params().unwrap();
            let vel = bufs.download_velocity().unwrap().unwrap();
            for i in [0, 1, 4 * 65_535 - 1, 4 * 65_535, 4 * 65_535 + 5, n - 1] {
                let v = -0.25 * g[i];
                // an f16 velocity is stored rounded; the parameters get it unrounded
                let stored = match dtype {
                    VelocityDtype::Full => v,
                    VelocityDtype::F16 => half::f16::from_f32(v).to_f32(),
                };
                assert_eq!(vel[i], stored, "{dtype:?} velocity at {i}");
                assert_eq!(got[i], p[i] + v, "{dtype:?} params at {i}");
            }
            let changed = got.iter().zip(&p).filter(|(a, b)| a != b).count();
            assert!(
                changed > n - n / 100,
                "only {changed} of {n} parameters moved"
            );
        }
    }

    /// Batched kernels against one dispatch per segment, on the same data: the
    /// squared norm to rounding, the parameters and velocity after an update with one
    /// step bit for bit, in every precision, with and without momentum, for both
    /// walks.
    #[test]
    fn batched_kernels_give_the_bits_of_one_dispatch_per_segment() {
        use crate::config::{ParamDtype, VelocityDtype};
        use crate::conformance::SplitMix64;
        use crate::context::ContextOptions;
        use crate::layout::{Layout, TensorSpec};
        let specs: Vec<TensorSpec> = [37, 3000, 5, 1000, 64, 2, 4097, 513]
            .iter()
            .enumerate()
            .map(|(i, &n)| TensorSpec::new(format!("t{i}"), &[n]))
            .collect();
        let n: usize = specs.iter().map(TensorSpec::len).sum();
        let mut rng = SplitMix64::new(12);
        let mut random = || (0..n).map(|_| rng.upm1()).collect::<Vec<f64>>();
        let (p, g, v) = (random(), random(), random());
        for contiguous in [true, false] {
            let ctx = GpuContext::with_options(ContextOptions {
                contiguous_invocations: Some(contiguous),
                max_workgroups: Some(3),
                ..Default::default()
            })
            .expect("an adapter");
            for (dtype, velocity, momentum) in [
                (ParamDtype::F32, VelocityDtype::Full, 0.9),
                (ParamDtype::F32, VelocityDtype::Full, 0.0),
                (ParamDtype::F32, VelocityDtype::F16, 0.9),
                (ParamDtype::F64, VelocityDtype::Full, 0.9),
            ] {
                let config = PolyakConfig::default()
                    .momentum(momentum)
                    .dtype(dtype)
                    .velocity_dtype(velocity);
                let (real, vel) = (dtype.bytes(), config.velocity_bytes());
                let layout = Layout::new(&specs, 64, 2048).unwrap();
                let bufs = ParamBuffers::new(&ctx, layout, real, vel, &[], 1, None);
                assert!(bufs.segments.len() >= 5, "{}", bufs.segments.len());
                let geometries = Kernels::geometries(&ctx, &bufs);
                assert!(geometries.iter().any(|g| g.groups > 1));
                let mut results = Vec::new();
                for most in [1, 2, 3, 10] {
                    let k =
                        Kernels::with_geometries(&ctx, &bufs, &config, geometries.clone(), most);
                    assert_eq!(k.update.len(), bufs.segments.len().div_ceil(most));
                    bufs.upload_params_f64(&p).unwrap();
                    bufs.upload_grads_f64(&g).unwrap();
                    if momentum > 0.0 {
                        bufs.upload_velocity_f64(&v).unwrap();
                    }
                    bufs.scalars.write_loss(0.5);
                    let mut enc = ctx.device().create_command_encoder(&Default::default());
                    k.encode_norm(&mut enc, None);
                    bufs.scalars.encode_readback(&mut enc, 0);
                    ctx.queue().submit([enc.finish()]);
                    let s = bufs.scalars.read().unwrap();
                    // The norm's partials group differently per batching: the sum
                    // agrees to rounding. The update, with one step, bit for bit.
                    let exact: f64 = g.iter().map(|x| x * x).sum();
                    let tol = if dtype == ParamDtype::F64 {
                        1e-13
                    } else {
                        1e-5
                    };
                    assert!((s.sqnorm - exact).abs() <= tol * exact, "{most}: {s:?}");
                    bufs.scalars.write_step(0.25);
                    let mut enc = ctx.device().create_command_encoder(&Default::default());
                    k.encode_update(&mut enc, None);
                    ctx.queue().submit([enc.finish()]);
                    let got_v = bufs.download_velocity_f64().unwrap();
                    results.push((bufs.download_params_f64().unwrap(), got_v));
                }
                let what =
                    format!("{dtype:?} {velocity:?} momentum {momentum}, contiguous {contiguous}");
                assert!(results[0].0 != p, "{what}: nothing moved");
                let bits = |r: &(Vec<f64>, Option<Vec<f64>>)| {
                    r.0.iter()
                        .chain(r.1.iter().flatten())
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>()
                };
                for r in &results[1..] {
                    assert!(bits(r) == bits(&results[0]), "{what}");
                }
            }
        }
    }
}
