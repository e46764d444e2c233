#!/usr/bin/env python3
"""The official OmniGen pipeline on a GPU, timed as tools/gpu/check.sh times ours (bench_side's
`pipeline_kv`): one warm-up run, then `--runs` timed runs of text-to-image at `--size`, `--steps` steps,
guidance 2.5, seed 0, kv cache on, bf16 (the official default dtype).

`--offload-kv-cache` keeps the official default (the kv cache moved to host memory between steps);
`--no-offload-kv-cache` keeps it on the GPU, its fastest setting. Prints one JSON object: times in seconds,
torch's peak allocated and reserved GPU memory.

Usage: python official.py --model-dir DIR [--size 1024] [--steps 50] [--runs 1] [--no-offload-kv-cache]
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
from common import patch_official, versions  # noqa: E402

PROMPT = "a red cat sitting on a blue mat"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--offload-kv-cache", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    patch_official()
    from OmniGen import OmniGenPipeline

    res = {"backend": "official-pytorch", "size": [args.size, args.size], "steps": args.steps,
           "offload_kv_cache": args.offload_kv_cache, "dtype": "bf16", "versions": versions(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    quiet = contextlib.ExitStack()
    quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))  # the official code print()s
    with quiet:
        t0 = time.perf_counter()
        pipe = OmniGenPipeline.from_pretrained(args.model_dir)
        res["load_s"] = time.perf_counter() - t0

        def run():
            with torch.no_grad():
                pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=2.5,
                     seed=0, use_kv_cache=True, offload_kv_cache=args.offload_kv_cache, dtype=torch.bfloat16)
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        t0 = time.perf_counter()
        run()
        res["warmup_s"] = time.perf_counter() - t0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        ts = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            run()
            ts.append(time.perf_counter() - t0)
    res["runs_s"] = ts
    res["median_s"] = statistics.median(ts)
    if torch.cuda.is_available():
        res["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        res["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    print(json.dumps(res))


if __name__ == "__main__":
    main()
