//! The MLP example (`examples/mlp/`): its WGSL forward/backward against the f64 CPU
//! twin, and training on the iris data end to end.

mod common;
#[allow(dead_code)]
#[path = "../examples/mlp/data.rs"]
mod data;
#[allow(dead_code)]
#[path = "../examples/mlp/model.rs"]
mod model;

use model::{Dims, Mlp, accuracy, cpu_forward, training_config};
use polyak_gpu::{PolyakConfig, PolyakSgd};

fn optimizer(ctx: &polyak_gpu::GpuContext, dims: Dims, config: PolyakConfig) -> PolyakSgd {
    model::optimizer(ctx, dims, config).unwrap()
}

#[test]
fn wgsl_loss_gradient_and_norm_match_the_f64_model() {
    let ctx = common::ctx();
    let (x, y) = data::iris().unwrap();
    // 100 hidden units: the hidden gradient spans several workgroups and partials.
    let dims = Dims {
        samples: y.len(),
        features: 4,
        hidden: 100,
        classes: 3,
    };
    let mut opt = optimizer(&ctx, dims, PolyakConfig::default());
    let n = opt.buffers().num_params();
    let p: Vec<f32> = common::random(300, n).iter().map(|v| 0.5 * v).collect();
    opt.upload_params(&p).unwrap();
    let mlp = Mlp::new(&opt, dims, &x, &y).unwrap();

    let mut grad = Vec::new();
    let (loss, _) = cpu_forward(dims, &p, &x, &y, Some(&mut grad));
    let s = opt.init_state(|ev| mlp.eval(ev)).unwrap();
    let s = opt.update(&s, |ev| mlp.eval(ev)).unwrap();
    let norm = grad.iter().map(|g| g * g).sum::<f64>().sqrt();
    assert!(
        (s.value - loss).abs() <= 1e-5 * loss,
        "{} vs {loss}",
        s.value
    );
    assert!(
        (s.error - norm).abs() <= 1e-5 * norm,
        "{} vs {norm}",
        s.error
    );
    // the gradient buffers still hold the gradient at p
    let g = opt.buffers().download_grads().unwrap();
    let scale = grad.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(&grad).enumerate() {
        assert!(
            (f64::from(*a) - b).abs() <= 1e-5 * scale,
            "gradient[{i}] {a} vs {b}"
        );
    }
    // and the step moved the parameters by -stepsize * g
    let q = opt.download_params().unwrap();
    let i = n / 3;
    let want = f64::from(p[i]) - s.stepsize * grad[i];
    assert!((f64::from(q[i]) - want).abs() <= 1e-5, "{} vs {want}", q[i]);
}

#[test]
fn training_on_iris_fits_and_generalises() {
    let ctx = common::ctx();
    let (all_x, all_y) = data::iris().unwrap();
    let (x, y, tx, ty) = data::split(&all_x, &all_y);
    let dims = Dims {
        samples: y.len(),
        features: 4,
        hidden: 32,
        classes: 3,
    };
    let mut opt = optimizer(&ctx, dims, training_config());
    let n = opt.buffers().num_params();
    let init: Vec<f32> = common::random(301, n).iter().map(|v| 0.5 * v).collect();
    opt.upload_params(&init).unwrap();
    let mlp = Mlp::new(&opt, dims, &x, &y).unwrap();
    let s = opt.run(|ev| mlp.eval(ev)).unwrap();
    assert!(s.error <= 1e-2 && s.iter_num < 2000, "{s:?}");
    let p = opt.download_params().unwrap();
    let (loss, scores) = cpu_forward(dims, &p, &x, &y, None);
    let test = Dims {
        samples: ty.len(),
        ..dims
    };
    let (_, held_out) = cpu_forward(test, &p, &tx, &ty, None);
    assert!(loss < 0.05, "{loss}");
    assert!(accuracy(&scores, &y) >= 0.97);
    assert!(accuracy(&held_out, &ty) >= 0.9);
    // the objective reported the loss on the GPU, on the parameters before the last step
    assert!(s.value < 0.05, "{s:?}");
}

#[test]
fn the_model_refuses_data_that_does_not_fit() {
    let ctx = common::ctx();
    let dims = Dims {
        samples: 2,
        features: 4,
        hidden: 8,
        classes: 3,
    };
    let opt = optimizer(&ctx, dims, PolyakConfig::default());
    let x = [0.0f32; 8];
    assert!(Mlp::new(&opt, dims, &x, &[0, 3]).is_err()); // label 3 of 3 classes
    assert!(Mlp::new(&opt, dims, &x[..4], &[0, 1]).is_err());
    assert!(Mlp::new(&opt, dims, &x, &[0, 2]).is_ok());
    // without norm_from_objective there is nowhere to put the norm
    let plain = PolyakSgd::with_tensors(&ctx, PolyakConfig::default(), &dims.tensors()).unwrap();
    assert!(Mlp::new(&plain, dims, &x, &[0, 2]).is_err());
}
