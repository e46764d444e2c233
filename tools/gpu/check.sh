#!/usr/bin/env bash
# The GPU check: one run on a GPU machine (an H200 lent by the `device` tool) with no network and no
# Rust toolchain, from what tools/gpu/build.sh put in .gpu/ here. Sized for <= 10 minutes:
#   1. the machine: GPU, driver, CUDA libraries, Python and torch
#   2. the parity fixtures on CUDA: the transformer, VAE and pipeline test binaries in f32, then the
#      transformer and pipeline parity cases in bf16 (OMNIGEN_TEST_DTYPE=bf16: within 3e-2 of the
#      f32 references)
#   3. a full-size random-weight checkpoint (the real config, 32 layers, bf16), made there by torch
#   4. ours (bench_side pipeline_kv, bf16) and the official pipeline (bf16) at 512² and 1024²: text to
#      image, 50 steps, guidance 2.5, kv cache on; wall time, per-step time, peak VRAM (nvidia-smi,
#      sampled every 100 ms, over the idle baseline) and MFU against the bf16 matmul rate measured there
# Everything goes to $OUT (the folder whose files come back; default ./gpu-out), the summary to
# $OUT/gpu_check.json. Every step records its outcome and the script goes on: one failure costs one
# step, not the run. Without a GPU it runs up to the GPU steps, records why it stopped and exits 0.
# Usage: bash tools/gpu/check.sh [--quick]     (--quick: 512² only, no official run)
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
OUT=${OUT:-$repo/gpu-out}
mkdir -p "$OUT/steps"
work=${TMPDIR:-/tmp}/omnigen-gpu
mkdir -p "$work/bin" "$work/lib"
quick=${1:-}
t_start=$(date +%s)
log() { echo "[$(( $(date +%s) - t_start ))s] $*" | tee -a "$OUT/check.log"; }
# record NAME KEY=VALUE... : one step's outcome as JSON (values are JSON already, or plain strings)
record() {
  local name=$1; shift
  python3 - "$OUT/steps/$name.json" "$@" <<'EOF'
import json, sys
out = {}
for kv in sys.argv[2:]:
    k, _, v = kv.partition("=")
    try:
        out[k] = json.loads(v)
    except ValueError:
        out[k] = v
json.dump(out, open(sys.argv[1], "w"), indent=1)
EOF
}

# ---- 1. the machine ------------------------------------------------------------------------------
log "machine"
{
  nvidia-smi 2>&1 | head -20
  echo "--- nvcc"; nvcc --version 2>&1 | tail -2
  echo "--- libraries"; ldconfig -p 2>/dev/null | grep -E 'libcuda\.|libnvrtc' | head -20
  echo "--- python"; python3 -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' 2>&1
} > "$OUT/machine.txt" 2>&1
gpu=false
nvidia-smi -L >/dev/null 2>&1 && gpu=true
record machine gpu=$gpu gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" \
  driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)" \
  python="$(python3 -c 'import platform; print(platform.python_version())' 2>/dev/null)" \
  torch="$(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)"

# cudarc opens libcuda and NVRTC by name at run time: offer every NVRTC the machine has under the
# names it tries, ahead of the system's.
for lib in $(ldconfig -p 2>/dev/null | awk '/libnvrtc\.so/ {print $NF}') \
    $(ls /usr/local/cuda*/lib64/libnvrtc.so* /usr/local/cuda*/targets/*/lib/libnvrtc.so* 2>/dev/null); do
  for name in libnvrtc.so libnvrtc.so.12 libnvrtc.so.13; do
    [ -e "$work/lib/$name" ] || ln -sf "$lib" "$work/lib/$name"
  done
done
export LD_LIBRARY_PATH="$work/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# ---- unpack ------------------------------------------------------------------------------------------
log "unpack"
ok=true
for f in .gpu/bin/*.xz; do
  [ -e "$f" ] || { ok=false; break; }
  name=$(basename "$f" .xz)
  xz -dc "$f" > "$work/bin/$name" && chmod +x "$work/bin/$name" || ok=false
done
"$work/bin/omnigen" --version > "$OUT/omnigen_version.txt" 2>&1 || ok=false
record unpack ok=$ok binaries="$(ls "$work/bin" | tr '\n' ' ')"
site="$work/site"
if [ -d .gpu/whl ]; then
  python3 -m pip install -q --no-index --no-deps --target "$site" .gpu/whl/*.whl > "$OUT/pip.log" 2>&1
fi
export PYTHONPATH="$site:$repo/.gpu${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import OmniGen, transformers, diffusers; print(transformers.__version__, diffusers.__version__)' \
  > "$OUT/official_import.txt" 2>&1
record official_import ok=$([ $? -eq 0 ] && echo true || echo false) detail="$(tail -1 "$OUT/official_import.txt")"

summarize() {
  python3 - "$OUT" "$t_start" <<'EOF'
import json, os, sys, time
out, t0 = sys.argv[1], int(sys.argv[2])
steps = {}
for f in sorted(os.listdir(os.path.join(out, "steps"))):
    steps[f[:-5]] = json.load(open(os.path.join(out, "steps", f)))
summary = {"seconds": int(time.time()) - t0, "steps": steps}
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print(json.dumps(summary, indent=1))
EOF
}

if [ "$gpu" != true ]; then
  log "no GPU (nvidia-smi finds none): the GPU steps are not run"
  # What can be checked without one: the checkpoint maker, on a one-layer model on the CPU.
  timeout 300 python3 tools/gpu/make_full.py --out "$work/full1" --layers 1 --device cpu \
    > "$OUT/steps_make_full1.log" 2>&1
  record make_checkpoint_cpu_1layer rc=$? detail="$(tail -1 "$OUT/steps_make_full1.log")"
  record stopped reason="no GPU on this machine"
  summarize
  exit 0
fi

# ---- 2. parity on CUDA -------------------------------------------------------------------------------
export OMNIGEN_FIXTURES="$repo/tests/fixtures"
parity() { # NAME DTYPE BINARY [FILTER]
  local name=$1 dtype=$2 bin=$3 filter=${4:-}
  log "parity $name ($dtype)"
  local t0; t0=$(date +%s)
  OMNIGEN_TEST_DTYPE=$dtype timeout 300 "$work/bin/test_$bin" $filter --test-threads 2 \
    > "$OUT/parity_${name}_$dtype.log" 2>&1
  local rc=$?
  local res; res=$(grep -E '^test result:' "$OUT/parity_${name}_$dtype.log" | tail -1)
  local worst; worst=$(grep -oE 'max abs diff [0-9.e+-]+' "$OUT/parity_${name}_$dtype.log" |
    awk '{print $4}' | sort -g | tail -1)
  local failed; failed=$(grep -E '^    [a-z_:0-9]+$' "$OUT/parity_${name}_$dtype.log" | tr -d ' ' | tr '\n' ' ')
  record "parity_${name}_$dtype" rc=$rc result="$res" worst_max_abs="${worst:-null}" failed="$failed" \
    seconds=$(( $(date +%s) - t0 ))
}
parity transformer f32 transformer
parity vae f32 vae
parity pipeline f32 pipeline
parity transformer bf16 transformer parity
parity pipeline bf16 pipeline parity
# cubek's multi-stage matmuls and inner sizes that are odd multiples of their k stage
# (docs/backends.md): the products the portable ops pad, run unpadded. A failure here says the
# padding is needed on this GPU too; a pass, that these kernels were not picked or are right.
OMNIGEN_NO_MATMUL_PAD=1 parity unpadded_products f32 transformer \
  device_ops::products_over_an_odd_multiple_of_a_stage_match_the_host

# ---- 3. the full-size checkpoint ---------------------------------------------------------------------
log "full-size checkpoint"
full="$work/full"
timeout 300 python3 tools/gpu/make_full.py --out "$full" --layers 32 --device cuda > "$OUT/make_full.log" 2>&1
record make_checkpoint rc=$? detail="$(tail -1 "$OUT/make_full.log")"

# The bf16 matmul rate of this GPU (the MFU denominator).
python3 - > "$OUT/matmul.json" 2> "$OUT/matmul.log" <<'EOF'
import json, time, torch
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20):
    a @ b
torch.cuda.synchronize()
print(json.dumps({"bf16_matmul_tflops": 20 * 2 * n**3 / (time.perf_counter() - t) / 1e12}))
EOF
record matmul rate="$(cat "$OUT/matmul.json" 2>/dev/null || echo null)"

# ---- 4. ours and the official pipeline ---------------------------------------------------------------
base_mib=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
# timed NAME SECONDS CMD...: runs CMD with VRAM sampled; stdout to $OUT/NAME.json
timed() {
  local name=$1 limit=$2; shift 2
  log "$name"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/$name.vram" 2>/dev/null &
  local sampler=$!
  local t0; t0=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  local wall; wall=$(python3 -c "import time; print(round(time.time() - $t0, 2))")
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  local peak; peak=$(sort -n "$OUT/$name.vram" | tail -1)
  record "$name" rc=$rc process_wall_s="$wall" peak_vram_mib=$(( ${peak:-0} - base_mib )) \
    result="$(tail -1 "$OUT/$name.json" 2>/dev/null || echo null)"
}
sizes="512 1024"
[ "$quick" = --quick ] && sizes=512
for size in $sizes; do
  timed "ours_$size" 420 "$work/bin/bench_side" --model-dir "$full" --size "$size" --steps 50 --runs 1 \
    --only pipeline_kv --dtype bf16
  [ "$quick" = --quick ] && continue
  timed "official_$size" 300 python3 tools/gpu/official.py --model-dir "$full" --size "$size" --steps 50 \
    --runs 1 --no-offload-kv-cache
done
# --offload model,kv (the layers and the kv cache streamed from host memory): its peak VRAM and its cost
# per step, 512², 10 steps (the "offload_" names stay out of the MFU table below).
timed "offload_512" 240 "$work/bin/bench_side" --model-dir "$full" --size 512 --steps 10 --runs 1 \
  --only pipeline_kv --dtype bf16 --offload-model --offload-kv

# MFU: the FLOPs of one run (both guidance branches; step 0 over the whole sequence, later steps over the
# image and time tokens against the cached condition) over its time and the measured matmul rate.
python3 - "$OUT" "$full" > "$OUT/steps/mfu.json" 2> "$OUT/mfu.log" <<'EOF'
import json, os, sys
out, full = sys.argv[1], sys.argv[2]
cfg = json.load(open(os.path.join(full, "config.json")))
D, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
rate = json.load(open(os.path.join(out, "matmul.json")))["bf16_matmul_tflops"] * 1e12
res = {"bf16_matmul_tflops": rate / 1e12}
def fwd(n, t):  # n query tokens over t keys, every layer: the linears and the two attention products
    return L * (2 * n * (4 * D * D + 3 * D * I) + 4 * n * t * D)
for name in sorted(os.listdir(out)):
    if not (name.startswith("ours_") or name.startswith("official_")) or not name.endswith(".json"):
        continue
    try:
        r = json.loads(open(os.path.join(out, name)).read().strip().splitlines()[-1])
    except Exception:
        continue
    size = int(name.split("_")[1].split(".")[0])
    img = (size // 16) ** 2
    text = 16  # the prompt's tokens (cond) / the empty prompt's (uncond), about
    flops = 0
    steps = 50
    for cond in (text + 8, 8):
        s = cond + img + 1
        flops += fwd(s, s) + (steps - 1) * fwd(img + 1, s)
    t = r.get("pipeline_kv", {}).get("median_s") or r.get("median_s")
    if t:
        res[name[:-5]] = {"seconds": t, "per_step_s": t / steps, "tflops": flops / t / 1e12, "mfu": flops / t / rate}
print(json.dumps(res))
EOF
summarize
