//! The GPU kernels and the solver against the f64 reference on random data.

mod common;

use common::{ctx, ctx_with_segments, random, sqnorm};
use polyak_gpu::{
    Error, Evaluation, GpuContext, Loss, NonFinitePolicy, PolyakConfig, PolyakSgd, Precision,
    State, TensorSpec, Variant, polyak_stepsize,
};
use std::sync::{Arc, Mutex};

/// Host objective with a fixed gradient and loss (tests the optimizer's kernels only).
fn fixed(
    g: &[f32],
    value: f64,
) -> impl Fn(&mut Evaluation<'_>) -> polyak_gpu::Result<(Loss, ())> + '_ {
    move |ev| {
        ev.write_grads(g)?;
        Ok((Loss::Host(value), ()))
    }
}

/// Checks one update against f64 arithmetic on the same f32 inputs; returns the
/// velocity the reference expects.
fn check_step(
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

fn two_steps(ctx: &GpuContext, n: usize, momentum: f64, seed: u64) {
    let cfg = PolyakConfig::default()
        .momentum(momentum)
        .fun_min(-1.0)
        .max_stepsize(1e6);
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

#[test]
fn update_matches_f64_on_random_data_at_awkward_sizes() {
    let ctx = ctx();
    for (i, &n) in [
        1usize, 3, 4, 5, 255, 256, 257, 1023, 1025, 4099, 65_537, 1_000_003,
    ]
    .iter()
    .enumerate()
    {
        two_steps(&ctx, n, 0.0, 10 * i as u64);
        two_steps(&ctx, n, 0.9, 10 * i as u64 + 5);
    }
}

#[test]
fn update_crosses_the_dispatch_dimension_limit() {
    // More than 65,535 workgroups x 256 invocations of elements.
    let n = 65_535 * 256 + 1_021;
    two_steps(&ctx(), n, 0.9, 99);
}

#[test]
fn few_workgroups_and_many_give_the_same_step() {
    for max in [1, 3, 100_000] {
        let mut c = ctx();
        c.set_max_workgroups(max);
        two_steps(&c, 300_007, 0.5, 1234);
    }
}

#[test]
fn tensors_across_segments_share_one_norm_and_update() {
    let lens = [1usize, 7, 300, 5000, 33, 1024, 2048, 9];
    let specs: Vec<TensorSpec> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorSpec::new(format!("t{i}"), &[n]))
        .collect();
    let total: usize = lens.iter().sum();
    let ctx = ctx_with_segments(2048);
    let cfg = PolyakConfig::default().momentum(0.9).max_stepsize(1e6);
    let mut opt = PolyakSgd::with_tensors(&ctx, cfg, &specs).unwrap();
    assert!(opt.buffers().layout().segment_lens().len() >= 6);
    let align = ctx.limits().min_storage_buffer_offset_alignment as u64;
    let mut p0 = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let t = random(500 + i as u64, spec.len());
        opt.buffers().upload_tensor(&spec.name, &t).unwrap();
        for b in opt.buffers().params_bindings(&spec.name).unwrap() {
            assert_eq!(b.offset % align, 0);
        }
        p0.extend(t);
    }
    assert_eq!(opt.download_params().unwrap(), p0);
    let g = random(77, total);
    let state = opt.init_state(fixed(&g, 2.0)).unwrap();
    let (_, p1, _) = check_step(&mut opt, &state, &p0, &vec![0.0; total], &g, 2.0);
    // each tensor downloads alone to its slice of the flat vector
    let mut at = 0;
    for spec in &specs {
        let t = opt.buffers().download_tensor(&spec.name).unwrap();
        assert_eq!(t, p1[at..at + spec.len()]);
        at += spec.len();
    }
}

#[test]
fn refused_steps_leave_parameters_and_velocity_untouched() {
    let ctx = ctx();
    let n = 1000;
    let mut opt =
        PolyakSgd::new(&ctx, PolyakConfig::default().momentum(0.9), &random(1, n)).unwrap();
    let g = random(2, n);
    let state = opt.init_state(fixed(&g, 1.0)).unwrap();
    let state = opt.update(&state, fixed(&g, 1.0)).unwrap();
    let p = opt.download_params().unwrap();
    let v = opt.download_velocity().unwrap().unwrap();
    let mut bad_g = g.clone();
    bad_g[n / 2] = f32::NAN;
    let cases: Vec<(Vec<f32>, f64)> = vec![
        (bad_g, 1.0),
        (g.clone(), f64::NAN),
        (g.clone(), f64::INFINITY),
        (vec![f32::MAX; n], 1.0), // squared norm overflows f32
    ];
    for (grad, value) in &cases {
        match opt.update(&state, fixed(grad, *value)) {
            Err(Error::NonFinite { iter_num, .. }) => assert_eq!(iter_num, 1),
            other => panic!("expected NonFinite, got {other:?}"),
        }
        assert_eq!(opt.download_params().unwrap(), p);
        assert_eq!(opt.download_velocity().unwrap().unwrap(), v);
    }
    // and the optimizer goes on normally afterwards
    let next = opt.update(&state, fixed(&g, 1.0)).unwrap();
    assert_eq!(next.iter_num, 2);
    assert_ne!(opt.download_params().unwrap(), p);
}

#[test]
fn zero_over_zero_is_refused_by_default_and_propagated_on_request() {
    let ctx = ctx();
    let c = [0.5f32, -0.25, 1.0];
    let quadratic = |ev: &mut Evaluation<'_>| {
        let x = ev.read_params()?;
        let g: Vec<f32> = x.iter().zip(&c).map(|(x, c)| x - c).collect();
        ev.write_grads(&g)?;
        Ok((Loss::Host(0.5 * common::sqnorm(&g)), ()))
    };
    let mut opt = PolyakSgd::new(&ctx, PolyakConfig::default(), &c).unwrap();
    assert!(matches!(
        opt.run(quadratic),
        Err(Error::NonFinite { iter_num: 0, .. })
    ));
    assert_eq!(opt.download_params().unwrap(), c);

    let cfg = PolyakConfig::default().nonfinite(NonFinitePolicy::Propagate);
    let mut opt = PolyakSgd::new(&ctx, cfg, &c).unwrap();
    let s = opt.run(quadratic).unwrap();
    assert_eq!((s.iter_num, s.value, s.error), (1, 0.0, 0.0));
    assert!(s.stepsize.is_nan());
    assert!(opt.download_params().unwrap().iter().all(|x| x.is_nan()));

    // delta > 0 or SPS+ avoid the 0/0: parameters unchanged, one iteration.
    for cfg in [
        PolyakConfig::default().delta(1e-3),
        PolyakConfig::default().variant(Variant::SpsPlus),
    ] {
        let mut opt = PolyakSgd::new(&ctx, cfg, &c).unwrap();
        let s = opt.run(quadratic).unwrap();
        assert_eq!((s.iter_num, s.stepsize), (1, 0.0));
        assert_eq!(opt.download_params().unwrap(), c);
    }
}

#[test]
fn bad_input_gives_typed_errors() {
    let ctx = ctx();
    let cfg = PolyakConfig::default;
    assert!(matches!(
        PolyakSgd::new(&ctx, cfg(), &[]),
        Err(Error::EmptyParameters(_))
    ));
    assert!(matches!(
        PolyakSgd::new(&ctx, cfg().momentum(1.0), &[1.0]),
        Err(Error::InvalidOption {
            option: "momentum",
            ..
        })
    ));
    assert!(matches!(
        PolyakSgd::new(&ctx, cfg().delta(-1.0), &[1.0]),
        Err(Error::InvalidOption {
            option: "delta",
            ..
        })
    ));
    assert!(matches!(
        PolyakSgd::new(&ctx, cfg().max_stepsize(f64::NAN), &[1.0]),
        Err(Error::InvalidOption {
            option: "max_stepsize",
            ..
        })
    ));
    assert!(matches!(
        "SPS".parse::<Variant>(),
        Err(Error::UnknownVariant(_))
    ));
    let mut opt = PolyakSgd::new(&ctx, cfg(), &[1.0, 2.0]).unwrap();
    assert!(matches!(
        opt.upload_params(&[1.0]),
        Err(Error::LengthMismatch {
            expected: 2,
            got: 1,
            ..
        })
    ));
    let wrong = [1.0f32; 3];
    let r = opt.run(|ev| {
        ev.write_grads(&wrong)?;
        Ok((Loss::Host(1.0), ()))
    });
    assert!(matches!(
        r,
        Err(Error::LengthMismatch {
            expected: 2,
            got: 3,
            ..
        })
    ));
    assert!(matches!(
        opt.buffers().download_tensor("nope"),
        Err(Error::Tensor(..))
    ));
    let none: Vec<u32> = vec![];
    assert!(matches!(
        opt.run_iterator(|_, _: &u32| Ok((Loss::Host(0.0), ())), none),
        Err(Error::EmptyIterator)
    ));
    assert_eq!(opt.download_params().unwrap(), [1.0, 2.0]);
    let dup = [TensorSpec::new("a", &[2]), TensorSpec::new("a", &[2])];
    assert!(matches!(
        PolyakSgd::with_tensors(&ctx, cfg(), &dup),
        Err(Error::Tensor(..))
    ));
    let empty = [TensorSpec::new("a", &[2, 0])];
    assert!(matches!(
        PolyakSgd::with_tensors(&ctx, cfg(), &empty),
        Err(Error::EmptyParameters(_))
    ));
}

#[test]
fn run_iterator_gives_the_first_batch_to_init_state_only() {
    let ctx = ctx();
    let mut opt = PolyakSgd::new(&ctx, PolyakConfig::default().maxiter(5), &[1.0, -1.0]).unwrap();
    let seen = std::cell::RefCell::new(Vec::new());
    let s = opt
        .run_iterator(
            |ev, b: &usize| {
                seen.borrow_mut().push(*b);
                let x = ev.read_params()?;
                ev.write_grads(&x)?;
                Ok((Loss::Host(0.5 * sqnorm(&x)), *b))
            },
            0..100,
        )
        .unwrap();
    assert_eq!(*seen.borrow(), [0, 1, 2, 3, 4, 5]);
    assert_eq!(
        (s.iter_num, s.num_fun_eval, s.num_grad_eval, s.aux),
        (5, 6, 5, 5)
    );
}

#[test]
fn pre_update_runs_before_each_update_and_maxiter_zero_does_nothing() {
    let ctx = ctx();
    let cfg = PolyakConfig::default().maxiter(4).tol(-1.0);
    let mut opt = PolyakSgd::new(&ctx, cfg, &[3.0]).unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&calls);
    opt.set_pre_update(move |h| {
        log.lock().unwrap().push(h.iter_num);
        Ok(())
    });
    let objective = |ev: &mut Evaluation<'_>| {
        let x = ev.read_params()?;
        ev.write_grads(&x)?;
        Ok((Loss::Host(0.5 * sqnorm(&x)), ()))
    };
    let s = opt.run(objective).unwrap();
    assert_eq!(s.iter_num, 4);
    assert_eq!(*calls.lock().unwrap(), [0, 1, 2, 3]);
    // 0.5 x^2: the Polyak step is 0.5, so x halves each update
    assert_eq!(opt.download_params().unwrap(), [3.0 / 16.0]);

    let mut opt = PolyakSgd::new(&ctx, PolyakConfig::default().maxiter(0), &[3.0]).unwrap();
    let s = opt.run(objective).unwrap();
    assert_eq!(s, State::initial(()));
    assert_eq!(opt.download_params().unwrap(), [3.0]);
}

/// A GPU objective: 0.5 ||x - c||^2 with gradient and loss written by WGSL kernels
/// (one invocation per element, then one invocation sums the workgroup partials).
struct GpuQuadratic {
    grad: wgpu::ComputePipeline,
    total: wgpu::ComputePipeline,
    grad_group: wgpu::BindGroup,
    total_group: wgpu::BindGroup,
    groups: u32,
}

impl GpuQuadratic {
    const SHADER: &'static str = r#"
        @group(0) @binding(0) var<storage, read> x: array<f32>;
        @group(0) @binding(1) var<storage, read> c: array<f32>;
        @group(0) @binding(2) var<storage, read_write> g: array<f32>;
        @group(0) @binding(3) var<storage, read_write> partials: array<f32>;
        @group(0) @binding(4) var<storage, read_write> loss: array<f32, 1>;
        var<workgroup> part: array<f32, 256>;
        @compute @workgroup_size(256)
        fn grad(@builtin(global_invocation_id) id: vec3<u32>,
                @builtin(local_invocation_index) lid: u32,
                @builtin(workgroup_id) wid: vec3<u32>) {
            var d = 0.0;
            if (id.x < arrayLength(&c)) {
                d = x[id.x] - c[id.x];
                g[id.x] = d;
            }
            part[lid] = d * d;
            workgroupBarrier();
            for (var s = 128u; s > 0u; s >>= 1u) {
                if (lid < s) { part[lid] += part[lid + s]; }
                workgroupBarrier();
            }
            if (lid == 0u) { partials[wid.x] = part[0]; }
        }
        @compute @workgroup_size(1)
        fn total() {
            var acc = 0.0;
            for (var i = 0u; i < arrayLength(&partials); i++) { acc += partials[i]; }
            loss[0] = 0.5 * acc;
        }"#;

    fn new(opt: &PolyakSgd, c: &[f32]) -> Self {
        use wgpu::util::DeviceExt;
        let device = opt.context().device();
        let groups = (c.len() as u32).div_ceil(256);
        let c_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(c),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let partials = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: u64::from(groups) * 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: None,
            source: wgpu::ShaderSource::Wgsl(Self::SHADER.into()),
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
        let b = opt.buffers();
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
        let grad_group = group(
            &grad,
            vec![
                (
                    0,
                    wgpu::BindingResource::Buffer(b.params_bindings("params").unwrap().remove(0)),
                ),
                (1, c_buf.as_entire_binding()),
                (
                    2,
                    wgpu::BindingResource::Buffer(b.grads_bindings("params").unwrap().remove(0)),
                ),
                (3, partials.as_entire_binding()),
            ],
        );
        let total_group = group(
            &total,
            vec![
                (3, partials.as_entire_binding()),
                (4, wgpu::BindingResource::Buffer(b.loss_binding())),
            ],
        );
        GpuQuadratic {
            grad,
            total,
            grad_group,
            total_group,
            groups,
        }
    }

    fn eval(&self, ev: &mut Evaluation<'_>) -> polyak_gpu::Result<(Loss, ())> {
        let mut pass = ev.encoder().begin_compute_pass(&Default::default());
        pass.set_pipeline(&self.grad);
        pass.set_bind_group(0, &self.grad_group, &[]);
        pass.dispatch_workgroups(self.groups, 1, 1);
        pass.set_pipeline(&self.total);
        pass.set_bind_group(0, &self.total_group, &[]);
        pass.dispatch_workgroups(1, 1, 1);
        Ok((Loss::Device, ()))
    }
}

#[test]
fn device_loss_and_gradient_agree_with_the_host_path() {
    let ctx = ctx();
    let n = 37;
    let c = random(5, n);
    let x0 = random(6, n);
    let cfg = PolyakConfig::default().momentum(0.3).maxiter(30).tol(1e-5);
    let mut gpu = PolyakSgd::new(&ctx, cfg.clone(), &x0).unwrap();
    let q = GpuQuadratic::new(&gpu, &c);
    let sg = gpu.run(|ev| q.eval(ev)).unwrap();

    let mut host = PolyakSgd::new(&ctx, cfg, &x0).unwrap();
    let sh = host
        .run(|ev| {
            let x = ev.read_params()?;
            let g: Vec<f32> = x.iter().zip(&c).map(|(x, c)| x - c).collect();
            ev.write_grads(&g)?;
            Ok((Loss::Host(0.5 * sqnorm(&g)), ()))
        })
        .unwrap();
    assert_eq!(sg.iter_num, sh.iter_num);
    assert!(sg.iter_num > 3);
    assert!((sg.value - sh.value).abs() <= 1e-4 * sh.value.abs() + 1e-12);
    assert!((sg.stepsize - sh.stepsize).abs() <= 1e-4 * sh.stepsize.abs());
    let (xg, xh) = (
        gpu.download_params().unwrap(),
        host.download_params().unwrap(),
    );
    for (a, b) in xg.iter().zip(&xh) {
        assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
    }
    // the optimizer converged to c
    assert!(xg.iter().zip(&c).all(|(x, c)| (x - c).abs() < 1e-4));
}

#[test]
fn runs_are_bitwise_repeatable_and_l2_optimality_error_matches() {
    let ctx = ctx();
    let n = 200_003;
    let c = random(8, n);
    let run = || {
        let mut opt = PolyakSgd::new(
            &ctx,
            PolyakConfig::default().momentum(0.9).maxiter(6),
            &random(9, n),
        )
        .unwrap();
        let q = GpuQuadratic::new(&opt, &c);
        let s = opt.run(|ev| q.eval(ev)).unwrap();
        let err = opt.l2_optimality_error(|ev| q.eval(ev)).unwrap();
        (
            s,
            opt.download_params().unwrap(),
            err,
            opt.download_velocity().unwrap(),
        )
    };
    let (s1, p1, e1, v1) = run();
    let (s2, p2, e2, v2) = run();
    assert_eq!(s1, s2);
    assert_eq!(s1.iter_num, 6);
    assert!(p1.iter().zip(&p2).all(|(a, b)| a.to_bits() == b.to_bits()));
    assert_eq!(v1, v2);
    assert_eq!(e1.to_bits(), e2.to_bits());
    let exact: f64 = p1
        .iter()
        .zip(&c)
        .map(|(x, c)| f64::from(x - c).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((e1 - exact).abs() <= 1e-5 * exact, "{e1} vs {exact}");
}
