#!/usr/bin/env python3
"""Side-by-side benchmark: omnigen-rs (examples/bench_side.rs) against the official PyTorch code
(tools/reference/bench.py) on the same model directory, sizes, prompt, steps and thread count.

Both sides run `--rounds` times, interleaved (Rust, PyTorch, Rust, PyTorch, ...) so that a change of machine
load hits both; every round times each workload `--runs` times after a warm-up. The table reports, per
workload, the median over all runs of all rounds and the ratio ours / PyTorch (< 1: we are faster).

Usage (from the repository root):
  python3 tools/bench_compare.py [--model-dir /tmp/omnigen_bench_M] [--config M|W] [--rounds 3] [--runs 3] [--threads 2]
                                 [--size 256] [--steps 10] [--only a,b] [--json out.json] [--markdown]
The model directory is built with `tools/reference/make_tiny.py --config M` (or `--config W`) when missing. The Rust binary is
built with `cargo build --release --example bench_side` (features from --cargo-features, default backend flex).
Needs the reference venv (tools/reference/setup.sh); --python selects its interpreter.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "reference"))
from bench_args import add_workload_args  # noqa: E402
WORKLOADS = ["load", "gemm_1024", "transformer_forward", "transformer_prefill", "transformer_cached", "vae_decode",
             "vae_encode", "pipeline_kv", "pipeline_nokv"]
ONLY_NAME = {"gemm_1024": "gemm"}


def machine():
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vp2intersect") if f in flags]
    return {"cpu": model, "cores": os.cpu_count(), "simd": simd, "os": platform.platform(),
            "load_avg": os.getloadavg()}


def run_json(cmd, env):
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    add_workload_args(ap, runs=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", choices=["M", "W"], default="M",
                    help="make_tiny.py config of a missing --model-dir (W: the real width, 4 layers)")
    ap.add_argument("--python", default=os.path.join(ROOT, "tools/reference/.venv/bin/python"))
    ap.add_argument("--bin", default=None, help="prebuilt bench_side binary (default: cargo build it)")
    ap.add_argument("--cargo-features", default=None, help="e.g. '--no-default-features --features ndarray'")
    ap.add_argument("--json", default=None, help="write all raw results here")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = ap.parse_args()

    if not os.path.exists(os.path.join(args.model_dir, "model.safetensors")):
        subprocess.check_call([args.python, os.path.join(ROOT, "tools/reference/make_tiny.py"), "--config",
                               args.config, "--out", args.model_dir], stdout=subprocess.DEVNULL)
    binary = args.bin
    if binary is None:
        cmd = ["cargo", "build", "--release", "--example", "bench_side", "--message-format=json"]
        if args.cargo_features:
            cmd += args.cargo_features.split()
        out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            msg = json.loads(line)
            if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "bench_side":
                binary = msg.get("executable") or binary
    common = ["--model-dir", args.model_dir, "--runs", str(args.runs), "--size", str(args.size), "--steps",
              str(args.steps)]
    if args.only:
        common += ["--only", args.only]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    rust, torch = [], []
    info = {"machine_start": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: rust ...", file=sys.stderr, flush=True)
        rust.append(run_json([binary] + common, env))
        print(f"round {r + 1}/{args.rounds}: pytorch ...", file=sys.stderr, flush=True)
        torch.append(run_json([args.python, os.path.join(ROOT, "tools/reference/bench.py"), "--threads",
                               str(args.threads)] + common, env))
    info["machine_end"] = machine()
    info["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")

    def med(results, name):
        runs = [x for res in results if name in res for x in res[name]["runs_s"]]
        return statistics.median(runs) if runs else None

    rows = []
    for name in WORKLOADS:
        a, b = med(rust, name), med(torch, name)
        if a is None or b is None:
            continue
        rows.append((name, a, b, a / b))
    gemm = {k: [res["gemm_1024"]["gflops"] for res in v if "gemm_1024" in res] for k, v in
            (("ours", rust), ("pytorch", torch))}
    if args.markdown:
        print(f"| workload | ours (s) | PyTorch (s) | ours / PyTorch |")
        print(f"|---|---:|---:|---:|")
        for name, a, b, q in rows:
            print(f"| {name} | {a:.4f} | {b:.4f} | **{q:.2f}** |")
    else:
        print(f"{'workload':24} {'ours (s)':>10} {'PyTorch (s)':>12} {'ratio':>7}")
        for name, a, b, q in rows:
            print(f"{name:24} {a:10.4f} {b:12.4f} {q:7.2f}")
    for k, v in gemm.items():
        if v:
            print(f"GEMM 1024^3 {k}: median {statistics.median(v):.1f} GFLOP/s")
    print(f"seq_len {rust[0].get('seq_len')} (ours) / {torch[0].get('seq_len')} (PyTorch); threads {args.threads}; "
          f"{args.rounds} rounds x {args.runs} runs; load avg start {info['machine_start']['load_avg']} end "
          f"{info['machine_end']['load_avg']}; {info['machine_start']['cpu']} {info['machine_start']['simd']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rust": rust, "pytorch": torch,
                       "table": [dict(workload=n, ours_s=a, pytorch_s=b, ratio=q) for n, a, b, q in rows]}, f,
                      indent=1)


if __name__ == "__main__":
    main()
