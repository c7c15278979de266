//! polyak-bench: times a Polyak step per size against the memory-bandwidth floor and
//! a multi-threaded CPU baseline.
//!
//! ```text
//! cargo run --release --bin polyak-bench -- --sizes 1e4,1e6,1e7,1e8 --momentum both --json out.json
//! ```

use indicatif::{ProgressBar, ProgressStyle};
use polyak_gpu::bench::{self, CopyBench, CpuBaseline, RoundTrip, fill};
use polyak_gpu::{
    AdapterChoice, ContextOptions, Evaluation, ExternalTensor, GpuContext, Loss, ParamDtype,
    PolyakConfig, PolyakSgd, PolyakSgdBuilder, Result, StepSizeMode, TensorSpec, VelocityDtype,
    WaitMode,
};
use serde_json::{Value, json};
use std::time::Instant;
use wgpu::util::DeviceExt;

const HELP: &str = "polyak-bench: ms per Polyak step vs the copy-rate floor and a CPU baseline

options:
  --sizes LIST        parameter counts, e.g. 1e4,1e6,1e7,1e8 (default)
  --momentum M        on | off | both (default both)
  --adapter A         gpu (default: high-performance adapter) | software (lavapipe)
  --reps N            timed steps per size after warm-up (default 20)
  --warmup N          untimed steps first (default 3)
  --cpu-max N         largest size for the CPU baseline (default 1e9)
  --max-workgroups N  cap on workgroups per dispatch (default: by adapter)
  --workgroup-size N  invocations per workgroup, a power of two (default 256)
  --unroll U          vec4s each invocation loads per loop iteration: 1, 2, 4, 8
                      (default 1)
  --one-pass-limit N  largest gradient whose norm and step size one workgroup
                      computes in one dispatch (default 16384; 0: never)
  --deferred on|off   submit each update with the next step (default off)
  --wait block|spin   how each wait for the GPU waits (default: spin on a GPU,
                      block on a CPU adapter; the fixed overhead is measured both
                      ways whatever this says)
  --stepsize M        host | device: where the step size is computed (default host;
                      the fixed overhead is measured every way whatever this says)
  --sync-every K      with --stepsize device: steps submitted per wait (default 1)
  --velocity f32|f16   how the velocity is stored (default: like the parameters)
  --dtype f32|f64      the parameters' precision (default f32)
  --norm-from-objective on|off
                      the objective writes the squared-norm partials (20 / 12 bytes
                      per parameter instead of 24 / 16; default off)
  --check-overflow on|off
                      refuse steps whose update would overflow (the norm pass also
                      reads p and v: 32 / 20 bytes per parameter; default off)
  --tensors K         split each size into K tensors (default 1)
  --tensors-in W      owned | arena | separate: the optimizer's own buffers (default),
                      user buffers with the tensors back to back (one run), or a pair
                      of user buffers per tensor (two dispatches per tensor)
  --json FILE         also write the results as JSON
";

/// Where the benchmark's tensors live (`--tensors-in`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Storage {
    Owned,
    Arena,
    Separate,
}

struct Args {
    sizes: Vec<usize>,
    momentum: Vec<bool>,
    adapter: AdapterChoice,
    reps: usize,
    warmup: usize,
    cpu_max: usize,
    max_workgroups: Option<u32>,
    workgroup_size: Option<u32>,
    unroll: Option<u32>,
    one_pass_limit: Option<usize>,
    wait: Option<WaitMode>,
    deferred: bool,
    stepsize: StepSizeMode,
    sync_every: usize,
    norm_from_objective: bool,
    check_overflow: bool,
    velocity: VelocityDtype,
    dtype: ParamDtype,
    tensors: usize,
    storage: Storage,
    json: Option<String>,
}

fn parse_count(s: &str) -> std::result::Result<usize, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|x| *x >= 1.0 && x.is_finite())
        .map(|x| x as usize)
        .ok_or_else(|| format!("not a count: {s:?}"))
}

fn parse_args() -> std::result::Result<Args, String> {
    let mut a = Args {
        sizes: vec![10_000, 1_000_000, 10_000_000, 100_000_000],
        momentum: vec![true, false],
        adapter: AdapterChoice::HighPerformance,
        reps: 20,
        warmup: 3,
        cpu_max: 1_000_000_000,
        max_workgroups: None,
        workgroup_size: None,
        unroll: None,
        one_pass_limit: None,
        wait: None,
        deferred: false,
        stepsize: StepSizeMode::Host,
        sync_every: 1,
        norm_from_objective: false,
        check_overflow: false,
        velocity: VelocityDtype::Full,
        dtype: ParamDtype::F32,
        tensors: 1,
        storage: Storage::Owned,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sizes" => {
                a.sizes = value
                    .split(',')
                    .map(parse_count)
                    .collect::<std::result::Result<_, _>>()?
            }
            "--momentum" => {
                a.momentum = match value.as_str() {
                    "on" => vec![true],
                    "off" => vec![false],
                    "both" => vec![true, false],
                    _ => return Err(format!("--momentum on|off|both, not {value:?}")),
                }
            }
            "--adapter" => {
                a.adapter = match value.as_str() {
                    "gpu" => AdapterChoice::HighPerformance,
                    "software" => AdapterChoice::Software,
                    _ => return Err(format!("--adapter gpu|software, not {value:?}")),
                }
            }
            "--reps" => a.reps = parse_count(&value)?,
            "--warmup" => a.warmup = parse_count(&value).unwrap_or(0),
            "--cpu-max" => a.cpu_max = parse_count(&value)?,
            "--max-workgroups" => a.max_workgroups = Some(parse_count(&value)? as u32),
            "--workgroup-size" => a.workgroup_size = Some(parse_count(&value)? as u32),
            "--unroll" => a.unroll = Some(parse_count(&value)? as u32),
            "--one-pass-limit" if value.trim() == "0" => a.one_pass_limit = Some(0),
            "--one-pass-limit" => a.one_pass_limit = Some(parse_count(&value)?),
            "--deferred" => a.deferred = value == "on",
            "--wait" => {
                a.wait = match value.as_str() {
                    "block" => Some(WaitMode::Block),
                    "spin" => Some(WaitMode::Spin),
                    _ => return Err(format!("--wait: block or spin, not {value:?}")),
                }
            }
            "--stepsize" => {
                a.stepsize = match value.as_str() {
                    "host" => StepSizeMode::Host,
                    "device" => StepSizeMode::Device,
                    _ => return Err(format!("--stepsize host|device, not {value:?}")),
                }
            }
            "--sync-every" => a.sync_every = parse_count(&value)?,
            "--norm-from-objective" => a.norm_from_objective = value == "on",
            "--check-overflow" => a.check_overflow = value == "on",
            "--dtype" => {
                a.dtype = match value.as_str() {
                    "f32" => ParamDtype::F32,
                    "f64" => ParamDtype::F64,
                    _ => return Err(format!("--dtype f32|f64, not {value:?}")),
                }
            }
            "--velocity" => {
                a.velocity = match value.as_str() {
                    "f32" => VelocityDtype::Full,
                    "f16" => VelocityDtype::F16,
                    _ => return Err(format!("--velocity f32|f16, not {value:?}")),
                }
            }
            "--tensors" => a.tensors = parse_count(&value)?,
            "--tensors-in" => {
                a.storage = match value.as_str() {
                    "owned" => Storage::Owned,
                    "arena" => Storage::Arena,
                    "separate" => Storage::Separate,
                    _ => return Err(format!("--tensors-in owned|arena|separate, not {value:?}")),
                }
            }
            "--json" => a.json = Some(value),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(a)
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.1), at(0.9))
}

/// The objective of a benchmark step: the gradient is already in place (filled on
/// the device) and the loss is fixed at 0.5. Under the host rule it is handed over
/// on the host; under the device rule it is copied from `loss` into the loss slot,
/// as a GPU objective's kernel writes it every evaluation. With
/// `--norm-from-objective` it copies its squared-norm partials from `partials`, as a
/// gradient kernel would write them.
fn keep(
    ev: &mut Evaluation<'_>,
    loss: &wgpu::Buffer,
    stepsize: StepSizeMode,
    partials: Option<&wgpu::Buffer>,
) -> Result<(Loss, ())> {
    if let (Some(src), Some(dst)) = (partials, ev.buffers().norm_partials_binding()) {
        let dst = dst.buffer.clone();
        ev.encoder()
            .copy_buffer_to_buffer(src, 0, &dst, 0, src.size());
    }
    Ok(match stepsize {
        StepSizeMode::Host => (Loss::Host(0.5), ()),
        StepSizeMode::Device => {
            let slot = ev.buffers().scalars_buffer().clone();
            ev.encoder()
                .copy_buffer_to_buffer(loss, 0, &slot, 0, loss.size());
            (Loss::Device, ())
        }
    })
}

/// ms per step of `opt` over `reps` steps after `warmup`: each step's wall clock, or
/// when steps are pipelined (`sync_every > 1`), the mean of each of five
/// `run_iterator` calls of `reps` steps.
fn time_steps(
    opt: &mut PolyakSgd,
    warmup: usize,
    reps: usize,
    partials: Option<&wgpu::Buffer>,
) -> Result<Vec<f64>> {
    let mode = opt.config().stepsize_mode;
    // The loss a GPU objective writes into the slot, in the parameters' type.
    let loss: Vec<u8> = match opt.config().dtype.bytes() {
        8 => bytemuck::bytes_of(&0.5f64).to_vec(),
        _ => bytemuck::bytes_of(&0.5f32).to_vec(),
    };
    let loss = opt
        .context()
        .device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("bench loss"),
            contents: &loss,
            usage: wgpu::BufferUsages::COPY_SRC,
        });
    let keep = |ev: &mut Evaluation<'_>| keep(ev, &loss, mode, partials);
    if opt.config().sync_every > 1 {
        let batched = |ev: &mut Evaluation<'_>, _: &usize| keep(ev);
        opt.run_iterator(batched, 0..=warmup)?;
        return (0..5)
            .map(|_| {
                let t0 = Instant::now();
                opt.run_iterator(batched, 0..=reps)?;
                Ok(t0.elapsed().as_secs_f64() * 1e3 / reps as f64)
            })
            .collect();
    }
    let mut state = opt.init_state(keep)?;
    for _ in 0..warmup {
        state = opt.update(&state, keep)?;
    }
    opt.flush()?;
    opt.context().wait()?;
    let mut times = Vec::with_capacity(reps);
    for i in 0..reps {
        let t0 = Instant::now();
        state = opt.update(&state, keep)?;
        if i + 1 == reps {
            // the last update is not waited for by a next step
            opt.flush()?;
            opt.context().wait()?;
        }
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

fn config(momentum: bool, stepsize: StepSizeMode, sync_every: usize) -> PolyakConfig {
    // A tiny cap keeps parameters bounded however many steps the benchmark takes.
    PolyakConfig::default()
        .momentum(if momentum { 0.9 } else { 0.0 })
        .max_stepsize(1e-3)
        .stepsize_mode(stepsize)
        .sync_every(sync_every)
        .maxiter(usize::MAX)
}

/// Partials a `--norm-from-objective` objective writes (one per workgroup of a
/// grid-stride gradient kernel of that size).
const BENCH_PARTIALS: usize = 2048;

/// Steps per wait of the pipelined fixed-overhead figure.
const PIPELINE: usize = 16;

/// Median ms of a step at N = 4, where everything but the round trip is nil.
fn fixed_overhead(
    ctx: &GpuContext,
    args: &Args,
    stepsize: StepSizeMode,
    sync_every: usize,
) -> Result<f64> {
    let mut tiny = PolyakSgd::new(ctx, config(true, stepsize, sync_every), &[0.5; 4])?;
    tiny.set_deferred_updates(args.deferred)?;
    fill(&tiny, false, 3, 1e-3)?;
    let mut times = time_steps(&mut tiny, args.warmup.max(3), args.reps.max(20), None)?;
    Ok(stats(&mut times).0)
}

fn wait_name(w: WaitMode) -> &'static str {
    match w {
        WaitMode::Block => "block",
        WaitMode::Spin => "spin",
    }
}

fn mode_name(m: StepSizeMode) -> &'static str {
    match m {
        StepSizeMode::Host => "host",
        StepSizeMode::Device => "device",
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{e}\n");
            }
            eprint!("{HELP}");
            std::process::exit(if e.is_empty() { 0 } else { 2 });
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("polyak-bench: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let ctx = GpuContext::with_options(ContextOptions {
        adapter: args.adapter,
        max_workgroups: args.max_workgroups,
        workgroup_size: args.workgroup_size,
        unroll: args.unroll,
        one_pass_limit: args.one_pass_limit,
        wait_mode: args.wait,
        // One copy-rate run is 20 copies in one submission: about a minute at 1e9
        // on lavapipe, past the default wait timeout.
        wait_timeout: Some(std::time::Duration::MAX),
        ..Default::default()
    })?;
    let info = ctx.adapter_info().cloned();
    let timestamps = ctx
        .device()
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY);
    println!("adapter: {}", ctx.describe());
    println!(
        "phase times from {}; {} workgroups max per dispatch, {} invocations each, {} vec4s per iteration; \
         norm in one dispatch up to {} elements; {} waits",
        if timestamps {
            "GPU timestamps"
        } else {
            "wall clock"
        },
        ctx.max_workgroups(),
        ctx.workgroup_size(),
        ctx.unroll(),
        ctx.one_pass_limit(),
        wait_name(ctx.wait_mode())
    );

    let cap = ctx
        .limits()
        .max_storage_buffer_binding_size
        .min(ctx.limits().max_buffer_size)
        / 4;
    // The floor is the faster of two copies of the same bytes: our vec4 copy kernel
    // (the same walk as the step) and the driver's buffer-to-buffer copy, each of
    // the largest size asked for, from 2^24 to 2^28 f32 (on an H200 the kernel
    // copied 256 MiB at 3.2-3.5 TB/s, below the step's own 4 TB/s at 1e8 and more:
    // each copy's start and drain weigh more on a short one).
    let largest = args.sizes.iter().copied().max().unwrap_or(0);
    let copy_n = largest.clamp(1 << 24, 1 << 28).min(cap as usize);
    let copy = CopyBench::new(&ctx, copy_n)?;
    let kernel_gbps = copy.gbps(20)?;
    let transfer_gbps = copy.transfer_gbps(20)?;
    drop(copy);
    let copy_gbps = kernel_gbps.max(transfer_gbps);
    println!(
        "copy rate: {copy_gbps:.1} GB/s ({kernel_gbps:.1} by the vec4 copy kernel, \
         {transfer_gbps:.1} by copy_buffer_to_buffer; {copy_n} f32, read + write)"
    );

    // Fixed cost of a step, with the step size computed on either side, and with
    // the other way of waiting too (then back to the one asked for).
    let wait = ctx.wait_mode();
    let other = match wait {
        WaitMode::Block => WaitMode::Spin,
        WaitMode::Spin => WaitMode::Block,
    };
    let mut by_wait = serde_json::Map::new();
    let mut overheads = [f64::NAN; 3]; // host, device, pipelined, under `wait`
    for mode in [other, wait] {
        ctx.set_wait_mode(mode);
        let ms = [
            fixed_overhead(&ctx, args, StepSizeMode::Host, 1)?,
            fixed_overhead(&ctx, args, StepSizeMode::Device, 1)?,
            fixed_overhead(&ctx, args, StepSizeMode::Device, PIPELINE)?,
        ];
        println!(
            "fixed per-step overhead (N = 4), {} waits: {:.4} ms with the step size on \
             the host, {:.4} ms on the device, {:.4} ms on the device with {PIPELINE} steps \
             per wait",
            wait_name(mode),
            ms[0],
            ms[1],
            ms[2]
        );
        // What the device itself costs a waited step: the floor of the figures above.
        let trip = RoundTrip::measure(&ctx, args.reps.max(50))?;
        println!(
            "  the device's own round trip, {} waits: {:.4} ms for an empty submission, \
             {:.4} ms for a 4-byte readback, {:.4} ms after a copy and a tiny dispatch \
             (the device rule's small step), {:.4} ms after a copy and 2 (the host rule's)",
            wait_name(mode),
            trip.empty_ms,
            trip.readback_ms,
            trip.device_shape_ms,
            trip.host_shape_ms
        );
        by_wait.insert(
            wait_name(mode).into(),
            json!({"host": ms[0], "device": ms[1], "pipelined": ms[2],
                   "empty_submission": trip.empty_ms, "readback_4_bytes": trip.readback_ms,
                   "device_rule_shape": trip.device_shape_ms,
                   "host_rule_shape": trip.host_shape_ms}),
        );
        if mode == wait {
            overheads = ms;
        }
    }
    let [overhead_host_ms, overhead_device_ms, overhead_pipelined_ms] = overheads;
    let overhead_ms = match (args.stepsize, args.sync_every) {
        (StepSizeMode::Host, _) => overhead_host_ms,
        (StepSizeMode::Device, 1) => overhead_device_ms,
        (StepSizeMode::Device, k) => fixed_overhead(&ctx, args, StepSizeMode::Device, k)?,
    };
    println!(
        "rows below: step size on the {}, {} step(s) per wait, {} tensor(s) in {} buffers\n",
        mode_name(args.stepsize),
        args.sync_every,
        args.tensors,
        match args.storage {
            Storage::Owned => "the optimizer's",
            Storage::Arena => "one pair of user",
            Storage::Separate => "separate user",
        }
    );

    let total = args.sizes.len() * args.momentum.len();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for &n in &args.sizes {
        for &momentum in &args.momentum {
            bar.set_message(format!(
                "N = {n:e}, momentum {}",
                if momentum { "on" } else { "off" }
            ));
            rows.push(measure(&ctx, args, n, momentum, copy_gbps));
            bar.inc(1);
        }
    }
    // The CPU baselines run after every GPU measurement: freeing their gigabytes of
    // host memory was seen to disturb the GPU step timed right after (H200, 1e9).
    bar.set_message("CPU baseline");
    for row in rows.iter_mut().filter(|r| r.get("error").is_none()) {
        let n = row["n"].as_u64().unwrap_or(0) as usize;
        if n <= args.cpu_max {
            let (ms, threads) = cpu_baseline(args, n, row["momentum"].as_bool() == Some(true));
            row["cpu_ms"] = json!(ms);
            row["cpu_threads"] = json!(threads);
        }
    }
    bar.finish_and_clear();

    println!(
        "{:>12} {:>4} {:>10} {:>17} {:>9} {:>9} {:>8} {:>9} {:>7} {:>6} {:>10} {:>8}",
        "N",
        "mom",
        "step ms",
        "p10-p90 ms",
        "norm ms",
        "upd ms",
        "GB/s",
        "floor ms",
        "%floor",
        "dev%",
        "CPU ms",
        "CPU/GPU"
    );
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        if let Some(e) = r.get("error") {
            println!(
                "{:>12} {:>4}  {}",
                r["n"],
                mom(r),
                e.as_str().unwrap_or("?")
            );
            continue;
        }
        println!(
            "{:>12} {:>4} {:>10.4} {:>8.4}-{:<8.4} {:>9.4} {:>9.4} {:>8.1} {:>9.4} {:>6.1}% {:>5.0}% {:>10} {:>8}",
            r["n"].as_u64().unwrap_or(0),
            mom(r),
            f("step_ms"),
            f("step_ms_p10"),
            f("step_ms_p90"),
            f("norm_ms"),
            f("update_ms"),
            f("gbps"),
            f("floor_ms"),
            f("pct_of_floor"),
            f("device_pct_of_floor"),
            r["cpu_ms"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.4}")),
            r["cpu_ms"]
                .as_f64()
                .map_or("-".into(), |v| format!("{:.1}x", v / f("step_ms"))),
        );
    }
    println!(
        "\nfloor = bytes per parameter ({} with momentum, {} without) x N / copy rate;",
        bytes_per_param(args, true),
        bytes_per_param(args, false)
    );
    println!(
        "%floor = floor / step time (100% = as fast as a copy of the same bytes); \
         dev% = floor / (norm + update device time)"
    );
    println!("peak host RSS: {:.0} MiB", bench::peak_rss_mib());

    if let Some(path) = &args.json {
        let out = json!({
            "tool": "polyak-bench",
            "adapter": info.as_ref().map(|i| i.name.clone()),
            "backend": info.as_ref().map(|i| format!("{:?}", i.backend)),
            "driver": info.as_ref().map(|i| format!("{} {}", i.driver, i.driver_info)),
            "timestamps": timestamps,
            "max_workgroups": ctx.max_workgroups(),
            "workgroup_size": ctx.workgroup_size(),
            "unroll": ctx.unroll(),
            "one_pass_limit": ctx.one_pass_limit(),
            "deferred_updates": args.deferred,
            "stepsize_mode": mode_name(args.stepsize),
            "copy_GBps": copy_gbps,
            "copy_kernel_GBps": kernel_gbps,
            "copy_buffer_to_buffer_GBps": transfer_gbps,
            "overhead_ms": overhead_ms,
            "overhead_host_ms": overhead_host_ms,
            "overhead_device_ms": overhead_device_ms,
            "overhead_pipelined_ms": overhead_pipelined_ms,
            "wait_mode": wait_name(wait),
            "overhead_ms_by_wait": by_wait,
            "pipelined_sync_every": PIPELINE,
            "sync_every": args.sync_every,
            "norm_from_objective": args.norm_from_objective,
            "check_overflow": args.check_overflow,
            "velocity_dtype": format!("{:?}", args.velocity),
            "dtype": format!("{:?}", args.dtype),
            "tensors": args.tensors,
            "tensors_in": format!("{:?}", args.storage),
            "peak_rss_MiB": bench::peak_rss_mib(),
            "rows": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out).unwrap_or_default())
            .map_err(|e| polyak_gpu::Error::Data(format!("{path}: {e}")))?;
        println!("wrote {path}");
    }
    Ok(())
}

/// Median ms per step of the multi-threaded CPU baseline, and its thread count.
fn cpu_baseline(args: &Args, n: usize, momentum: bool) -> (f64, usize) {
    let mut cpu = CpuBaseline::new(n, momentum, 0);
    let cfg = config(momentum, StepSizeMode::Host, 1);
    for _ in 0..args.warmup {
        cpu.step(0.5, &cfg);
    }
    let mut times: Vec<f64> = (0..args.reps.min(10))
        .map(|_| {
            let t0 = Instant::now();
            cpu.step(0.5, &cfg);
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    (stats(&mut times).0, cpu.threads())
}

fn mom(r: &Value) -> &'static str {
    if r["momentum"].as_bool() == Some(true) {
        "on"
    } else {
        "off"
    }
}

/// The optimizer's own traffic per parameter and step: the norm reads g (not when
/// the objective computes the norm; and p and v too with the overflow check), the
/// update reads p and g and writes p, and reads and writes v.
fn bytes_per_param(args: &Args, momentum: bool) -> usize {
    let real = args.dtype.bytes() as usize;
    let velocity = if momentum {
        args.velocity.bytes(args.dtype) as usize
    } else {
        0
    };
    let norm = match (args.norm_from_objective, args.check_overflow) {
        (true, _) => 0,
        (false, false) => real,
        (false, true) => 2 * real + velocity,
    };
    norm + 3 * real + 2 * velocity
}

/// Adds `n` parameters to `builder` as `--tensors` tensors stored as `--tensors-in`
/// says: lengths a multiple of 4 (the last one takes the rest), user buffers
/// zeroed.
fn tensors(
    ctx: &GpuContext,
    mut builder: PolyakSgdBuilder,
    args: &Args,
    n: usize,
) -> PolyakSgdBuilder {
    let k = args.tensors.clamp(1, n.div_ceil(4));
    let each = (n / k) / 4 * 4;
    let lens: Vec<usize> = (0..k)
        .map(|i| if i + 1 < k { each } else { n - each * (k - 1) })
        .collect();
    let real = args.dtype.bytes();
    let buffer = |len: usize| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("bench user tensor"),
            size: (len as u64 * real).next_multiple_of(16),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    };
    let arena = (args.storage == Storage::Arena).then(|| (buffer(n), buffer(n)));
    let mut at = 0;
    for (i, &len) in lens.iter().enumerate() {
        let spec = TensorSpec::new(format!("t{i}"), &[len]);
        builder = match (args.storage, &arena) {
            (Storage::Arena, Some((p, g))) => builder.external(ExternalTensor {
                spec,
                params: p.clone(),
                params_offset: at,
                grads: g.clone(),
                grads_offset: at,
            }),
            (Storage::Separate, _) => builder.external(ExternalTensor {
                spec,
                params: buffer(len),
                params_offset: 0,
                grads: buffer(len),
                grads_offset: 0,
            }),
            _ => builder.tensor(spec),
        };
        at += len as u64 * real;
    }
    builder
}

fn measure(ctx: &GpuContext, args: &Args, n: usize, momentum: bool, copy_gbps: f64) -> Value {
    let bytes_per_param = bytes_per_param(args, momentum);
    let mut row = json!({"n": n, "momentum": momentum, "bytes_per_param": bytes_per_param});
    let velocity = if momentum {
        args.velocity.bytes(args.dtype)
    } else {
        0
    };
    let vectors = (n as u64) * (2 * args.dtype.bytes() + velocity);
    // On a CPU adapter the "device" memory is host memory: leave room for the baseline.
    if ctx.available_memory().is_some_and(|a| 2 * vectors > a) {
        row["error"] = json!(format!(
            "skipped: {} GB of vectors do not fit in host memory",
            vectors as f64 / 1e9
        ));
        return row;
    }
    let gpu = (|| -> Result<Value> {
        let cfg = config(momentum, args.stepsize, args.sync_every)
            .velocity_dtype(args.velocity)
            .dtype(args.dtype)
            .check_overflow(args.check_overflow);
        let mut builder = tensors(ctx, PolyakSgd::builder(ctx, cfg), args, n);
        let mut partials = None;
        if args.norm_from_objective {
            builder = builder.norm_from_objective(BENCH_PARTIALS);
            let values = vec![1e-3f32; BENCH_PARTIALS];
            partials = Some(
                ctx.device()
                    .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some("bench norm partials"),
                        contents: bytemuck::cast_slice(&values),
                        usage: wgpu::BufferUsages::COPY_SRC,
                    }),
            );
        }
        let mut opt = builder.build()?;
        opt.set_deferred_updates(args.deferred)?;
        fill(&opt, true, 1, 1.0)?;
        fill(&opt, false, 2, 1e-3)?;
        let mut times = time_steps(&mut opt, args.warmup, args.reps, partials.as_ref())?;
        let (med, p10, p90) = stats(&mut times);
        let phases = opt.time_phases(args.reps.min(10))?;
        let floor_ms = (bytes_per_param * n) as f64 / (copy_gbps * 1e9) * 1e3;
        Ok(json!({
            "step_ms": med, "step_ms_p10": p10, "step_ms_p90": p90,
            "norm_ms": phases.norm_ms, "update_ms": phases.update_ms,
            "gbps": (bytes_per_param * n) as f64 / (med * 1e-3) / 1e9,
            "floor_ms": floor_ms,
            "pct_of_floor": 100.0 * floor_ms / med,
            "device_pct_of_floor": 100.0 * floor_ms / (phases.norm_ms + phases.update_ms),
            "device_bytes": opt.device_bytes(),
            "scratch_bytes": opt.scratch_bytes(),
            "segments": opt.buffers().layout().segment_lens().len(),
            "tensors": opt.buffers().layout().tensors().len(),
            "tensors_in": format!("{:?}", args.storage),
            "dispatches_per_step": opt.dispatches_per_step(),
        }))
    })();
    match gpu {
        Ok(v) => {
            for (k, x) in v.as_object().into_iter().flatten() {
                row[k] = x.clone();
            }
        }
        Err(e) => {
            row["error"] = json!(format!("does not fit or failed: {e}"));
            return row;
        }
    }
    row
}
