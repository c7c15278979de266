//! Helpers for benchmark harnesses: on-device data, the copy-rate ceiling, and the
//! multi-threaded CPU baseline of the same step.

use crate::config::PolyakConfig;
use crate::context::GpuContext;
use crate::error::{Error, Result};
use crate::kernels::{Geometry, bind_group, grid, module, pipeline, uniform, with_prelude};
use crate::solver::PolyakSgd;
use crate::stepsize::{Precision, polyak_stepsize};

/// Fills every tensor's parameters (`params = true`) or gradient with pseudo-random
/// values in `[-scale, scale)` on the device, without a host upload. It fills each
/// tensor piece of the optimizer's own segments, and each segment of a run of user
/// tensors whole; pieces shorter than 4 elements, and the last `len % 4` elements
/// of each piece, keep their values.
pub fn fill(opt: &PolyakSgd, params: bool, seed: u32, scale: f32) -> Result<()> {
    let ctx = opt.context();
    opt.buffers().flush()?;
    // (a user buffer destroyed since registration: an error, not wgpu's panic)
    ctx.checked(|| encode_fill(opt, params, seed, scale))?;
    ctx.wait()
}

/// Records and submits [`fill`]'s dispatches.
fn encode_fill(opt: &PolyakSgd, params: bool, seed: u32, scale: f32) {
    let ctx = opt.context();
    let source = include_str!("../shaders/bench_fill.wgsl");
    let shader = module(
        ctx,
        "bench fill",
        with_prelude(source, opt.buffers().real_bytes(), 0),
    );
    let pipeline = pipeline(ctx, &shader, "main", &[]);
    let bufs = opt.buffers();
    let layout = bufs.layout();
    // (segment, first element, elements) of every range to fill: the gaps between
    // the optimizer's own tensors stay zero.
    let external = layout.external_segments();
    let mut ranges: Vec<(usize, usize, usize)> = Vec::new();
    for (i, &len) in layout.segment_lens().iter().enumerate() {
        if external[i] {
            ranges.push((i, 0, len));
        }
    }
    for t in layout.tensors().iter().filter(|t| !t.external) {
        ranges.extend(t.parts.iter().map(|p| (p.segment, p.offset, p.len)));
    }
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    for (k, (segment, first, len)) in ranges.into_iter().enumerate() {
        let n4 = (len / 4) as u32;
        if n4 == 0 {
            continue;
        }
        let s = &bufs.segments[segment];
        let region = if params { &s.params } else { &s.grads };
        // One vec4 per invocation: mirrors `Fill` in bench_fill.wgsl.
        let (x, y) = grid(n4.div_ceil(256));
        let cfg: [u32; 8] = [
            n4,
            seed.wrapping_add(k as u32),
            x,
            0,
            scale.to_bits(),
            0,
            0,
            0,
        ];
        let cfg = uniform(ctx, &cfg);
        let binding = wgpu::BufferBinding {
            buffer: &region.buffer,
            offset: region.offset + first as u64 * region.elem,
            size: wgpu::BufferSize::new(u64::from(n4) * 4 * region.elem),
        };
        let group = bind_group(
            ctx,
            &pipeline,
            &[
                (0, wgpu::BindingResource::Buffer(binding)),
                (1, cfg.as_entire_binding()),
            ],
        );
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(x, y, 1);
    }
    ctx.queue().submit([encoder.finish()]);
}

/// A device-to-device copy with the optimizer's geometry and walk, to measure the
/// memory bandwidth a step is compared against.
#[derive(Debug)]
pub struct CopyBench {
    ctx: GpuContext,
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    dispatch: (u32, u32),
    n: usize,
    buffers: [wgpu::Buffer; 3],
}

impl CopyBench {
    /// Two buffers of `n` f32 (rounded down to a multiple of 4), at most one
    /// storage binding long (an error past that).
    pub fn new(ctx: &GpuContext, n: usize) -> Result<Self> {
        let most = ctx.limits().max_storage_buffer_binding_size / 4;
        if n as u64 > most {
            return Err(Error::InvalidOption {
                option: "CopyBench elements",
                value: n.to_string(),
                reason: "must fit one storage binding of the device",
            });
        }
        let n4 = (n / 4).max(1) as u32;
        let buffer = |usage| {
            ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench copy"),
                size: u64::from(n4) * 16,
                usage,
                mapped_at_creation: false,
            })
        };
        let src = buffer(
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
        );
        let dst = buffer(wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST);
        let geometry = Geometry::new(n4, ctx.max_workgroups(), ctx.workgroup_size());
        let dispatch = geometry.dispatch();
        // `Geometry` of bench_copy.wgsl: the segment's, and the grid's width
        let geo = uniform(
            ctx,
            &[geometry.n4, geometry.chunk, geometry.groups, dispatch.0],
        );
        let shader = module(
            ctx,
            "bench copy",
            include_str!("../shaders/bench_copy.wgsl"),
        );
        let pipeline = pipeline(ctx, &shader, "main", &ctx.kernel_constants());
        let group = bind_group(
            ctx,
            &pipeline,
            &[
                (0, src.as_entire_binding()),
                (1, dst.as_entire_binding()),
                (2, geo.as_entire_binding()),
            ],
        );
        Ok(CopyBench {
            ctx: ctx.clone(),
            pipeline,
            group,
            dispatch,
            n: n4 as usize * 4,
            buffers: [src, dst, geo],
        })
    }

    /// Runs `reps` copies by the vec4 copy kernel back to back in one submission
    /// after one warm-up copy, and returns the best of three such runs in GB/s
    /// (bytes read + written).
    pub fn gbps(&self, reps: usize) -> Result<f64> {
        self.best_of_three(reps, |encoder| {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.pipeline);
            pass.set_bind_group(0, &self.group, &[]);
            pass.dispatch_workgroups(self.dispatch.0, self.dispatch.1, 1);
        })
    }

    /// Like [`gbps`](Self::gbps) with the driver's own buffer-to-buffer copy
    /// (`copy_buffer_to_buffer`, which may use a copy engine or a tuned kernel): the
    /// stricter floor where it is faster than ours.
    pub fn transfer_gbps(&self, reps: usize) -> Result<f64> {
        let [src, dst, _] = &self.buffers;
        self.best_of_three(reps, |encoder| {
            encoder.copy_buffer_to_buffer(src, 0, dst, 0, src.size());
        })
    }

    /// Best GB/s of three submissions of `reps` copies each, after one of a single copy.
    fn best_of_three(&self, reps: usize, copy: impl Fn(&mut wgpu::CommandEncoder)) -> Result<f64> {
        let run = |reps: usize| -> Result<f64> {
            let mut encoder = self
                .ctx
                .device()
                .create_command_encoder(&Default::default());
            for _ in 0..reps {
                copy(&mut encoder);
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

/// The least a step that waits for the GPU can cost on this device, in ms (medians
/// of `reps` after a few untimed, with the context's wait mode): an empty
/// submission waited for; a 4-byte copy into a mapped readback buffer, submitted,
/// waited for and read, as every waited step does; and the shapes of a small step:
/// a 4-byte copy and one tiny dispatch before the readback (the device's rule: the
/// loss a GPU objective writes, then the whole step in one workgroup), or a copy
/// and two dispatches in two compute passes (the host's rule: its step size, the
/// update, the next norm). Our step costs what these cost plus its own recording
/// and work.
#[derive(Debug, Clone, Copy)]
pub struct RoundTrip {
    /// An empty submission, waited for.
    pub empty_ms: f64,
    /// A 4-byte readback: copy, submit, map, wait, read, unmap.
    pub readback_ms: f64,
    /// A 4-byte copy, one one-workgroup dispatch, then the readback.
    pub device_shape_ms: f64,
    /// A 4-byte copy, two one-workgroup dispatches in two passes, then the readback.
    pub host_shape_ms: f64,
}

impl RoundTrip {
    /// Measures the four on `ctx`.
    pub fn measure(ctx: &GpuContext, reps: usize) -> Result<Self> {
        let buffer = |usage| {
            ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench round trip"),
                size: 4,
                usage,
                mapped_at_creation: false,
            })
        };
        let src = buffer(wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST);
        let staging = buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
        let counter = buffer(wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC);
        let fill = buffer(wgpu::BufferUsages::COPY_SRC);
        let shader = module(
            ctx,
            "bench tick",
            include_str!("../shaders/bench_tick.wgsl"),
        );
        let tick = pipeline(ctx, &shader, "main", &[]);
        let group = bind_group(ctx, &tick, &[(0, counter.as_entire_binding())]);
        let slot = std::sync::Arc::new(std::sync::Mutex::new(None));
        let empty = || -> Result<()> {
            ctx.queue().submit([]);
            ctx.wait()
        };
        // Compute passes of `passes[i]` dispatches each, with a 4-byte copy before
        // them where `copy`, then the readback.
        let round = |passes: &[u32], copy: bool| -> Result<()> {
            let mut encoder = ctx.device().create_command_encoder(&Default::default());
            if copy {
                encoder.copy_buffer_to_buffer(&fill, 0, &src, 0, 4);
            }
            for &dispatches in passes {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&tick);
                pass.set_bind_group(0, &group, &[]);
                for _ in 0..dispatches {
                    pass.dispatch_workgroups(1, 1, 1);
                }
            }
            encoder.copy_buffer_to_buffer(&counter, 0, &staging, 0, 4);
            ctx.queue().submit([encoder.finish()]);
            crate::buffers::read_mapped(ctx, &staging, &slot, |bytes| bytes.len()).map(|_| ())
        };
        let median_ms = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            for _ in 0..3 {
                f()?;
            }
            let mut times = Vec::with_capacity(reps.max(1));
            for _ in 0..reps.max(1) {
                let t0 = std::time::Instant::now();
                f()?;
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            Ok(times[times.len() / 2])
        };
        Ok(RoundTrip {
            empty_ms: median_ms(&empty)?,
            readback_ms: median_ms(&|| round(&[], false))?,
            device_shape_ms: median_ms(&|| round(&[1], true))?,
            host_shape_ms: median_ms(&|| round(&[1, 1], true))?,
        })
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

/// Host memory this process held at its peak, in MiB (Linux; 0 where unknown).
pub fn peak_rss_mib() -> f64 {
    crate::context::proc_kb("/proc/self/status", "VmHWM:").map_or(0.0, |kb| kb as f64 / 1024.0)
}
