//! `ParamDtype::F64`: parameters, gradients, velocity and the GPU's arithmetic in
//! f64 (jaxopt's float64 path; the conformance cases are in tests/conformance.rs).

mod common;

use common::{ctx, ctx_with_segments, fixed_f64};
use polyak_gpu::conformance::SplitMix64;
use polyak_gpu::{
    Error, Evaluation, GpuContext, Loss, NonFinitePolicy, ParamDtype, PolyakConfig, PolyakSgd,
    Precision, StepSizeMode, TensorSpec, Variant, VelocityDtype, polyak_stepsize,
};

fn random64(seed: u64, n: usize) -> Vec<f64> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.upm1()).collect()
}

/// Two steps from random f64 parameters with random f64 gradients, against f64
/// arithmetic on the host: equal to a few f64 roundings.
fn two_steps_f64(ctx: &GpuContext, n: usize, mode: StepSizeMode, seed: u64) {
    let cfg = PolyakConfig::default()
        .momentum(0.9)
        .fun_min(-1.0)
        .max_stepsize(1e6)
        .dtype(ParamDtype::F64)
        .stepsize_mode(mode);
    let mut opt = PolyakSgd::new_zeroed(ctx, cfg.clone(), n).unwrap();
    let mut p = random64(seed, n);
    opt.buffers().upload_params_f64(&p).unwrap();
    assert_eq!(opt.buffers().download_params_f64().unwrap(), p);
    let mut v = vec![0.0f64; n];
    let (g1, g2) = (random64(seed + 1, n), random64(seed + 2, n));
    let mut state = opt.init_state(fixed_f64(&g1, 0.5)).unwrap();
    for (g, value) in [(&g1, 0.5), (&g2, 0.25)] {
        state = opt.update(&state, fixed_f64(g, value)).unwrap();
        let sq: f64 = g.iter().map(|x| x * x).sum();
        assert!(
            (state.error * state.error - sq).abs() <= 1e-13 * sq,
            "n={n}: {} vs {sq}",
            state.error * state.error
        );
        let step = polyak_stepsize(value, sq, &cfg, Precision::F64);
        assert!(
            (state.stepsize - step).abs() <= 1e-13 * step,
            "{state:?} vs {step}"
        );
        let s = state.stepsize;
        let got_p = opt.buffers().download_params_f64().unwrap();
        let got_v = opt.buffers().download_velocity_f64().unwrap().unwrap();
        for i in 0..n {
            let vi = 0.9 * v[i] - s * g[i];
            let scale = p[i].abs() + (0.9 * v[i]).abs() + (s * g[i]).abs();
            assert!(
                (got_v[i] - vi).abs() <= 4.0 * f64::EPSILON * scale,
                "v[{i}]"
            );
            assert!(
                (got_p[i] - (p[i] + vi)).abs() <= 4.0 * f64::EPSILON * scale,
                "n={n} p[{i}]: {} vs {}",
                got_p[i],
                p[i] + vi
            );
        }
        p = got_p;
        v = got_v;
    }
    // not an f32 computation in disguise: the values use f64's digits
    assert!(p.iter().any(|&x| f64::from(x as f32) != x));
}

#[test]
fn f64_steps_match_f64_arithmetic_at_awkward_sizes() {
    let ctx = ctx();
    for (i, n) in [1usize, 5, 257, 4099, 100_003].into_iter().enumerate() {
        two_steps_f64(&ctx, n, StepSizeMode::Host, 600 + 10 * i as u64);
        two_steps_f64(&ctx, n, StepSizeMode::Device, 605 + 10 * i as u64);
    }
    two_steps_f64(&ctx_with_segments(4096), 10_001, StepSizeMode::Device, 650);
    // the GPUs' grid-stride walk (lavapipe uses contiguous runs by default)
    two_steps_f64(
        &common::grid_stride_ctx(),
        300_007,
        StepSizeMode::Device,
        655,
    );
}

#[test]
fn f64_memory_and_the_objectives_norm() {
    let ctx = ctx();
    let cfg = PolyakConfig::default()
        .momentum(0.5)
        .max_stepsize(100.0)
        .dtype(ParamDtype::F64);
    let n = 1 << 14;
    let opt = PolyakSgd::new_zeroed(&ctx, cfg.clone(), n).unwrap();
    assert_eq!(opt.buffers().device_bytes(), 24 * n as u64);

    // The objective writes f64 norm partials, in its own commands.
    let mut opt = PolyakSgd::builder(&ctx, cfg)
        .tensor(TensorSpec::new("p", &[1000]))
        .norm_from_objective(3)
        .build()
        .unwrap();
    let parts = [0.1f64, 0.2, 0.30000000000000004];
    let source = wgpu::util::DeviceExt::create_buffer_init(
        opt.context().device(),
        &wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(&parts),
            usage: wgpu::BufferUsages::COPY_SRC,
        },
    );
    let g = random64(660, 1000);
    let f = |ev: &mut Evaluation<'_>| {
        ev.write_grads_f64(&g)?;
        let dst = ev.buffers().norm_partials_binding().unwrap().buffer.clone();
        ev.encoder().copy_buffer_to_buffer(&source, 0, &dst, 0, 24);
        Ok((Loss::Host(1.0), ()))
    };
    let s = opt.init_state(f).unwrap();
    let s = opt.update(&s, f).unwrap();
    let sum: f64 = (0.1 + 0.2) + 0.30000000000000004;
    assert_eq!(s.error, sum.sqrt());
    assert_eq!(s.stepsize, 1.0 / sum);
}

#[test]
fn f64_is_refused_where_it_cannot_run() {
    let cfg = PolyakConfig::default().dtype(ParamDtype::F64);
    let option_of = |r: polyak_gpu::Result<PolyakSgd>| match r {
        Err(Error::InvalidOption { option, .. }) => option,
        other => panic!("expected InvalidOption, got {other:?}"),
    };
    let plain = common::default_features_ctx();
    assert_eq!(
        option_of(PolyakSgd::new(&plain, cfg.clone(), &[1.0; 4])),
        "dtype"
    );
    // an f16 velocity goes with f32 parameters only
    let ctx = ctx();
    let half = cfg.clone().momentum(0.9).velocity_dtype(VelocityDtype::F16);
    assert_eq!(
        option_of(PolyakSgd::new(&ctx, half, &[1.0; 4])),
        "velocity_dtype"
    );
}

#[test]
fn user_owned_f64_buffers_are_updated_in_place() {
    let ctx = ctx();
    let n = 1000;
    let p0 = random64(690, n);
    let g = random64(691, n);
    let device = ctx.device();
    let init = |data: &[f64]| {
        wgpu::util::DeviceExt::create_buffer_init(
            device,
            &wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            },
        )
    };
    let (params, grads) = (init(&p0), init(&g));
    let cfg = PolyakConfig::default()
        .max_stepsize(10.0)
        .dtype(ParamDtype::F64);
    let mut opt = PolyakSgd::builder(&ctx, cfg)
        .external(polyak_gpu::ExternalTensor {
            spec: TensorSpec::new("w", &[n]),
            params: params.clone(),
            params_offset: 0,
            grads,
            grads_offset: 0,
        })
        .build()
        .unwrap();
    // the gradient is already in the user's buffer; the loss comes from the host
    let keep = |_: &mut Evaluation<'_>| Ok((Loss::Host(2.0), ()));
    let s = opt.init_state(keep).unwrap();
    let s = opt.update(&s, keep).unwrap();
    let sq: f64 = g.iter().map(|x| x * x).sum();
    assert!((s.stepsize - 2.0 / sq).abs() <= 1e-14 * s.stepsize);
    let p = opt.buffers().download_params_f64().unwrap();
    for i in 0..n {
        let want = p0[i] - s.stepsize * g[i];
        assert!(
            (p[i] - want).abs() <= 4.0 * f64::EPSILON * p0[i].abs().max(1.0),
            "{i}"
        );
    }
    // a user buffer too small for f64 values is refused at registration
    let small = init(&p0[..n / 2]);
    let built = PolyakSgd::builder(&ctx, PolyakConfig::default().dtype(ParamDtype::F64))
        .external(polyak_gpu::ExternalTensor {
            spec: TensorSpec::new("w", &[n]),
            params: small,
            params_offset: 0,
            grads: init(&g),
            grads_offset: 0,
        })
        .build();
    match built {
        Err(Error::Registration { reason, .. }) => assert!(reason.contains("exceeds"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_f64_checkpoint_resumes_bit_for_bit() {
    let ctx = ctx();
    let cfg = PolyakConfig::default()
        .momentum(0.9)
        .max_stepsize(10.0)
        .dtype(ParamDtype::F64);
    let n = 3000;
    let gs: Vec<Vec<f64>> = (0..4).map(|k| random64(670 + k, n)).collect();
    let dir = std::env::temp_dir().join(format!("polyak-f64-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("f64.safetensors");
    let fresh = |seed| {
        let opt = PolyakSgd::new_zeroed(&ctx, cfg.clone(), n).unwrap();
        opt.buffers().upload_params_f64(&random64(seed, n)).unwrap();
        opt
    };
    let mut a = fresh(680);
    let mut s = a.init_state(fixed_f64(&gs[0], 1.0)).unwrap();
    for (k, g) in gs.iter().enumerate() {
        s = a.update(&s, fixed_f64(g, 1.0)).unwrap();
        if k == 1 {
            a.save_checkpoint(&s, &file).unwrap();
        }
    }
    let mut b = fresh(681);
    let mut r = b.load_checkpoint(&file).unwrap();
    for g in &gs[2..] {
        r = b.update(&r, fixed_f64(g, 1.0)).unwrap();
    }
    assert_eq!(r, s);
    let bits = |v: Vec<f64>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(a.buffers().download_params_f64().unwrap()),
        bits(b.buffers().download_params_f64().unwrap())
    );
    assert_eq!(
        bits(a.buffers().download_velocity_f64().unwrap().unwrap()),
        bits(b.buffers().download_velocity_f64().unwrap().unwrap())
    );
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("params/params").unwrap().dtype(),
        safetensors::Dtype::F64
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_benchmark_fill_writes_f64_too() {
    let ctx = ctx();
    let cfg = PolyakConfig::default().dtype(ParamDtype::F64);
    let n = 10_003;
    let opt = PolyakSgd::new_zeroed(&ctx, cfg, n).unwrap();
    polyak_gpu::bench::fill(&opt, true, 7, 0.5).unwrap();
    let p = opt.buffers().download_params_f64().unwrap();
    // all but the last n % 4 are filled, within [-0.5, 0.5), and varied
    assert!(p[..n - n % 4].iter().all(|x| x.abs() <= 0.5 && *x != 0.0));
    let mean = p.iter().sum::<f64>() / n as f64;
    assert!(mean.abs() < 0.02, "{mean}");
}

/// One f64 device-mode step with gradient `g` and host loss `value` under `cfg`
/// and `policy`: its step size, or `None` when it was refused. The parameters and
/// velocity must be untouched by a refusal.
fn f64_device_step(
    ctx: &GpuContext,
    cfg: &PolyakConfig,
    policy: NonFinitePolicy,
    g: &[f64],
    value: f64,
) -> Option<f64> {
    let cfg = cfg
        .clone()
        .momentum(0.5)
        .dtype(ParamDtype::F64)
        .stepsize_mode(StepSizeMode::Device)
        .nonfinite(policy);
    let mut opt = PolyakSgd::new_zeroed(ctx, cfg, g.len()).unwrap();
    let p = random64(700, g.len());
    opt.buffers().upload_params_f64(&p).unwrap();
    let state = opt.init_state(fixed_f64(g, value)).unwrap();
    match opt.update(&state, fixed_f64(g, value)) {
        Ok(s) => Some(s.stepsize),
        Err(Error::NonFinite { .. }) => {
            assert_eq!(opt.buffers().download_params_f64().unwrap(), p);
            let v = opt.buffers().download_velocity_f64().unwrap().unwrap();
            assert!(v.iter().all(|&x| x == 0.0));
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn f64_device_rule_gives_the_host_rules_special_values_and_refusals() {
    // The GPU classifies f64 NaN and infinity itself; a compiler may fold f64
    // arithmetic as if they never occurred (lavapipe made every value finite and
    // 1/0 zero before the prelude classified by bits).
    let ctx = ctx();
    let n = 64;
    let g = random64(701, n);
    let zeros = vec![0.0; n];
    let mut inf_g = g.clone();
    inf_g[7] = f64::INFINITY;
    let mut nan_g = g.clone();
    nan_g[9] = f64::NAN;
    let huge = vec![1e200; n]; // squared norm overflows f64
    let tiny = vec![1e-170; n]; // squared norm underflows to 0: x/0
    let max = PolyakConfig::default();
    let plus = PolyakConfig::default().variant(Variant::SpsPlus);
    let delta = PolyakConfig::default().delta(1e-3);
    let cases: Vec<(&str, &PolyakConfig, &[f64], f64)> = vec![
        ("0/0", &max, &zeros, 0.0),
        ("x/0 is capped", &max, &zeros, 2.0),
        ("x/(0 underflowed) is capped", &max, &tiny, 1e300),
        ("delta removes 0/0", &delta, &zeros, 0.0),
        ("SPS+ zero norm", &plus, &zeros, 1.0),
        ("inf loss", &max, &g, f64::INFINITY),
        ("-inf loss", &max, &g, f64::NEG_INFINITY),
        ("NaN loss", &max, &g, f64::NAN),
        ("SPS+ NaN loss", &plus, &g, f64::NAN),
        ("inf gradient", &max, &inf_g, 1.0),
        ("NaN gradient", &max, &nan_g, 1.0),
        ("overflowing norm", &max, &huge, 1.0),
        ("1e39 is finite in f64", &max, &g, 1e39),
        ("ordinary", &max, &g, 0.5),
    ];
    for (what, cfg, grad, value) in cases {
        let sq: f64 = grad.iter().map(|x| x * x).sum();
        let host = polyak_stepsize(value, sq, cfg, Precision::F64);
        let finite = value.is_finite() && sq.is_finite() && host.is_finite();
        let propagated = f64_device_step(&ctx, cfg, NonFinitePolicy::Propagate, grad, value);
        let got = propagated.expect("Propagate never refuses");
        // Equal up to the order of the norm's sum (a few ulps), specials exactly.
        let close = (got - host).abs() <= 1e-14 * host.abs();
        assert!(
            got == host || close || (got.is_nan() && host.is_nan()),
            "{what}: device {got} vs host {host}"
        );
        let refused = f64_device_step(&ctx, cfg, NonFinitePolicy::Refuse, grad, value).is_none();
        assert_eq!(refused, !finite, "{what}: refused {refused}, step {host}");
    }
}

#[test]
fn every_vector_moves_in_f64_by_tensor_and_whole() {
    let ctx = ctx_with_segments(256);
    let specs = [TensorSpec::new("a", &[301]), TensorSpec::new("b", &[7, 3])];
    let n = 322;
    for dtype in [ParamDtype::F64, ParamDtype::F32] {
        let cfg = PolyakConfig::default().momentum(0.5).dtype(dtype);
        let opt = PolyakSgd::with_tensors(&ctx, cfg, &specs).unwrap();
        let b = opt.buffers();
        // f64 storage keeps every bit; f32 storage rounds to nearest.
        let stored = |x: &[f64]| -> Vec<f64> {
            match dtype {
                ParamDtype::F64 => x.to_vec(),
                _ => x.iter().map(|&v| f64::from(v as f32)).collect(),
            }
        };
        let (a, t) = (random64(710, 301), random64(711, 21));
        b.upload_tensor_f64("a", &a).unwrap();
        b.upload_tensor_f64("b", &t).unwrap();
        assert_eq!(b.download_tensor_f64("a").unwrap(), stored(&a));
        assert_eq!(b.download_tensor_f64("b").unwrap(), stored(&t));
        let whole = [a, t].concat();
        assert_eq!(b.download_params_f64().unwrap(), stored(&whole));
        let (v, g) = (random64(712, n), random64(713, n));
        b.upload_velocity_f64(&v).unwrap();
        b.upload_grads_f64(&g).unwrap();
        assert_eq!(b.download_velocity_f64().unwrap().unwrap(), stored(&v));
        assert_eq!(b.download_grads_f64().unwrap(), stored(&g));
        assert!(matches!(
            b.upload_tensor_f64("a", &[1.0]),
            Err(Error::LengthMismatch { .. })
        ));
    }
}

#[test]
fn tensor_bindings_cover_each_tensor_in_its_own_precision() {
    // Several tensors per segment and one split over segments, so that bindings
    // start at offsets other than 0.
    let ctx = ctx_with_segments(256);
    let specs = [
        TensorSpec::new("a", &[37]),
        TensorSpec::new("b", &[5, 9]),
        TensorSpec::new("c", &[600]),
    ];
    for dtype in [ParamDtype::F64, ParamDtype::F32] {
        let cfg = PolyakConfig::default().dtype(dtype);
        let opt = PolyakSgd::with_tensors(&ctx, cfg, &specs).unwrap();
        let b = opt.buffers();
        let n: usize = specs.iter().map(TensorSpec::len).sum();
        b.upload_params_f64(&random64(720, n)).unwrap();
        b.upload_grads_f64(&random64(721, n)).unwrap();
        let (all_p, all_g) = (
            b.download_params_f64().unwrap(),
            b.download_grads_f64().unwrap(),
        );
        let mut start = 0;
        for spec in &specs {
            let range = start..start + spec.len();
            start = range.end;
            let (p, g) = (all_p[range.clone()].to_vec(), all_g[range].to_vec());
            for (bindings, want) in [
                (b.params_bindings(&spec.name).unwrap(), p),
                (b.grads_bindings(&spec.name).unwrap(), g),
            ] {
                let got: Vec<f64> = bindings
                    .iter()
                    .flat_map(|bd| {
                        let size = bd.size.expect("bindings have a size").get();
                        let bytes = common::read_back(&ctx, bd.buffer, bd.offset, size);
                        match dtype {
                            ParamDtype::F64 => bytemuck::pod_collect_to_vec::<u8, f64>(&bytes),
                            _ => bytemuck::pod_collect_to_vec::<u8, f32>(&bytes)
                                .into_iter()
                                .map(f64::from)
                                .collect(),
                        }
                    })
                    .collect();
                assert_eq!(got, want, "{dtype:?} {}", spec.name);
            }
        }
    }
}
