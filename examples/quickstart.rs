//! Least squares on the GPU: the loss and the gradient come from this example's own
//! WGSL kernel (`quickstart.wgsl`), written straight into the optimizer's buffers, so
//! only the loss, the squared norm and the step size (16 bytes) cross to the CPU each step.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use polyak_gpu::conformance::SplitMix64;
use polyak_gpu::{GpuContext, Loss, PolyakConfig, PolyakSgd, Result};
use wgpu::util::DeviceExt;

const M: usize = 4096; // rows
const D: usize = 512; // parameters

fn main() -> Result<()> {
    let ctx = GpuContext::new()?;
    println!("adapter: {}", ctx.describe());

    // A consistent system A x_true = b, so the optimal loss is 0 (fun_min = 0).
    let mut rng = SplitMix64::new(7);
    let a: Vec<f32> = (0..M * D).map(|_| rng.upm1() as f32).collect();
    let x_true: Vec<f32> = (0..D).map(|_| rng.upm1() as f32).collect();
    let b: Vec<f32> = a
        .chunks(D)
        .map(|row| row.iter().zip(&x_true).map(|(a, x)| a * x).sum())
        .collect();

    let config = PolyakConfig::default()
        .momentum(0.9)
        .maxiter(2000)
        .tol(1e-4);
    let mut opt = PolyakSgd::new(&ctx, config.clone(), &vec![0.0; D])?;

    // The objective's buffers and bind group, made once.
    let device = ctx.device();
    let storage = |data: &[f32], writable: bool| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(data),
            usage: if writable {
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST
            } else {
                wgpu::BufferUsages::STORAGE
            },
        })
    };
    let a_buf = storage(&a, false);
    let b_buf = storage(&b, false);
    let r_buf = storage(&vec![0.0; M], true);
    let dims = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: bytemuck::cast_slice(&[M as u32, D as u32, 0, 0]),
        usage: wgpu::BufferUsages::UNIFORM,
    });
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("quickstart"),
        source: wgpu::ShaderSource::Wgsl(include_str!("quickstart.wgsl").into()),
    });
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: None,
        entries: &(0..7)
            .map(|i| wgpu::BindGroupLayoutEntry {
                binding: i,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: if i == 6 {
                    wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    }
                } else {
                    wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage {
                            read_only: matches!(i, 0 | 1 | 3),
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    }
                },
                count: None,
            })
            .collect::<Vec<_>>(),
    });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: None,
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = |entry: &str| {
        device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        })
    };
    let (residual, gradient, total_loss) = (
        pipeline("residual"),
        pipeline("gradient"),
        pipeline("total_loss"),
    );
    let bufs = opt.buffers();
    let x = bufs.params_bindings("params")?.remove(0);
    let g = bufs.grads_bindings("params")?.remove(0);
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &layout,
        entries: &[
            (0, a_buf.as_entire_binding()),
            (1, b_buf.as_entire_binding()),
            (2, r_buf.as_entire_binding()),
            (3, wgpu::BindingResource::Buffer(x)),
            (4, wgpu::BindingResource::Buffer(g)),
            (5, wgpu::BindingResource::Buffer(bufs.loss_binding())),
            (6, dims.as_entire_binding()),
        ]
        .map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource }),
    });

    // One evaluation: three dispatches recorded into the step's own submission.
    let objective = |ev: &mut polyak_gpu::Evaluation<'_>| {
        let mut pass = ev.encoder().begin_compute_pass(&Default::default());
        pass.set_bind_group(0, &bind_group, &[]);
        pass.set_pipeline(&residual);
        pass.dispatch_workgroups((M as u32).div_ceil(64), 1, 1);
        pass.set_pipeline(&gradient);
        pass.dispatch_workgroups((D as u32).div_ceil(64), 1, 1);
        pass.set_pipeline(&total_loss);
        pass.dispatch_workgroups(1, 1, 1);
        Ok((Loss::Device, ()))
    };

    // jaxopt's run loop, written out to print progress.
    let start = std::time::Instant::now();
    let mut state = opt.init_state(objective)?;
    while state.iter_num < config.maxiter {
        state = opt.update(&state, objective)?;
        if state.iter_num % 100 == 0 || state.iter_num == 1 {
            println!(
                "iter {:5}  loss {:.3e}  |grad| {:.3e}  step {:.4}",
                state.iter_num, state.value, state.error, state.stepsize
            );
        }
        if !state.should_continue(config.tol) {
            break;
        }
    }
    let elapsed = start.elapsed();
    let x = opt.download_params()?;
    let err = x
        .iter()
        .zip(&x_true)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        .sqrt();
    println!(
        "done: {} iterations in {:.2?} ({:.3} ms/iter), final loss {:.3e}, |grad| {:.3e}, |x - x_true| {:.3e}",
        state.iter_num,
        elapsed,
        elapsed.as_secs_f64() * 1e3 / state.iter_num as f64,
        state.value,
        state.error,
        err
    );
    // The problem is consistent (b = A x_true): the run must have found x_true.
    if err > 1e-2 {
        eprintln!("did not converge: |x - x_true| = {err:e}");
        std::process::exit(1);
    }
    Ok(())
}
