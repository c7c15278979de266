//! An MLP trained end to end on the GPU: Fisher's iris data (150 flowers, 4
//! measurements, 3 species), one hidden layer, forward and backward in WGSL
//! (`mlp.wgsl`) writing the gradient, its norm partials and the loss straight into
//! the optimizer's buffers; Polyak steps computed on the GPU, 16 per wait.
//!
//! ```text
//! cargo run --release --example mlp
//! ```

mod data;
mod model;

use data::{iris, split};
use model::{Dims, Mlp, accuracy, cpu_forward, optimizer, training_config};
use polyak_gpu::conformance::SplitMix64;
use polyak_gpu::{GpuContext, Result};

fn main() -> Result<()> {
    let (all_x, all_y) = iris()?;
    let (x, y, test_x, test_y) = split(&all_x, &all_y);
    let dims = Dims {
        samples: y.len(),
        features: 4,
        hidden: 32,
        classes: 3,
    };
    let ctx = GpuContext::new()?;
    println!("adapter: {}", ctx.describe());
    let mut opt = optimizer(&ctx, dims, training_config())?;

    // He-style uniform start for the weights, zero biases.
    let mut rng = SplitMix64::new(2026);
    let mut init = Vec::new();
    for t in dims.tensors() {
        let fan_in = if t.shape.len() == 2 { t.shape[0] } else { 0 };
        let scale = if fan_in > 0 {
            (6.0 / fan_in as f64).sqrt()
        } else {
            0.0
        };
        init.extend((0..t.len()).map(|_| (rng.upm1() * scale) as f32));
    }
    opt.upload_params(&init)?;
    let (loss0, scores0) = cpu_forward(dims, &init, &x, &y, None);
    let test = Dims {
        samples: test_y.len(),
        ..dims
    };

    let mlp = Mlp::new(&opt, dims, &x, &y)?;
    let t0 = std::time::Instant::now();
    let state = opt.run(|ev| mlp.eval(ev))?;
    let secs = t0.elapsed().as_secs_f64();

    let params = opt.download_params()?;
    let (loss, scores) = cpu_forward(dims, &params, &x, &y, None);
    let (_, held_out) = cpu_forward(test, &params, &test_x, &test_y, None);
    println!(
        "{} parameters, {} training flowers: loss {loss0:.4} -> {loss:.4}, accuracy {:.1}% -> {:.1}%",
        params.len(),
        dims.samples,
        100.0 * accuracy(&scores0, &y),
        100.0 * accuracy(&scores, &y)
    );
    println!(
        "{} held-out flowers: accuracy {:.1}%",
        test.samples,
        100.0 * accuracy(&held_out, &test_y)
    );
    println!(
        "{} Polyak steps in {secs:.2} s ({:.3} ms/step), |grad| {:.2e}, last step size {:.3}",
        state.iter_num,
        1e3 * secs / state.iter_num.max(1) as f64,
        state.error,
        state.stepsize
    );
    Ok(())
}
