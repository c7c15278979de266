//! criterion benches of the norm, the update and a whole step, on whatever adapter
//! wgpu picks (lavapipe here): `cargo bench --bench step`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use polyak_gpu::{GpuContext, Loss, PolyakConfig, PolyakSgd, StepSizeMode, bench};

fn steps(c: &mut Criterion) {
    let ctx = GpuContext::new().expect("a wgpu adapter");
    eprintln!("adapter: {}", ctx.describe());
    let mut group = c.benchmark_group("polyak");
    group.sample_size(20);
    for n in [10_000usize, 100_000, 1_000_000] {
        let cfg = PolyakConfig::default().momentum(0.9).max_stepsize(1e-3);
        let mut opt = PolyakSgd::new(&ctx, cfg.clone(), &vec![0.0; n]).unwrap();
        bench::fill(&opt, true, 1, 1.0).unwrap();
        bench::fill(&opt, false, 2, 1e-3).unwrap();
        let keep = |_: &mut polyak_gpu::Evaluation<'_>| Ok((Loss::Host(0.5), ()));
        let mut state = opt.init_state(keep).unwrap();
        group.throughput(Throughput::Bytes(24 * n as u64));
        group.bench_with_input(BenchmarkId::new("step", n), &n, |b, _| {
            b.iter(|| {
                state = opt.update(&state, keep).unwrap();
            })
        });
        // The same step with the overflow check (the norm pass reads p and v too).
        let mut checked =
            PolyakSgd::new(&ctx, cfg.clone().check_overflow(true), &vec![0.0; n]).unwrap();
        bench::fill(&checked, true, 1, 1.0).unwrap();
        bench::fill(&checked, false, 2, 1e-3).unwrap();
        let mut checked_state = checked.init_state(keep).unwrap();
        group.throughput(Throughput::Bytes(32 * n as u64));
        group.bench_with_input(BenchmarkId::new("step (overflow check)", n), &n, |b, _| {
            b.iter(|| {
                checked_state = checked.update(&checked_state, keep).unwrap();
            })
        });
        group.throughput(Throughput::Bytes(24 * n as u64));
        drop(checked);
        // The same step with the step size computed on the GPU: one submission.
        let mut on_device = PolyakSgd::new(
            &ctx,
            cfg.clone().stepsize_mode(StepSizeMode::Device),
            &vec![0.0; n],
        )
        .unwrap();
        bench::fill(&on_device, true, 1, 1.0).unwrap();
        bench::fill(&on_device, false, 2, 1e-3).unwrap();
        // The loss a GPU objective writes into the slot every evaluation.
        let loss = wgpu::util::DeviceExt::create_buffer_init(
            ctx.device(),
            &wgpu::util::BufferInitDescriptor {
                label: Some("bench loss"),
                contents: bytemuck::bytes_of(&0.5f32),
                usage: wgpu::BufferUsages::COPY_SRC,
            },
        );
        let loss_in_slot = |ev: &mut polyak_gpu::Evaluation<'_>| {
            let slot = ev.buffers().scalars_buffer().clone();
            ev.encoder().copy_buffer_to_buffer(&loss, 0, &slot, 0, 4);
            Ok((Loss::Device, ()))
        };
        let mut device_state = on_device.init_state(loss_in_slot).unwrap();
        group.bench_with_input(BenchmarkId::new("step (device rule)", n), &n, |b, _| {
            b.iter(|| {
                device_state = on_device.update(&device_state, loss_in_slot).unwrap();
            })
        });
        drop(on_device);
        group.bench_with_input(BenchmarkId::new("norm+readback", n), &n, |b, _| {
            b.iter(|| opt.l2_optimality_error(keep).unwrap())
        });
        group.bench_with_input(
            BenchmarkId::new("norm+update device time", n),
            &n,
            |b, _| {
                b.iter_custom(|iters| {
                    let t = opt.time_phases(iters as usize).unwrap();
                    std::time::Duration::from_secs_f64(
                        (t.norm_ms + t.update_ms) * 1e-3 * iters as f64,
                    )
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, steps);
criterion_main!(benches);
