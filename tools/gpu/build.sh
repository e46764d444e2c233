#!/usr/bin/env bash
# Builds, here, everything tools/gpu/check.sh runs on a GPU machine that has no Rust toolchain and no
# network, into the git-ignored folder .gpu/ (carried to that machine by the `device` tool: 64 MiB at most):
#   .gpu/bin/*.xz   the CLI, the bench_side example and the transformer / VAE / pipeline parity test
#                   binaries, built with --features cuda, stripped and xz-compressed
#   .gpu/whl/       wheels of the official code's exact dependencies for the machine's Python
#   .gpu/OmniGen/   the official `omnigen` 1.0.3 package (an sdist only: pure Python)
# Usage: bash tools/gpu/build.sh [--no-wheels]      (PYVER=3.12 picks the wheels' Python)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.gpu
pyver=${PYVER:-3.12}
features="--no-default-features --features cuda,hub"
mkdir -p "$out/bin"
target=${CARGO_TARGET_DIR:-target}/release

cargo build --release -p omnigen-cli $features --bin omnigen
cargo build --release -p omnigen $features --example bench_side
# The test binaries' paths, from cargo's own report.
# The parity tests as CI's wgpu run builds them (.ci/gpu-test.toml): release dependencies, shared
# with the command above, and the workspace's crates unoptimised (the kernels are compiled on the
# GPU machine, so optimising the host code buys little and costs minutes here).
mapfile -t tests < <(cargo test --release --config .ci/gpu-test.toml $features -p omnigen-models -p omnigen-pipeline \
    --test transformer --test vae --test pipeline --no-run --message-format=json 2>"$out/test-build.log" |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"] + " " + m["executable"])')
[ "${#tests[@]}" -eq 3 ] || { echo "build.sh: expected 3 test binaries, got: ${tests[*]} (see $out/test-build.log)" >&2; exit 1; }

pack() { # NAME PATH
  strip -o "$out/bin/$1" "$2"
  xz -T2 -9 -f "$out/bin/$1"
}
pack omnigen "$target/omnigen"
pack bench_side "$target/examples/bench_side"
for t in "${tests[@]}"; do pack "test_${t%% *}" "${t#* }"; done

if [ "${1:-}" != "--no-wheels" ]; then
  mkdir -p "$out/whl"
  for pkg in transformers==4.45.2 tokenizers==0.20.3 huggingface_hub==0.36.2 diffusers==0.33.1 \
      peft==0.9.0 accelerate==0.26.1 timm==1.0.31; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
      --implementation cp --platform manylinux2014_x86_64 -d "$out/whl" "$pkg"
  done
  if [ ! -d "$out/OmniGen" ]; then
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" omnigen==1.0.3
    # The sdist's name is spelled as the index spells the project (seen: OmniGen-1.0.3.tar.gz).
    sdist=$(find "$tmp" -maxdepth 1 -iname 'omnigen-1.0.3.tar.gz' | head -1)
    [ -n "$sdist" ] || { echo "build.sh: pip saved no omnigen 1.0.3 sdist in $tmp: $(ls "$tmp")" >&2; exit 1; }
    tar -xzf "$sdist" -C "$tmp"
    pkg=$(find "$tmp" -mindepth 2 -maxdepth 2 -type d -name OmniGen | head -1)
    [ -n "$pkg" ] || { echo "build.sh: no OmniGen/ package folder in $sdist" >&2; exit 1; }
    cp -r "$pkg" "$out/OmniGen"
    rm -rf "$tmp"
  fi
fi
du -shl "$out"/* "$out"/bin/*   # -l: each argument counted in full
total=$(du -sb "$out" | cut -f1); echo "$total bytes in all"
[ "$total" -lt $((60 << 20)) ] || { echo "build.sh: $out is $total bytes, over the 60 MiB to carry" >&2; exit 1; }
echo "build.sh: $out ready ($total bytes); run: device run with carry [\".gpu\"] and command 'bash tools/gpu/check.sh'"
