#!/usr/bin/env python3
"""CPU timing of the OFFICIAL OmniGen code, workload for workload what `examples/bench_side.rs` times.

Same model directory (default: make_tiny.py --config M, built if missing), same prompt, size, steps, guidance,
thread count. Prints one JSON object: per workload median/min/all runs in seconds after one warm-up.

Usage: python bench.py [--model-dir DIR] [--runs 5] [--threads 2] [--size 256] [--steps 10] [--only a,b]
Workloads: load, gemm, transformer_forward, transformer_prefill, transformer_cached, vae_decode, vae_encode,
pipeline_kv, pipeline_nokv.
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_args import add_workload_args  # noqa: E402
from common import patch_official, versions  # noqa: E402

PROMPT = "a red cat sitting on a blue mat"


def timed(fn, runs):
    fn()  # warm-up
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "runs_s": ts}


def main():
    ap = argparse.ArgumentParser()
    add_workload_args(ap, runs=5)
    args = ap.parse_args()
    want = (lambda n: True) if not args.only else (lambda n: n in args.only.split(","))
    if not os.path.exists(os.path.join(args.model_dir, "model.safetensors")):
        subprocess.check_call([sys.executable, os.path.join(HERE, "make_tiny.py"), "--config", "M", "--out",
                               args.model_dir], stdout=subprocess.DEVNULL)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    patch_official()
    from OmniGen import OmniGenPipeline
    from OmniGen.scheduler import OmniGenCache

    H = W = args.size
    res = {"backend": "pytorch", "threads": torch.get_num_threads(), "size": [H, W], "steps": args.steps,
           "runs": args.runs, "dtype": "f32", "versions": versions()}
    quiet_out = contextlib.redirect_stdout(io.StringIO())  # the official code print()s; stdout = JSON only
    quiet_err = contextlib.redirect_stderr(io.StringIO())
    with quiet_out, quiet_err:
        if want("gemm"):
            n = 1024
            a, b = torch.rand(n, n), torch.rand(n, n)
            r = timed(lambda: torch.mm(a, b), args.runs)
            r["gflops"] = 2 * n ** 3 / 1e9 / r["median_s"]
            res["gemm_1024"] = r

        if want("load"):
            res["load"] = timed(lambda: OmniGenPipeline.from_pretrained(args.model_dir), args.runs)
        pipe = OmniGenPipeline.from_pretrained(args.model_dir)
        model = pipe.model.float().eval()  # the pipeline itself does model.to(float32) per call
        data = pipe.processor([PROMPT], None, height=H, width=W, use_img_cfg=False, separate_cfg_input=True)
        ids, mask, pos = data["input_ids"][0], data["attention_mask"][0], data["position_ids"][0]
        res["seq_len"] = int(mask.shape[-1])
        x = torch.randn(1, 4, H // 8, W // 8)
        ts = torch.tensor([0.5])
        n_img = x.size(-1) * x.size(-2) // 4

        if want("transformer_forward"):
            def tf():
                model.llm.config.use_cache = False
                with torch.no_grad():
                    model.forward(x, ts, ids, None, {}, mask, pos, return_past_key_values=False)
            res["transformer_forward"] = timed(tf, args.runs)

        def prefill():
            # step 0 of the official scheduler with use_kv_cache=True
            model.llm.config.use_cache = True
            cache = OmniGenCache(n_img, False)
            with torch.no_grad():
                out, cache = model.forward(x, ts, ids, None, {}, mask, pos, past_key_values=cache,
                                           return_past_key_values=True)
            return cache
        if want("transformer_prefill"):
            res["transformer_prefill"] = timed(prefill, args.runs)
        if want("transformer_cached"):
            cache = prefill()
            mask_c, pos_c = mask[..., -(n_img + 1):, :], pos[:, -(n_img + 1):]

            def cached():
                # steps >= 1: input_ids None, cropped mask/positions, the step-0 cache
                model.llm.config.use_cache = True
                with torch.no_grad():
                    model.forward(x, ts, None, None, {}, mask_c, pos_c, past_key_values=cache,
                                  return_past_key_values=True)
            res["transformer_cached"] = timed(cached, args.runs)

        vae = pipe.vae.float().eval()
        if want("vae_decode"):
            z = torch.randn(1, 4, H // 8, W // 8)

            def vd():
                with torch.no_grad():
                    vae.decode(z)
            res["vae_decode"] = timed(vd, args.runs)
        if want("vae_encode"):
            img = torch.rand(1, 3, H, W) * 2 - 1

            def ve():
                with torch.no_grad():
                    vae.encode(img).latent_dist.mean
            res["vae_encode"] = timed(ve, args.runs)

        for name, kv in [("pipeline_kv", True), ("pipeline_nokv", False)]:
            if not want(name):
                continue

            def run_pipe():
                with torch.no_grad():
                    pipe(PROMPT, height=H, width=W, num_inference_steps=args.steps, guidance_scale=2.5,
                         dtype=torch.float32, seed=0, use_kv_cache=kv)
            res[name] = timed(run_pipe, args.runs)
    import resource
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps(res))


if __name__ == "__main__":
    main()
