//! `NonFinitePolicy::Skip`: a non-finite step is skipped and the run goes on.

mod common;

use common::{ctx, fixed, random, sqnorm};
use polyak_gpu::reference::CpuPolyakSgd;
use polyak_gpu::{Evaluation, Loss, NonFinitePolicy, PolyakConfig, PolyakSgd, StepSizeMode};

fn skip(mode: StepSizeMode, sync_every: usize) -> PolyakConfig {
    PolyakConfig::default()
        .momentum(0.9)
        .max_stepsize(0.5)
        .nonfinite(NonFinitePolicy::Skip)
        .stepsize_mode(mode)
        .sync_every(sync_every)
}

#[test]
fn a_skipped_update_changes_nothing_but_the_counters() {
    let ctx = ctx();
    let n = 777;
    for mode in [StepSizeMode::Host, StepSizeMode::Device] {
        let mut opt = PolyakSgd::new(&ctx, skip(mode, 1), &random(500, n)).unwrap();
        let g = random(501, n);
        let s = opt.init_state(fixed(&g, 1.0)).unwrap();
        let s = opt.update(&s, fixed(&g, 1.0)).unwrap();
        let (p, v) = (
            opt.download_params().unwrap(),
            opt.download_velocity().unwrap(),
        );
        let mut bad = g.clone();
        bad[n / 3] = f32::INFINITY;
        for (grad, value) in [(&bad, 1.0), (&g, f64::NAN)] {
            let t = opt.update(&s, fixed(grad, value)).unwrap();
            assert_eq!(
                (t.iter_num, t.num_skipped, t.num_fun_eval),
                (1, 1, 3),
                "{mode:?}"
            );
            assert!(!(t.value.is_finite() && t.error.is_finite()), "{t:?}");
            assert_eq!(opt.download_params().unwrap(), p, "{mode:?}");
            assert_eq!(opt.download_velocity().unwrap(), v, "{mode:?}");
        }
        let t = opt.update(&s, fixed(&g, 1.0)).unwrap();
        assert_eq!((t.iter_num, t.num_skipped), (2, 0));
        assert_ne!(opt.download_params().unwrap(), p);
    }
}

/// Batch t pulls towards its own target; batch 4 carries a NaN gradient element.
fn batches(n: usize) -> Vec<Vec<f32>> {
    (0..10).map(|t| random(510 + t, n)).collect()
}

fn objective(
    targets: &[Vec<f32>],
    bad: Option<usize>,
) -> impl FnMut(&mut Evaluation<'_>, &usize) -> polyak_gpu::Result<(Loss, usize)> + '_ {
    move |ev, &t| {
        let x = ev.read_params()?;
        let mut g: Vec<f32> = x.iter().zip(&targets[t]).map(|(x, c)| x - c).collect();
        let loss = 0.5 * sqnorm(&g);
        if Some(t) == bad {
            g[1] = f32::NAN;
        }
        ev.write_grads(&g)?;
        Ok((Loss::Host(loss), t))
    }
}

#[test]
fn run_iterator_skips_a_bad_batch_as_if_it_were_not_there() {
    let ctx = ctx();
    let n = 1025;
    let targets = batches(n);
    let x0 = random(520, n);
    for (mode, k) in [
        (StepSizeMode::Host, 1),
        (StepSizeMode::Device, 1),
        (StepSizeMode::Device, 4),
    ] {
        let run = |order: Vec<usize>, bad| {
            let mut opt = PolyakSgd::new(&ctx, skip(mode, k), &x0).unwrap();
            let s = opt.run_iterator(objective(&targets, bad), order).unwrap();
            (
                s,
                opt.download_params().unwrap(),
                opt.download_velocity().unwrap(),
            )
        };
        let (s, p, v) = run((0..10).collect(), Some(4));
        assert_eq!(
            (s.iter_num, s.num_skipped, s.aux),
            (8, 1, 9),
            "{mode:?} {k}"
        );
        // the same batches without the bad one: the same parameters, bit for bit
        let (t, q, w) = run([0, 1, 2, 3, 5, 6, 7, 8, 9].to_vec(), None);
        assert_eq!((t.iter_num, t.num_skipped), (8, 0));
        assert_eq!(p, q, "{mode:?} sync_every {k}");
        assert_eq!(v, w, "{mode:?} sync_every {k}");
    }
}

#[test]
fn the_cpu_reference_skips_alike() {
    let n = 64;
    let targets = batches(n);
    let cfg = skip(StepSizeMode::Host, 1);
    let mut cpu =
        CpuPolyakSgd::new(cfg, random(520, n).iter().map(|&x| f64::from(x)).collect()).unwrap();
    let mut state = cpu
        .init_state(|_, g| {
            g.fill(1.0);
            Ok((1.0, ()))
        })
        .unwrap();
    for (t, target) in targets.iter().take(6).enumerate() {
        state = cpu
            .update(&state, |x, g| {
                for (i, gi) in g.iter_mut().enumerate() {
                    *gi = x[i] - f64::from(target[i]);
                }
                if t == 2 {
                    g[0] = f64::NAN;
                }
                Ok((1.0, ()))
            })
            .unwrap();
    }
    assert_eq!(
        (state.iter_num, state.num_skipped, state.num_fun_eval),
        (5, 1, 7)
    );
}
