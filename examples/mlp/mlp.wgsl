// A one-hidden-layer MLP classifier, forward and backward, on the whole data set:
//   act = relu(x w1 + b1),  logits = act w2 + b2,  loss = mean cross-entropy.
// The entry points run in this order, one dispatch each: hidden, output, grad_out,
// backprop, grad_hidden, total. The gradient kernels also write the squared-norm
// partials the optimizer sums (norm_from_objective), one per workgroup, so the
// optimizer never reads the gradient for its norm.

struct Dims {
    b: u32,    // samples
    f: u32,    // features
    h: u32,    // hidden units
    c: u32,    // classes (at most 16)
    base: u32, // first norm partial of grad_hidden (grad_out's count)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// binding 0: the sizes above.
@group(0) @binding(0) var<uniform> dims: Dims;
// binding 1: the inputs, [b, f] row-major.
@group(0) @binding(1) var<storage, read> x: array<f32>;
// binding 2: the class of each sample, [b].
@group(0) @binding(2) var<storage, read> y: array<u32>;
// bindings 3-6: the parameters, in the optimizer's buffers: w1 [f, h], b1 [h],
// w2 [h, c], b2 [c].
@group(0) @binding(3) var<storage, read> w1: array<f32>;
@group(0) @binding(4) var<storage, read> b1: array<f32>;
@group(0) @binding(5) var<storage, read> w2: array<f32>;
@group(0) @binding(6) var<storage, read> b2: array<f32>;
// bindings 7-10: their gradients, written into the optimizer's buffers.
@group(0) @binding(7) var<storage, read_write> g_w1: array<f32>;
@group(0) @binding(8) var<storage, read_write> g_b1: array<f32>;
@group(0) @binding(9) var<storage, read_write> g_w2: array<f32>;
@group(0) @binding(10) var<storage, read_write> g_b2: array<f32>;
// binding 11: the hidden activations [b, h]; backprop turns them into their gradient.
@group(0) @binding(11) var<storage, read_write> act: array<f32>;
// binding 12: d loss / d logits, [b, c].
@group(0) @binding(12) var<storage, read_write> dlogits: array<f32>;
// binding 13: each sample's cross-entropy, [b].
@group(0) @binding(13) var<storage, read_write> losses: array<f32>;
// binding 14: the optimizer's squared-norm partials.
@group(0) @binding(14) var<storage, read_write> partials: array<f32>;
// binding 15: the optimizer's loss slot.
@group(0) @binding(15) var<storage, read_write> loss: array<f32, 1>;

const WG: u32 = 64u;
var<workgroup> red: array<f32, WG>;

// Sums `v` over the workgroup into red[0] (every invocation must call it).
fn workgroup_sum(lid: u32, v: f32) {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(64)
fn hidden(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= dims.b * dims.h) {
        return;
    }
    let s = i / dims.h;
    let j = i % dims.h;
    var z = b1[j];
    for (var f = 0u; f < dims.f; f++) {
        z += x[s * dims.f + f] * w1[f * dims.h + j];
    }
    act[i] = max(z, 0.0);
}

@compute @workgroup_size(64)
fn output(@builtin(global_invocation_id) gid: vec3<u32>) {
    let s = gid.x;
    if (s >= dims.b) {
        return;
    }
    var logits: array<f32, 16>;
    var m = logits[0];
    for (var c = 0u; c < dims.c; c++) {
        var z = b2[c];
        for (var j = 0u; j < dims.h; j++) {
            z += act[s * dims.h + j] * w2[j * dims.c + c];
        }
        logits[c] = z;
        m = select(m, z, c == 0u || z > m);
    }
    var sum = 0.0;
    for (var c = 0u; c < dims.c; c++) {
        sum += exp(logits[c] - m);
    }
    let lse = m + log(sum);
    losses[s] = lse - logits[y[s]];
    for (var c = 0u; c < dims.c; c++) {
        let truth = select(0.0, 1.0, c == y[s]);
        dlogits[s * dims.c + c] = (exp(logits[c] - lse) - truth) / f32(dims.b);
    }
}

// d/d w2 [h, c] and d/d b2 [c]; one partial of their squares per workgroup.
@compute @workgroup_size(64)
fn grad_out(@builtin(global_invocation_id) gid: vec3<u32>,
            @builtin(local_invocation_index) lid: u32,
            @builtin(workgroup_id) wid: vec3<u32>) {
    let o = gid.x;
    var g = 0.0;
    if (o < dims.h * dims.c) {
        let j = o / dims.c;
        let c = o % dims.c;
        for (var s = 0u; s < dims.b; s++) {
            g += act[s * dims.h + j] * dlogits[s * dims.c + c];
        }
        g_w2[o] = g;
    } else if (o < dims.h * dims.c + dims.c) {
        let c = o - dims.h * dims.c;
        for (var s = 0u; s < dims.b; s++) {
            g += dlogits[s * dims.c + c];
        }
        g_b2[c] = g;
    }
    workgroup_sum(lid, g * g);
    if (lid == 0u) {
        partials[wid.x] = red[0];
    }
}

// Through w2 and the relu: act becomes d loss / d (x w1 + b1).
@compute @workgroup_size(64)
fn backprop(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= dims.b * dims.h) {
        return;
    }
    let s = i / dims.h;
    let j = i % dims.h;
    var d = 0.0;
    if (act[i] > 0.0) {
        for (var c = 0u; c < dims.c; c++) {
            d += dlogits[s * dims.c + c] * w2[j * dims.c + c];
        }
    }
    act[i] = d;
}

// d/d w1 [f, h] and d/d b1 [h]; partials after grad_out's.
@compute @workgroup_size(64)
fn grad_hidden(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(local_invocation_index) lid: u32,
               @builtin(workgroup_id) wid: vec3<u32>) {
    let o = gid.x;
    var g = 0.0;
    if (o < dims.f * dims.h) {
        let f = o / dims.h;
        let j = o % dims.h;
        for (var s = 0u; s < dims.b; s++) {
            g += x[s * dims.f + f] * act[s * dims.h + j];
        }
        g_w1[o] = g;
    } else if (o < dims.f * dims.h + dims.h) {
        let j = o - dims.f * dims.h;
        for (var s = 0u; s < dims.b; s++) {
            g += act[s * dims.h + j];
        }
        g_b1[j] = g;
    }
    workgroup_sum(lid, g * g);
    if (lid == 0u) {
        partials[dims.base + wid.x] = red[0];
    }
}

// The mean of the per-sample losses into the loss slot (one workgroup).
@compute @workgroup_size(64)
fn total(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var s = lid; s < dims.b; s += WG) {
        acc += losses[s];
    }
    workgroup_sum(lid, acc);
    if (lid == 0u) {
        loss[0] = red[0] / f32(dims.b);
    }
}
