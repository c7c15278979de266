//! The kernels' shape options: `ContextOptions::workgroup_size` (the norm and
//! update kernels at other workgroup sizes, both walks, one and many segments,
//! against f64; sizes the device cannot take are refused) and
//! `ContextOptions::unroll` (the same bits at every unrolling) and
//! `ContextOptions::one_pass_limit` (the norm and the rule in one dispatch or two,
//! both against f64).

mod common;

use common::{bits, fixed_f64, two_steps_in};
use polyak_gpu::conformance::SplitMix64;
use polyak_gpu::{
    ContextOptions, DEFAULT_ONE_PASS_LIMIT, Error, GpuContext, Loss, ParamDtype, PolyakConfig,
    PolyakSgd, StepSizeMode, TensorSpec, VelocityDtype,
};

fn ctx_with(workgroup_size: u32, contiguous: bool, segment: Option<usize>) -> GpuContext {
    GpuContext::with_options(ContextOptions {
        workgroup_size: Some(workgroup_size),
        contiguous_invocations: Some(contiguous),
        max_segment_elements: segment,
        max_workgroups: Some(5), // several strides or chunks per invocation
        ..Default::default()
    })
    .expect("an adapter that takes this workgroup size")
}

#[test]
fn other_workgroup_sizes_step_as_f64_says() {
    for wg in [32, 64, 512, 1024] {
        for contiguous in [true, false] {
            // 300,001 elements: many vec4s per invocation in 5 workgroups of 32.
            let ctx = ctx_with(wg, contiguous, None);
            assert_eq!(ctx.workgroup_size(), wg);
            for (n, mode) in [
                (1, StepSizeMode::Host),
                (1021, StepSizeMode::Device),
                (300_001, StepSizeMode::Host),
            ] {
                two_steps_in(&ctx, n, 0.9, n as u64 + u64::from(wg), mode);
            }
            // many small segments: batched dispatches
            let ctx = ctx_with(wg, contiguous, Some(256));
            two_steps_in(&ctx, 5000, 0.5, 7, StepSizeMode::Device);
        }
    }
}

#[test]
fn the_overflow_check_and_f64_at_the_largest_workgroup() {
    // The checking norm pass keeps three f64 arrays of the workgroup's length in
    // workgroup memory: 24 KiB at 1,024 invocations.
    let ctx = ctx_with(1024, false, Some(1024));
    let n = 9000;
    let p0: Vec<f64> = (0..n).map(|i| ((i % 17) as f64 - 8.0) * 0.125).collect();
    let mut results = Vec::new();
    for check in [false, true] {
        let cfg = PolyakConfig::default()
            .dtype(ParamDtype::F64)
            .momentum(0.9)
            .stepsize_mode(StepSizeMode::Device)
            .check_overflow(check);
        let mut opt = PolyakSgd::new_zeroed(&ctx, cfg, n).unwrap();
        opt.buffers().upload_params_f64(&p0).unwrap();
        let f = |ev: &mut polyak_gpu::Evaluation<'_>| {
            let x = ev.read_params_f64()?;
            ev.write_grads_f64(&x)?; // 0.5 |x|^2
            Ok((Loss::Host(0.5 * x.iter().map(|v| v * v).sum::<f64>()), ()))
        };
        let mut state = opt.init_state(f).unwrap();
        for _ in 0..3 {
            state = opt.update(&state, f).unwrap();
        }
        results.push((state, opt.buffers().download_params_f64().unwrap()));
    }
    // 0.5 |x|^2 from x0: every step size is |x|^2 / 2 / |x|^2 = 0.5, so with momentum
    // 0.9: v1 = -0.5 x0, x1 = 0.5 x0; v2 = -0.7 x0, x2 = -0.2 x0; v3 = -0.53 x0,
    // x3 = -0.73 x0.
    let (state, p) = &results[0];
    assert_eq!(state.iter_num, 3);
    assert!((state.stepsize - 0.5).abs() <= 1e-12, "{state:?}"); // (sums in another order)
    for (a, b) in p.iter().zip(&p0) {
        assert!((a + 0.73 * b).abs() <= 1e-12, "{a} vs -0.73 * {b}");
    }
    // With and without the check: the same steps (batches of 1,024-element segments
    // may be grouped differently: equal to the last bits).
    let (checked, q) = &results[1];
    assert_eq!(checked.iter_num, 3);
    for (a, b) in p.iter().zip(q) {
        assert!((a - b).abs() <= 1e-12 * (b.abs() + 1.0), "{a} vs {b}");
    }
}

#[test]
fn workgroup_sizes_the_device_cannot_take_are_refused() {
    let most = common::ctx().limits().max_compute_invocations_per_workgroup;
    for bad in [0, 16, 48, 100, 2 * most] {
        let opened = GpuContext::with_options(ContextOptions {
            workgroup_size: Some(bad),
            ..Default::default()
        });
        assert!(
            matches!(
                opened,
                Err(Error::InvalidOption {
                    option: "workgroup_size",
                    ..
                })
            ),
            "{bad}: {opened:?}"
        );
    }
    let mut ctx = common::ctx();
    assert_eq!(ctx.workgroup_size(), 256);
    assert!(ctx.set_workgroup_size(48).is_err());
    assert_eq!(ctx.workgroup_size(), 256);
    ctx.set_workgroup_size(64).unwrap();
    assert_eq!(ctx.workgroup_size(), 64);
}

#[test]
fn unrolled_loops_give_the_same_bits() {
    // Odd tensor lengths over small segments (batched) and one long one; f32 with
    // and without momentum, an f16 velocity, f64; three steps with the step size
    // from the GPU's norm, so a norm summed in another order would show.
    let specs: Vec<TensorSpec> = [3, 1021, 77, 50_003, 5]
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorSpec::new(format!("t{i}"), &[n]))
        .collect();
    let n: usize = specs.iter().map(TensorSpec::len).sum();
    let mut rng = SplitMix64::new(77);
    let mut draw = || (0..n).map(|_| rng.upm1()).collect::<Vec<f64>>();
    let (p0, grads) = (draw(), [draw(), draw(), draw(), draw()]);
    for (contiguous, dtype, velocity, momentum) in [
        (true, ParamDtype::F32, VelocityDtype::Full, 0.9),
        (false, ParamDtype::F32, VelocityDtype::Full, 0.0),
        (true, ParamDtype::F32, VelocityDtype::F16, 0.9),
        (false, ParamDtype::F64, VelocityDtype::Full, 0.9),
    ] {
        {
            let what = format!("contiguous {contiguous}, {dtype:?} {velocity:?} {momentum}");
            let mut runs = Vec::new();
            for unroll in [1, 2, 8] {
                let ctx = GpuContext::with_options(ContextOptions {
                    unroll: Some(unroll),
                    contiguous_invocations: Some(contiguous),
                    max_segment_elements: Some(8192),
                    max_workgroups: Some(3),
                    ..Default::default()
                })
                .unwrap();
                assert_eq!(ctx.unroll(), unroll);
                let cfg = PolyakConfig::default()
                    .dtype(dtype)
                    .velocity_dtype(velocity)
                    .momentum(momentum)
                    .stepsize_mode(StepSizeMode::Device);
                let mut opt = PolyakSgd::with_tensors(&ctx, cfg, &specs).unwrap();
                opt.buffers().upload_params_f64(&p0).unwrap();
                let mut state = opt.init_state(fixed_f64(&grads[0], 3.0)).unwrap();
                for g in &grads[1..] {
                    state = opt.update(&state, fixed_f64(g, 3.0)).unwrap();
                }
                runs.push((state, bits(&opt)));
            }
            assert!(
                runs[0].1.iter().zip(&p0).any(|(&b, &x)| b != x.to_bits()),
                "{what}: nothing moved"
            );
            for r in &runs[1..] {
                assert_eq!(r.0, runs[0].0, "{what}");
                assert!(r.1 == runs[0].1, "{what}");
            }
        }
    }
    assert!(matches!(
        GpuContext::with_options(ContextOptions {
            unroll: Some(3),
            ..Default::default()
        }),
        Err(Error::InvalidOption {
            option: "unroll",
            ..
        })
    ));
}

#[test]
fn one_pass_and_two_pass_norms_step_as_f64_says() {
    for contiguous in [true, false] {
        for segment in [None, Some(256)] {
            for limit in [0, 1 << 20] {
                let ctx = GpuContext::with_options(ContextOptions {
                    one_pass_limit: Some(limit),
                    contiguous_invocations: Some(contiguous),
                    max_segment_elements: segment,
                    ..Default::default()
                })
                .unwrap();
                assert_eq!(ctx.one_pass_limit(), limit);
                // One segment of 5,001, or 20 of 256 in one batch: one dispatch
                // less in one pass. 300,001 is one pass in one segment (293 vec4s
                // per invocation; with the GPU's rule the whole step in one
                // workgroup), two in 1,172 segments (more than a batch).
                let cfg = PolyakConfig::default().momentum(0.9);
                let opt = PolyakSgd::new_zeroed(&ctx, cfg.clone(), 5001).unwrap();
                let two = if segment.is_some() { 1 + 1 + 2 } else { 3 };
                let fewer = usize::from(limit > 0);
                assert_eq!(
                    opt.dispatches_per_step(),
                    two - fewer,
                    "{segment:?} {limit}"
                );
                // With the GPU's rule the whole step is one dispatch where the
                // update's bindings take every segment (not 20).
                let device = cfg.clone().stepsize_mode(StepSizeMode::Device);
                let opt = PolyakSgd::new_zeroed(&ctx, device, 5001).unwrap();
                let whole = if limit > 0 && segment.is_none() {
                    1
                } else {
                    two - fewer
                };
                assert_eq!(opt.dispatches_per_step(), whole, "{segment:?} {limit}");
                for (n, mode) in [
                    (1, StepSizeMode::Host),
                    (5001, StepSizeMode::Device),
                    (300_001, StepSizeMode::Device),
                ] {
                    two_steps_in(&ctx, n, 0.9, n as u64 + limit as u64, mode);
                }
            }
        }
    }
    // The default: gradients of up to DEFAULT_ONE_PASS_LIMIT elements.
    let mut ctx = GpuContext::new().unwrap();
    assert_eq!(ctx.one_pass_limit(), DEFAULT_ONE_PASS_LIMIT);
    let cfg = PolyakConfig::default();
    let at = PolyakSgd::new_zeroed(&ctx, cfg.clone(), DEFAULT_ONE_PASS_LIMIT).unwrap();
    let over = PolyakSgd::new_zeroed(&ctx, cfg.clone(), DEFAULT_ONE_PASS_LIMIT + 1).unwrap();
    assert_eq!(
        (at.dispatches_per_step(), over.dispatches_per_step()),
        (2, 3)
    );
    ctx.set_one_pass_limit(0);
    let never = PolyakSgd::new_zeroed(&ctx, cfg, 4).unwrap();
    assert_eq!(never.dispatches_per_step(), 3);
}
