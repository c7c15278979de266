//! `norm_from_objective`: the objective writes the squared-norm partials while it
//! writes the gradient, and the optimizer skips its own pass over the gradient.

mod common;

use common::{GpuQuadratic, ctx, ctx_with_segments, random};
use polyak_gpu::{
    Error, Evaluation, GpuContext, Loss, PolyakConfig, PolyakSgd, State, StepSizeMode, TensorSpec,
};
use wgpu::util::DeviceExt;

/// Partials GpuQuadratic writes for tensor "params": one per 256 elements of each
/// piece.
fn quadratic_partials(ctx: &GpuContext, n: usize) -> usize {
    let probe = PolyakSgd::new_zeroed(ctx, PolyakConfig::default(), n).unwrap();
    let t = probe.buffers().layout().tensor("params").unwrap();
    t.parts.iter().map(|p| p.len.div_ceil(256)).sum()
}

/// `steps` updates of the GPU quadratic with the norm from our pass or from the
/// objective's partials: states, parameters, dispatches per step.
fn run(
    ctx: &GpuContext,
    cfg: &PolyakConfig,
    n: usize,
    from_objective: bool,
    steps: usize,
) -> (Vec<State>, Vec<f32>, usize) {
    let mut b = PolyakSgd::builder(ctx, cfg.clone()).tensor(TensorSpec::new("params", &[n]));
    if from_objective {
        b = b.norm_from_objective(quadratic_partials(ctx, n));
    }
    let mut opt = b.build().unwrap();
    opt.upload_params(&random(100, n)).unwrap();
    let q = GpuQuadratic::new(&opt, "params", &random(101, n));
    let mut s = opt.init_state(|ev| q.eval(ev)).unwrap();
    let mut seen = Vec::new();
    for _ in 0..steps {
        s = opt.update(&s, |ev| q.eval(ev)).unwrap();
        seen.push(s.clone());
    }
    (
        seen,
        opt.download_params().unwrap(),
        opt.dispatches_per_step(),
    )
}

#[test]
fn the_objectives_norm_gives_the_same_steps_with_fewer_dispatches() {
    // (both above the one-pass limit: a norm pass per segment, then the final sum)
    for (ctx, n) in [(ctx(), 100_003), (ctx_with_segments(4096), 20_001)] {
        for cfg in [
            PolyakConfig::default().momentum(0.9).max_stepsize(0.3),
            PolyakConfig::default().stepsize_mode(StepSizeMode::Device),
        ] {
            let (ours, p_ours, d_ours) = run(&ctx, &cfg, n, false, 6);
            let (theirs, p_theirs, d_theirs) = run(&ctx, &cfg, n, true, 6);
            let segments = (d_ours - 1) / 2;
            assert_eq!(d_theirs, d_ours - segments, "n {n}");
            for (a, b) in ours.iter().zip(&theirs) {
                let rel = |x: f64, y: f64| (x - y).abs() / y.abs();
                assert!(rel(b.error, a.error) <= 1e-5, "{a:?} {b:?}");
                assert!(rel(b.stepsize, a.stepsize) <= 1e-5, "{a:?} {b:?}");
                assert_eq!(b.iter_num, a.iter_num);
            }
            assert_ne!(p_ours, random(100, n), "the run moved nothing");
            let worst = p_ours
                .iter()
                .zip(&p_theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-5, "n {n}: {worst}");
        }
    }
}

/// An objective with a fixed gradient whose norm partials it copies, in its own
/// commands, from `source` (`written` of them).
fn copying(
    g: &[f32],
    source: &wgpu::Buffer,
    written: u64,
) -> impl Fn(&mut Evaluation<'_>) -> polyak_gpu::Result<(Loss, ())> {
    move |ev| {
        ev.write_grads(g)?;
        let dst = ev.buffers().norm_partials_binding().unwrap().buffer.clone();
        ev.encoder()
            .copy_buffer_to_buffer(source, 0, &dst, 0, 4 * written);
        Ok((Loss::Host(2.0), ()))
    }
}

#[test]
fn partials_the_objective_leaves_unwritten_refuse_the_step() {
    let ctx = ctx();
    let n = 1000;
    for mode in [StepSizeMode::Host, StepSizeMode::Device] {
        let cfg = PolyakConfig::default()
            .momentum(0.5)
            .max_stepsize(100.0)
            .stepsize_mode(mode);
        let mut opt = PolyakSgd::builder(&ctx, cfg)
            .tensor(TensorSpec::new("params", &[n]))
            .norm_from_objective(10)
            .build()
            .unwrap();
        let p0 = random(102, n);
        opt.upload_params(&p0).unwrap();
        let g = random(103, n);
        let parts: Vec<f32> = (1..=10).map(|i| i as f32 * 0.5).collect();
        let source = ctx
            .device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(&parts),
                usage: wgpu::BufferUsages::COPY_SRC,
            });
        let s = opt.init_state(copying(&g, &source, 10)).unwrap();
        // nine of ten written: refused, nothing moves
        match opt.update(&s, copying(&g, &source, 9)) {
            Err(Error::NonFinite { sqnorm, .. }) => assert!(sqnorm.is_nan()),
            other => panic!("{mode:?}: expected NonFinite, got {other:?}"),
        }
        assert_eq!(opt.download_params().unwrap(), p0);
        // all ten: the norm is their sum (27.5, whatever the gradient), step 2 / 27.5
        let s = opt.update(&s, copying(&g, &source, 10)).unwrap();
        assert_eq!(s.error, f64::from(27.5f32.sqrt()));
        assert!((s.stepsize - 2.0 / 27.5).abs() <= 1e-7, "{s:?}");
        let p = opt.download_params().unwrap();
        for i in [0, 1, n / 2, n - 1] {
            let want = p0[i] - (s.stepsize as f32) * g[i];
            assert!((p[i] - want).abs() <= 1e-6, "{i}: {} vs {want}", p[i]);
        }
    }
}

#[test]
fn norm_from_objective_needs_a_sane_count() {
    let ctx = ctx();
    // too many for the single workgroup that sums them, more than a binding holds
    for bad in [
        0,
        polyak_gpu::solver::MAX_OBJECTIVE_PARTIALS + 1,
        usize::MAX / 8,
    ] {
        let built = PolyakSgd::builder(&ctx, PolyakConfig::default())
            .tensor(TensorSpec::new("p", &[8]))
            .norm_from_objective(bad)
            .build();
        assert!(
            matches!(
                built,
                Err(Error::InvalidOption {
                    option: "norm_from_objective",
                    ..
                })
            ),
            "{bad}"
        );
    }
    // and without it there is no partials binding
    let opt = PolyakSgd::new_zeroed(&ctx, PolyakConfig::default(), 8).unwrap();
    assert!(opt.buffers().norm_partials_binding().is_none());
}

#[test]
fn with_the_device_step_and_pipelined_runs_too() {
    // The objective's norm, the GPU's step size and its halt on `error <= tol`, over
    // several segments: a pipelined run stops where one waiting every step stops.
    let ctx = ctx_with_segments(4096);
    let n = 20_001;
    let outcome = |sync_every: usize| {
        let cfg = PolyakConfig::default()
            .momentum(0.2)
            .tol(1e-3)
            .stepsize_mode(StepSizeMode::Device)
            .sync_every(sync_every);
        let mut opt = PolyakSgd::builder(&ctx, cfg)
            .tensor(TensorSpec::new("params", &[n]))
            .norm_from_objective(quadratic_partials(&ctx, n))
            .build()
            .unwrap();
        opt.upload_params(&random(104, n)).unwrap();
        let q = GpuQuadratic::new(&opt, "params", &random(105, n));
        let s = opt.run(|ev| q.eval(ev)).unwrap();
        (s, opt.download_params().unwrap())
    };
    let (s1, p1) = outcome(1);
    assert!(s1.error <= 1e-3 && s1.iter_num > 5, "{s1:?}");
    for k in [3, 8] {
        let (s, p) = outcome(k);
        assert_eq!(s, s1, "sync_every {k}");
        assert_eq!(p, p1, "sync_every {k}");
    }
}
