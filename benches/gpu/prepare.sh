#!/usr/bin/env bash
# Run here (no GPU needed) before a device call: builds the release binaries the
# device check runs, packed into gpu-bin/bin.tar.xz (about 13 MB), and fetches the
# Vulkan loader (.gl/) and the jaxopt wheel (.whl/) the GPU machine cannot
# download. All three are ignored by git; carry them:
# run(carry=[".gl", ".whl", "gpu-bin"], command="bash benches/gpu/check.sh").
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
if ! ls .gl/libvulkan1_*.deb >/dev/null 2>&1; then
  mkdir -p .gl /tmp/amd64/partial
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  apt-get $o update >/dev/null
  (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
fi
if ! ls .whl/jaxopt-0.8.5-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary :all: -d .whl jaxopt==0.8.5
fi
rm -rf gpu-bin /tmp/gpu-bin && mkdir -p gpu-bin /tmp/gpu-bin
cargo build --release --bin polyak-bench --example conformance --example mlp
for b in polyak-bench examples/conformance examples/mlp; do
  cp "target/release/$b" /tmp/gpu-bin/
done
# Test binaries that read no file by path (the conformance tests do; the example
# above replays the same cases from a path given on its command line) and need no
# software adapter (the context test does); `lib` is the crate's unit tests (the
# kernels against f64). check.sh runs them in this order.
for t in $(cat benches/gpu/tests.txt); do
  if [ "$t" = lib ]; then which=(--lib); else which=(--test "$t"); fi
  bin=$(cargo test --release --no-run "${which[@]}" --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"): print(m["executable"])' | tail -1)
  cp "$bin" "/tmp/gpu-bin/test-$t"
done
strip /tmp/gpu-bin/* 2>/dev/null || true
# A device call carries at most 64 MiB with the working tree: about 6.5 MB a
# binary, but they share most of their code, so xz takes the lot to about 15 MB.
# check.sh unpacks it (with Python's tarfile: no xz binary needed there).
tar -C /tmp -cf - gpu-bin | xz -T0 -6 > gpu-bin/bin.tar.xz
du -sh .gl .whl gpu-bin
