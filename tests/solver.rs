//! The GPU kernels and the solver against the f64 reference on random data.

mod common;

use common::{GpuQuadratic, check_step, ctx, ctx_with_segments, fixed, random, sqnorm, two_steps};
use polyak_gpu::{
    Error, Evaluation, Loss, NonFinitePolicy, PolyakConfig, PolyakSgd, State, StepSizeMode,
    TensorSpec, Variant,
};
use std::sync::{Arc, Mutex};

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

#[test]
fn device_loss_and_gradient_agree_with_the_host_path() {
    let ctx = ctx();
    let n = 37;
    let c = random(5, n);
    let x0 = random(6, n);
    let cfg = PolyakConfig::default().momentum(0.3).maxiter(30).tol(1e-5);
    let mut gpu = PolyakSgd::new(&ctx, cfg.clone(), &x0).unwrap();
    let q = GpuQuadratic::new(&gpu, "params", &c);
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
        let q = GpuQuadratic::new(&opt, "params", &c);
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

#[test]
fn both_invocation_walks_give_the_same_step() {
    // CPU adapters walk contiguous runs, GPUs stride by the workgroup: test both here.
    for contiguous in [false, true] {
        let ctx = polyak_gpu::GpuContext::with_options(polyak_gpu::ContextOptions {
            contiguous_invocations: Some(contiguous),
            max_workgroups: Some(7),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ctx.contiguous_invocations(), contiguous);
        for n in [1, 257, 4 * 256 * 7 + 5, 300_007] {
            two_steps(&ctx, n, 0.9, 70 + n as u64);
            two_steps(&ctx, n, 0.0, 71 + n as u64);
        }
    }
}

#[test]
fn deferred_updates_give_the_same_trajectory_and_every_read_sees_them() {
    let ctx = ctx();
    let n = 10_001;
    let c = random(30, n);
    let x0 = random(31, n);
    let cfg = PolyakConfig::default().momentum(0.9).maxiter(7).tol(-1.0);
    let run = |deferred: bool| {
        let mut opt = PolyakSgd::new(&ctx, cfg.clone(), &x0).unwrap();
        opt.set_deferred_updates(deferred).unwrap();
        let q = GpuQuadratic::new(&opt, "params", &c);
        let mut state = opt.init_state(|ev| q.eval(ev)).unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            state = opt.update(&state, |ev| q.eval(ev)).unwrap();
            // a read between steps sees the update just made
            seen.push(opt.download_params().unwrap());
        }
        // an upload between steps lands after the pending update, not before it
        state = opt.update(&state, |ev| q.eval(ev)).unwrap();
        opt.upload_params(&x0).unwrap();
        state = opt.update(&state, |ev| q.eval(ev)).unwrap();
        // the host objective path sees the pending update too
        state = opt
            .update(&state, |ev| {
                let x = ev.read_params()?;
                let g: Vec<f32> = x.iter().zip(&c).map(|(x, c)| x - c).collect();
                ev.write_grads(&g)?;
                Ok((Loss::Host(0.5 * sqnorm(&g)), ()))
            })
            .unwrap();
        opt.flush().unwrap();
        (
            state,
            seen,
            opt.download_params().unwrap(),
            opt.download_velocity().unwrap(),
        )
    };
    let (s1, seen1, p1, v1) = run(false);
    let (s2, seen2, p2, v2) = run(true);
    for (i, (a, b)) in seen1.iter().zip(&seen2).enumerate() {
        assert!(a == b, "step {i} differs");
    }
    assert_eq!(s1, s2);
    assert_ne!(seen1[0], seen1[1]);
    assert_eq!(p1, p2);
    assert_eq!(v1, v2);
}

#[test]
fn bench_fill_writes_bounded_nonzero_data_and_the_copy_kernel_runs() {
    let ctx = ctx();
    let n = 70_003; // a tail of 3 elements that fill leaves alone
    let opt = PolyakSgd::new(&ctx, PolyakConfig::default(), &vec![5.0; n]).unwrap();
    polyak_gpu::bench::fill(&opt, true, 9, 2.0).unwrap();
    let p = opt.download_params().unwrap();
    assert!(p[..n - 3].iter().all(|x| (-2.0..2.0).contains(x)));
    assert!(p[..n - 3].iter().filter(|x| **x != 0.0).count() > n - 100);
    assert_eq!(p[n - 3..], [5.0; 3]);
    let distinct: std::collections::HashSet<u32> = p.iter().map(|x| x.to_bits()).collect();
    assert!(distinct.len() > n / 2);
    let gbps = polyak_gpu::bench::CopyBench::new(&ctx, 1 << 16)
        .unwrap()
        .gbps(2)
        .unwrap();
    assert!(gbps.is_finite() && gbps > 0.0);
    // past one binding: an error, not a wgpu panic or a wrapped size
    let too_many = ctx.limits().max_storage_buffer_binding_size as usize / 4 + 4;
    assert!(matches!(
        polyak_gpu::bench::CopyBench::new(&ctx, too_many),
        Err(Error::InvalidOption { .. })
    ));
}

#[test]
fn the_optimizer_can_move_to_another_thread() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<PolyakSgd>();
    send_sync::<polyak_gpu::GpuContext>();
    send_sync::<polyak_gpu::ParamBuffers>();
    // and it really runs on another thread
    let ctx = ctx();
    let mut opt = PolyakSgd::new(&ctx, PolyakConfig::default(), &random(200, 64)).unwrap();
    let g = random(201, 64);
    let moved = std::thread::spawn(move || {
        let s = opt.init_state(fixed(&g, 1.0)).unwrap();
        let s = opt.update(&s, fixed(&g, 1.0)).unwrap();
        (s.iter_num, opt)
    })
    .join()
    .unwrap();
    assert_eq!(moved.0, 1);
}

#[test]
fn a_loss_the_objective_leaves_unwritten_refuses_the_step() {
    // The loss slot is NaN until the objective writes it: a GPU objective that
    // forgets it gets a refusal, not the previous step's loss.
    let ctx = ctx();
    let n = 1000;
    for mode in [StepSizeMode::Host, StepSizeMode::Device] {
        let cfg = PolyakConfig::default().stepsize_mode(mode);
        let mut opt = PolyakSgd::new(&ctx, cfg, &random(7, n)).unwrap();
        let q = GpuQuadratic::new(&opt, "params", &random(8, n));
        let state = opt.init_state(|ev| q.eval(ev)).unwrap();
        let state = opt.update(&state, |ev| q.eval(ev)).unwrap();
        assert!(state.value > 1.0 && state.value.is_finite(), "{state:?}");
        let before = opt.download_params().unwrap();
        match opt.update(&state, |ev| q.eval_without_loss(ev)) {
            Err(Error::NonFinite {
                iter_num: 1, value, ..
            }) => assert!(value.is_nan(), "{mode:?}: {value}"),
            other => panic!("{mode:?}: expected a refusal, got {other:?}"),
        }
        assert_eq!(opt.download_params().unwrap(), before, "{mode:?}");
        // The next evaluation that writes its loss steps as usual.
        let next = opt.update(&state, |ev| q.eval(ev)).unwrap();
        assert_eq!(next.iter_num, 2);
        assert!(
            next.value.is_finite() && next.value < state.value,
            "{next:?}"
        );
    }
}

#[test]
fn an_invalid_command_of_the_objective_is_an_error_and_runs_nothing() {
    // wgpu panics on a command it rejects unless someone catches it: the optimizer
    // does, for everything recorded into a step, and submits none of that step.
    let ctx = ctx();
    let n = 64;
    let (p0, g) = (random(31, n), random(32, n));
    let bad = |ev: &mut Evaluation<'_>| {
        let slot = ev.buffers().scalars_buffer().clone();
        ev.encoder().copy_buffer_to_buffer(&slot, 0, &slot, 16, 4);
        Ok((Loss::Host(1.0), ()))
    };
    let is_invalid = |r: &polyak_gpu::Result<State>| matches!(r, Err(Error::Validation(m)) if m.contains("same buffer"));
    for (mode, deferred) in [
        (StepSizeMode::Host, false),
        (StepSizeMode::Host, true),
        (StepSizeMode::Device, false),
    ] {
        let cfg = PolyakConfig::default().momentum(0.5).stepsize_mode(mode);
        let one_step = || {
            let mut twin = PolyakSgd::new(&ctx, cfg.clone(), &p0).unwrap();
            let s = twin.init_state(fixed(&g, 1.0)).unwrap();
            twin.update(&s, fixed(&g, 1.0)).unwrap();
            twin.download_params().unwrap()
        };
        let mut opt = PolyakSgd::new(&ctx, cfg.clone(), &p0).unwrap();
        opt.set_deferred_updates(deferred).unwrap();
        assert!(is_invalid(&opt.init_state(bad)), "{mode:?}");
        let state = opt.init_state(fixed(&g, 1.0)).unwrap();
        let s1 = opt.update(&state, fixed(&g, 1.0)).unwrap();
        // With deferred updates the first step's update is still pending here: it
        // must not be lost with the step it would have ridden with.
        assert!(is_invalid(&opt.update(&s1, bad)), "{mode:?}");
        assert_eq!(
            opt.download_params().unwrap(),
            one_step(),
            "{mode:?} {deferred}"
        );
        let s2 = opt.update(&s1, fixed(&g, 1.0)).unwrap();
        assert_eq!(s2.iter_num, 2);
        assert_ne!(opt.download_params().unwrap(), one_step());
        if mode == StepSizeMode::Device {
            // The host loss queued for the rejected step does not outlive it: an
            // evaluation that then leaves the loss slot unwritten is refused.
            assert!(is_invalid(&opt.update(&s2, bad)));
            let unwritten = |ev: &mut Evaluation<'_>| {
                ev.write_grads(&g)?;
                Ok((Loss::Device, ()))
            };
            match opt.update(&s2, unwritten) {
                Err(Error::NonFinite { value, .. }) => assert!(value.is_nan(), "{value}"),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    }
}
