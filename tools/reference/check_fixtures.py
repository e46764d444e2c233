#!/usr/bin/env python3
"""Consistency checks of a fixtures dir, using only the fixture files + the official OmniGen modules.

For every pipeline case it recomputes each transformer call with a plain, cache-free OmniGen.forward
from the recorded inputs and compares to the recorded output, and replays the Euler steps, CFG and VAE decode.
It documents (and verifies) the KV-cache semantics of the official pipeline:
  * use_kv_cache=True, step 0: the time token and the image tokens attend ONLY to the condition tokens
    (OmniGenCache.update returns the cropped keys/values on the first call). Equivalent cache-free computation:
    full forward with the attention mask columns [cond_len:] zeroed for rows [cond_len:].
  * steps >= 1 with cache == plain full-sequence forward (condition K/V do not depend on image tokens).
  * use_kv_cache=False: plain full-sequence forward at every step.
Usage: python check_fixtures.py fixtures/A [DIR ...]
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import patch_official  # noqa: E402


def maxdiff(a, b):
    return float((a.float() - b.float()).abs().max())


def check_dir(d):
    patch_official()
    from OmniGen.model import OmniGen
    man = json.load(open(os.path.join(d, "manifest.json")))
    model_dir = os.path.join(d, man["model_dir"])
    model = OmniGen.from_pretrained(model_dir).float().eval()
    model.llm.config.use_cache = False
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae")).float().eval()
    results = {}
    worst = 0.0
    for name in man["cases"]:
        t = load_file(os.path.join(d, name + ".safetensors"))
        j = json.load(open(os.path.join(d, name + ".json")))
        a = j["pipeline_call_args"]
        sep = a["separate_cfg_infer"]
        kv = a["use_kv_cache"]
        nb = t["latents.init"].shape[0]
        num_prompt = t["randn.00"].shape[0]  # batch of prompts: rows are [cond x P, uncond x P, (img_cond x P)]
        n_br = nb // num_prompt
        res = {}
        branches = [f"b{b}" for b in range(n_br)] if sep else ["batch"]
        for s in range(man["num_inference_steps"]):
            outs = []
            for br in branches:
                p = "proc." + br
                ids = t[p + ".input_ids"]
                mask = t[p + ".attention_mask"].clone().float()  # F32 (original A cases) or U8 0/1
                pos = t[p + ".position_ids"]
                sizes = {int(k): v for k, v in j[p]["input_image_sizes"].items()}
                lat = [t[f"step0.{br}.input_img_latents.{k}"] for k in range(j[p]["num_pixel_values"])] or None
                x = t[f"step{s}.{br}.x"]
                ts = t[f"step{s}.{br}.timestep"]
                if kv and s == 0:
                    n_img = x.shape[-1] * x.shape[-2] // 4
                    cond_len = mask.shape[-1] - n_img - 1
                    mask[:, cond_len:, cond_len:] = 0
                with torch.no_grad():
                    o = model.forward(x, ts, ids, lat, sizes, mask, pos, past_key_values=None,
                                      return_past_key_values=False)
                md = maxdiff(o, t[f"step{s}.{br}.out"])
                res[f"step{s}.{br}.out"] = md
                outs.append(o)
            out = torch.cat(outs, 0)
            g, ig = a["guidance_scale"], a["img_guidance_scale"]
            if n_br == 3:
                c, u, ic = out.chunk(3)
                pred = u + ig * (ic - u) + g * (c - ic)
            else:
                c, u = out.chunk(2)
                pred = u + g * (c - u)
            pred = torch.cat([pred] * n_br)
            res[f"step{s}.pred(recomputed CFG)"] = maxdiff(pred, t[f"step{s}.pred"])
            sig = t["sched.sigma"]
            z_out = t[f"step{s}.z_in"] + (sig[s + 1] - sig[s]) * t[f"step{s}.pred"]
            res[f"step{s}.z_out(euler from recorded pred)"] = maxdiff(z_out, t[f"step{s}.z_out"])
        with torch.no_grad():
            dec = vae.decode(t["latents.final"] / j["vae_scaling_factor"]).sample
        if "vae_dec.output" in t:
            res["vae_decode(final/scaling)"] = maxdiff(dec, t["vae_dec.output"])
            dec = t["vae_dec.output"]
        res["vae_dec.input=final/scaling"] = maxdiff(t["latents.final"] / j["vae_scaling_factor"], t["vae_dec.input"])
        img = ((dec * 0.5 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1).to(torch.uint8)
        res["image_uint8(trunc)"] = maxdiff(img[0], t["image_uint8"])
        for r in range(1, num_prompt):
            res[f"image_uint8.{r}(trunc)"] = maxdiff(img[r], t[f"image_uint8.{r}"])
        for i in range(j["num_vae_encodes"]):
            smp = t[f"vae_enc.{i}.mean"] + t[f"vae_enc.{i}.std"] * t[f"randn.{i+1:02d}"]
            res[f"vae_enc.{i}.sample=mean+std*randn"] = maxdiff(smp, t[f"vae_enc.{i}.sample"])
        results[name] = res
        worst = max(worst, max(res.values()))
    # transformer_only (and further direct transformer dumps, e.g. transformer_only_imgcond)
    for tname in [x for x in man.get("extra_cases", ["transformer_only"]) if x.startswith("transformer_only")]:
        t = load_file(os.path.join(d, tname + ".safetensors"))
        j = json.load(open(os.path.join(d, tname + ".json")))
        sizes = {int(k): v for k, v in j["input_image_sizes"].items()}
        lat = [t[k] for k in sorted(x for x in t if x.startswith("tf.input_img_latents."))] or None
        with torch.no_grad():
            o = model.forward(t["tf.x"], t["tf.timestep"], t["tf.input_ids"], lat, sizes, t["tf.attention_mask"].float(),
                              t["tf.position_ids"], return_past_key_values=False)
        results[tname] = {"tf.out": maxdiff(o, t["tf.out"])}
    t = load_file(os.path.join(d, "vae_only.safetensors"))
    with torch.no_grad():
        ld = vae.encode(t["vae.x"]).latent_dist
        results["vae_only"] = {"mean": maxdiff(ld.mean, t["vae.enc.mean"]),
                               "dec_of_z_rand": maxdiff(vae.decode(t["vae.z_rand"]).sample, t["vae.dec_of_z_rand"])}
    return results, worst


def main():
    allok = True
    for d in sys.argv[1:]:
        res, worst = check_dir(d)
        print(d)
        for case, r in res.items():
            print("  ", case, json.dumps({k: float("%.3g" % v) for k, v in r.items()}))
        ok = all(v < 1e-4 for r in res.values() for v in r.values())
        print("   max abs diff over all checks: %.3g -> %s" % (max(v for r in res.values() for v in r.values()),
                                                            "OK" if ok else "MISMATCH"))
        allok &= ok
    sys.exit(0 if allok else 1)


if __name__ == "__main__":
    main()
