//! Replays every case of a jaxopt PolyakSGD reference file on the f64 CPU reference
//! and on the f32 GPU path, prints one line per case, and exits non-zero if any fails.
//!
//! ```text
//! cargo run --release --example conformance -- tests/data/jaxopt_polyak_reference.json
//! cargo run --release --example conformance -- FILE.json --software   # force lavapipe
//! cargo run --release --example conformance -- FILE.json --device-step # f32 rule on the GPU
//! cargo run --release --example conformance -- FILE.json --f64         # GPU path in f64
//! ```

use polyak_gpu::conformance::{ReferenceFile, compare_f32, compare_f64, replay_cpu, replay_gpu};
use polyak_gpu::{GpuContext, ParamDtype, StepSizeMode};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let software = args.iter().any(|a| a == "--software");
    let device_step = args.iter().any(|a| a == "--device-step");
    let f64_path = args.iter().any(|a| a == "--f64");
    let path = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| "tests/data/jaxopt_polyak_reference.json".into());
    let mut file = match ReferenceFile::load(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let ctx = match if software {
        GpuContext::software()
    } else {
        GpuContext::new()
    } {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    for case in &mut file.cases {
        if device_step {
            case.config.stepsize_mode = StepSizeMode::Device;
        }
        if f64_path {
            case.config.dtype = ParamDtype::F64;
        }
    }
    let gpu = if f64_path { "f64 GPU" } else { "f32 GPU" };
    println!(
        "{path}: {} cases on {}, {gpu} path, step size on the {}",
        file.cases.len(),
        ctx.describe(),
        if device_step { "GPU" } else { "CPU" }
    );
    println!(
        "{:<26} {:<12} {:>9}   {:<44} {:<44} result",
        "case",
        "method",
        "iters",
        "f64 CPU: params value stepsize error",
        format!("{gpu}: params value stepsize error")
    );
    let mut failed = 0;
    for case in &file.cases {
        let cpu = replay_cpu(case).map(|r| compare_f64(case, &r));
        let gpu_result = replay_gpu(&ctx, case).map(|r| {
            if f64_path {
                compare_f64(case, &r)
            } else {
                compare_f32(case, &r)
            }
        });
        let fmt = |c: &polyak_gpu::conformance::Comparison| {
            format!(
                "{:8.1e} {:8.1e} {:8.1e} {:8.1e}      ",
                c.params, c.value, c.stepsize, c.error
            )
        };
        let (cpu_s, gpu_s, iters, ok) = match (&cpu, &gpu_result) {
            (Ok(c), Ok(g)) => (
                fmt(c),
                fmt(g),
                format!("{}/{}/{}", c.iter_num, g.iter_num, case.run_result.iter_num),
                c.passed() && g.passed(),
            ),
            _ => (String::new(), String::new(), String::new(), false),
        };
        println!(
            "{:<26} {:<12} {:>9}   {:<44} {:<44} {}",
            case.name,
            format!("{:?}", case.method),
            iters,
            cpu_s,
            gpu_s,
            if ok { "PASS" } else { "FAIL" }
        );
        for (path, r) in [("f64 CPU", &cpu), (gpu, &gpu_result)] {
            match r {
                Ok(c) => c
                    .failures
                    .iter()
                    .take(5)
                    .for_each(|f| println!("    {path}: {f}")),
                Err(e) => println!("    {path}: error: {e}"),
            }
        }
        failed += usize::from(!ok);
    }
    println!("iters = ours f64 CPU / ours {gpu} / jaxopt f64");
    println!("{} passed, {} failed", file.cases.len() - failed, failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
