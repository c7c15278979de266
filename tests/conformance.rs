//! Every case of jaxopt's recorded trajectories, on the f64 CPU reference and on the
//! f32 GPU path.

mod common;

use polyak_gpu::conformance::{
    Problem, ReferenceFile, compare_f32, compare_f64, replay_cpu, replay_gpu,
};

const FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/jaxopt_polyak_reference.json"
);

fn file() -> ReferenceFile {
    ReferenceFile::load(FILE).expect("reference file")
}

#[test]
fn the_public_file_has_the_expected_cases() {
    let names: Vec<String> = file().cases.iter().map(|c| c.name.clone()).collect();
    assert_eq!(
        names,
        [
            "a_lsq_interp_m0",
            "b_lsq_interp_m09",
            "c_lsq_interp_cap001",
            "e_logreg_separable",
            "f_pytree_linear",
            "h_at_optimum_delta0",
            "h_at_optimum_delta1e-3"
        ]
    );
}

#[test]
fn generator_reproduces_the_materialised_data() {
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(FILE).unwrap()).unwrap();
    for case in raw["cases"].as_array().unwrap() {
        let p = &case["problem"];
        assert_eq!(
            Problem::generate(p).unwrap(),
            Problem::from_json(p).unwrap(),
            "{}",
            case["name"]
        );
    }
}

#[test]
fn f64_cpu_reference_matches_jaxopt_to_1e12() {
    for case in &file().cases {
        let c = compare_f64(case, &replay_cpu(case).unwrap());
        assert!(c.passed(), "{}: {:?}", case.name, c.failures);
        assert_eq!(c.iter_num, case.run_result.iter_num, "{}", case.name);
        assert!(c.params <= 1e-12, "{}: {}", case.name, c.params);
    }
}

#[test]
fn f32_gpu_path_matches_jaxopt_within_the_float32_acceptance() {
    let ctx = common::ctx();
    for case in &file().cases {
        let c = compare_f32(case, &replay_gpu(&ctx, case).unwrap());
        assert!(c.passed(), "{}: {:?}", case.name, c.failures);
        assert_eq!(c.iter_num, case.run_result.iter_num, "{}", case.name);
    }
}

#[test]
fn f32_gpu_path_with_the_step_size_on_the_device_matches_jaxopt_too() {
    // Waiting every step, and with run / run_iterator submitting 8 steps per wait.
    let ctx = common::ctx();
    for sync_every in [1, 8] {
        for case in &file().cases {
            let mut case = case.clone();
            case.config.stepsize_mode = polyak_gpu::StepSizeMode::Device;
            case.config.sync_every = sync_every;
            let c = compare_f32(&case, &replay_gpu(&ctx, &case).unwrap());
            assert!(c.passed(), "{} / {sync_every}: {:?}", case.name, c.failures);
            assert_eq!(c.iter_num, case.run_result.iter_num, "{}", case.name);
        }
    }
}

#[test]
fn the_comparison_catches_a_wrong_trajectory() {
    // A solver with another max_stepsize must fail the comparison: the check can fail.
    let mut case = file().cases[0].clone();
    case.config.max_stepsize = 0.5;
    let c = compare_f64(&file().cases[0], &replay_cpu(&case).unwrap());
    assert!(!c.passed());
    let ctx = common::ctx();
    let g = compare_f32(&file().cases[0], &replay_gpu(&ctx, &case).unwrap());
    assert!(!g.passed());
}

/// Expected data made by the f64 reference, for shapes the public file lacks.
fn with_cpu_expectations(
    mut case: polyak_gpu::conformance::Case,
    ks: std::ops::RangeInclusive<usize>,
) -> polyak_gpu::conformance::Case {
    use polyak_gpu::conformance::Entry;
    case.entries = ks
        .map(|k| Entry {
            iter_num: k,
            params: polyak_gpu::conformance::Recorded::Full(vec![]),
            value: 0.0,
            stepsize: 0.0,
            error: 0.0,
            velocity: None,
            num_fun_eval: 0,
            num_grad_eval: 0,
            batch: None,
        })
        .collect();
    let cpu = replay_cpu(&case).unwrap();
    case.entries = cpu.entries.iter().map(Entry::from).collect();
    case.run_result = Entry::from(&cpu.run);
    case
}

#[test]
fn run_iterator_minibatches_agree_between_the_gpu_and_the_f64_reference() {
    use polyak_gpu::conformance::Method;
    let ctx = common::ctx();
    for base in [0, 1, 3] {
        let mut case = file().cases[base].clone();
        case.method = Method::RunIterator;
        case.config.maxiter = 40;
        let case = with_cpu_expectations(case, 0..=40);
        let cpu = replay_cpu(&case).unwrap();
        assert_eq!(cpu.run.state.iter_num, 40);
        assert_eq!(cpu.run.state.num_fun_eval, 41);
        // the minibatch losses differ from the full-batch run
        let full = replay_cpu(&file().cases[base]).unwrap();
        assert_ne!(cpu.entries[5].state.value, full.entries[5].state.value);
        let g = compare_f32(&case, &replay_gpu(&ctx, &case).unwrap());
        assert!(g.passed(), "{}: {:?}", case.name, g.failures);
    }
    // the pytree problem has 16 rows: too few for 4 batches of 8 out of 32
    let mut case = file().cases[4].clone();
    case.method = Method::RunIterator;
    assert!(matches!(replay_cpu(&case), Err(polyak_gpu::Error::Data(_))));
}

#[test]
fn rosenbrock_early_steps_agree_between_the_gpu_and_the_f64_reference() {
    let ctx = common::ctx();
    let mut case = file().cases[1].clone(); // momentum 0.9
    case.problem = Problem::Rosenbrock;
    case.tensors = vec![polyak_gpu::TensorSpec::new(".", &[2])];
    case.init_params = vec![-1.2, 1.0];
    case.config.maxiter = 300;
    let case = with_cpu_expectations(case, 0..=10);
    assert!(case.chaotic());
    let g = compare_f32(&case, &replay_gpu(&ctx, &case).unwrap());
    assert!(g.passed(), "{:?}", g.failures);
    assert!(g.params < 5e-2 && g.params > 0.0, "{}", g.params);
}

#[test]
fn f64_gpu_path_matches_jaxopt_to_1e12_like_the_cpu_reference() {
    // The whole step on the GPU in f64: host and device step size, and pipelined.
    let ctx = common::ctx();
    for (mode, sync_every) in [
        (polyak_gpu::StepSizeMode::Host, 1),
        (polyak_gpu::StepSizeMode::Device, 1),
        (polyak_gpu::StepSizeMode::Device, 8),
    ] {
        for case in &file().cases {
            let mut case = case.clone();
            case.config.dtype = polyak_gpu::ParamDtype::F64;
            case.config.stepsize_mode = mode;
            case.config.sync_every = sync_every;
            let c = compare_f64(&case, &replay_gpu(&ctx, &case).unwrap());
            assert!(c.passed(), "{} {mode:?}: {:?}", case.name, c.failures);
            assert_eq!(c.iter_num, case.run_result.iter_num, "{}", case.name);
            assert!(c.params <= 1e-12, "{} {mode:?}: {}", case.name, c.params);
        }
    }
}
