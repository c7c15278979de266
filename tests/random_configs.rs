//! Random configurations against f64 arithmetic: layouts of odd lengths, single
//! elements and scalars over small segments, user-owned tensors, f32 or f64
//! parameters, f16 velocity, momentum or none, both variants, both step-size modes,
//! deferred updates and the overflow check; every step checked on its own, and a checkpoint taken
//! midway resumed bit for bit in a fresh optimizer.

mod common;

use common::ctx_with_segments;
use polyak_gpu::conformance::SplitMix64;
use polyak_gpu::{
    Evaluation, ExternalTensor, GpuContext, Loss, NonFinitePolicy, ParamDtype, PolyakConfig,
    PolyakSgd, Precision, State, StepSizeMode, TensorSpec, Variant, VelocityDtype, polyak_stepsize,
};

/// A random model and configuration.
#[derive(Debug, Clone)]
struct Drawn {
    /// Tensors the optimizer owns.
    specs: Vec<TensorSpec>,
    /// Tensors whose buffers the user owns.
    external: Vec<TensorSpec>,
    /// Whether those lie back to back in one pair of buffers (one run, lengths of
    /// any size adding up to a multiple of 4) or each in buffers of its own
    /// (lengths a multiple of 4).
    arena: bool,
    cfg: PolyakConfig,
    /// Most elements per segment.
    segment: usize,
}

fn draw(rng: &mut SplitMix64) -> Drawn {
    let mut pick = |n: u64| (rng.next_u64() % n) as usize;
    let specs = (0..1 + pick(5))
        .map(|i| {
            let dims = pick(3); // 0 dims: a scalar
            let shape: Vec<usize> = (0..dims).map(|_| 1 + pick(40)).collect();
            TensorSpec::new(format!("t{i}"), &shape)
        })
        .collect();
    let arena = pick(2) == 0;
    let unit = if arena { 1 } else { 4 };
    let mut external: Vec<TensorSpec> = (0..pick(3))
        .map(|i| TensorSpec::new(format!("u{i}"), &[unit * (1 + pick(100)), 1 + pick(2)]))
        .collect();
    let n: usize = external.iter().map(TensorSpec::len).sum();
    if !n.is_multiple_of(4) {
        external.push(TensorSpec::new("pad", &[4 - n % 4]));
    }
    let momentum = [0.0, 0.5, 0.9][pick(3)];
    let dtype = [ParamDtype::F32, ParamDtype::F32, ParamDtype::F64][pick(3)];
    let velocity = if dtype == ParamDtype::F32 && pick(2) == 0 {
        VelocityDtype::F16
    } else {
        VelocityDtype::Full
    };
    let cfg = PolyakConfig::default()
        .momentum(momentum)
        .dtype(dtype)
        .velocity_dtype(velocity)
        .stepsize_mode([StepSizeMode::Host, StepSizeMode::Device][pick(2)])
        .variant([Variant::SpsMax, Variant::SpsMax, Variant::SpsPlus][pick(3)])
        .fun_min(-1.0)
        .max_stepsize([1e6, 0.05][pick(2)])
        .delta([0.0, 0.1][pick(2)]);
    let segment = [64, 256, 1 << 20][pick(3)];
    // The overflow check never refuses these finite steps; it must change nothing.
    let cfg = cfg.check_overflow(pick(2) == 0);
    Drawn {
        specs,
        external,
        arena,
        cfg,
        segment,
    }
}

/// The optimizer of a drawn model, with fresh user buffers (zeroed, at an aligned
/// offset) for its external tensors.
fn build(ctx: &GpuContext, drawn: &Drawn) -> PolyakSgd {
    let Drawn {
        specs,
        external,
        arena,
        cfg,
        ..
    } = drawn;
    let real = cfg.dtype.bytes();
    let align = u64::from(ctx.limits().min_storage_buffer_offset_alignment);
    let buffer = |len: usize| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: align + len as u64 * real,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    };
    let mut b = PolyakSgd::builder(ctx, cfg.clone());
    for t in specs {
        b = b.tensor(t.clone());
    }
    let total: usize = external.iter().map(TensorSpec::len).sum();
    let shared = (buffer(total), buffer(total));
    let mut at = 0;
    for t in external {
        let (params, grads) = if *arena {
            shared.clone()
        } else {
            (buffer(t.len()), buffer(t.len()))
        };
        let first = if *arena { at } else { 0 };
        b = b.external(ExternalTensor {
            spec: t.clone(),
            params,
            params_offset: align + first,
            grads,
            grads_offset: first,
        });
        at += t.len() as u64 * real;
    }
    b.build().unwrap()
}

/// Parameters and velocity as f64 (exact whatever the storage type).
fn vectors(opt: &PolyakSgd) -> (Vec<f64>, Vec<f64>) {
    let b = opt.buffers();
    let p = b.download_params_f64().unwrap();
    let v = b
        .download_velocity_f64()
        .unwrap()
        .unwrap_or_else(|| vec![0.0; p.len()]);
    (p, v)
}

/// A host objective writing `g` (rounded to f32 for f32 parameters).
fn objective(
    g: &[f64],
    value: f64,
    f64_params: bool,
) -> impl Fn(&mut Evaluation<'_>) -> polyak_gpu::Result<(Loss, ())> + '_ {
    move |ev| {
        if f64_params {
            ev.write_grads_f64(g)?;
        } else {
            ev.write_grads(&g.iter().map(|&x| x as f32).collect::<Vec<_>>())?;
        }
        Ok((Loss::Host(value), ()))
    }
}

/// One update from what the GPU holds, checked against f64 arithmetic.
fn checked_step(opt: &mut PolyakSgd, state: &State, rng: &mut SplitMix64, what: &str) -> State {
    let cfg = opt.config().clone();
    let wide = cfg.dtype == ParamDtype::F64;
    let n = opt.buffers().num_params();
    let (p0, v0) = vectors(opt);
    let g: Vec<f64> = (0..n)
        .map(|_| {
            let x = rng.upm1();
            if wide { x } else { f64::from(x as f32) }
        })
        .collect();
    let value = rng.u01() * 2.0;
    let next = opt.update(state, objective(&g, value, wide)).unwrap();
    let (eps, precision) = if wide {
        (f64::EPSILON, Precision::F64)
    } else {
        (f64::from(f32::EPSILON), Precision::F32)
    };
    let sq: f64 = g.iter().map(|x| x * x).sum();
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-30);
    assert!(
        rel(next.error * next.error, sq) <= 64.0 * eps,
        "{what}: norm {next:?} vs {sq}"
    );
    let rule = polyak_stepsize(value, sq, &cfg, precision);
    assert!(
        rel(next.stepsize, rule) <= 64.0 * eps,
        "{what}: step {next:?} vs {rule}"
    );
    let (p1, v1) = vectors(opt);
    let (m, s) = (cfg.momentum, next.stepsize);
    let half = cfg.velocity_dtype == VelocityDtype::F16;
    for i in 0..n {
        let v = m * v0[i] - s * g[i];
        let scale = p0[i].abs() + (m * v0[i]).abs() + (s * g[i]).abs() + 1e-30;
        assert!(
            (p1[i] - (p0[i] + v)).abs() <= 4.0 * eps * scale,
            "{what}: p[{i}] {} vs {}",
            p1[i],
            p0[i] + v
        );
        if m != 0.0 {
            // f16 keeps 11 significant bits; below 2^-14 its step is 2^-24.
            let tol = if half {
                2f64.powi(-11) * v.abs() + 2f64.powi(-25) + 4.0 * eps * scale
            } else {
                4.0 * eps * scale
            };
            assert!((v1[i] - v).abs() <= tol, "{what}: v[{i}] {} vs {v}", v1[i]);
        }
    }
    next
}

#[test]
fn random_configurations_match_f64_step_by_step_and_resume_bit_for_bit() {
    let mut rng = SplitMix64::new(2026);
    for case in 0..24 {
        let drawn = draw(&mut rng);
        let Drawn { cfg, segment, .. } = &drawn;
        let what = format!("case {case}: {drawn:?}");
        let ctx = ctx_with_segments(*segment);
        let mut opt = build(&ctx, &drawn);
        // Every other case defers its updates (host rule: one submission a step);
        // every read below must see them.
        opt.set_deferred_updates(case % 2 == 1).unwrap();
        let n = opt.buffers().num_params();
        let p: Vec<f64> = (0..n).map(|_| rng.upm1()).collect();
        opt.buffers().upload_params_f64(&p).unwrap();
        let g0: Vec<f64> = (0..n).map(|_| rng.upm1()).collect();
        let wide = cfg.dtype == ParamDtype::F64;
        let mut state = opt.init_state(objective(&g0, 1.0, wide)).unwrap();
        for _ in 0..2 {
            state = checked_step(&mut opt, &state, &mut rng, &what);
        }
        let file = std::env::temp_dir().join(format!(
            "polyak-random-{}-{case}.safetensors",
            std::process::id()
        ));
        opt.save_checkpoint(&state, &file).unwrap();
        let mut resumed = build(&ctx, &drawn);
        let resumed_state = resumed.load_checkpoint(&file).unwrap();
        let _ = std::fs::remove_file(&file);
        assert_eq!(resumed_state, state, "{what}");
        // The same last step on both: the same bits.
        let mut twin = rng.clone();
        state = checked_step(&mut opt, &state, &mut rng, &what);
        let again = checked_step(&mut resumed, &resumed_state, &mut twin, &what);
        assert_eq!(again, state, "{what}");
        let bits = |(p, v): (Vec<f64>, Vec<f64>)| {
            (p.iter().chain(&v).map(|x| x.to_bits())).collect::<Vec<_>>()
        };
        assert!(bits(vectors(&opt)) == bits(vectors(&resumed)), "{what}");
    }
}

#[test]
fn random_pipelined_runs_equal_waiting_every_step() {
    // Device step size in every drawn configuration, batches of which some give a
    // NaN loss, under Refuse or Skip: run_iterator submitting 2..9 steps per wait
    // ends exactly where waiting every step ends (state, error, every bit).
    let mut rng = SplitMix64::new(7);
    for case in 0..12 {
        let drawn = draw(&mut rng);
        let policy = [NonFinitePolicy::Refuse, NonFinitePolicy::Skip][case % 2];
        let cfg = drawn
            .cfg
            .clone()
            .stepsize_mode(StepSizeMode::Device)
            .nonfinite(policy)
            .maxiter(12);
        let k = 2 + (rng.next_u64() % 8) as usize;
        let what = format!("case {case}: sync_every {k}, {cfg:?}, {drawn:?}");
        let ctx = ctx_with_segments(drawn.segment);
        let wide = cfg.dtype == ParamDtype::F64;
        let n: usize = drawn
            .specs
            .iter()
            .chain(&drawn.external)
            .map(|t| t.len())
            .sum();
        let p: Vec<f64> = (0..n).map(|_| rng.upm1()).collect();
        let grads: Vec<Vec<f64>> = (0..13)
            .map(|_| (0..n).map(|_| rng.upm1()).collect())
            .collect();
        let bad = 1 + (rng.next_u64() % 12) as usize;
        let outcome = |sync_every: usize| {
            let mut opt = build(
                &ctx,
                &Drawn {
                    cfg: cfg.clone().sync_every(sync_every),
                    ..drawn.clone()
                },
            );
            opt.buffers().upload_params_f64(&p).unwrap();
            let batch = |ev: &mut Evaluation<'_>, b: &usize| {
                let value = if *b == bad {
                    f64::NAN
                } else {
                    1.0 / (1 + b) as f64
                };
                objective(&grads[*b], value, wide)(ev)
            };
            let state = opt.run_iterator(batch, 0..13).map_err(|e| format!("{e:?}"));
            (state, vectors(&opt))
        };
        let (s1, v1) = outcome(1);
        let (s, v) = outcome(k);
        // The NaN batch was refused or skipped, whatever the precision.
        match (&s1, policy) {
            (Err(e), NonFinitePolicy::Refuse) => assert!(e.contains("NonFinite"), "{what}"),
            (Ok(st), NonFinitePolicy::Skip) => assert_eq!(st.num_skipped, 1, "{what}"),
            (other, _) => panic!("{what}: {other:?}"),
        }
        // (as text: a skipped last batch leaves NaN in the state, and NaN != NaN)
        assert_eq!(format!("{s:?}"), format!("{s1:?}"), "{what}");
        let bits = |(p, v): &(Vec<f64>, Vec<f64>)| {
            p.iter().chain(v).map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        assert!(bits(&v) == bits(&v1), "{what}");
    }
}

#[test]
fn random_gpu_objectives_follow_the_host_objectives_trajectory() {
    // The quadratic 0.5 ||x - c||^2 with its gradient and loss written by WGSL
    // kernels (Loss::Device) in f32 or f64, the norm from our pass or from the kernel's partials,
    // single updates or pipelined epochs, against the same quadratic on the host:
    // the same trajectory up to the order of the f32 sums.
    let mut rng = SplitMix64::new(99);
    for case in 0..10 {
        let mut pick = |n: u64| (rng.next_u64() % n) as usize;
        let n = 1 + pick(3000);
        let segment = [256, 1024, 1 << 20][pick(3)];
        let from_objective = pick(2) == 0;
        let k = [1, 1, 4][pick(3)];
        let dtype = [ParamDtype::F32, ParamDtype::F64][pick(2)];
        let velocity = match dtype {
            ParamDtype::F32 => [VelocityDtype::Full, VelocityDtype::F16][pick(2)],
            _ => VelocityDtype::Full,
        };
        // (momentum 0.5 with the step 0.5 of this quadratic lands on c in two
        // steps, exactly in f64: a zero norm and a refused 0/0 step)
        let cfg = PolyakConfig::default()
            .momentum([0.0, 0.3][pick(2)])
            .dtype(dtype)
            .velocity_dtype(velocity)
            .stepsize_mode([StepSizeMode::Host, StepSizeMode::Device][pick(2)])
            .max_stepsize(0.7);
        let cfg = if cfg.stepsize_mode == StepSizeMode::Device {
            cfg.sync_every(k)
        } else {
            cfg
        };
        let what = format!(
            "case {case}: n {n}, segments {segment}, norm from objective {from_objective}, {cfg:?}"
        );
        let ctx = ctx_with_segments(segment);
        let x0 = common::random(200 + case as u64, n);
        let c = common::random(300 + case as u64, n);
        let mut gpu = {
            let mut b =
                PolyakSgd::builder(&ctx, cfg.clone()).tensor(TensorSpec::new("params", &[n]));
            if from_objective {
                let probe = PolyakSgd::new_zeroed(&ctx, PolyakConfig::default(), n).unwrap();
                let t = probe.buffers().layout().tensor("params").unwrap();
                b = b.norm_from_objective(t.parts.iter().map(|p| p.len.div_ceil(256)).sum());
            }
            b.build().unwrap()
        };
        gpu.upload_params(&x0).unwrap();
        let q = common::GpuQuadratic::new(&gpu, "params", &c);
        let s = gpu.init_state(|ev| q.eval(ev)).unwrap();
        let s = gpu
            .update_batches(s, |ev, _: &usize| q.eval(ev), 0..8)
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        let mut host = PolyakSgd::new(&ctx, cfg.clone().sync_every(1), &x0).unwrap();
        let quadratic = |ev: &mut Evaluation<'_>| {
            let x = ev.read_params_f64()?;
            let g: Vec<f64> = x.iter().zip(&c).map(|(x, &c)| x - f64::from(c)).collect();
            ev.write_grads_f64(&g)?;
            Ok((Loss::Host(0.5 * g.iter().map(|d| d * d).sum::<f64>()), ()))
        };
        let mut h = host.init_state(quadratic).unwrap();
        for _ in 0..8 {
            h = host.update(&h, quadratic).unwrap();
        }
        assert_eq!(s.iter_num, h.iter_num, "{what}");
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
        assert!(rel(s.value, h.value) <= 1e-4, "{what}: {s:?} vs {h:?}");
        assert!(
            rel(s.stepsize, h.stepsize) <= 1e-4,
            "{what}: {s:?} vs {h:?}"
        );
        let (pg, ph) = (
            gpu.buffers().download_params_f64().unwrap(),
            host.buffers().download_params_f64().unwrap(),
        );
        let scale = ph.iter().map(|x| x.abs()).fold(0.0, f64::max) + 1.0;
        let worst = pg
            .iter()
            .zip(&ph)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 1e-4 * scale, "{what}: params differ by {worst}");
    }
}
