//! The kernels against one another and against f64 on the host.

use super::*;

/// One vec4 per workgroup forces more than 65,535 workgroups at a small size, so
/// the 2-D dispatch path of both kernels runs on any adapter.
#[test]
fn two_dimensional_dispatch_norm_and_update() {
    use super::batch::MAX_DIM;
    use crate::config::VelocityDtype;
    use crate::conformance::SplitMix64;
    use crate::layout::{Layout, TensorSpec};
    let ctx = GpuContext::software()
        .or_else(|_| GpuContext::new())
        .expect("an adapter");
    for dtype in [VelocityDtype::Full, VelocityDtype::F16] {
        let n = 4 * 70_001 - 3;
        let layout = Layout::new(&[TensorSpec::new("p", &[n])], 8, 1 << 30).unwrap();
        let config = PolyakConfig::default()
            .momentum(0.5)
            .max_stepsize(100.0)
            .velocity_dtype(dtype);
        let bufs = ParamBuffers::new(&ctx, layout, &config, &[], None);
        let n4 = (bufs.segments[0].len / 4) as u32;
        let geo = Geometry {
            n4,
            chunk: 1,
            groups: n4,
            first: 0,
        };
        assert_eq!(geo.dispatch(), (MAX_DIM, 2));
        let kernels =
            Kernels::with_geometries(&ctx, &bufs, &config, vec![geo], BatchLimits::both(1), false);
        let mut rng = SplitMix64::new(11);
        let g: Vec<f32> = (0..n).map(|_| rng.upm1() as f32).collect();
        let p: Vec<f32> = (0..n).map(|_| rng.upm1() as f32).collect();
        bufs.upload_grads(&g).unwrap();
        bufs.upload_params(&p).unwrap();
        bufs.scalars.write_loss(1000.0);
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        bufs.clear_velocity(&mut enc);
        kernels.encode_norm(&mut enc, None);
        bufs.scalars.encode_readback(&mut enc, 0);
        ctx.queue().submit([enc.finish()]);
        let s = bufs.scalars.read().unwrap();
        let exact: f64 = g.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        assert!((s.sqnorm - exact).abs() <= 1e-5 * exact, "{s:?} vs {exact}");
        // The rule's step, in f32 on the GPU: 1000 / sqnorm (below the cap of 100).
        let want = 1000.0 / s.sqnorm;
        assert!(
            (s.step - want).abs() <= 4.0 * f64::from(f32::EPSILON) * want,
            "{s:?}"
        );
        assert_eq!(s.verdict, crate::scalars::Verdict::Applied);

        bufs.scalars.write_step(0.25);
        let mut enc = ctx.device().create_command_encoder(&Default::default());
        kernels.encode_update(&mut enc, None);
        ctx.queue().submit([enc.finish()]);
        let got = bufs.download_params().unwrap();
        let vel = bufs.download_velocity().unwrap().unwrap();
        for i in [0, 1, 4 * 65_535 - 1, 4 * 65_535, 4 * 65_535 + 5, n - 1] {
            let v = -0.25 * g[i];
            // an f16 velocity is stored rounded; the parameters get it unrounded
            let stored = match dtype {
                VelocityDtype::Full => v,
                VelocityDtype::F16 => half::f16::from_f32(v).to_f32(),
            };
            assert_eq!(vel[i], stored, "{dtype:?} velocity at {i}");
            assert_eq!(got[i], p[i] + v, "{dtype:?} params at {i}");
        }
        let changed = got.iter().zip(&p).filter(|(a, b)| a != b).count();
        assert!(
            changed > n - n / 100,
            "only {changed} of {n} parameters moved"
        );
    }
}

/// Batched kernels against one dispatch per segment, on the same data: the
/// squared norm to rounding, the parameters and velocity after an update with one
/// step bit for bit, in every precision, with and without momentum, for both
/// walks.
#[test]
fn batched_kernels_give_the_bits_of_one_dispatch_per_segment() {
    use crate::config::{ParamDtype, VelocityDtype};
    use crate::conformance::SplitMix64;
    use crate::context::ContextOptions;
    use crate::layout::{Layout, TensorSpec};
    let specs: Vec<TensorSpec> = [37, 3000, 5, 1000, 64, 2, 4097, 513]
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorSpec::new(format!("t{i}"), &[n]))
        .collect();
    let n: usize = specs.iter().map(TensorSpec::len).sum();
    let mut rng = SplitMix64::new(12);
    let mut random = || (0..n).map(|_| rng.upm1()).collect::<Vec<f64>>();
    let (p, g, v) = (random(), random(), random());
    for contiguous in [true, false] {
        let ctx = GpuContext::with_options(ContextOptions {
            contiguous_invocations: Some(contiguous),
            max_workgroups: Some(3),
            ..Default::default()
        })
        .expect("an adapter");
        for (dtype, velocity, momentum, check) in [
            (ParamDtype::F32, VelocityDtype::Full, 0.9, false),
            (ParamDtype::F32, VelocityDtype::Full, 0.0, false),
            (ParamDtype::F32, VelocityDtype::F16, 0.9, false),
            (ParamDtype::F64, VelocityDtype::Full, 0.9, false),
            (ParamDtype::F32, VelocityDtype::Full, 0.9, true),
        ] {
            let config = PolyakConfig::default()
                .momentum(momentum)
                .dtype(dtype)
                .velocity_dtype(velocity)
                .check_overflow(check);
            let layout = Layout::new(&specs, 64, 2048).unwrap();
            let bufs = ParamBuffers::new(&ctx, layout, &config, &[], None);
            assert!(bufs.segments.len() >= 5, "{}", bufs.segments.len());
            let geometries = Kernels::geometries(&ctx, &bufs);
            assert!(geometries.iter().any(|g| g.groups > 1));
            // The vectors as drawn.
            let restore = || {
                bufs.upload_params_f64(&p).unwrap();
                bufs.upload_grads_f64(&g).unwrap();
                if momentum > 0.0 {
                    bufs.upload_velocity_f64(&v).unwrap();
                }
            };
            // The scalars after the commands `record` records.
            let scalars_after = |record: &dyn Fn(&mut wgpu::CommandEncoder)| {
                let mut enc = ctx.device().create_command_encoder(&Default::default());
                record(&mut enc);
                bufs.scalars.encode_readback(&mut enc, 0);
                ctx.queue().submit([enc.finish()]);
                bufs.scalars.read().unwrap()
            };
            let mut results = Vec::new();
            // The norm may batch more segments than the update, or fewer, or be
            // one pass (one workgroup, no final sum; not with the check), and then
            // the whole step one dispatch where the update is one batch.
            for (norm, update, one_pass) in [
                (1, 1, false),
                (2, 2, false),
                (3, 10, false),
                (30, 3, false),
                (30, 3, !check),
                (30, 10, !check),
            ] {
                let limits = BatchLimits { norm, update };
                let k = Kernels::with_geometries(
                    &ctx,
                    &bufs,
                    &config,
                    geometries.clone(),
                    limits,
                    one_pass,
                );
                let segments = bufs.segments.len();
                assert_eq!(k.norm.len(), segments.div_ceil(norm));
                assert_eq!(k.update.len(), segments.div_ceil(update));
                assert_eq!(k.finish.is_none(), one_pass);
                let whole = one_pass && k.update.len() == 1;
                assert_eq!(k.step.is_some(), whole);
                assert_eq!(
                    k.dispatches_per_step(false),
                    k.norm.len() + k.update.len() + 1 - usize::from(one_pass)
                );
                let apart = k.dispatches_per_step(false);
                assert_eq!(k.dispatches_per_step(true), if whole { 1 } else { apart });
                restore();
                bufs.scalars.write_loss(0.5);
                let s = scalars_after(&|enc| k.encode_norm(enc, None));
                // The norm's partials group differently per batching: the sum
                // agrees to rounding. The update, with one step, bit for bit.
                let exact: f64 = g.iter().map(|x| x * x).sum();
                let (tol, precision) = if dtype == ParamDtype::F64 {
                    (1e-13, crate::Precision::F64)
                } else {
                    (1e-5, crate::Precision::F32)
                };
                let what = format!("{limits:?} one pass {one_pass}: {s:?}");
                assert!((s.sqnorm - exact).abs() <= tol * exact, "{what}");
                // Either way the rule ran on the GPU's norm, and took the loss.
                assert_eq!(s.loss, 0.5, "{what}");
                let step = crate::polyak_stepsize(0.5, s.sqnorm, &config, precision);
                assert!(step > 1e-5 && step < 1e-3, "{what}");
                assert!((s.step - step).abs() <= 1e-6 * step, "{what}");
                assert_eq!(s.verdict, crate::scalars::Verdict::Applied, "{what}");
                // The norm pass set the loss slot to NaN once it read it: a pass
                // with no loss written takes NaN, not the last one.
                let again = scalars_after(&|enc| k.encode_norm(enc, None));
                assert!(
                    again.loss.is_nan() && again.step.is_nan(),
                    "{what}: {again:?}"
                );
                assert_eq!(again.sqnorm, s.sqnorm, "{what}");
                bufs.scalars.write_step(0.25);
                let mut enc = ctx.device().create_command_encoder(&Default::default());
                k.encode_update(&mut enc, None);
                ctx.queue().submit([enc.finish()]);
                let got_v = bufs.download_velocity_f64().unwrap();
                results.push((bufs.download_params_f64().unwrap(), got_v));
                if whole {
                    // The whole step in one dispatch gives the bits of the norm
                    // pass and the update apart, and the same scalars.
                    let mut outcomes = Vec::new();
                    for apart in [true, false] {
                        restore();
                        bufs.scalars.write_loss(0.5);
                        let s = scalars_after(&|enc| {
                            if apart {
                                k.encode_norm(enc, None);
                                k.encode_update(enc, None);
                            } else {
                                k.encode_step(enc);
                            }
                        });
                        let v = bufs.download_velocity_f64().unwrap();
                        outcomes.push((s, bufs.download_params_f64().unwrap(), v));
                    }
                    assert_eq!(outcomes[0].0, s, "{what}");
                    assert!(outcomes[0].1 != p, "{what}: nothing moved");
                    assert!(outcomes[0] == outcomes[1], "{what}");
                }
            }
            let what = format!(
                "{dtype:?} {velocity:?} momentum {momentum} check {check}, contiguous {contiguous}"
            );
            assert!(results[0].0 != p, "{what}: nothing moved");
            let bits = |r: &(Vec<f64>, Option<Vec<f64>>)| {
                r.0.iter()
                    .chain(r.1.iter().flatten())
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            for r in &results[1..] {
                assert!(bits(r) == bits(&results[0]), "{what}");
            }
        }
    }
}

/// The step interval of the overflow check, on the host in f64 (see
/// `shaders/norm_guard.wgsl`): the steps `s` for which `s*g`, `a - s*g` and
/// `c - s*g` stay within `limit` for every element, `a = momentum * v`, `c = p + a`.
fn step_interval(
    p: &[f64],
    v: &[f64],
    g: &[f64],
    momentum: f64,
    limit: f64,
    tiny: f64,
) -> (f64, f64) {
    let (mut lowest, mut highest) = (-limit, limit);
    for i in 0..p.len() {
        let a = momentum * v[i];
        let c = p[i] + a;
        if !(p[i].is_finite() && v[i].is_finite() && c.is_finite()) {
            return (limit, -limit);
        }
        let top = a.min(c).min(0.0) + limit;
        let bottom = a.max(c).max(0.0) - limit;
        let (lo, hi) = if g[i].abs() < tiny {
            if bottom <= 0.0 && top >= 0.0 {
                (-limit, limit)
            } else {
                (limit, -limit)
            }
        } else if g[i] > 0.0 {
            (bottom / g[i], top / g[i])
        } else {
            (top / g[i], bottom / g[i])
        };
        lowest = lowest.max(lo);
        highest = highest.min(hi);
    }
    (lowest, highest)
}

/// The overflow check's interval against f64 on the host, on random data with
/// values near overflow, in segments batched and alone, f32 (with an f16
/// velocity too) and f64, with and without momentum; the squared norm is that of
/// the plain norm pass's bit for bit; a NaN parameter empties the interval.
#[test]
fn overflow_bounds_match_f64_and_leave_the_norm_alone() {
    use crate::config::{ParamDtype, VelocityDtype};
    use crate::conformance::SplitMix64;
    use crate::layout::{Layout, TensorSpec};
    let ctx = GpuContext::new().expect("an adapter");
    let specs: Vec<TensorSpec> = [1001, 37, 5, 2050, 3]
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorSpec::new(format!("t{i}"), &[n]))
        .collect();
    let n: usize = specs.iter().map(TensorSpec::len).sum();
    for (dtype, velocity, momentum) in [
        (ParamDtype::F32, VelocityDtype::Full, 0.9),
        (ParamDtype::F32, VelocityDtype::Full, 0.0),
        (ParamDtype::F32, VelocityDtype::F16, 0.5),
        (ParamDtype::F64, VelocityDtype::Full, 0.9),
        (ParamDtype::F64, VelocityDtype::Full, 0.0),
    ] {
        let f64s = dtype == ParamDtype::F64;
        let (big, limit, tiny) = if f64s {
            (1e307, 1.7959375751603017e308, f64::MIN_POSITIVE)
        } else {
            (1e37, 3.3995004e38f32 as f64, f32::MIN_POSITIVE as f64)
        };
        let round = |x: f64| if f64s { x } else { x as f32 as f64 };
        let mut rng = SplitMix64::new(21);
        // Mostly O(1), with parameters and velocities up to 10 * big of either sign,
        // gradients of all sizes, zeros and subnormals.
        let mut draw = |scale: f64| {
            (0..n)
                .map(|i| match i % 97 {
                    0 => round(rng.upm1() * 10.0 * scale),
                    1 => 0.0,
                    2 => round(tiny * 0.25),
                    _ => round(rng.upm1()),
                })
                .collect::<Vec<f64>>()
        };
        let p = draw(big);
        let mut v = draw(if velocity == VelocityDtype::F16 {
            6e3 / big
        } else {
            big
        });
        if velocity == VelocityDtype::F16 {
            v = v.iter().map(|&x| half::f16::from_f64(x).to_f64()).collect();
        }
        let g: Vec<f64> = draw(1.0)
            .iter()
            .zip(0..)
            .map(|(&x, i)| if i % 7 == 0 { round(x * 1e-30) } else { x })
            .collect();
        let plain = PolyakConfig::default()
            .momentum(momentum)
            .dtype(dtype)
            .velocity_dtype(velocity);
        let mut norms = Vec::new();
        for (guard, most) in [(false, 10), (true, 10), (false, 1), (true, 1)] {
            let config = plain.clone().check_overflow(guard);
            let layout = Layout::new(&specs, 64, 1024).unwrap();
            let bufs = ParamBuffers::new(&ctx, layout, &config, &[], None);
            let geometries = Kernels::geometries(&ctx, &bufs);
            let limits = BatchLimits::both(most);
            let k = Kernels::with_geometries(&ctx, &bufs, &config, geometries, limits, false);
            bufs.upload_params_f64(&p).unwrap();
            bufs.upload_grads_f64(&g).unwrap();
            if momentum > 0.0 {
                bufs.upload_velocity_f64(&v).unwrap();
            }
            let norm_and_bounds = || {
                bufs.scalars.write_loss(0.5);
                let mut enc = ctx.device().create_command_encoder(&Default::default());
                k.encode_norm(&mut enc, None);
                bufs.scalars.encode_readback(&mut enc, 0);
                ctx.queue().submit([enc.finish()]);
                bufs.scalars.read().unwrap()
            };
            let s = norm_and_bounds();
            norms.push(s.sqnorm.to_bits());
            let what = format!("{dtype:?} {velocity:?} momentum {momentum} batch {most}");
            if !guard {
                assert_eq!(s.bounds, None, "{what}");
                continue;
            }
            let m = round(momentum); // the kernel reads it in its precision
            let v0 = if momentum > 0.0 {
                v.clone()
            } else {
                vec![0.0; n]
            };
            let (lo, hi) = step_interval(&p, &v0, &g, m, limit, tiny);
            let (got_lo, got_hi) = s.bounds.expect("bounds");
            let tol = if f64s { 1e-12 } else { 1e-5 };
            // Both ends set by the data, not by the limit; zero inside.
            let teeth = -limit < lo && lo < 0.0 && 0.0 < hi && hi < limit;
            assert!(teeth, "{what}: [{lo:e}, {hi:e}]");
            assert!(
                (got_lo - lo).abs() <= tol * lo.abs(),
                "{what}: lowest {got_lo} vs {lo}"
            );
            assert!(
                (got_hi - hi).abs() <= tol * hi.abs(),
                "{what}: highest {got_hi} vs {hi}"
            );

            // A NaN parameter (or, with momentum, velocity) empties the interval.
            let mut bad = p.clone();
            bad[n / 2] = f64::NAN;
            bufs.upload_params_f64(&bad).unwrap();
            let (e_lo, e_hi) = norm_and_bounds().bounds.unwrap();
            assert!(e_lo > e_hi, "{what}: NaN parameter gave [{e_lo}, {e_hi}]");
        }
        // The same batches give the same squared norm, checked or not.
        assert_eq!(norms[0], norms[1], "{dtype:?} {momentum}: the norm changed");
        assert_eq!(norms[2], norms[3], "{dtype:?} {momentum}: the norm changed");
    }
}
