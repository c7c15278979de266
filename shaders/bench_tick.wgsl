// Benchmark only: the least work a dispatch can do (one invocation adds 1 to a
// counter), to time what a dispatch costs a waited step besides its work
// (bench::RoundTrip).

// binding 0: the counter.
@group(0) @binding(0) var<storage, read_write> counter: array<f32, 1>;

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32) {
    if (lid == 0u) {
        counter[0] = counter[0] + 1.0;
    }
}
