//! Helpers shared by the integration tests.
#![allow(dead_code)]

use polyak_gpu::conformance::SplitMix64;
use polyak_gpu::{
    ContextOptions, Evaluation, GpuContext, Loss, PolyakConfig, PolyakSgd, Precision, State,
    StepSizeMode, polyak_stepsize,
};

/// `size` bytes of `buffer` (COPY_SRC) from `offset`, read back through a staging
/// buffer.
pub fn read_back(ctx: &GpuContext, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Vec<u8> {
    let staging = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = ctx.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
    ctx.queue().submit([enc.finish()]);
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, |r| r.unwrap());
    ctx.wait().unwrap();
    let bytes = staging.slice(..).get_mapped_range().unwrap().to_vec();
    staging.unmap();
    bytes
}

/// The whole of `buffer` as f32s.
pub fn read_f32(ctx: &GpuContext, buffer: &wgpu::Buffer) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(&read_back(ctx, buffer, 0, buffer.size()))
}

/// A user's buffer (STORAGE, COPY_SRC, COPY_DST): `lead` bytes of 7.0, then `data`,
/// then eight more 7.0s, the 7.0s to check that nothing writes around `data`.
pub fn user_buffer(ctx: &GpuContext, data: &[f32], lead: u64) -> wgpu::Buffer {
    use wgpu::util::DeviceExt;
    let mut contents = vec![7.0f32; lead as usize / 4];
    contents.extend_from_slice(data);
    contents.extend_from_slice(&[7.0; 8]);
    ctx.device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("user buffer"),
            contents: bytemuck::cast_slice(&contents),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        })
}

/// The `n` values after `lead` bytes of a buffer made by [`user_buffer`], after
/// asserting that the 7.0s around them are still there (nothing wrote outside).
pub fn inside_sentinels(ctx: &GpuContext, buffer: &wgpu::Buffer, lead: u64, n: usize) -> Vec<f32> {
    let raw = read_f32(ctx, buffer);
    let lead = lead as usize / 4;
    assert!(
        raw[..lead]
            .iter()
            .chain(&raw[lead + n..])
            .all(|&x| x == 7.0),
        "a write outside the user's values"
    );
    raw[lead..lead + n].to_vec()
}

/// The adapter the tests run on: wgpu's choice (lavapipe on CI), honouring the usual
/// environment variables.
pub fn ctx() -> GpuContext {
    GpuContext::new().expect("a wgpu adapter (apt-get install -y mesa-vulkan-drivers)")
}

/// A context whose segments hold at most `n` elements, so the multi-segment paths run.
pub fn ctx_with_segments(n: usize) -> GpuContext {
    GpuContext::with_options(ContextOptions {
        max_segment_elements: Some(n),
        ..Default::default()
    })
    .expect("a wgpu adapter")
}

/// A device opened with wgpu's default features (no SHADER_F16 or SHADER_F64), as a
/// caller may bring one.
pub fn default_features_ctx() -> GpuContext {
    let instance = wgpu::Instance::default();
    let adapter =
        pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
            .expect("an adapter");
    let (device, queue) =
        pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default())).unwrap();
    GpuContext::from_device(device, queue)
}

/// A context whose kernels walk their segment in a grid-stride loop, as on GPUs,
/// with few workgroups so each invocation strides several times.
pub fn grid_stride_ctx() -> GpuContext {
    GpuContext::with_options(ContextOptions {
        contiguous_invocations: Some(false),
        max_workgroups: Some(7),
        ..Default::default()
    })
    .expect("a wgpu adapter")
}

/// `n` values uniform in [-1, 1) as f32.
pub fn random(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.upm1() as f32).collect()
}

/// Squared norm in f64.
pub fn sqnorm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// Host objective with a fixed gradient and loss (tests the optimizer's kernels only).
pub fn fixed(
    g: &[f32],
    value: f64,
) -> impl Fn(&mut Evaluation<'_>) -> polyak_gpu::Result<(Loss, ())> + '_ {
    move |ev| {
        ev.write_grads(g)?;
        Ok((Loss::Host(value), ()))
    }
}

/// A host objective writing `g` (rounded to the parameters' precision) and
/// reporting `value`.
pub fn fixed_f64(
    g: &[f64],
    value: f64,
) -> impl Fn(&mut Evaluation<'_>) -> polyak_gpu::Result<(Loss, ())> + '_ {
    move |ev| {
        ev.write_grads_f64(g)?;
        Ok((Loss::Host(value), ()))
    }
}

/// The parameters, then the velocity (none without momentum), as the bits of their
/// f64 values: exact whatever the storage type.
pub fn bits(opt: &PolyakSgd) -> Vec<u64> {
    let p = opt.buffers().download_params_f64().unwrap();
    let v = opt.buffers().download_velocity_f64().unwrap();
    p.iter()
        .chain(v.iter().flatten())
        .map(|x| x.to_bits())
        .collect()
}

/// Checks one update against f64 arithmetic on the same f32 inputs; returns the
/// velocity the reference expects.
pub fn check_step(
    opt: &mut PolyakSgd,
    state: &State,
    p: &[f32],
    v: &[f32],
    g: &[f32],
    value: f64,
) -> (State, Vec<f32>, Vec<f32>) {
    let cfg = opt.config().clone();
    let next = opt.update(state, fixed(g, value)).unwrap();
    let exact = sqnorm(g);
    let rel = (next.error * next.error - exact).abs() / exact;
    assert!(
        rel <= 1e-5,
        "n={}: norm^2 {} vs {exact}",
        g.len(),
        next.error * next.error
    );
    let expected_step = polyak_stepsize(value, exact, &cfg, Precision::F32);
    assert!(
        (next.stepsize - expected_step).abs() <= 1e-5 * expected_step.abs(),
        "step {} vs {expected_step}",
        next.stepsize
    );
    let s = next.stepsize;
    let m = cfg.momentum;
    let got_p = opt.download_params().unwrap();
    let got_v = opt.download_velocity().unwrap();
    assert_eq!(got_v.is_some(), m != 0.0);
    let mut worst = 0.0f64;
    for i in 0..g.len() {
        let (pi, vi, gi) = (f64::from(p[i]), f64::from(v[i]), f64::from(g[i]));
        let v_new = m * vi - s * gi;
        let p_new = pi + v_new;
        let scale = pi.abs() + (m * vi).abs() + (s * gi).abs() + 1e-30;
        let err = (f64::from(got_p[i]) - p_new).abs() / scale;
        worst = worst.max(err);
        if let Some(gv) = &got_v {
            let verr = (f64::from(gv[i]) - v_new).abs() / ((m * vi).abs() + (s * gi).abs() + 1e-30);
            assert!(
                verr <= 4.0 * f64::from(f32::EPSILON),
                "velocity[{i}] {} vs {v_new}",
                gv[i]
            );
        }
    }
    assert!(
        worst <= 4.0 * f64::from(f32::EPSILON),
        "n={}: params rel err {worst}",
        g.len()
    );
    (next, got_p, got_v.unwrap_or_else(|| vec![0.0; g.len()]))
}

/// Two updates from random parameters with random gradients, each checked against
/// f64 arithmetic, with the step size computed on the host.
pub fn two_steps(ctx: &GpuContext, n: usize, momentum: f64, seed: u64) {
    two_steps_in(ctx, n, momentum, seed, StepSizeMode::Host);
}

/// As [`two_steps`], with the step size computed where `mode` says.
pub fn two_steps_in(ctx: &GpuContext, n: usize, momentum: f64, seed: u64, mode: StepSizeMode) {
    let cfg = PolyakConfig::default()
        .momentum(momentum)
        .fun_min(-1.0)
        .max_stepsize(1e6)
        .stepsize_mode(mode);
    let p0 = random(seed, n);
    let mut opt = PolyakSgd::new(ctx, cfg, &p0).unwrap();
    let g1 = random(seed + 1, n);
    let g2 = random(seed + 2, n);
    let state = opt.init_state(fixed(&g1, 0.5)).unwrap();
    let zeros = vec![0.0; n];
    let (state, p1, v1) = check_step(&mut opt, &state, &p0, &zeros, &g1, 0.5);
    let (state, _, _) = check_step(&mut opt, &state, &p1, &v1, &g2, 0.25);
    assert_eq!(
        (state.iter_num, state.num_fun_eval, state.num_grad_eval),
        (2, 3, 2)
    );
}

/// A GPU objective: 0.5 ||x - c||^2 with gradient and loss written by WGSL kernels in
/// the parameters' precision (f32 or f64):
/// one invocation per element (one dispatch per piece of the tensor), then one
/// invocation sums the workgroup partials into the loss slot.
pub struct GpuQuadratic {
    grad: wgpu::ComputePipeline,
    total: wgpu::ComputePipeline,
    /// Bind group and workgroup count of each piece.
    pieces: Vec<(wgpu::BindGroup, u32)>,
    total_group: wgpu::BindGroup,
}

impl GpuQuadratic {
    const SHADER: &'static str = r#"
        struct Piece { base: u32, _p0: u32, _p1: u32, _p2: u32 }
        @group(0) @binding(0) var<storage, read> x: array<f32>;
        @group(0) @binding(1) var<storage, read> c: array<f32>;
        @group(0) @binding(2) var<storage, read_write> g: array<f32>;
        @group(0) @binding(3) var<storage, read_write> partials: array<f32>;
        @group(0) @binding(4) var<storage, read_write> loss: array<f32, 1>;
        @group(0) @binding(5) var<uniform> piece: Piece;
        var<workgroup> part: array<f32, 256>;
        @compute @workgroup_size(256)
        fn grad(@builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32,
                @builtin(workgroup_id) wid: vec3<u32>) {
            let group = wid.y * nwg.x + wid.x;
            let i = group * 256u + lid;
            var d: f32 = 0.0;
            if (i < arrayLength(&c)) {
                d = x[i] - c[i];
                g[i] = d;
            }
            part[lid] = d * d;
            workgroupBarrier();
            for (var s = 128u; s > 0u; s >>= 1u) {
                if (lid < s) { part[lid] += part[lid + s]; }
                workgroupBarrier();
            }
            let n = (arrayLength(&c) + 255u) / 256u;
            if (lid == 0u && group < n) { partials[piece.base + group] = part[0]; }
        }
        @compute @workgroup_size(256)
        fn total(@builtin(local_invocation_index) lid: u32) {
            var acc: f32 = 0.0;
            for (var i = lid; i < arrayLength(&partials); i += 256u) { acc += partials[i]; }
            part[lid] = acc;
            workgroupBarrier();
            for (var s = 128u; s > 0u; s >>= 1u) {
                if (lid < s) { part[lid] += part[lid + s]; }
                workgroupBarrier();
            }
            if (lid == 0u) { loss[0] = 0.5 * part[0]; }
        }"#;

    /// Binds the tensor's parameters and gradient, piece by piece.
    pub fn new(opt: &PolyakSgd, tensor: &str, c: &[f32]) -> Self {
        let b = opt.buffers();
        let t = b.layout().tensor(tensor).unwrap();
        let x = b.params_bindings(tensor).unwrap();
        let g = b.grads_bindings(tensor).unwrap();
        let pieces: Vec<_> = x
            .into_iter()
            .zip(g)
            .zip(&t.parts)
            .map(|((x, g), p)| (x, g, p.tensor_offset, p.len))
            .collect();
        Self::build(opt, pieces, c)
    }

    /// Binds the given parameter and gradient ranges (one piece).
    pub fn with_bindings(
        opt: &PolyakSgd,
        x: wgpu::BufferBinding<'_>,
        g: wgpu::BufferBinding<'_>,
        c: &[f32],
    ) -> Self {
        Self::build(opt, vec![(x, g, 0, c.len())], c)
    }

    fn build(
        opt: &PolyakSgd,
        pieces: Vec<(
            wgpu::BufferBinding<'_>,
            wgpu::BufferBinding<'_>,
            usize,
            usize,
        )>,
        c: &[f32],
    ) -> Self {
        use wgpu::util::DeviceExt;
        let device = opt.context().device();
        // In the parameters' precision: the kernels' f32 becomes f64 with f64 ones.
        let e = opt.config().dtype.bytes();
        let (c_bytes, source) = if e == 8 {
            let c: Vec<f64> = c.iter().map(|&x| f64::from(x)).collect();
            (
                bytemuck::cast_slice(&c).to_vec(),
                Self::SHADER.replace("f32", "f64"),
            )
        } else {
            (bytemuck::cast_slice(c).to_vec(), Self::SHADER.to_string())
        };
        let c_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: &c_bytes,
            usage: wgpu::BufferUsages::STORAGE,
        });
        let groups: Vec<u32> = pieces.iter().map(|p| (p.3 as u32).div_ceil(256)).collect();
        let partials = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: u64::from(groups.iter().sum::<u32>()) * e,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        // An optimizer built with norm_from_objective gets the squared norm from our
        // per-workgroup partials: they go straight into its buffer.
        let partials_binding = || match opt.buffers().norm_partials_binding() {
            Some(b) => wgpu::BindingResource::Buffer(b),
            None => partials.as_entire_binding(),
        };
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: None,
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = |entry| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: None,
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let (grad, total) = (pipeline("grad"), pipeline("total"));
        let group = |p: &wgpu::ComputePipeline, entries: Vec<(u32, wgpu::BindingResource<'_>)>| {
            let entries: Vec<_> = entries
                .into_iter()
                .map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource })
                .collect();
            device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &p.get_bind_group_layout(0),
                entries: &entries,
            })
        };
        let mut base = 0u32;
        let mut bound = Vec::new();
        for ((x, g, at, len), n) in pieces.into_iter().zip(&groups) {
            let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(&[base, 0, 0, 0]),
                usage: wgpu::BufferUsages::UNIFORM,
            });
            let c_piece = wgpu::BufferBinding {
                buffer: &c_buf,
                offset: at as u64 * e,
                size: wgpu::BufferSize::new(len as u64 * e),
            };
            let bg = group(
                &grad,
                vec![
                    (0, wgpu::BindingResource::Buffer(x)),
                    (1, wgpu::BindingResource::Buffer(c_piece)),
                    (2, wgpu::BindingResource::Buffer(g)),
                    (3, partials_binding()),
                    (5, uniform.as_entire_binding()),
                ],
            );
            bound.push((bg, *n));
            base += n;
        }
        let total_group = group(
            &total,
            vec![
                (3, partials_binding()),
                (
                    4,
                    wgpu::BindingResource::Buffer(opt.buffers().loss_binding()),
                ),
            ],
        );
        GpuQuadratic {
            grad,
            total,
            pieces: bound,
            total_group,
        }
    }

    pub fn eval(&self, ev: &mut Evaluation<'_>) -> polyak_gpu::Result<(Loss, ())> {
        let mut pass = ev.encoder().begin_compute_pass(&Default::default());
        self.grad_pass(&mut pass);
        pass.set_pipeline(&self.total);
        pass.set_bind_group(0, &self.total_group, &[]);
        pass.dispatch_workgroups(1, 1, 1);
        Ok((Loss::Device, ()))
    }

    /// A faulty evaluation: writes the gradient (and norm partials) but not the
    /// loss it reports as `Loss::Device`.
    pub fn eval_without_loss(&self, ev: &mut Evaluation<'_>) -> polyak_gpu::Result<(Loss, ())> {
        self.grad_pass(&mut ev.encoder().begin_compute_pass(&Default::default()));
        Ok((Loss::Device, ()))
    }

    /// Records the gradient kernel over every piece.
    fn grad_pass(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.grad);
        for (bg, groups) in &self.pieces {
            pass.set_bind_group(0, bg, &[]);
            let x = (*groups).min(65_535);
            pass.dispatch_workgroups(x, groups.div_ceil(x), 1);
        }
    }
}
