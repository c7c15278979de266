//! Helpers for benchmark harnesses: on-device data, the copy-rate ceiling, and the
//! multi-threaded CPU baseline of the same step.

use crate::config::PolyakConfig;
use crate::context::GpuContext;
use crate::error::Result;
use crate::solver::PolyakSgd;
use crate::stepsize::{Precision, polyak_stepsize};
use wgpu::util::DeviceExt;

const MAX_DIM: u32 = 65_535;

fn pipeline(
    ctx: &GpuContext,
    source: &'static str,
    label: &str,
    constants: &[(&str, f64)],
) -> wgpu::ComputePipeline {
    let module = ctx
        .device()
        .create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
    ctx.device()
        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(label),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                ..Default::default()
            },
            cache: None,
        })
}

/// Fills every tensor's parameters (`params = true`) or gradient with pseudo-random
/// values in `[-scale, scale)` on the device, without a host upload. Pieces shorter
/// than 4 elements, and the last `len % 4` elements of each piece, keep their values.
pub fn fill(opt: &PolyakSgd, params: bool, seed: u32, scale: f32) -> Result<()> {
    let ctx = opt.context();
    let pipeline = pipeline(
        ctx,
        include_str!("../shaders/bench_fill.wgsl"),
        "bench fill",
        &[],
    );
    let bufs = opt.buffers();
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    let mut groups_kept = Vec::new();
    for t in bufs.layout().tensors() {
        let name = t.spec.name.as_str();
        let bindings = if params {
            bufs.params_bindings(name)?
        } else {
            bufs.grads_bindings(name)?
        };
        for (i, b) in bindings.into_iter().enumerate() {
            let n4 = (t.parts[i].len / 4) as u32;
            if n4 == 0 {
                continue;
            }
            let groups = n4.div_ceil(256);
            let x = groups.min(MAX_DIM);
            let cfg: [u32; 8] = [
                n4,
                seed.wrapping_add(i as u32),
                x,
                0,
                scale.to_bits(),
                0,
                0,
                0,
            ];
            let uniform = ctx
                .device()
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: bytemuck::cast_slice(&cfg),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
            let binding = wgpu::BufferBinding {
                size: wgpu::BufferSize::new(u64::from(n4) * 16),
                ..b
            };
            let group = ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.get_bind_group_layout(0),
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(binding),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: uniform.as_entire_binding(),
                    },
                ],
            });
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &group, &[]);
                pass.dispatch_workgroups(x, groups.div_ceil(x), 1);
            }
            groups_kept.push((group, uniform));
        }
    }
    ctx.queue().submit([encoder.finish()]);
    ctx.wait()
}

/// A device-to-device copy with the optimizer's chunked geometry, to measure the
/// memory bandwidth a step is compared against.
#[derive(Debug)]
pub struct CopyBench {
    ctx: GpuContext,
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    dispatch: (u32, u32),
    n: usize,
    _buffers: [wgpu::Buffer; 3],
}

impl CopyBench {
    /// Two buffers of `n` f32 (rounded down to a multiple of 4).
    pub fn new(ctx: &GpuContext, n: usize) -> Self {
        let n4 = (n / 4).max(1) as u32;
        let buffer = |usage| {
            ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench copy"),
                size: u64::from(n4) * 16,
                usage,
                mapped_at_creation: false,
            })
        };
        let src = buffer(wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST);
        let dst = buffer(wgpu::BufferUsages::STORAGE);
        let wanted = n4.div_ceil(256).clamp(1, ctx.max_workgroups().max(1));
        let chunk = n4.div_ceil(wanted);
        let groups = n4.div_ceil(chunk);
        let x = groups.min(MAX_DIM);
        let geo: [u32; 8] = [n4, chunk, x, groups, 0, 0, 0, 0];
        let uniform = ctx
            .device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(&geo),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let pipeline = pipeline(
            ctx,
            include_str!("../shaders/bench_copy.wgsl"),
            "bench copy",
            &ctx.kernel_constants(),
        );
        let group = ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: src.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: dst.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: uniform.as_entire_binding(),
                },
            ],
        });
        CopyBench {
            ctx: ctx.clone(),
            pipeline,
            group,
            dispatch: (x, groups.div_ceil(x)),
            n: n4 as usize * 4,
            _buffers: [src, dst, uniform],
        }
    }

    /// Runs `reps` copies back to back in one submission after one warm-up copy, and
    /// returns the best of three such runs in GB/s (bytes read + written).
    pub fn gbps(&self, reps: usize) -> Result<f64> {
        let run = |reps: usize| -> Result<f64> {
            let mut encoder = self
                .ctx
                .device()
                .create_command_encoder(&Default::default());
            for _ in 0..reps {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&self.pipeline);
                pass.set_bind_group(0, &self.group, &[]);
                pass.dispatch_workgroups(self.dispatch.0, self.dispatch.1, 1);
            }
            let t0 = std::time::Instant::now();
            self.ctx.queue().submit([encoder.finish()]);
            self.ctx.wait()?;
            Ok(t0.elapsed().as_secs_f64())
        };
        run(1)?;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            best = best.min(run(reps)?);
        }
        Ok((8 * self.n * reps) as f64 / best / 1e9)
    }
}

/// Sum of squares in 16 independent f32 lanes (so that the compiler vectorises it).
fn sqsum(g: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = g.chunks_exact(16);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x * x;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    acc.iter().sum::<f32>() + tail
}

/// The same step on the CPU in f32, split over threads: the baseline a GPU step is
/// compared against. Vectors are filled with the same kind of data as [`fill`].
#[derive(Debug)]
pub struct CpuBaseline {
    params: Vec<f32>,
    grads: Vec<f32>,
    velocity: Option<Vec<f32>>,
    threads: usize,
}

impl CpuBaseline {
    /// `n` parameters, velocity if `momentum`, on `threads` threads (0: all cores).
    pub fn new(n: usize, momentum: bool, threads: usize) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |t| t.get())
        } else {
            threads
        };
        let mut rng = crate::conformance::SplitMix64::new(1);
        let pattern: Vec<f32> = (0..4096).map(|_| rng.upm1() as f32).collect();
        let data = |scale: f32| {
            (0..n)
                .map(|i| pattern[i % 4096] * scale)
                .collect::<Vec<f32>>()
        };
        CpuBaseline {
            params: data(1.0),
            grads: data(1e-3),
            velocity: momentum.then(|| vec![0.0; n]),
            threads,
        }
    }

    /// One step: the squared norm (f32 per thread chunk, added in f64), the step size,
    /// the fused update. Returns the step size.
    pub fn step(&mut self, value: f64, config: &PolyakConfig) -> f64 {
        let chunk = self.params.len().div_ceil(self.threads).max(1);
        let sqnorm: f64 = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .grads
                .chunks(chunk)
                .map(|g| s.spawn(move || f64::from(sqsum(g))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(f64::NAN))
                .sum()
        });
        let step = polyak_stepsize(value, sqnorm, config, Precision::F32) as f32;
        let m = config.momentum as f32;
        std::thread::scope(|s| match &mut self.velocity {
            Some(v) => {
                for ((p, v), g) in self
                    .params
                    .chunks_mut(chunk)
                    .zip(v.chunks_mut(chunk))
                    .zip(self.grads.chunks(chunk))
                {
                    s.spawn(move || {
                        for ((p, v), g) in p.iter_mut().zip(v.iter_mut()).zip(g) {
                            *v = m * *v - step * g;
                            *p += *v;
                        }
                    });
                }
            }
            None => {
                for (p, g) in self.params.chunks_mut(chunk).zip(self.grads.chunks(chunk)) {
                    s.spawn(move || {
                        for (p, g) in p.iter_mut().zip(g) {
                            *p -= step * g;
                        }
                    });
                }
            }
        });
        f64::from(step)
    }

    /// Threads used.
    pub fn threads(&self) -> usize {
        self.threads
    }
}
