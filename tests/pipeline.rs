//! Pipelined `run` / `run_iterator` (`sync_every > 1` under the device step size)
//! against waiting every step: same states, parameters and velocity, same stops and
//! refusals.

mod common;

use common::{GpuQuadratic, ctx, random, sqnorm};
use polyak_gpu::{
    Error, Evaluation, Loss, NonFinitePolicy, PolyakConfig, PolyakSgd, State, StepSizeMode,
};
use std::cell::Cell;

fn device(sync_every: usize) -> PolyakConfig {
    PolyakConfig::default()
        .stepsize_mode(StepSizeMode::Device)
        .sync_every(sync_every)
}

/// What a run left: its result, the parameters, the velocity, and how many times
/// the objective was called.
type Outcome = (polyak_gpu::Result<State>, Vec<f32>, Option<Vec<f32>>, usize);

/// `run` of the GPU quadratic 0.5 ||x - c||^2 from a fixed start under `cfg`.
fn run_quadratic(cfg: PolyakConfig, n: usize) -> Outcome {
    let ctx = ctx();
    let c = random(80, n);
    let mut opt = PolyakSgd::new(&ctx, cfg, &random(81, n)).unwrap();
    let q = GpuQuadratic::new(&opt, "params", &c);
    let calls = Cell::new(0);
    let out = opt.run(|ev| {
        calls.set(calls.get() + 1);
        q.eval(ev)
    });
    (
        out,
        opt.download_params().unwrap(),
        opt.download_velocity().unwrap(),
        calls.get(),
    )
}

#[test]
fn pipelined_run_stops_where_waiting_every_step_stops() {
    let n = 10_007;
    for base in [
        PolyakConfig::default().tol(1e-4),
        PolyakConfig::default().momentum(0.3).tol(1e-3),
        PolyakConfig::default().max_stepsize(0.2).maxiter(7),
    ] {
        let with = |k: usize| {
            base.clone()
                .stepsize_mode(StepSizeMode::Device)
                .sync_every(k)
        };
        let (s1, p1, v1, calls1) = run_quadratic(with(1), n);
        let s1 = s1.unwrap();
        assert!(s1.iter_num > 5, "{s1:?}");
        assert_eq!(calls1, s1.iter_num + 1);
        for k in [2, 5, 16, 64] {
            let (s, p, v, calls) = run_quadratic(with(k), n);
            assert_eq!(s.unwrap(), s1, "sync_every {k}");
            assert_eq!(p, p1, "sync_every {k}");
            assert_eq!(v, v1, "sync_every {k}");
            // the objective ran for every step submitted, at most k - 1 past the last
            assert!(
                calls >= calls1 && calls < calls1 + k,
                "sync_every {k}: {calls} calls vs {calls1}"
            );
        }
    }
}

/// A host objective 0.5 ||x - c||^2 whose loss is NaN at call `bad` (counting the
/// one of `init_state` as 0), or which fails there if `fail`.
fn faulty(
    c: &[f32],
    calls: &Cell<usize>,
    bad: usize,
    fail: bool,
) -> impl FnMut(&mut Evaluation<'_>) -> polyak_gpu::Result<(Loss, ())> {
    move |ev| {
        let k = calls.get();
        calls.set(k + 1);
        if k == bad && fail {
            return Err(Error::Objective(format!("call {k} failed")));
        }
        let x = ev.read_params()?;
        let g: Vec<f32> = x.iter().zip(c).map(|(x, c)| x - c).collect();
        ev.write_grads(&g)?;
        let loss = if k == bad { f64::NAN } else { 0.5 * sqnorm(&g) };
        Ok((Loss::Host(loss), ()))
    }
}

#[test]
fn refusals_and_failures_mid_batch_leave_what_waiting_every_step_leaves() {
    let ctx = ctx();
    let n = 513;
    let c = random(82, n);
    let x0 = random(83, n);
    for fail in [false, true] {
        let outcome = |k: usize| {
            let cfg = device(k).momentum(0.5).tol(-1.0).maxiter(20);
            let mut opt = PolyakSgd::new(&ctx, cfg, &x0).unwrap();
            let calls = Cell::new(0);
            let out = opt.run(faulty(&c, &calls, 6, fail));
            (
                out,
                opt.download_params().unwrap(),
                opt.download_velocity().unwrap(),
            )
        };
        let (e1, p1, v1) = outcome(1);
        match (&e1, fail) {
            (Err(Error::NonFinite { iter_num: 5, .. }), false) => {}
            (Err(Error::Objective(_)), true) => {}
            other => panic!("fail={fail}: {other:?}"),
        }
        assert_ne!(p1, x0);
        for k in [2, 4, 7, 32] {
            let (e, p, v) = outcome(k);
            assert_eq!(format!("{e:?}"), format!("{e1:?}"), "sync_every {k}");
            assert_eq!(p, p1, "fail={fail} sync_every {k}");
            assert_eq!(v, v1, "fail={fail} sync_every {k}");
        }
    }
}

#[test]
fn a_nan_norm_under_propagate_stops_the_pipelined_run_as_jaxopt() {
    // A NaN loss at update 1 makes its step NaN and, propagated, the parameters; the
    // norm at update 2 is then NaN, and jaxopt's loop stops on `NaN > tol` being false.
    let ctx = ctx();
    let n = 64;
    let c = random(85, n);
    for k in [1, 4] {
        let cfg = device(k).nonfinite(NonFinitePolicy::Propagate);
        let mut opt = PolyakSgd::new(&ctx, cfg, &random(86, n)).unwrap();
        let calls = Cell::new(0);
        let s = opt.run(faulty(&c, &calls, 1, false)).unwrap();
        assert_eq!(s.iter_num, 2, "sync_every {k}");
        assert!(s.error.is_nan() && s.stepsize.is_nan(), "{s:?}");
        assert!(opt.download_params().unwrap().iter().all(|x| x.is_nan()));
        assert!(calls.get() >= 3 && calls.get() < 3 + k);
    }
}

#[test]
fn pipelined_run_iterator_matches_and_single_updates_still_apply_after_it() {
    let ctx = ctx();
    let n = 2048;
    let x0 = random(84, n);
    // Batch t pulls towards its own target: the trajectory depends on the order.
    let targets: Vec<Vec<f32>> = (0..12).map(|t| random(90 + t, n)).collect();
    let objective = |ev: &mut Evaluation<'_>, t: &usize| {
        let x = ev.read_params()?;
        let g: Vec<f32> = x.iter().zip(&targets[*t]).map(|(x, c)| x - c).collect();
        ev.write_grads(&g)?;
        Ok((Loss::Host(0.5 * sqnorm(&g)), *t))
    };
    let run = |k: usize| {
        let mut opt = PolyakSgd::new(&ctx, device(k).momentum(0.9).maxiter(9), &x0).unwrap();
        let s = opt.run_iterator(objective, 0..12).unwrap();
        let p = opt.download_params().unwrap();
        // the run armed a halt on the GPU; a plain update afterwards must apply
        let next = opt.update(&s, |ev| objective(ev, &11)).unwrap();
        let q = opt.download_params().unwrap();
        (s, p, next, q)
    };
    let (s1, p1, n1, q1) = run(1);
    assert_eq!((s1.iter_num, s1.aux), (9, 9));
    assert_ne!(p1, q1);
    for k in [2, 4, 16] {
        let (s, p, next, q) = run(k);
        assert_eq!(s, s1, "sync_every {k}");
        assert_eq!(p, p1, "sync_every {k}");
        assert_eq!(next, n1, "sync_every {k}");
        assert_eq!(q, q1, "sync_every {k}");
    }
}

#[test]
fn update_batches_in_epochs_continue_one_run() {
    // init_state on batch 0, then epochs of update_batches: the same as one
    // run_iterator over every batch, pipelined or not, a NaN batch skipped.
    let ctx = ctx();
    let n = 1000;
    let x0 = random(95, n);
    let targets: Vec<Vec<f32>> = (0..13).map(|t| random(96 + t, n)).collect();
    let objective = |ev: &mut Evaluation<'_>, t: &usize| {
        let x = ev.read_params()?;
        let g: Vec<f32> = x.iter().zip(&targets[*t]).map(|(x, c)| x - c).collect();
        ev.write_grads(&g)?;
        let loss = if *t == 7 { f64::NAN } else { 0.5 * sqnorm(&g) };
        Ok((Loss::Host(loss), *t))
    };
    let cfg = |k: usize| {
        device(k)
            .momentum(0.9)
            .maxiter(12)
            .nonfinite(NonFinitePolicy::Skip)
    };
    let mut whole = PolyakSgd::new(&ctx, cfg(1), &x0).unwrap();
    let s1 = whole.run_iterator(objective, 0..13).unwrap();
    let p1 = whole.download_params().unwrap();
    assert_eq!((s1.iter_num, s1.num_skipped, s1.aux), (11, 1, 12));
    for k in [1, 4] {
        let mut opt = PolyakSgd::new(&ctx, cfg(k), &x0).unwrap();
        let mut s = opt.init_state(|ev| objective(ev, &0)).unwrap();
        for epoch in [1..5, 5..9, 9..13] {
            s = opt.update_batches(s, objective, epoch).unwrap();
        }
        assert_eq!(s, s1, "sync_every {k}");
        assert_eq!(opt.download_params().unwrap(), p1, "sync_every {k}");
    }
}
