//! `StepSizeMode::Device`: the step-size rule run on the GPU, against the host rule
//! and the f64 reference, including its special values and its refusals.

mod common;

use common::{GpuQuadratic, ctx, fixed, random, sqnorm, two_steps_in};
use polyak_gpu::{
    Error, Evaluation, Loss, NonFinitePolicy, PolyakConfig, PolyakSgd, Precision, StepSizeMode,
    Variant, polyak_stepsize,
};

const DEVICE: StepSizeMode = StepSizeMode::Device;

#[test]
fn device_steps_match_f64_on_random_data_at_awkward_sizes() {
    let ctx = ctx();
    for (i, &n) in [1usize, 5, 257, 1025, 65_537, 1_000_003].iter().enumerate() {
        two_steps_in(&ctx, n, 0.0, 300 + 10 * i as u64, DEVICE);
        two_steps_in(&ctx, n, 0.9, 305 + 10 * i as u64, DEVICE);
    }
}

#[test]
fn device_steps_cross_the_dispatch_dimension_limit() {
    let n = 65_535 * 256 + 1_021;
    two_steps_in(&ctx(), n, 0.9, 399, DEVICE);
}

/// Host objective `0.5 * sum(a_i (x_i - c_i)^2)` with weights `a` in [0.1, 10): the
/// Polyak step varies from step to step (for equal weights it would stay at 0.5).
fn weighted(
    a: &[f32],
    c: &[f32],
) -> impl Fn(&mut Evaluation<'_>) -> polyak_gpu::Result<(Loss, ())> {
    move |ev| {
        let x = ev.read_params()?;
        let g: Vec<f32> = (0..x.len()).map(|i| a[i] * (x[i] - c[i])).collect();
        ev.write_grads(&g)?;
        let loss = (0..x.len())
            .map(|i| 0.5 * f64::from(a[i]) * f64::from(x[i] - c[i]).powi(2))
            .sum();
        Ok((Loss::Host(loss), ()))
    }
}

/// `steps` updates of the weighted objective for `cfg` in each mode: their states.
fn trajectories(cfg: &PolyakConfig, steps: usize) -> [Vec<polyak_gpu::State>; 2] {
    let ctx = ctx();
    let n = 4099;
    let a: Vec<f32> = random(42, n).iter().map(|r| 10f32.powf(*r)).collect();
    let c = random(40, n);
    let x0 = random(41, n);
    let f = weighted(&a, &c);
    [StepSizeMode::Host, DEVICE].map(|mode| {
        let mut opt = PolyakSgd::new(&ctx, cfg.clone().stepsize_mode(mode), &x0).unwrap();
        let mut state = opt.init_state(&f).unwrap();
        (0..steps)
            .map(|_| {
                state = opt.update(&state, &f).unwrap();
                state.clone()
            })
            .collect()
    })
}

#[test]
fn device_and_host_rules_follow_the_same_trajectory() {
    for cfg in [
        PolyakConfig::default().momentum(0.9),
        PolyakConfig::default().max_stepsize(0.3).fun_min(-0.5),
        PolyakConfig::default().delta(0.25),
        PolyakConfig::default()
            .variant(Variant::SpsPlus)
            .momentum(0.5),
    ] {
        let [host, device] = trajectories(&cfg, 12);
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-30);
        for (k, (h, d)) in host.iter().zip(&device).enumerate() {
            assert!(
                rel(d.stepsize, h.stepsize) <= 1e-4,
                "{cfg:?} step {k}: {} vs {}",
                d.stepsize,
                h.stepsize
            );
            assert!(rel(d.value, h.value) <= 1e-4, "{cfg:?} step {k}");
            assert!(rel(d.error, h.error) <= 1e-4, "{cfg:?} step {k}");
            assert_eq!(d.iter_num, h.iter_num);
        }
        // the step changed along the way, so the rule really ran each time
        let steps: Vec<f64> = device.iter().map(|s| s.stepsize).collect();
        assert!(
            steps.iter().any(|&s| rel(s, steps[0]) > 1e-2),
            "{cfg:?}: {steps:?}"
        );
        // and the device's step is the rule applied in f32 to its own value and norm
        for d in &device {
            let want = polyak_stepsize(d.value, d.error * d.error, &cfg, Precision::F32);
            assert!(rel(d.stepsize, want) <= 1e-5, "{cfg:?}: {d:?} vs {want}");
        }
    }
}

#[test]
fn device_loss_written_by_a_kernel_gives_the_host_loss_trajectory() {
    let ctx = ctx();
    let n = 10_001;
    let c = random(45, n);
    let x0 = random(46, n);
    let cfg = PolyakConfig::default()
        .momentum(0.7)
        .max_stepsize(0.4)
        .stepsize_mode(DEVICE);
    let mut gpu = PolyakSgd::new(&ctx, cfg.clone(), &x0).unwrap();
    let q = GpuQuadratic::new(&gpu, "params", &c);
    let mut host = PolyakSgd::new(&ctx, cfg, &x0).unwrap();
    let a = vec![1.0f32; n];
    let f = weighted(&a, &c);
    let (mut sg, mut sh) = (
        gpu.init_state(|ev| q.eval(ev)).unwrap(),
        host.init_state(&f).unwrap(),
    );
    for k in 0..6 {
        sg = gpu.update(&sg, |ev| q.eval(ev)).unwrap();
        sh = host.update(&sh, &f).unwrap();
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        assert!(rel(sg.value, sh.value) <= 1e-4, "step {k}: {sg:?} {sh:?}");
        assert!(rel(sg.stepsize, sh.stepsize) <= 1e-4, "step {k}");
    }
    let (pg, ph) = (
        gpu.download_params().unwrap(),
        host.download_params().unwrap(),
    );
    assert!(pg.iter().zip(&ph).all(|(a, b)| (a - b).abs() <= 1e-5));
    assert_ne!(pg, x0);
}

/// One device-mode step with gradient `g` and host loss `value` under `cfg` with
/// `Propagate`: the step size it reports.
fn device_step(cfg: &PolyakConfig, g: &[f32], value: f64) -> f64 {
    let cfg = cfg
        .clone()
        .stepsize_mode(DEVICE)
        .nonfinite(NonFinitePolicy::Propagate);
    let mut opt = PolyakSgd::new(&ctx(), cfg, &random(50, g.len())).unwrap();
    let state = opt.init_state(fixed(g, value)).unwrap();
    opt.update(&state, fixed(g, value)).unwrap().stepsize
}

#[test]
fn device_rule_gives_jaxopts_special_values() {
    let g = random(51, 64);
    let sq = sqnorm(&g) as f32 as f64;
    let zeros = vec![0.0f32; 64];
    let tiny = vec![1e-5f32; 64]; // squared norm 6.4e-9, below f32 eps
    let max = PolyakConfig::default();
    let plus = PolyakConfig::default().variant(Variant::SpsPlus);
    let cases: Vec<(&str, PolyakConfig, &[f32], f64, f64)> = vec![
        ("0/0 is NaN", max.clone(), &zeros, 0.0, f64::NAN),
        ("x/0 is capped", max.clone(), &zeros, 2.0, 1.0),
        (
            "delta removes 0/0",
            max.clone().delta(1e-3),
            &zeros,
            0.0,
            0.0,
        ),
        ("inf loss is capped", max.clone(), &g, f64::INFINITY, 1.0),
        ("NaN loss is NaN", max.clone(), &g, f64::NAN, f64::NAN),
        ("cap", max.clone().max_stepsize(0.01), &g, 5.0, 0.01),
        (
            "negative gap is kept",
            max.clone().fun_min(1.0),
            &g,
            0.5,
            (0.5 - 1.0) / sq,
        ),
        ("SPS+ tiny norm is 0", plus.clone(), &tiny, 1.0, 0.0),
        (
            "SPS+ NaN loss, tiny norm is 0",
            plus.clone(),
            &tiny,
            f64::NAN,
            0.0,
        ),
        ("SPS+ NaN loss is NaN", plus.clone(), &g, f64::NAN, f64::NAN),
        (
            "SPS+ negative gap is 0",
            plus.clone().fun_min(3.0),
            &g,
            1.0,
            0.0,
        ),
        ("SPS+ ignores the cap", plus.clone(), &g, 1e3, 1e3 / sq),
    ];
    for (what, cfg, grad, value, want) in cases {
        let got = device_step(&cfg, grad, value);
        let host = polyak_stepsize(value, sqnorm(grad) as f32 as f64, &cfg, Precision::F32);
        if want.is_nan() {
            assert!(got.is_nan() && host.is_nan(), "{what}: {got} / {host}");
        } else {
            assert!(
                (got - want).abs() <= 1e-6 * want.abs(),
                "{what}: {got} vs {want}"
            );
            assert!(
                (host - want).abs() <= 1e-6 * want.abs(),
                "{what}: host {host}"
            );
        }
    }
}

#[test]
fn device_refusals_leave_parameters_and_velocity_untouched() {
    let ctx = ctx();
    let n = 1000;
    let cfg = PolyakConfig::default().momentum(0.9).stepsize_mode(DEVICE);
    let mut opt = PolyakSgd::new(&ctx, cfg, &random(60, n)).unwrap();
    let g = random(61, n);
    let state = opt.init_state(fixed(&g, 1.0)).unwrap();
    let state = opt.update(&state, fixed(&g, 1.0)).unwrap();
    let p = opt.download_params().unwrap();
    let v = opt.download_velocity().unwrap().unwrap();
    let mut bad_g = g.clone();
    bad_g[n / 2] = f32::INFINITY;
    let cases: Vec<(Vec<f32>, f64)> = vec![
        (bad_g, 1.0),
        (g.clone(), f64::NAN),
        (g.clone(), f64::INFINITY),
        (g.clone(), 1e39),    // finite in f64, infinite in f32
        (vec![1e20; n], 1.0), // squared norm overflows f32
        (vec![0.0; n], 0.0),  // 0/0
    ];
    for (grad, value) in &cases {
        match opt.update(&state, fixed(grad, *value)) {
            Err(Error::NonFinite { iter_num, .. }) => assert_eq!(iter_num, 1),
            other => panic!("value {value}: expected NonFinite, got {other:?}"),
        }
        assert_eq!(opt.download_params().unwrap(), p, "value {value}");
        assert_eq!(opt.download_velocity().unwrap().unwrap(), v);
    }
    // the optimizer goes on normally afterwards
    let next = opt.update(&state, fixed(&g, 1.0)).unwrap();
    assert_eq!(next.iter_num, 2);
    assert_ne!(opt.download_params().unwrap(), p);
}

#[test]
fn device_zero_over_zero_propagates_on_request_as_jaxopt() {
    let ctx = ctx();
    let c = [0.5f32, -0.25, 1.0, 2.0, 3.0];
    let quadratic = |ev: &mut Evaluation<'_>| {
        let x = ev.read_params()?;
        let g: Vec<f32> = x.iter().zip(&c).map(|(x, c)| x - c).collect();
        ev.write_grads(&g)?;
        Ok((Loss::Host(0.5 * sqnorm(&g)), ()))
    };
    let cfg = PolyakConfig::default()
        .stepsize_mode(DEVICE)
        .nonfinite(NonFinitePolicy::Propagate);
    let mut opt = PolyakSgd::new(&ctx, cfg, &c).unwrap();
    let s = opt.run(quadratic).unwrap();
    assert_eq!((s.iter_num, s.value, s.error), (1, 0.0, 0.0));
    assert!(s.stepsize.is_nan());
    assert!(opt.download_params().unwrap().iter().all(|x| x.is_nan()));
}

#[test]
fn device_mode_converges_and_l2_optimality_error_does_not_step() {
    let ctx = ctx();
    let n = 30_001;
    let c = random(70, n);
    // without momentum each step halves the distance to c (the Polyak step of
    // 0.5 ||x - c||^2 is 0.5): about 21 steps from ~140 to a gradient norm of 1e-4
    let cfg = PolyakConfig::default().tol(1e-4).stepsize_mode(DEVICE);
    let mut opt = PolyakSgd::new(&ctx, cfg, &random(71, n)).unwrap();
    // deferring is meaningless here and must not change anything
    opt.set_deferred_updates(true).unwrap();
    let q = GpuQuadratic::new(&opt, "params", &c);
    let s = opt.run(|ev| q.eval(ev)).unwrap();
    assert!(s.error <= 1e-4 && (20..=23).contains(&s.iter_num), "{s:?}");
    let p = opt.download_params().unwrap();
    let exact = p
        .iter()
        .zip(&c)
        .map(|(x, c)| f64::from(x - c).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(exact <= 1e-4, "{exact}");
    let err = opt.l2_optimality_error(|ev| q.eval(ev)).unwrap();
    assert_eq!(opt.download_params().unwrap(), p);
    assert!((err - exact).abs() <= 1e-4 * exact, "{err} vs {exact}");
}
