// The fused Polyak update over one segment, one pass:
//   with momentum:    v = momentum * v - step * g;  p = p + v      (entry point `momentum`)
//   without momentum: p = p + (-step) * g, no velocity traffic     (entry point `plain`)
// Each workgroup handles one contiguous chunk of vec4s, as the norm does.

struct Geometry {
    n4: u32,           // length of the segment in vec4s
    chunk: u32,        // vec4s handled by one workgroup
    groups_x: u32,     // workgroups along x in the dispatch
    groups: u32,       // workgroups that have work
    partial_base: u32, // unused here (shared struct with the norm)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct Step {
    step: f32,     // the Polyak step size of this iteration, rounded to f32
    momentum: f32, // the momentum coefficient
    _pad0: f32,
    _pad1: f32,
}

// binding 0: the parameter segment, updated in place.
@group(0) @binding(0) var<storage, read_write> params: array<vec4<f32>>;
// binding 1: the gradient segment at the current parameters.
@group(0) @binding(1) var<storage, read> grads: array<vec4<f32>>;
// binding 2: the velocity segment (only bound by `momentum`).
@group(0) @binding(2) var<storage, read_write> velocity: array<vec4<f32>>;
// binding 3: this segment's dispatch geometry.
@group(0) @binding(3) var<uniform> geo: Geometry;
// binding 4: the step size and momentum, shared by all segments.
@group(0) @binding(4) var<uniform> rule: Step;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn momentum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.y * geo.groups_x + wid.x;
    if (group >= geo.groups) {
        return;
    }
    let start = group * geo.chunk;
    let end = min(start + geo.chunk, geo.n4);
    for (var i = start + lid; i < end; i += WG) {
        let v = rule.momentum * velocity[i] - rule.step * grads[i];
        velocity[i] = v;
        params[i] = params[i] + v;
    }
}

@compute @workgroup_size(256)
fn plain(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.y * geo.groups_x + wid.x;
    if (group >= geo.groups) {
        return;
    }
    let start = group * geo.chunk;
    let end = min(start + geo.chunk, geo.n4);
    let neg_step = -rule.step;
    for (var i = start + lid; i < end; i += WG) {
        params[i] = params[i] + neg_step * grads[i];
    }
}
