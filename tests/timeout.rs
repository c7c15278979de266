//! A GPU that does not finish in time: the wait gives up with `Error::Timeout`
//! instead of hanging, and the optimizer goes on once the work is done.

mod common;

use common::{check_step, fixed, random};
use polyak_gpu::{
    ContextOptions, Error, Evaluation, GpuContext, Loss, PolyakConfig, PolyakSgd, StepSizeMode,
    WaitMode,
};
use std::time::{Duration, Instant};

/// A kernel of the objective that keeps the device busy for a second or more.
/// lavapipe caps every loop (at about 65,535 iterations) and GPUs are fast, so the
/// work is a grid of 64-invocation workgroups, each invocation running a chain of
/// 50,000 xorshift steps that cannot be elided (its result is tested and may be
/// stored), with as many rows of 1,000 workgroups as the adapter needs.
struct Spin {
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    rows: u32,
}

impl Spin {
    const SHADER: &'static str = r#"
        // out[0]: written only if a chain ends at 0, which xorshift never does.
        @group(0) @binding(0) var<storage, read_write> out: array<u32, 1>;
        @compute @workgroup_size(64)
        fn main(@builtin(global_invocation_id) id: vec3<u32>) {
            var h = id.x + id.y * 64000u + 1u;
            for (var i = 0u; i < 50000u; i++) { h ^= h << 13u; h ^= h >> 17u; h ^= h << 5u; }
            if (h == 0u) { out[0] = h; }
        }"#;

    /// A spin of at least `target` on this adapter, measured (with a wait of no
    /// limit) on one row first.
    fn lasting(ctx: &GpuContext, target: Duration) -> Self {
        let device = ctx.device();
        let out = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: None,
            source: wgpu::ShaderSource::Wgsl(Self::SHADER.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: out.as_entire_binding(),
            }],
        });
        let mut spin = Spin {
            pipeline,
            group,
            rows: 1,
        };
        let saved = ctx.wait_timeout();
        ctx.set_wait_timeout(Duration::MAX);
        let mut encoder = device.create_command_encoder(&Default::default());
        spin.encode(&mut encoder);
        let start = Instant::now();
        ctx.queue().submit([encoder.finish()]);
        ctx.wait().unwrap();
        let row = start.elapsed().max(Duration::from_micros(1));
        ctx.set_wait_timeout(saved);
        spin.rows = (target.as_secs_f64() / row.as_secs_f64())
            .ceil()
            .clamp(1.0, 65535.0) as u32;
        spin
    }

    fn encode(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.group, &[]);
        pass.dispatch_workgroups(1000, self.rows, 1);
    }
}

/// Waits until the queued work is done, through as many timeouts as it takes.
fn wait_out(ctx: &GpuContext) {
    let start = Instant::now();
    loop {
        match ctx.wait() {
            Ok(()) => return,
            Err(Error::Timeout(_)) => assert!(start.elapsed() < Duration::from_secs(300)),
            Err(e) => panic!("{e}"),
        }
    }
}

/// One step whose objective spins past a 100 ms timeout, then normal steps.
/// Returns the parameters after the slow step's work was waited out.
fn slow_step_then_go_on(mode: StepSizeMode, wait: WaitMode) -> (Vec<f32>, Vec<f32>) {
    let timeout = Duration::from_millis(100);
    let ctx = GpuContext::with_options(ContextOptions {
        wait_timeout: Some(timeout),
        wait_mode: Some(wait),
        ..Default::default()
    })
    .expect("a wgpu adapter");
    assert_eq!(ctx.wait_timeout(), timeout);
    assert_eq!(ctx.wait_mode(), wait);
    let n = 1001;
    let (p0, g) = (random(1, n), random(2, n));
    let cfg = PolyakConfig::default().momentum(0.9).stepsize_mode(mode);
    let mut opt = PolyakSgd::new(&ctx, cfg, &p0).unwrap();
    let state = opt.init_state(fixed(&g, 0.5)).unwrap();
    // At least ten times the timeout (lavapipe: about 0.55 s a row here, two rows).
    let spin = Spin::lasting(&ctx, 10 * timeout);
    let slow = |ev: &mut Evaluation<'_>| {
        spin.encode(ev.encoder());
        ev.write_grads(&g)?;
        Ok((Loss::Host(0.5), ()))
    };
    let started = Instant::now();
    match opt.update(&state, slow) {
        Err(Error::Timeout(d)) => assert_eq!(d, timeout),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // It gave up on time, not when the work ended.
    assert!(started.elapsed() < Duration::from_secs(30));
    wait_out(&ctx);
    // The timeout is shared with the optimizer's clone of the context: back to
    // the default, so the checks below do not race it.
    ctx.set_wait_timeout(polyak_gpu::DEFAULT_WAIT_TIMEOUT);
    let after = opt.download_params().unwrap();
    // The optimizer goes on: the readback buffer whose map was pending takes the
    // next steps' copies, and a step from here matches f64.
    let state = opt.init_state(fixed(&g, 0.5)).unwrap();
    let g2 = random(3, n);
    let (state, _, _) = check_step(&mut opt, &state, &after, &vec![0.0; n], &g2, 0.25);
    assert_eq!(state.iter_num, 1);
    (p0, after)
}

#[test]
fn a_timed_out_host_mode_step_leaves_the_parameters_as_they_were() {
    // The update is submitted only after the readback: it never was.
    let (p0, after) = slow_step_then_go_on(StepSizeMode::Host, WaitMode::Block);
    assert_eq!(after, p0);
}

#[test]
fn a_spinning_wait_gives_up_on_time_too() {
    let (p0, after) = slow_step_then_go_on(StepSizeMode::Host, WaitMode::Spin);
    assert_eq!(after, p0);
    let (p0, after) = slow_step_then_go_on(StepSizeMode::Device, WaitMode::Spin);
    assert_ne!(after, p0);
}

/// Ten steps of a momentum run whose objective keeps the device busy first (so a
/// wait that returned before the work was done would read no scalars or those of
/// the step before), pipelined or not: the last state and the bits of the
/// parameters and velocity.
fn busy_run(wait: WaitMode, mode: StepSizeMode, sync_every: usize) -> (String, Vec<u64>) {
    let ctx = common::ctx();
    ctx.set_wait_mode(wait);
    assert_eq!(ctx.wait_mode(), wait);
    let n = 4099;
    let cfg = PolyakConfig::default()
        .momentum(0.9)
        .stepsize_mode(mode)
        .sync_every(sync_every);
    let mut opt = PolyakSgd::new(&ctx, cfg, &random(1, n)).unwrap();
    let spin = Spin::lasting(&ctx, Duration::from_millis(20));
    let busy = |ev: &mut Evaluation<'_>, k: &usize| {
        spin.encode(ev.encoder());
        ev.write_grads(&random(10 + *k as u64, n))?;
        Ok((Loss::Host(0.5 + *k as f64), ()))
    };
    let state = opt.run_iterator(busy, 0..11).unwrap();
    assert_eq!(state.iter_num, 10);
    (format!("{state:?}"), common::bits(&opt))
}

#[test]
fn spinning_and_blocking_waits_give_the_same_steps() {
    for (mode, sync_every) in [
        (StepSizeMode::Host, 1),
        (StepSizeMode::Device, 1),
        (StepSizeMode::Device, 4),
    ] {
        let block = busy_run(WaitMode::Block, mode, sync_every);
        let spin = busy_run(WaitMode::Spin, mode, sync_every);
        assert_eq!(block, spin, "{mode:?}, {sync_every} steps per wait");
    }
}

#[test]
fn a_timed_out_device_mode_step_still_lands_once_its_work_is_done() {
    // The update is in the same submission as the objective, as documented.
    let (p0, after) = slow_step_then_go_on(StepSizeMode::Device, WaitMode::Block);
    assert_ne!(after, p0);
}

#[test]
fn waits_spin_on_a_gpu_and_block_on_a_cpu_adapter_by_default() {
    let ctx = common::ctx();
    let cpu = ctx
        .adapter_info()
        .is_some_and(|i| i.device_type == wgpu::DeviceType::Cpu);
    let expected = if cpu { WaitMode::Block } else { WaitMode::Spin };
    assert_eq!(ctx.wait_mode(), expected);
    // shared by clones, as the timeout
    let clone = ctx.clone();
    clone.set_wait_mode(WaitMode::Spin);
    assert_eq!(ctx.wait_mode(), WaitMode::Spin);
    clone.set_wait_mode(WaitMode::Block);
    assert_eq!(ctx.wait_mode(), WaitMode::Block);
}

#[test]
fn the_default_wait_timeout_is_a_minute() {
    let ctx = common::ctx();
    assert_eq!(ctx.wait_timeout(), polyak_gpu::DEFAULT_WAIT_TIMEOUT);
    assert_eq!(ctx.wait_timeout(), Duration::from_secs(60));
}
