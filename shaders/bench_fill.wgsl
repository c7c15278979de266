// Benchmark data: fills a range with pseudo-random values in [-scale, scale), so that
// benchmarks run on non-zero data without a host upload. `real4` (f32 or f64) comes
// from the precision prelude (kernels.rs).

struct Fill {
    n4: u32,       // vec4s to fill
    seed: u32,     // stream
    groups_x: u32, // workgroups along x (one vec4 per invocation)
    _pad: u32,
    scale: f32,    // half-width of the range
    _pad1: f32,
    _pad2: f32,
    _pad3: f32,
}

// binding 0: the range to fill.
@group(0) @binding(0) var<storage, read_write> out: array<real4>;
// binding 1: what to fill it with.
@group(0) @binding(1) var<uniform> fill: Fill;

fn hash(x: u32) -> u32 {
    // PCG output permutation of an LCG step.
    let state = x * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn unit(x: u32) -> f32 {
    return f32(hash(x) >> 8u) * (2.0 / 16777216.0) - 1.0;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * fill.groups_x + wid.x) * 256u + lid;
    if (i >= fill.n4) {
        return;
    }
    let k = (i * 4u) ^ (fill.seed * 0x9E3779B9u);
    out[i] = real4(fill.scale * vec4<f32>(unit(k), unit(k + 1u), unit(k + 2u), unit(k + 3u)));
}
