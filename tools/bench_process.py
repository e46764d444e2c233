#!/usr/bin/env python3
"""Whole-process benchmark: `omnigen generate` against the official pipeline run as a script, each a fresh
process (interpreter or binary start, imports, model load, generation, PNG written), interleaved
(ours, official, ours, official, ...) so that a change of machine load hits both.

Both generate text-to-image with the same prompt, size, steps, guidance 2.5, seed 0, f32 on the CPU, with the
kv cache on (`--kv-cache official` / `use_kv_cache=True`) or off, at `--threads` threads. Reports per side the
median wall time and the largest peak RSS of its processes, and the ratio ours / official.

Usage (from the repository root):
  python3 tools/bench_process.py --model-dir /tmp/omnigen_bench_W [--size 512] [--steps 2] [--kv off|official]
                                 [--rounds 2] [--threads 2] [--bin target/release/omnigen] [--json out.json]
The model directory is made by `tools/reference/make_tiny.py --config W` (the real width, 4 layers). The binary
is built with `cargo build --release -p omnigen-cli` when --bin is not given. Needs the reference venv
(tools/reference/setup.sh); --python selects its interpreter.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red cat sitting on a blue mat"

OFFICIAL = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from common import patch_official
model_dir, size, steps, kv, threads, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "official", int(sys.argv[6]), sys.argv[7]
torch.set_num_threads(threads)
patch_official()
from OmniGen import OmniGenPipeline
pipe = OmniGenPipeline.from_pretrained(model_dir)
with torch.no_grad():
    images = pipe(%r, height=size, width=size, num_inference_steps=steps, guidance_scale=2.5,
                  dtype=torch.float32, seed=0, use_kv_cache=kv)
images[0].save(out)
""" % PROMPT


def timed(cmd, env):
    """Wall seconds and peak RSS (MiB) of one child process (its own rusage, from wait4)."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({child.returncode}):\n{stderr[-4000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/omnigen_bench_W")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--kv", choices=["off", "official"], default="off")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bin", default=None, help="prebuilt omnigen binary")
    ap.add_argument("--python", default=os.path.join(ROOT, "tools/reference/.venv/bin/python"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    binary = args.bin
    if binary is None:
        subprocess.check_call(["cargo", "build", "--release", "-p", "omnigen-cli"], cwd=ROOT)
        binary = os.path.join(ROOT, "target", "release", "omnigen")
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    out_dir = tempfile.mkdtemp(prefix="bench_process_")
    ours, official = [], []
    for r in range(args.rounds):
        png = os.path.join(out_dir, f"ours_{r}.png")
        print(f"round {r + 1}/{args.rounds}: ours ...", file=sys.stderr, flush=True)
        ours.append(timed([binary, "generate", "--model", args.model_dir, "--prompt", PROMPT, "--height",
                           str(args.size), "--width", str(args.size), "--steps", str(args.steps), "--guidance-scale",
                           "2.5", "--seed", "0", "--kv-cache", args.kv, "--dtype", "f32", "--output", png], env))
        print(f"round {r + 1}/{args.rounds}: official ...", file=sys.stderr, flush=True)
        official.append(timed([args.python, "-c", OFFICIAL, os.path.join(ROOT, "tools", "reference"),
                               args.model_dir, str(args.size), str(args.steps), args.kv, str(args.threads),
                               os.path.join(out_dir, f"official_{r}.png")], env))
    a = statistics.median(w for w, _ in ours)
    b = statistics.median(w for w, _ in official)
    print(f"| whole process, {args.size}², {args.steps} steps, kv cache {args.kv} | ours (s) | official (s) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| wall time (median of {args.rounds}) | {a:.2f} | {b:.2f} | **{a / b:.2f}** |")
    print(f"runs: ours {[round(w, 2) for w, _ in ours]}, official {[round(w, 2) for w, _ in official]}; "
          f"peak RSS ours {max(p for _, p in ours):.0f} MiB, official {max(p for _, p in official):.0f} MiB; "
          f"load avg {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ours": ours, "official": official, "ratio": a / b}, f, indent=1)


if __name__ == "__main__":
    main()
