// Squared L2 norm, pass 2 of 2: one workgroup sums all partials of pass 1 (every
// segment) in a fixed order and writes the squared norm next to the loss.

struct Count {
    n: u32,      // number of partials
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// binding 0: the partial sums written by norm_partials.wgsl.
@group(0) @binding(0) var<storage, read> partials: array<f32>;
// binding 1: the scalars slot: [0] = loss (written by the objective), [1] = squared norm.
@group(0) @binding(1) var<storage, read_write> scalars: array<f32, 2>;
// binding 2: how many partials there are.
@group(0) @binding(2) var<uniform> count: Count;

const WG: u32 = 256u;
var<workgroup> sums: array<f32, WG>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var i = lid; i < count.n; i += WG) {
        acc += partials[i];
    }
    sums[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            sums[lid] += sums[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        scalars[1] = sums[0];
    }
}
