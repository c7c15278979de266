#!/usr/bin/env python3
"""Times one Polyak-SGD step in the peers, for comparison with polyak-bench.

Same sizes, same bytes counted (24 per parameter with momentum: the norm reads the
gradient, the update reads p, g, v and writes p, v; 16 without momentum) and the same
JSON row fields as `polyak-bench --json`. The floor is a device-to-device copy of
2^28 f32 measured in this run. Implementations:

  torch_eager     squared norm read back to the CPU (.item()), step size on the CPU,
                  fused in-place update; momentum on and off
  torch_compile   the same step with the step size kept on the device, compiled
                  (momentum on; sizes >= --compile-min)
  jaxopt          jaxopt.PolyakSGD.update, jitted (momentum 0.9 and 0)
  optax           optax.polyak_sgd (no momentum), jitted with donated buffers

usage: python3 peers.py [--sizes 1e4,1e6,1e7,1e8,1e9] [--reps 20] [--json FILE]
"""
import argparse
import json
import os
import statistics
import sys
import time

MOMENTUM, MAX_STEP, LOSS = 0.9, 1e-3, 0.5


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1e4,1e6,1e7,1e8,1e9")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-min", type=float, default=1e8)
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "peers.json"))
    a = p.parse_args()
    a.sizes = [int(float(s)) for s in a.sizes.split(",")]
    return a


def timed(step, sync, reps, warmup):
    """Median, p10, p90 of wall-clock ms per call of step(), each followed by sync()."""
    for _ in range(warmup):
        step()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    q = lambda f: ts[round((len(ts) - 1) * f)]
    return statistics.median(ts), q(0.1), q(0.9)


SAVE = {}


def save(r):
    """Appends a row and rewrites the JSON file, so a run cut short keeps its rows."""
    SAVE["out"]["rows"].append(r)
    with open(SAVE["path"], "w") as f:
        json.dump(SAVE["out"], f, indent=1)
    print(json.dumps(r), flush=True)
    return r


def row(impl, n, momentum, t, copy_gbps):
    b = 24 if momentum else 16
    floor = b * n / (copy_gbps * 1e9) * 1e3
    med, p10, p90 = t
    return save({"impl": impl, "n": n, "momentum": momentum, "bytes_per_param": b,
                 "step_ms": med, "step_ms_p10": p10, "step_ms_p90": p90,
                 "gbps": b * n / (med * 1e-3) / 1e9, "floor_ms": floor,
                 "pct_of_floor": 100 * floor / med})


def torch_rows(args, out):
    import torch
    dev = "cuda"
    out["device"] = torch.cuda.get_device_name(0)
    out["torch"] = torch.__version__
    sync = torch.cuda.synchronize
    src = torch.rand(1 << 28, device=dev)
    dst = torch.empty_like(src)
    med, _, _ = timed(lambda: dst.copy_(src), sync, args.reps, args.warmup)
    out["copy_GBps"] = 8 * src.numel() / (med * 1e-3) / 1e9
    del src, dst
    print(f"device {out['device']}, copy {out['copy_GBps']:.0f} GB/s", flush=True)

    def eager(p, g, v):
        sq = torch.dot(g, g).item()  # the norm comes back to the CPU
        s = min(LOSS / sq, MAX_STEP) if sq > 0 else MAX_STEP
        if v is None:
            p.add_(g, alpha=-s)
        else:
            v.mul_(MOMENTUM).add_(g, alpha=-s)
            p.add_(v)

    def on_device(p, g, v, loss):
        s = torch.clamp(loss / torch.dot(g, g), max=MAX_STEP)
        v.mul_(MOMENTUM).sub_(g * s)
        p.add_(v)

    compiled = torch.compile(on_device)
    rows = []
    for n in args.sizes:
        gen = torch.Generator(device=dev).manual_seed(0)
        p = torch.rand(n, device=dev, generator=gen) * 2 - 1
        g = (torch.rand(n, device=dev, generator=gen) * 2 - 1) * 1e-3
        v = torch.zeros(n, device=dev)
        for momentum in (True, False):
            t = timed(lambda: eager(p, g, v if momentum else None), sync, args.reps, args.warmup)
            rows.append(row("torch_eager", n, momentum, t, out["copy_GBps"]))
        if n >= args.compile_min:
            loss = torch.tensor(LOSS, device=dev)
            t = timed(lambda: compiled(p, g, v, loss), sync, args.reps, args.warmup)
            rows.append(row("torch_compile", n, True, t, out["copy_GBps"]))
        del p, g, v
        torch.cuda.empty_cache()
    return rows


def jax_rows(args, copy_gbps):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    rows = []
    try:
        import optax
    except ImportError as e:
        print("optax missing:", e, flush=True)
        optax = None
    try:
        import jaxopt
    except ImportError as e:
        print("jaxopt missing:", e, flush=True)
        jaxopt = None
    print("jax", jax.__version__, jax.devices(), flush=True)
    for n in args.sizes:
        p0 = jax.random.uniform(jax.random.PRNGKey(0), (n,), jnp.float32, -1, 1)
        g = jax.random.uniform(jax.random.PRNGKey(1), (n,), jnp.float32, -1e-3, 1e-3)
        if jaxopt is not None:
            for momentum in (MOMENTUM, 0.0):
                solver = jaxopt.PolyakSGD(fun=lambda p, g: (jnp.float32(LOSS), g), value_and_grad=True,
                                          max_stepsize=MAX_STEP, momentum=momentum, jit=True)
                update = jax.jit(solver.update, donate_argnums=(0, 1))
                box = {"p": p0 + 0, "s": solver.init_state(p0, g)}

                def step():
                    box["p"], box["s"] = update(box["p"], box["s"], g)
                t = timed(step, lambda: box["p"].block_until_ready(), args.reps, args.warmup)
                rows.append(row("jaxopt", n, momentum != 0.0, t, copy_gbps))
                del box
        if optax is not None:
            opt = optax.polyak_sgd(max_learning_rate=MAX_STEP)

            def ostep(p, st):
                u, st = opt.update(g, st, p, value=jnp.float32(LOSS))
                return optax.apply_updates(p, u), st
            ostep = jax.jit(ostep, donate_argnums=(0, 1))
            box = {"p": p0 + 0}
            box["s"] = opt.init(box["p"])

            def step():
                box["p"], box["s"] = ostep(box["p"], box["s"])
            t = timed(step, lambda: box["p"].block_until_ready(), args.reps, args.warmup)
            rows.append(row("optax", n, False, t, copy_gbps))
            del box
        del p0, g
    return rows


def main():
    args = parse_args()
    out = {"tool": "peers", "sizes": args.sizes, "rows": []}
    SAVE.update(out=out, path=args.json)
    rows = []
    try:
        rows += torch_rows(args, out)
    except Exception as e:  # report and go on with JAX
        print("torch part failed:", repr(e)[:300], flush=True)
    try:
        rows += jax_rows(args, out.get("copy_GBps", float("nan")))
    except Exception as e:
        print("jax part failed:", repr(e)[:300], flush=True)
    print(f"\n{'impl':>14} {'N':>11} {'mom':>4} {'ms':>9} {'%floor':>7}")
    for r in rows:
        print(f"{r['impl']:>14} {r['n']:>11} {'on' if r['momentum'] else 'off':>4} "
              f"{r['step_ms']:>9.4f} {r['pct_of_floor']:>6.1f}%")
    print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
