// Squared L2 norm, pass 1 of 2, with the overflow check
// (`PolyakConfig::check_overflow`): as norm_partials.wgsl, each workgroup sums g*g
// over its share of the gradient segments of its batch and writes one partial. It
// also reads the parameters and the velocity, and finds the step sizes s for which
// the update (update.wgsl) writes only finite values. With a = momentum * v (0
// without momentum) and c = p + a, an element's update computes s*g, a - s*g (the
// new velocity) and c - s*g (the new parameter); it stays finite for
//   |s*g| <= LIMIT, |a - s*g| <= LIMIT, |c - s*g| <= LIMIT,
// an interval of s, and the workgroup writes the intersection over its share as
// two more partials: the lowest and the highest such step. LIMIT is 99.9% of the
// largest finite value: that margin is far above the rounding of these bounds and
// of the update, so a step inside the interval never overflows, and only steps
// that would bring a value within 0.1% of overflow are refused for nothing.
// Parameters or velocity already NaN or infinite give an empty interval.
// `real`, `real4`, `velocity4`, `LIMIT`, `TINY` and `finite4` come from the
// precision prelude; the batch (`batch`, `walk`) from batch.wgsl, both put in front
// by the host (kernels.rs).

// binding 0: one partial sum per workgroup of every segment.
@group(0) @binding(0) var<storage, read_write> partials: array<real>;
// binding 2: per workgroup of every segment, the lowest step its share allows, then
// the highest.
@group(0) @binding(2) var<storage, read_write> bounds: array<real>;
// binding 3: the scalars slot of rule.wgsl, read only: [10] = the momentum
// (only bound by `momentum`).
@group(0) @binding(3) var<storage, read> scalars: array<real, 14>;

// The steps an invocation's elements allow so far.
struct Steps {
    lowest: real4,
    highest: real4,
}

// Narrows `acc`'s steps to those that keep the update of these four elements
// finite (see the top of this file).
fn allow(acc: ptr<function, Steps>, p: real4, v: real4, a: real4, g: real4) {
    let c = p + a;
    let zero = real4(0.0);
    let top = min(min(a, c), zero) + LIMIT; // s*g <= top
    let bottom = max(max(a, c), zero) - LIMIT; // s*g >= bottom
    // A gradient under the smallest normal number makes |s*g| negligible next to
    // the margin (and division by it is not specified to be accurate): as zero.
    let moves = abs(g) >= real4(TINY);
    let d = select(real4(1.0), g, moves);
    let up = g > zero;
    var lowest = select(top / d, bottom / d, up);
    var highest = select(bottom / d, top / d, up);
    // g = 0: s*g = 0, allowed for every s where bottom <= 0 <= top.
    let free = (bottom <= zero) & (top >= zero);
    lowest = select(select(real4(LIMIT), real4(-LIMIT), free), lowest, moves);
    highest = select(select(real4(-LIMIT), real4(LIMIT), free), highest, moves);
    if (!(finite4(p) && finite4(v) && finite4(c))) {
        lowest = real4(LIMIT); // empty
        highest = real4(-LIMIT);
    }
    (*acc).lowest = max((*acc).lowest, lowest);
    (*acc).highest = min((*acc).highest, highest);
}

// @each
// bindings $BP, $BG, $BV: the parameters, the gradient and the velocity (only bound
// by `momentum`) of segment $K of the batch, read only.
@group(0) @binding($BP) var<storage, read> params_$K: array<real4>;
@group(0) @binding($BG) var<storage, read> grads_$K: array<real4>;
@group(0) @binding($BV) var<storage, read> velocity_$K: array<velocity4>;
// Each returns the share's sum of g*g, as norm_partials.wgsl (the same order:
// the same bits), and narrows `steps`.
fn momentum_$K(w: vec3<u32>, steps: ptr<function, Steps>) -> real4 {
    var sum = real4(0.0);
    for (var i = w.x; i < w.y; i += w.z) {
        let g = grads_$K[i];
        sum += g * g;
        let v = real4(velocity_$K[i]);
        allow(steps, params_$K[i], v, scalars[10] * v, g);
    }
    return sum;
}
fn plain_$K(w: vec3<u32>, steps: ptr<function, Steps>) -> real4 {
    var sum = real4(0.0);
    for (var i = w.x; i < w.y; i += w.z) {
        let g = grads_$K[i];
        sum += g * g;
        allow(steps, params_$K[i], real4(0.0), real4(0.0), g);
    }
    return sum;
}
// @end

var<workgroup> sums: array<real, WG>;
var<workgroup> lows: array<real, WG>;
var<workgroup> highs: array<real, WG>;

// Sums the workgroup's invocations' shares in a fixed order, intersects their
// steps, and writes the workgroup's partials.
fn finish(sum: real4, steps: Steps, g: u32, lid: u32) {
    let lo = steps.lowest;
    let hi = steps.highest;
    sums[lid] = (sum.x + sum.y) + (sum.z + sum.w);
    lows[lid] = max(max(lo.x, lo.y), max(lo.z, lo.w));
    highs[lid] = min(min(hi.x, hi.y), min(hi.z, hi.w));
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            sums[lid] += sums[lid + s];
            lows[lid] = max(lows[lid], lows[lid + s]);
            highs[lid] = min(highs[lid], highs[lid + s]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let at = batch.partial_base + g;
        partials[at] = sums[0];
        bounds[2u * at] = lows[0];
        bounds[2u * at + 1u] = highs[0];
    }
}

fn every_step() -> Steps {
    return Steps(real4(-LIMIT), real4(LIMIT));
}

@compute @workgroup_size(WG)
fn momentum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = workgroup_index(wid);
    if (g >= batch.total) {
        return; // workgroup-uniform: the whole group leaves together
    }
    var sum = real4(0.0);
    var steps = every_step();
    // @each
    sum += momentum_$K(walk(batch.seg[$K], g, lid), &steps);
    // @end
    finish(sum, steps, g, lid);
}

@compute @workgroup_size(WG)
fn plain(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = workgroup_index(wid);
    if (g >= batch.total) {
        return;
    }
    var sum = real4(0.0);
    var steps = every_step();
    // @each
    sum += plain_$K(walk(batch.seg[$K], g, lid), &steps);
    // @end
    finish(sum, steps, g, lid);
}
