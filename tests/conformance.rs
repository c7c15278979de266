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
