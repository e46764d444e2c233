#!/usr/bin/env bash
# Create tools/reference/.venv (git-ignored) with the exact package versions of requirements-freeze.txt,
# from PyPI only. Idempotent: does nothing when the venv exists and was built from the current freeze file
# (stamp .venv/.setup-stamp holds its sha256); pass --force to rebuild from scratch.
#
# Usage (from anywhere):  bash tools/reference/setup.sh [--force]
# Interpreter: PYTHON (default python3; CPython 3.11 was used). Download ~3 GB (the PyPI torch 2.3.1 wheel is the
# CUDA build and needs the nvidia-* wheels to import, even on CPU).
#
# Every package of requirements-freeze.txt is installed with --no-deps (exact pins, no resolver). This yields
# the same set as the README's step-by-step recipe (torch==2.3.1, torchvision==0.18.1, transformers==4.45.2,
# diffusers==0.33.1, accelerate==0.26.1, peft==0.9.0, omnigen==1.0.3, ...). `omnigen` itself pins
# diffusers==0.30.3 and datasets; we use diffusers 0.33.1 (needed by compare_diffusers.py) and no datasets, so
# `pip check` reports those two and nothing else.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
FREEZE="$HERE/requirements-freeze.txt"
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.setup-stamp"
want=$(sha256sum "$FREEZE" | cut -d' ' -f1)

if [ "${1:-}" = "--force" ]; then rm -rf "$VENV"; fi
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup.sh: $VENV is up to date (remove it or pass --force to rebuild)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
P="$VENV/bin/pip"
"$P" install --upgrade pip
# exact pins, no dependency resolution (the freeze file is complete)
"$P" install --no-deps -r "$FREEZE"
# everything the harness imports must work on CPU
"$VENV/bin/python" - <<'EOF'
import torch, torchvision, transformers, diffusers, peft, accelerate, timm, safetensors, PIL, tokenizers
import importlib.metadata as md
assert torch.__version__.startswith("2.3.1"), torch.__version__
assert transformers.__version__ == "4.45.2", transformers.__version__
assert diffusers.__version__ == "0.33.1", diffusers.__version__
assert peft.__version__ == "0.9.0", peft.__version__
assert md.version("OmniGen") == "1.0.3"
import OmniGen.model, OmniGen.transformer, OmniGen.processor  # noqa: F401
from diffusers import OmniGenPipeline, OmniGenTransformer2DModel  # noqa: F401
print("torch", torch.__version__, "matmul ok:", tuple((torch.randn(2, 2) @ torch.randn(2, 2)).shape))
EOF
"$P" check || true   # expected: omnigen wants diffusers==0.30.3 and datasets (see above)
echo "$want" > "$STAMP"
echo "setup.sh: done, interpreter $VENV/bin/python"
