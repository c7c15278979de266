//! `VelocityDtype::F16`: the velocity stored as f16, the update computed in f32.

mod common;

use common::{ctx, ctx_with_segments, fixed, random, sqnorm};
use half::f16;
use polyak_gpu::{
    Error, GpuContext, PolyakConfig, PolyakSgd, Precision, State, TensorSpec, VelocityDtype,
    polyak_stepsize,
};

fn config() -> PolyakConfig {
    PolyakConfig::default()
        .momentum(0.9)
        .fun_min(-1.0)
        .max_stepsize(1e6)
        .velocity_dtype(VelocityDtype::F16)
}

/// Two steps from random parameters with random gradients, against f64 arithmetic
/// that rounds the stored velocity to f16 and adds the unrounded one to p.
fn two_steps_f16(ctx: &GpuContext, n: usize, seed: u64) {
    let cfg = config();
    let p0 = random(seed, n);
    let mut opt = PolyakSgd::new(ctx, cfg.clone(), &p0).unwrap();
    let (g1, g2) = (random(seed + 1, n), random(seed + 2, n));
    let mut state = opt.init_state(fixed(&g1, 0.5)).unwrap();
    let mut p: Vec<f64> = p0.iter().map(|&x| f64::from(x)).collect();
    let mut v = vec![0.0f64; n]; // the stored (f16) velocity
    for (g, value) in [(&g1, 0.5), (&g2, 0.25)] {
        state = opt.update(&state, fixed(g, value)).unwrap();
        let step = polyak_stepsize(value, sqnorm(g), &cfg, Precision::F32);
        assert!(
            (state.stepsize - step).abs() <= 1e-5 * step,
            "{state:?} vs {step}"
        );
        let s = state.stepsize;
        let got_p = opt.download_params().unwrap();
        let got_v = opt.download_velocity().unwrap().unwrap();
        for i in 0..n {
            let unrounded = 0.9 * v[i] - s * f64::from(g[i]);
            let scale = (0.9 * v[i]).abs() + (s * f64::from(g[i])).abs() + 1e-30;
            // the stored velocity is the f16 of the f32 result: within one f16 ulp
            let stored = f64::from(got_v[i]);
            assert_eq!(f64::from(f16::from_f64(stored)), stored, "not an f16");
            let ulp = f64::from(f16::from_f64(unrounded).to_f32()).abs() * 2f64.powi(-10);
            assert!(
                (stored - unrounded).abs() <= ulp.max(6e-8) + 4e-7 * scale,
                "n={n} velocity[{i}]: {stored} vs {unrounded}"
            );
            let want = p[i] + unrounded;
            let p_scale = p[i].abs() + scale;
            assert!(
                (f64::from(got_p[i]) - want).abs() <= 4.0 * f64::from(f32::EPSILON) * p_scale,
                "n={n} params[{i}]: {} vs {want}",
                got_p[i]
            );
            p[i] = f64::from(got_p[i]);
            v[i] = stored;
        }
    }
}

#[test]
fn f16_velocity_steps_match_f64_with_the_stored_velocity_rounded() {
    let ctx = ctx();
    for (i, n) in [1usize, 5, 257, 4099, 100_003].into_iter().enumerate() {
        two_steps_f16(&ctx, n, 400 + 10 * i as u64);
    }
    // over several segments (the 2-D dispatch is the kernels' unit test's)
    two_steps_f16(&ctx_with_segments(4096), 10_001, 450);
    // the GPUs' grid-stride walk (lavapipe uses contiguous runs by default)
    two_steps_f16(&common::grid_stride_ctx(), 300_007, 455);
}

#[test]
fn f16_velocity_takes_ten_bytes_per_parameter() {
    let ctx = ctx();
    let n = 1 << 16;
    let with = |dtype| {
        let cfg = config().velocity_dtype(dtype);
        PolyakSgd::new_zeroed(&ctx, cfg, n)
            .unwrap()
            .buffers()
            .device_bytes()
    };
    assert_eq!(with(VelocityDtype::Full), 12 * n as u64);
    assert_eq!(with(VelocityDtype::F16), 10 * n as u64);
    // without momentum there is no velocity whatever its dtype
    let plain = PolyakConfig::default().velocity_dtype(VelocityDtype::F16);
    let opt = PolyakSgd::new_zeroed(&ctx, plain, n).unwrap();
    assert_eq!(opt.buffers().device_bytes(), 8 * n as u64);
}

#[test]
fn f16_velocity_needs_the_shader_f16_feature() {
    let ctx = common::default_features_ctx();
    match PolyakSgd::new(&ctx, config(), &[1.0; 8]) {
        Err(Error::InvalidOption {
            option: "velocity_dtype",
            ..
        }) => {}
        other => panic!("expected InvalidOption, got {other:?}"),
    }
    // an f32 velocity is fine there
    assert!(
        PolyakSgd::new(
            &ctx,
            config().velocity_dtype(VelocityDtype::Full),
            &[1.0; 8]
        )
        .is_ok()
    );
}

#[test]
fn an_f16_velocity_checkpoint_resumes_bit_for_bit_and_is_stored_as_f16() {
    let ctx = ctx_with_segments(4096);
    // Odd lengths: an f16 tensor then ends in the middle of a 4-byte word, which
    // every copy must still move whole.
    let specs = [TensorSpec::new("a", &[3001]), TensorSpec::new("b", &[1999])];
    let dir = std::env::temp_dir().join(format!("polyak-f16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("v16.safetensors");
    let g: Vec<Vec<f32>> = (0..4).map(|k| random(470 + k, 5000)).collect();
    let fresh = |seed| {
        let opt = PolyakSgd::with_tensors(&ctx, config(), &specs).unwrap();
        opt.upload_params(&random(seed, 5000)).unwrap();
        opt
    };
    // A velocity uploaded comes back rounded to f16, and nothing else moves.
    let up = fresh(479);
    let v = random(478, 5000);
    up.buffers().upload_velocity(&v).unwrap();
    let rounded: Vec<f32> = v.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    assert_eq!(up.download_velocity().unwrap().unwrap(), rounded);
    assert_eq!(up.download_params().unwrap(), random(479, 5000));
    let step = |opt: &mut PolyakSgd, s: &State, k: usize| opt.update(s, fixed(&g[k], 1.0)).unwrap();

    let mut a = fresh(480);
    let mut s = a.init_state(fixed(&g[0], 1.0)).unwrap();
    for k in 0..4 {
        s = step(&mut a, &s, k);
        if k == 1 {
            a.save_checkpoint(&s, &file).unwrap();
        }
    }
    let mut b = fresh(481);
    let mut r = b.load_checkpoint(&file).unwrap();
    for k in 2..4 {
        r = step(&mut b, &r, k);
    }
    assert_eq!(r, s);
    let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(a.download_params().unwrap()),
        bits(b.download_params().unwrap())
    );
    assert_eq!(
        bits(a.download_velocity().unwrap().unwrap()),
        bits(b.download_velocity().unwrap().unwrap())
    );
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("velocity/a").unwrap().dtype(),
        safetensors::Dtype::F16
    );
    assert_eq!(
        st.tensor("params/a").unwrap().dtype(),
        safetensors::Dtype::F32
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_f16_velocity_saturates_instead_of_overflowing() {
    // A step of 1e6 along a unit gradient: |v| = 1e6 is past f16's 65504. Stored as
    // infinity it would make the next step's parameters infinite.
    let ctx = ctx();
    let n = 8;
    let cfg = config().max_stepsize(1e6).fun_min(0.0);
    let mut opt = PolyakSgd::new(&ctx, cfg, &[0.0; 8]).unwrap();
    let g = vec![1.0f32; n];
    let state = opt.init_state(fixed(&g, 1e12)).unwrap();
    let state = opt.update(&state, fixed(&g, 1e12)).unwrap();
    assert_eq!(state.stepsize, 1e6);
    // The parameters moved by the unrounded velocity; the stored one saturated.
    assert_eq!(opt.download_params().unwrap(), vec![-1e6; n]);
    assert_eq!(opt.download_velocity().unwrap().unwrap(), vec![-65504.0; n]);
    let state = opt.update(&state, fixed(&g, 1e12)).unwrap();
    assert_eq!(state.iter_num, 2);
    // (within an f32 rounding or two: a GPU may fuse the multiply-add)
    let want = -1e6 + (0.9 * -65504.0 - 1e6);
    for p in opt.download_params().unwrap() {
        assert!(
            (f64::from(p) - want).abs() <= 1e-6 * want.abs(),
            "{p} vs {want}"
        );
    }
    // Uploads saturate too.
    opt.buffers().upload_velocity(&[1e9; 8]).unwrap();
    assert_eq!(opt.download_velocity().unwrap().unwrap(), vec![65504.0; n]);
}
