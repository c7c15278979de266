#!/usr/bin/env bash
# One device call (about 6 minutes on an H200; run it with timeout_s 600): the GPU
# correctness of both step-size modes and of pipelined runs, polyak-bench with each
# (the device rows with momentum only), an out-of-memory probe, and the peers at the
# sizes where the fixed cost and the bandwidth show. The log in $OUT grows as it goes,
# so a cut-off call still returns what ran. Prepare with benches/gpu/prepare.sh.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
B=gpu-bin
SIZES=${SIZES:-1e4,1e6,1e7,1e8,1e9}
PEERS=${PEERS:-1e4,1e8}
export XDG_RUNTIME_DIR=/tmp
if [ -z "${DRY:-}" ]; then  # DRY=1: try the script here, on lavapipe
  for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site
fi
step() { echo; echo "=== $* ($(date +%T))"; }
{
  step card; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  step conformance, host step size; timeout 40 $B/conformance tests/data/jaxopt_polyak_reference.json 2>&1 | tail -10
  step conformance, device step size; timeout 40 $B/conformance tests/data/jaxopt_polyak_reference.json --device-step 2>&1 | tail -10
  step conformance, f64 GPU path; timeout 40 $B/conformance tests/data/jaxopt_polyak_reference.json --f64 2>&1 | tail -10
  step stepsize_mode tests; timeout 60 $B/stepsize_mode --test-threads 1 2>&1 | grep -E "^test |test result|panicked|assert" | head -30
  step solver tests; timeout 60 $B/solver --test-threads 1 2>&1 | grep -E "test result|panicked|FAILED" | head
  step mlp example; timeout 30 $B/mlp 2>&1 | tail -3
  step polyak-bench host; timeout 150 $B/polyak-bench --sizes "$SIZES" --json "$OUT/bench-host.json" 2>&1
  step polyak-bench device; timeout 70 $B/polyak-bench --sizes "$SIZES" --momentum on --stepsize device --cpu-max 1 --json "$OUT/bench-device.json" 2>&1
  step polyak-bench device, 16 steps per wait; timeout 70 $B/polyak-bench --sizes "$SIZES" --momentum on --stepsize device --sync-every 16 --cpu-max 1 --json "$OUT/bench-pipelined.json" 2>&1
  step polyak-bench, norm from the objective; timeout 70 $B/polyak-bench --sizes "$SIZES" --stepsize device --norm-from-objective on --cpu-max 1 --json "$OUT/bench-objective-norm.json" 2>&1
  step polyak-bench, f16 velocity; timeout 70 $B/polyak-bench --sizes "$SIZES" --momentum on --stepsize device --velocity f16 --cpu-max 1 --json "$OUT/bench-f16.json" 2>&1
  step polyak-bench, f64 parameters; timeout 90 $B/polyak-bench --sizes "$SIZES" --momentum on --stepsize device --dtype f64 --cpu-max 1 --json "$OUT/bench-f64.json" 2>&1
  step pipeline, objective-norm, f16-velocity and f64 tests
  timeout 40 $B/pipeline --test-threads 1 2>&1 | grep -E "test result|panicked|FAILED" | head
  timeout 40 $B/objective_norm --test-threads 1 2>&1 | grep -E "test result|panicked|FAILED" | head
  timeout 40 $B/velocity_f16 --test-threads 1 2>&1 | grep -E "test result|panicked|FAILED" | head
  timeout 40 $B/f64 --test-threads 1 2>&1 | grep -E "test result|panicked|FAILED" | head
  step out of memory: 2e10 parameters, 240 GB; expect a does-not-fit row, not a crash
  timeout 40 $B/polyak-bench --sizes 2e10 --momentum on --cpu-max 1 --reps 2 2>&1 | tail -5
  step peers; PYTHONUNBUFFERED=1 timeout 120 python3 benches/peers/peers.py --sizes "$PEERS" --reps 20 --json "$OUT/peers.json" 2>&1 | grep -v -i warn
  step done
} 2>&1 | tee "$OUT/log.txt"
