//! Helpers shared by the integration tests.
#![allow(dead_code)]

use polyak_gpu::conformance::SplitMix64;
use polyak_gpu::{ContextOptions, GpuContext};

/// The adapter the tests run on: wgpu's choice (lavapipe on CI), honouring the usual
/// environment variables.
pub fn ctx() -> GpuContext {
    GpuContext::new().expect("a wgpu adapter (apt-get install -y mesa-vulkan-drivers)")
}

/// A context whose segments hold at most `n` elements, so the multi-segment paths run.
pub fn ctx_with_segments(n: usize) -> GpuContext {
    GpuContext::with_options(ContextOptions {
        max_segment_elements: Some(n),
        ..Default::default()
    })
    .expect("a wgpu adapter")
}

/// `n` values uniform in [-1, 1) as f32.
pub fn random(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.upm1() as f32).collect()
}

/// Squared norm in f64.
pub fn sqnorm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}
