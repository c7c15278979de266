// The fused Polyak update, one pass over each workgroup's share of every segment of
// its batch:
//   with momentum:    v = momentum * v - step * g;  p = p + v      (entry point `momentum`)
//   without momentum: p = p + (-step) * g, no velocity traffic     (entry point `plain`)
// A small step with the step size on the device is one dispatch of one workgroup
// (`step_momentum`, `step_plain`): the squared norm (`share`, square_sum.wgsl), the
// rule (`decide`, rule.wgsl), then the update.
//
// `real4` (vec4 of f32 or f64) and `velocity4`, the velocity's storage type, come
// from the precision prelude the host puts in front (kernels.rs): `velocity4` is
// `real4`, or `vec4<f16>` after `enable f16;` for an f16 velocity (the update
// computes in `real` either way and rounds only what it stores, through
// `to_velocity`, which saturates an f16 velocity at +-65504). The batch (`batch`,
// `walk`) comes from batch.wgsl, and the scalars slot (binding 2: [3] = the step
// size, [4] = not 0.0 if this update must not run (refused, or the run halted),
// [10] = the momentum) and the rule (binding 3, the one-dispatch step only) from
// rule.wgsl, also put in front.

// @each
// bindings $BP, $BG, $BV: the parameters (updated in place), the gradient and the
// velocity (only bound by `momentum`) of segment $K of the batch.
@group(0) @binding($BP) var<storage, read_write> params_$K: array<real4>;
@group(0) @binding($BG) var<storage, read> grads_$K: array<real4>;
@group(0) @binding($BV) var<storage, read_write> velocity_$K: array<velocity4>;
fn momentum_$K(w: vec3<u32>, step: real, momentum: real) {
    var i = w.x;
    // @unrolled
    for (; i + (UNROLL - 1u) * w.z < w.y; i += UNROLL * w.z) {
        // @repeat
        let j$u = i + $uu * w.z;
        let v$u = momentum * real4(velocity_$K[j$u]) - step * grads_$K[j$u];
        let p$u = params_$K[j$u];
        // @end repeat
        // @repeat
        velocity_$K[j$u] = to_velocity(v$u);
        params_$K[j$u] = p$u + v$u;
        // @end repeat
    }
    // @end unrolled
    for (; i < w.y; i += w.z) {
        let v = momentum * real4(velocity_$K[i]) - step * grads_$K[i];
        velocity_$K[i] = to_velocity(v);
        params_$K[i] = params_$K[i] + v;
    }
}
fn plain_$K(w: vec3<u32>, neg_step: real) {
    var i = w.x;
    // @unrolled
    for (; i + (UNROLL - 1u) * w.z < w.y; i += UNROLL * w.z) {
        // @repeat
        let j$u = i + $uu * w.z;
        let p$u = params_$K[j$u] + neg_step * grads_$K[j$u];
        // @end repeat
        // @repeat
        params_$K[j$u] = p$u;
        // @end repeat
    }
    // @end unrolled
    for (; i < w.y; i += w.z) {
        params_$K[i] = params_$K[i] + neg_step * grads_$K[i];
    }
}
// @end

@compute @workgroup_size(WG)
fn momentum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = workgroup_index(wid);
    if (g >= batch.total || scalars[4] != 0.0) {
        return;
    }
    let step = scalars[3];
    let momentum = scalars[10];
    // @each
    momentum_$K(walk(batch.seg[$K], g, lid), step, momentum);
    // @end
}

// The one-dispatch step: whether the update runs, after the whole workgroup
// summed the squared norm and its first invocation applied the rule.
fn decided(lid: u32) -> bool {
    let sqnorm = share(0u, lid);
    if (lid == 0u) {
        decide(sqnorm, -LIMIT, LIMIT);
    }
    storageBarrier(); // what invocation 0 wrote, for every invocation
    return scalars[4] == 0.0;
}

@compute @workgroup_size(WG)
fn step_momentum(@builtin(local_invocation_index) lid: u32) {
    if (!decided(lid)) {
        return;
    }
    let step = scalars[3];
    let momentum = scalars[10];
    // @each
    momentum_$K(walk(batch.seg[$K], 0u, lid), step, momentum);
    // @end
}

@compute @workgroup_size(WG)
fn step_plain(@builtin(local_invocation_index) lid: u32) {
    if (!decided(lid)) {
        return;
    }
    let neg_step = -scalars[3];
    // @each
    plain_$K(walk(batch.seg[$K], 0u, lid), neg_step);
    // @end
}

@compute @workgroup_size(WG)
fn plain(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = workgroup_index(wid);
    if (g >= batch.total || scalars[4] != 0.0) {
        return;
    }
    let neg_step = -scalars[3];
    // @each
    plain_$K(walk(batch.seg[$K], g, lid), neg_step);
    // @end
}
