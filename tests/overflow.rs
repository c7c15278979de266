//! `PolyakConfig::check_overflow`: a step whose update would write an infinity from
//! finite inputs, or that would update parameters already NaN, is refused (or
//! skipped) with every parameter and velocity left as it was; steps that stay
//! finite run bit for bit as without the check.

mod common;

use common::{bits, ctx, ctx_with_segments, fixed_f64};
use polyak_gpu::{
    Error, Evaluation, Loss, NonFinitePolicy, ParamDtype, PolyakConfig, PolyakSgd, State,
    StepSizeMode, TensorSpec, Variant,
};

/// SPS+ (no cap on the step) minimising nothing in particular: the objective
/// writes `g` and reports `loss`, so the step is `loss / |g|^2`.
fn config(dtype: ParamDtype, momentum: f64, mode: StepSizeMode) -> PolyakConfig {
    PolyakConfig::default()
        .variant(Variant::SpsPlus)
        .momentum(momentum)
        .dtype(dtype)
        .stepsize_mode(mode)
}

const G: [f64; 4] = [-1.0, 0.5, 0.25, 0.0]; // |g|^2 = 1.3125

fn objective(loss: f64) -> impl Fn(&mut Evaluation<'_>) -> polyak_gpu::Result<(Loss, ())> {
    fixed_f64(&G, loss)
}

/// The largest finite value of `dtype`.
fn largest(dtype: ParamDtype) -> f64 {
    match dtype {
        ParamDtype::F64 => f64::MAX,
        _ => f64::from(f32::MAX),
    }
}

/// An optimizer whose first parameter is 97% of the largest finite value.
fn near_overflow(cfg: PolyakConfig) -> PolyakSgd {
    let ctx = ctx();
    let opt = PolyakSgd::with_tensors(&ctx, cfg.clone(), &[TensorSpec::new("p", &[4])]).unwrap();
    let top = 0.97 * largest(cfg.dtype);
    opt.buffers()
        .upload_params_f64(&[top, 1.0, -2.0, 0.5])
        .unwrap();
    opt
}

#[test]
fn a_step_that_would_overflow_is_refused_and_changes_nothing() {
    for dtype in [ParamDtype::F32, ParamDtype::F64] {
        for momentum in [0.0, 0.5] {
            for mode in [StepSizeMode::Host, StepSizeMode::Device] {
                let what = format!("{dtype:?} momentum {momentum} {mode:?}");
                let cfg = config(dtype, momentum, mode);
                // A step of 5% of the largest value moves p[0] by that much: past it.
                let big = 0.05 * largest(dtype);
                let loss = big * 1.3125;
                // Without the check the update writes an infinity (what it is for).
                let mut opt = near_overflow(cfg.clone());
                let s = opt.init_state(objective(loss)).unwrap();
                opt.update(&s, objective(loss)).unwrap();
                let p = opt.buffers().download_params_f64().unwrap();
                assert_eq!(p[0], f64::INFINITY, "{what}: {p:?}");

                // With it: refused, every bit as it was.
                let mut opt = near_overflow(cfg.clone().check_overflow(true));
                let s = opt.init_state(objective(loss)).unwrap();
                let before = bits(&opt);
                match opt.update(&s, objective(loss)) {
                    Err(Error::NonFiniteUpdate {
                        iter_num: 0,
                        stepsize,
                        lowest,
                        highest,
                    }) => {
                        let rel = (stepsize - big).abs() / big;
                        assert!(rel < 1e-6, "{what}: step {stepsize}");
                        // p[0] + s may reach 1 - 2^-10 of the largest value.
                        let room = (1.0 - 2f64.powi(-10) - 0.97) * largest(dtype);
                        assert!((highest - room).abs() < 1e-3 * room, "{what}: {highest}");
                        assert!(lowest < -0.9 * largest(dtype), "{what}: {lowest}");
                    }
                    other => panic!("{what}: {other:?}"),
                }
                assert_eq!(bits(&opt), before, "{what}");

                // Skip goes on with nothing changed.
                let mut skip = near_overflow(
                    cfg.clone()
                        .check_overflow(true)
                        .nonfinite(NonFinitePolicy::Skip),
                );
                let s = skip.init_state(objective(loss)).unwrap();
                let before = bits(&skip);
                let next = skip.update(&s, objective(loss)).unwrap();
                assert_eq!((next.iter_num, next.num_skipped), (0, 1), "{what}");
                assert_eq!(bits(&skip), before, "{what}");

                // A step that stays finite (1% of the largest value) runs as
                // without the check, bit for bit.
                let fine = 0.01 * largest(dtype) * 1.3125;
                let mut results = Vec::new();
                for check in [false, true] {
                    let mut opt = near_overflow(cfg.clone().check_overflow(check));
                    let s = opt.init_state(objective(fine)).unwrap();
                    let next = opt.update(&s, objective(fine)).unwrap();
                    results.push((next, bits(&opt)));
                }
                assert_eq!(results[0], results[1], "{what}");
                let p = near_overflow(cfg.clone());
                assert_ne!(results[0].1, bits(&p), "{what}: nothing moved");
            }
        }
    }
}

#[test]
fn a_non_finite_parameter_or_velocity_is_refused_with_the_check() {
    for mode in [StepSizeMode::Host, StepSizeMode::Device] {
        let cfg = config(ParamDtype::F32, 0.5, mode).check_overflow(true);
        let mut opt = near_overflow(cfg.clone());
        opt.buffers()
            .upload_params(&[1.0, f32::NAN, 3.0, 4.0])
            .unwrap();
        let s = opt.init_state(objective(1.0)).unwrap();
        let before = bits(&opt);
        match opt.update(&s, objective(1.0)) {
            Err(Error::NonFiniteUpdate {
                lowest, highest, ..
            }) => assert!(lowest > highest, "{mode:?}: [{lowest}, {highest}]"),
            other => panic!("{mode:?}: {other:?}"),
        }
        assert_eq!(bits(&opt), before, "{mode:?}");
        // An infinite velocity, put there by hand.
        let mut opt = near_overflow(cfg);
        opt.buffers()
            .upload_velocity(&[0.0, 0.0, f32::NEG_INFINITY, 0.0])
            .unwrap();
        let s = State::initial(());
        let before = bits(&opt);
        let refused = opt.update(&s, objective(1.0));
        assert!(
            matches!(refused, Err(Error::NonFiniteUpdate { .. })),
            "{mode:?}: {refused:?}"
        );
        assert_eq!(bits(&opt), before, "{mode:?}");
    }
}

#[test]
fn pipelined_runs_stop_or_skip_at_the_step_that_would_overflow() {
    // Batches of growing loss: the step grows until batch 3 would carry p[0] past
    // the largest f32. Four steps per wait end as waiting every step ends.
    let loss = |b: &usize| [1e35, 2e35, 4e35, 5e37, 1e35, 1e35][*b] * 1.3125;
    let batch = |ev: &mut Evaluation<'_>, b: &usize| objective(loss(b))(ev);
    for policy in [NonFinitePolicy::Refuse, NonFinitePolicy::Skip] {
        let outcome = |sync_every: usize| {
            let cfg = config(ParamDtype::F32, 0.5, StepSizeMode::Device)
                .check_overflow(true)
                .nonfinite(policy)
                .sync_every(sync_every)
                .maxiter(5);
            let mut opt = near_overflow(cfg);
            let state = opt.run_iterator(batch, 0..6);
            (format!("{state:?}"), bits(&opt))
        };
        let (waiting, pipelined) = (outcome(1), outcome(4));
        assert_eq!(waiting, pipelined, "{policy:?}");
        match policy {
            NonFinitePolicy::Refuse => assert!(
                waiting.0.contains("NonFiniteUpdate { iter_num: 2"),
                "{}",
                waiting.0
            ),
            _ => assert!(waiting.0.contains("num_skipped: 1"), "{}", waiting.0),
        }
    }
}

#[test]
fn many_segments_run_as_without_the_check() {
    // A model over many small segments (batched dispatches), momentum, both rules:
    // ten steps with the check are the ten steps without it. (Its norm pass binds
    // three buffers per segment, so it batches fewer segments per dispatch than the
    // plain one: the squared norm may differ in its last bits, not more.)
    let ctx = ctx_with_segments(64);
    let specs: Vec<TensorSpec> = (0..23)
        .map(|i| TensorSpec::new(format!("t{i}"), &[1 + 13 * i]))
        .collect();
    let n: usize = specs.iter().map(TensorSpec::len).sum();
    let p0 = common::random(5, n);
    for mode in [StepSizeMode::Host, StepSizeMode::Device] {
        let run = |check: bool| {
            let cfg = PolyakConfig::default()
                .momentum(0.9)
                .stepsize_mode(mode)
                .check_overflow(check);
            let mut opt = PolyakSgd::with_tensors(&ctx, cfg, &specs).unwrap();
            opt.upload_params(&p0).unwrap();
            let mut state = opt.init_state(|_| Ok((Loss::Host(1.0), ()))).unwrap();
            for k in 0..10 {
                let g = common::random(100 + k, n);
                state = opt
                    .update(&state, |ev| {
                        ev.write_grads(&g)?;
                        Ok((Loss::Host(0.5 + k as f64), ()))
                    })
                    .unwrap();
            }
            (state, opt.download_params().unwrap())
        };
        let ((with, p), (without, q)) = (run(true), run(false));
        assert_eq!((with.iter_num, with.num_skipped), (10, 0), "{mode:?}");
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs();
        assert!(
            close(with.stepsize, without.stepsize),
            "{mode:?}: {with:?} {without:?}"
        );
        assert!(
            close(with.error, without.error),
            "{mode:?}: {with:?} {without:?}"
        );
        for (i, (a, b)) in p.iter().zip(&q).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (b.abs() + 1.0),
                "{mode:?}: p[{i}] {a} vs {b}"
            );
        }
        assert!(p != p0, "{mode:?}: nothing moved");
    }
}

#[test]
fn the_check_needs_our_norm_pass() {
    let ctx = ctx();
    let cfg = PolyakConfig::default().check_overflow(true);
    let built = PolyakSgd::builder(&ctx, cfg)
        .tensor(TensorSpec::new("w", &[8]))
        .norm_from_objective(4)
        .build();
    assert!(
        matches!(
            built,
            Err(Error::InvalidOption {
                option: "check_overflow",
                ..
            })
        ),
        "{built:?}"
    );
}
