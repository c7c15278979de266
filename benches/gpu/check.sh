#!/usr/bin/env bash
# One device call (3 min 47 s on an H200 on 2026-11-26; run it with timeout_s 600),
# most important first: GPU correctness (conformance on the f32 and f64 paths, then
# the test binaries of benches/gpu/tests.txt: the kernels against f64, step-size
# modes, pipelining, the objective's norm, f16 velocity, f64, randomized
# configurations, checkpoints, ...), polyak-bench with the host rule, the device
# rule and pipelined, the peers, the norm in one pass or two at 1e4 and 1e5, then
# blocking waits (every polyak-bench run also times the fixed cost both ways),
# deferred updates, 300 tensors in separate buffers
# and in one arena; then the objective's norm, f16 velocity, f64, overflow-check,
# workgroup-size and unroll benches, the MLP example and an out-of-memory probe.
# The log in $OUT grows as it goes, so a cut-off call still returns what ran.
# Prepare with benches/gpu/prepare.sh; DRY=1 tries it here. QUICK=1 stops after the
# 300-tensor benches; TESTS="lib solver ..." runs those test binaries only.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# At most 8 files come back from $OUT: the JSON of every run goes to $J, packed
# into $OUT/json.tar at each step (so a cut-off call still returns what ran).
J=/tmp/check-json; rm -rf "$J"; mkdir -p "$J"
B=/tmp/gpu-bin # unpacked from gpu-bin/bin.tar.xz below
SIZES=${SIZES:-1e4,1e6,1e7,1e8,1e9}
MORE=${MORE:-1e4,1e8,1e9}
PEERS=${PEERS:-1e4,1e8}
TESTS=${TESTS:-$(cat benches/gpu/tests.txt)}
REF=tests/data/jaxopt_polyak_reference.json
export XDG_RUNTIME_DIR=/tmp
if [ -z "${DRY:-}" ]; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site
fi
rm -rf "$B" && python3 -c 'import tarfile; tarfile.open("gpu-bin/bin.tar.xz").extractall("/tmp")' || exit 1
step() { tar -C "$J" -cf "$OUT/json.tar" .; echo; echo "=== $* ($(date +%T))"; }
tests() { timeout 60 "$B/test-$1" --test-threads 1 2>&1 | grep -E "test result|panicked|FAILED" | head; }
bench() { local name=$1; shift; timeout 90 $B/polyak-bench --cpu-max 1 --json "$J/bench-$name.json" "$@" 2>&1; }
{
  step card; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  step conformance: f32 host rule, f32 device rule, f64
  timeout 40 $B/conformance $REF 2>&1 | tail -10
  timeout 40 $B/conformance $REF --device-step 2>&1 | tail -3
  timeout 40 $B/conformance $REF --f64 2>&1 | tail -10
  step tests: $TESTS
  for t in $TESTS; do echo "$t:"; tests $t; done
  step polyak-bench host; timeout 150 $B/polyak-bench --sizes "$SIZES" --json "$J/bench-host.json" 2>&1
  step polyak-bench device; bench device --sizes "$SIZES" --momentum on --stepsize device
  step polyak-bench device, 16 steps per wait; bench pipelined --sizes "$SIZES" --momentum on --stepsize device --sync-every 16
  step peers; PYTHONUNBUFFERED=1 timeout 180 python3 benches/peers/peers.py --sizes "$PEERS" --reps 20 --json "$J/peers.json" 2>&1 | grep -v -i warn
  step "polyak-bench, the norm in two passes (one-pass limit 0), then one pass up to 1e6"
  bench two-pass --sizes 1e4,1e5 --momentum on --stepsize device --one-pass-limit 0
  bench one-pass --sizes 1e4,1e5 --momentum on --stepsize device --one-pass-limit 1e6
  step polyak-bench, blocking waits: host rule, device rule, deferred updates
  bench block-host --sizes 1e4,1e6,1e7,1e8 --wait block
  bench block-device --sizes 1e4,1e8 --momentum on --stepsize device --wait block
  bench deferred --sizes 1e4,1e8 --momentum on --deferred on
  step polyak-bench, 300 tensors: in separate user buffers, then back to back in one
  bench tensors-separate --sizes 1e6,1e8 --momentum on --stepsize device --tensors 300 --tensors-in separate
  bench tensors-arena --sizes 1e6,1e8 --momentum on --stepsize device --tensors 300 --tensors-in arena
  if [ -n "${QUICK:-}" ]; then step done; exit; fi
  step polyak-bench, norm from the objective; bench objective-norm --sizes "$MORE" --stepsize device --norm-from-objective on
  step polyak-bench, f16 velocity; bench f16 --sizes "$MORE" --momentum on --stepsize device --velocity f16
  step polyak-bench, f64 parameters; bench f64 --sizes "$MORE" --momentum on --stepsize device --dtype f64
  step polyak-bench, the overflow check; bench overflow --sizes 1e8 --momentum on --stepsize device --check-overflow on
  step polyak-bench, workgroups of 128, 512 and 1024 invocations at 1e8, 256 above
  for wg in 128 512 1024; do bench wg$wg --sizes 1e8 --momentum on --stepsize device --workgroup-size $wg; done
  step polyak-bench, 2, 4 and 8 vec4s per loop iteration at 1e8, 1 above
  for u in 2 4 8; do bench unroll$u --sizes 1e8 --momentum on --stepsize device --unroll $u; done
  step mlp example; timeout 30 $B/mlp 2>&1 | tail -3
  step "out of memory: 2e10 parameters, 240 GB (a does-not-fit row, not a crash)"
  timeout 40 $B/polyak-bench --sizes 2e10 --momentum on --cpu-max 1 --reps 2 2>&1 | tail -5
  step done
} 2>&1 | tee "$OUT/log.txt"
