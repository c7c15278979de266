// Squared L2 norm, pass 1 of 2 (`main`): each workgroup sums g*g over its share of
// the gradient segments of its batch (`share`, square_sum.wgsl) and writes a single
// partial. At small sizes one workgroup does both passes (`single`): it sums the
// whole gradient and applies the step-size rule itself, one dispatch where two
// would cost a waited step twice the dispatches' fixed cost. `real` / `real4` (f32
// or f64) come from the precision prelude, the rule (`decide`, bindings 2 and 3)
// from rule.wgsl, the batch (`batch`, `walk`) from batch.wgsl, which the host puts
// in front (kernels.rs).

// binding 0: one partial sum per workgroup of every segment (`main` only).
@group(0) @binding(0) var<storage, read_write> partials: array<real>;

// @each
// binding $BG: the gradient of segment $K of the batch, read only (zero in padding
// and gaps).
@group(0) @binding($BG) var<storage, read> grads_$K: array<real4>;
// @end

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = workgroup_index(wid);
    if (g >= batch.total) {
        return; // workgroup-uniform: the whole group leaves together
    }
    let sum = share(g, lid);
    if (lid == 0u) {
        partials[batch.partial_base + g] = sum;
    }
}

// Both passes in one workgroup, the only one of its dispatch (the batch's geometry
// gives every segment that one workgroup).
@compute @workgroup_size(WG)
fn single(@builtin(local_invocation_index) lid: u32) {
    let sqnorm = share(0u, lid);
    if (lid == 0u) {
        decide(sqnorm, -LIMIT, LIMIT);
    }
}
