//! Checkpoints: bit-exact resume, atomic writes, and files that do not fit.

mod common;

use common::{ctx_with_segments, random, sqnorm};
use polyak_gpu::{
    Error, Evaluation, GpuContext, Loss, NonFinitePolicy, ParamDtype, PolyakConfig, PolyakSgd,
    State, TensorSpec, VelocityDtype,
};
use std::path::PathBuf;

/// A fresh, empty directory for one test.
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("polyak-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("w1", &[33, 17]),
        TensorSpec::new("b1", &[17]),
        TensorSpec::new("w2", &[17, 300]),
        TensorSpec::new("b2", &[3]),
    ]
}

/// A model of four tensors over several segments, with its own random start.
fn model(ctx: &GpuContext, cfg: PolyakConfig, seed: u64) -> PolyakSgd {
    let opt = PolyakSgd::with_tensors(ctx, cfg, &specs()).unwrap();
    let n = opt.buffers().num_params();
    opt.upload_params(&random(seed, n)).unwrap();
    opt
}

/// 0.5 sum a_i (x_i - c_i)^2: the step size changes from step to step.
fn objective(n: usize) -> impl Fn(&mut Evaluation<'_>) -> polyak_gpu::Result<(Loss, ())> {
    let c = random(7, n);
    let a: Vec<f32> = random(8, n).iter().map(|r| 2f32.powf(3.0 * r)).collect();
    move |ev| {
        let x = ev.read_params()?;
        let g: Vec<f32> = (0..n).map(|i| a[i] * (x[i] - c[i])).collect();
        ev.write_grads(&g)?;
        let loss = (0..n)
            .map(|i| 0.5 * f64::from(a[i]) * f64::from(x[i] - c[i]).powi(2))
            .sum();
        Ok((Loss::Host(loss), ()))
    }
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn a_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let ctx = ctx_with_segments(4096);
    let cfg = PolyakConfig::default().momentum(0.9).max_stepsize(10.0);
    let d = dir("resume");
    let file = d.join("run.safetensors");

    let mut straight = model(&ctx, cfg.clone(), 1);
    assert!(straight.buffers().layout().segment_lens().len() >= 2);
    let f = objective(straight.buffers().num_params());
    let mut s = straight.init_state(&f).unwrap();
    for k in 0..8 {
        s = straight.update(&s, &f).unwrap();
        if k == 3 {
            straight.save_checkpoint(&s, &file).unwrap();
        }
    }

    // Another optimizer, another start: the checkpoint replaces both.
    let mut resumed = model(&ctx, cfg, 99);
    let mut r = resumed.load_checkpoint(&file).unwrap();
    assert_eq!(r.iter_num, 4);
    for _ in 0..4 {
        r = resumed.update(&r, &f).unwrap();
    }
    assert_eq!(r, s);
    let steps: Vec<f64> = [r.stepsize, s.stepsize].to_vec();
    assert!(steps[0] != 1.0 && steps[0] != 10.0, "{steps:?}");
    assert!(same_bits(
        &resumed.download_params().unwrap(),
        &straight.download_params().unwrap()
    ));
    assert!(same_bits(
        &resumed.download_velocity().unwrap().unwrap(),
        &straight.download_velocity().unwrap().unwrap()
    ));
    // nothing but the checkpoint is left in the directory
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["run.safetensors"]);
}

#[test]
fn non_finite_state_values_round_trip_bit_for_bit() {
    let ctx = ctx_with_segments(4096);
    let d = dir("nonfinite");
    let file = d.join("c.safetensors");
    // init_state's value and error are +inf; a 0/0 step under Propagate is NaN.
    let cfg = PolyakConfig::default().nonfinite(NonFinitePolicy::Propagate);
    let c = [0.5f32, -0.25, 1.0, 2.0];
    let mut opt = PolyakSgd::new(&ctx, cfg, &c).unwrap();
    let at_optimum = |ev: &mut Evaluation<'_>| {
        let x = ev.read_params()?;
        let g: Vec<f32> = x.iter().zip(&c).map(|(x, c)| x - c).collect();
        ev.write_grads(&g)?;
        Ok((Loss::Host(0.5 * sqnorm(&g)), ()))
    };
    let s0 = opt.init_state(at_optimum).unwrap();
    opt.save_checkpoint(&s0, &file).unwrap();
    assert_eq!(opt.load_checkpoint(&file).unwrap(), s0);
    let s1 = opt.update(&s0, at_optimum).unwrap();
    assert!(s1.stepsize.is_nan());
    opt.save_checkpoint(&s1, &file).unwrap(); // over the old one
    let back = opt.load_checkpoint(&file).unwrap();
    assert_eq!(back.stepsize.to_bits(), s1.stepsize.to_bits());
    assert_eq!((back.iter_num, back.value, back.error), (1, 0.0, 0.0));
    // aux is not stored; it can be put back
    let with: State<&str> = back.with_aux("batch 7");
    assert_eq!((with.aux, with.iter_num), ("batch 7", 1));
}

#[test]
fn a_checkpoint_that_does_not_fit_is_an_error_and_changes_nothing() {
    let ctx = ctx_with_segments(4096);
    let d = dir("mismatch");
    let cfg = PolyakConfig::default().momentum(0.5);
    let source = model(&ctx, cfg.clone(), 3);
    let s = State::initial(());
    let good = d.join("good.safetensors");
    source.save_checkpoint(&s, &good).unwrap();

    let mut target = model(&ctx, cfg.clone(), 4);
    let before = target.download_params().unwrap();
    let unchanged = |t: &PolyakSgd| same_bits(&t.download_params().unwrap(), &before);
    let reason = |r: polyak_gpu::Result<State>| match r {
        Err(Error::Checkpoint { reason, .. }) => reason,
        other => panic!("expected a checkpoint error, got {other:?}"),
    };

    // another shape for one tensor
    let mut other_specs = specs();
    other_specs[2] = TensorSpec::new("w2", &[17, 301]);
    let other = PolyakSgd::with_tensors(&ctx, cfg.clone(), &other_specs).unwrap();
    let wrong_shape = d.join("shape.safetensors");
    other.save_checkpoint(&s, &wrong_shape).unwrap();
    assert!(
        reason(target.load_checkpoint(&wrong_shape)).contains("\"params/w2\" is F32 [17, 301]")
    );
    assert!(unchanged(&target));

    // saved without momentum, loaded with it (and the other way round)
    let plain = model(&ctx, PolyakConfig::default(), 5);
    let no_velocity = d.join("plain.safetensors");
    plain.save_checkpoint(&s, &no_velocity).unwrap();
    assert!(reason(target.load_checkpoint(&no_velocity)).contains("without momentum"));
    assert!(unchanged(&target));
    let mut plain = plain;
    assert!(reason(plain.load_checkpoint(&good)).contains("does not hold"));

    // a tensor fewer in the optimizer than in the file
    let mut fewer = PolyakSgd::with_tensors(&ctx, cfg, &specs()[..3]).unwrap();
    assert!(reason(fewer.load_checkpoint(&good)).contains("\"params/b2\""));

    // a truncated file, a missing one, and one that is not a checkpoint
    let bytes = std::fs::read(&good).unwrap();
    let cut = d.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
    assert!(reason(target.load_checkpoint(&cut)).contains("truncated"));
    reason(target.load_checkpoint(d.join("missing.safetensors")));
    // too short for a header, a header length past the file (no allocation of
    // it), a header that is not JSON, bytes past the data
    let not_json = [8u64.to_le_bytes().to_vec(), b"not json".to_vec()].concat();
    for (name, content) in [
        ("short", vec![1u8, 2, 3]),
        ("huge", u64::MAX.to_le_bytes().to_vec()),
        ("json", not_json),
        ("tail", [bytes.clone(), vec![0; 4]].concat()),
    ] {
        let f = d.join(format!("{name}.safetensors"));
        std::fs::write(&f, content).unwrap();
        reason(target.load_checkpoint(&f));
    }
    let foreign = d.join("foreign.safetensors");
    let data = [0u8; 8];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data);
    safetensors::serialize_to_file([("x", view.unwrap())], None, &foreign).unwrap();
    assert!(reason(target.load_checkpoint(&foreign)).contains("format"));
    assert!(unchanged(&target));

    // a save into a directory that does not exist fails and leaves nothing behind
    let nowhere = d.join("no/such/dir/x.safetensors");
    match source.save_checkpoint(&s, &nowhere) {
        Err(Error::Checkpoint { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(!d.join("no").exists());

    // and the good one still loads
    assert_eq!(target.load_checkpoint(&good).unwrap(), s);
    assert!(same_bits(
        &target.download_params().unwrap(),
        &source.download_params().unwrap()
    ));
}

#[test]
fn a_checkpoint_of_another_precision_loads_rounded_to_nearest() {
    let ctx = ctx_with_segments(4096);
    let d = dir("precision");
    let cfg = PolyakConfig::default().momentum(0.5);
    let n = specs().iter().map(|t| t.len()).sum::<usize>();
    let file = d.join("x.safetensors");
    let s = State::initial(());

    // f32 velocity into an f16 one: rounded to f16, the parameters exact.
    let (p, v) = (random(31, n), random(32, n));
    let src = model(&ctx, cfg.clone(), 31);
    src.buffers().upload_velocity(&v).unwrap();
    src.save_checkpoint(&s, &file).unwrap();
    let half_cfg = cfg.clone().velocity_dtype(VelocityDtype::F16);
    let mut dst = model(&ctx, half_cfg, 33);
    dst.load_checkpoint(&file).unwrap();
    assert_eq!(dst.download_params().unwrap(), p);
    let v16: Vec<f32> = v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
    assert_eq!(dst.download_velocity().unwrap().unwrap(), v16);

    // f64 parameters into f32 ones: rounded to nearest, not truncated.
    let wide = PolyakSgd::with_tensors(&ctx, cfg.clone().dtype(ParamDtype::F64), &specs());
    let Ok(wide) = wide else {
        return; // an adapter without SHADER_F64
    };
    // Three quarters of an f32 step away from zero: rounds to the next f32, where
    // truncation would give back `p`.
    let next = |x: f32| f32::from_bits(x.to_bits() + 1);
    let p64: Vec<f64> = p
        .iter()
        .map(|&x| f64::from(x) + 0.75 * (f64::from(next(x)) - f64::from(x)))
        .collect();
    wide.buffers().upload_params_f64(&p64).unwrap();
    wide.save_checkpoint(&s, &file).unwrap();
    let mut narrow = model(&ctx, cfg, 34);
    narrow.load_checkpoint(&file).unwrap();
    let got = narrow.download_params().unwrap();
    let want: Vec<f32> = p.iter().map(|&x| next(x)).collect();
    assert!(got == want, "f64 -> f32 not rounded to nearest");
}

#[test]
fn a_user_buffer_that_cannot_be_written_fails_the_load_before_any_upload() {
    // The owned tensor comes first in layout order; the user-owned one lacks
    // COPY_DST. The load must fail whole, not after restoring the owned tensor.
    let ctx = ctx_with_segments(4096);
    let d = dir("readonly");
    let file = d.join("x.safetensors");
    let buffer = |usage| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 64 * 4,
            usage: wgpu::BufferUsages::STORAGE | usage,
            mapped_at_creation: false,
        })
    };
    let opt = PolyakSgd::builder(&ctx, PolyakConfig::default())
        .tensor(TensorSpec::new("owned", &[10]))
        .external(polyak_gpu::ExternalTensor {
            spec: TensorSpec::new("user", &[64]),
            params: buffer(wgpu::BufferUsages::COPY_SRC),
            params_offset: 0,
            grads: buffer(wgpu::BufferUsages::COPY_SRC),
            grads_offset: 0,
        })
        .build()
        .unwrap();
    opt.buffers()
        .upload_tensor("owned", &random(40, 10))
        .unwrap();
    opt.save_checkpoint(&State::initial(()), &file).unwrap();
    let mut opt = opt;
    let later = random(41, 10);
    opt.buffers().upload_tensor("owned", &later).unwrap();
    match opt.load_checkpoint(&file) {
        Err(Error::Registration { tensor, reason }) => {
            assert_eq!(tensor, "user");
            assert!(reason.contains("COPY_DST"), "{reason}");
        }
        other => panic!("expected a registration error, got {other:?}"),
    }
    assert_eq!(opt.buffers().download_tensor("owned").unwrap(), later);
    // A whole-vector upload fails the same way, before writing the owned tensor.
    assert!(matches!(
        opt.upload_params(&random(42, 74)),
        Err(Error::Registration { .. })
    ));
    assert_eq!(opt.buffers().download_tensor("owned").unwrap(), later);
}
