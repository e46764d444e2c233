#!/usr/bin/env bash
# Regenerate every reference fixture of the project into <repo>/tests/fixtures (run from anywhere).
#   bash tools/reference/regen.sh            # all configs (A, B), schedulers, LoRA, diffusers copy, checks, FIXTURES.md
#   bash tools/reference/regen.sh --bench    # additionally the CPU benchmark (config M, ~8 min) -> bench_result.json
# Needs the venv of setup.sh (PY overrides the interpreter). Deterministic: with the AVX2 settings below the
# committed files are reproduced byte for byte (except timing fields "wall_s" in the JSON files).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
FIX="$ROOT/tests/fixtures"
PY=${PY:-$HERE/.venv/bin/python}
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null; then
  echo "regen.sh: no interpreter $PY; run: bash tools/reference/setup.sh" >&2; exit 1
fi
# Reproducibility: force AVX2 kernels so that an AVX-512 CPU produces the committed fixtures byte-identically
# (torch's AVX-512 paths shift the official outputs by up to ~2e-5). 2 threads as recorded in manifest.json.
export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2}
export MKL_ENABLE_INSTRUCTIONS=${MKL_ENABLE_INSTRUCTIONS:-AVX2}
export ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PYTHONDONTWRITEBYTECODE=1
export PYTHONHASHSEED=0   # PEFT writes target_modules from a set into adapter_config.json
cd "$HERE"
mkdir -p "$FIX"
# generated content only (tests/fixtures/README.md is hand-written and kept)
rm -rf "$FIX/A" "$FIX/B" "$FIX/proc" "$FIX/sched" "$FIX/FIXTURES.md" "$FIX/check_report.txt"
for c in A B; do
  "$PY" make_tiny.py --config $c --out "$FIX/$c/model"
  "$PY" dump_ref.py --model "$FIX/$c/model" --out "$FIX/$c"
done
"$PY" dump_proc.py --model "$FIX/A/model" --out "$FIX/proc"
"$PY" dump_sched.py --fixtures "$FIX"
"$PY" make_diffusers_copy.py --fixtures "$FIX/A"
"$PY" make_lora.py --fixtures "$FIX/A"
"$PY" check_fixtures.py "$FIX/A" "$FIX/B" | tee "$FIX/check_report.txt"
"$PY" compare_diffusers.py "$FIX/A" "$FIX/B" > /dev/null
"$PY" list_fixtures.py "$FIX" "$FIX/FIXTURES.md"
du -sh "$FIX"
if [ "${1:-}" = "--bench" ]; then echo "timings: run python3 tools/bench_compare.py (without the AVX2 variables above)"; fi
