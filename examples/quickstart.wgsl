// Least squares f(x) = 0.5 * ||A x - b||^2 / m, loss and gradient on the GPU.
// The example dispatches `residual`, then `gradient` and `loss`.

struct Dims {
    m: u32, // rows of A
    d: u32, // columns of A (= parameters)
    _pad0: u32,
    _pad1: u32,
}

// binding 0: A, m x d, row-major.
@group(0) @binding(0) var<storage, read> a: array<f32>;
// binding 1: b, m entries.
@group(0) @binding(1) var<storage, read> b: array<f32>;
// binding 2: scratch residual r = A x - b, m entries.
@group(0) @binding(2) var<storage, read_write> r: array<f32>;
// binding 3: the optimizer's parameters x (d entries).
@group(0) @binding(3) var<storage, read> x: array<f32>;
// binding 4: the optimizer's gradient buffer, written here (d entries).
@group(0) @binding(4) var<storage, read_write> g: array<f32>;
// binding 5: the optimizer's loss slot (one f32).
@group(0) @binding(5) var<storage, read_write> loss: array<f32, 1>;
// binding 6: sizes.
@group(0) @binding(6) var<uniform> dims: Dims;

@compute @workgroup_size(64)
fn residual(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i >= dims.m) {
        return;
    }
    var acc = 0.0;
    for (var j = 0u; j < dims.d; j++) {
        acc += a[i * dims.d + j] * x[j];
    }
    r[i] = acc - b[i];
}

@compute @workgroup_size(64)
fn gradient(@builtin(global_invocation_id) id: vec3<u32>) {
    let j = id.x;
    if (j >= dims.d) {
        return;
    }
    var acc = 0.0;
    for (var i = 0u; i < dims.m; i++) {
        acc += a[i * dims.d + j] * r[i];
    }
    g[j] = acc / f32(dims.m);
}

var<workgroup> part: array<f32, 256>;

@compute @workgroup_size(256)
fn total_loss(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var i = lid; i < dims.m; i += 256u) {
        acc += r[i] * r[i];
    }
    part[lid] = acc;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            part[lid] += part[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        loss[0] = 0.5 * part[0] / f32(dims.m);
    }
}
