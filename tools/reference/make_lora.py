#!/usr/bin/env python3
"""Tiny PEFT LoRA adapter for config A, made as the official train.py does, and the official merge_lora result.

Usage: python make_lora.py --fixtures tests/fixtures/A

1. Adapter (written to A/lora/ with PeftModel.save_pretrained: adapter_config.json + adapter_model.safetensors):
   OmniGen.from_pretrained(A/model); model.requires_grad_(False);
   get_peft_model(model, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["qkv_proj", "o_proj"]))            (official train.py, rank 4)
   then, so that the merge matters, every lora_B (zero-initialised by PEFT) is set to 0.05 * N(0,1) and every
   lora_A re-drawn as N(0, 1/r) (torch.Generator seed 2024), all rounded to bf16-exact float32 (the official
   pipeline holds the model in bf16 when it merges, so bf16-exact adapter values load losslessly).
2. Official merge: pipe = OmniGenPipeline.from_pretrained(A/model)  (model cast to bf16 by __init__)
                   pipe.merge_lora(A/lora)  ->  PeftModel.from_pretrained(model, path).merge_and_unload()
   PEFT 0.9.0 merges in the model dtype (bf16 on CPU): delta = (B @ A) * (alpha/r) in bf16, W = W + delta in bf16.
3. lora_ref.safetensors:
   merged.llm.layers.N.self_attn.{qkv_proj,o_proj}.weight  official merged weights (bf16 values, stored float32)
   fp32merge.llm.layers.N.self_attn.{qkv_proj,o_proj}.weight  W + (alpha/r) * B @ A computed in float32 from the files
   lora.tf.out      OmniGen.forward of the merged model (after pipe.model.to(float32), as __call__ does) on the
                    inputs of A/transformer_only.safetensors (tf.x, tf.timestep, tf.input_ids, ...)
   lora.tf.out_fp32merge  same forward with the float32 merge (fp32merge.*) instead
   lora_ref.json: adapter key names and shapes, scaling, and how close the emulations are to the official merge.
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Recorder, fixtures_arg, patch_official, write_json  # noqa: E402

R = 4
ALPHA = 4
SEED = 2024


def bf16_exact(t):
    return t.to(torch.bfloat16).to(torch.float32)


def main():
    fixtures, model_dir = fixtures_arg()
    lora_dir = os.path.join(fixtures, "lora")
    shutil.rmtree(lora_dir, ignore_errors=True)
    patch_official()
    from OmniGen.model import OmniGen
    from OmniGen import OmniGenPipeline
    from peft import LoraConfig, get_peft_model

    # ---- 1. adapter, as train.py builds it
    model = OmniGen.from_pretrained(model_dir)
    model.requires_grad_(False)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=["qkv_proj", "o_proj"])
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, mod in sorted(pm.named_modules()):
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                a = mod.lora_A["default"].weight
                b = mod.lora_B["default"].weight
                a.copy_(bf16_exact(torch.randn(a.shape, generator=g) / R))
                b.copy_(bf16_exact(0.05 * torch.randn(b.shape, generator=g)))
    pm.save_pretrained(lora_dir)
    if os.path.exists(os.path.join(lora_dir, "README.md")):  # PEFT's generated model card: not part of the adapter
        os.remove(os.path.join(lora_dir, "README.md"))
    ad = load_file(os.path.join(lora_dir, "adapter_model.safetensors"))
    adapter_cfg = json.load(open(os.path.join(lora_dir, "adapter_config.json")))

    # ---- 2. official merge
    pipe = OmniGenPipeline.from_pretrained(model_dir)
    pipe.merge_lora(lora_dir)
    merged_model = pipe.model.get_base_model()
    pipe.model.to(torch.float32)  # what __call__(dtype=float32) does

    base = load_file(os.path.join(model_dir, "model.safetensors"))
    rec = Recorder()
    scaling = ALPHA / R
    report = {"scaling_alpha_over_r": scaling, "per_weight": {}}
    fp32_sd = {}
    n_layers = len(merged_model.llm.layers)
    for n in range(n_layers):
        for proj in ["qkv_proj", "o_proj"]:
            key = f"llm.layers.{n}.self_attn.{proj}.weight"
            w_off = getattr(merged_model.llm.layers[n].self_attn, proj).weight.detach().float()
            A = ad[f"base_model.model.llm.layers.{n}.self_attn.{proj}.lora_A.weight"]
            B = ad[f"base_model.model.llm.layers.{n}.self_attn.{proj}.lora_B.weight"]
            w0 = base[key]
            fp32 = w0 + scaling * (B @ A)
            # emulation of PEFT's bf16 merge: delta = bf16(bf16(B) @ bf16(A)) * s, W = bf16(bf16(W) + delta)
            delta_bf = (B.bfloat16() @ A.bfloat16()) * scaling
            emu = (w0.bfloat16() + delta_bf).float()
            rec.add("merged." + key, w_off)
            rec.add("fp32merge." + key, fp32)
            fp32_sd[key] = fp32
            report["per_weight"][key] = {
                "max|official - fp32merge|": float((w_off - fp32).abs().max()),
                "max|official - bf16(fp32merge)|": float((w_off - bf16_exact(fp32)).abs().max()),
                "max|official - bf16 emulation|": float((w_off - emu).abs().max()),
                "max|delta|": float((scaling * (B @ A)).abs().max()),
            }

    t = load_file(os.path.join(fixtures, "transformer_only.safetensors"))
    j = json.load(open(os.path.join(fixtures, "transformer_only.json")))
    sizes = {int(k): v for k, v in j["input_image_sizes"].items()}
    lat = [t[k] for k in sorted(x for x in t if x.startswith("tf.input_img_latents."))]
    inputs = (t["tf.x"], t["tf.timestep"], t["tf.input_ids"], lat, sizes, t["tf.attention_mask"].float(),
              t["tf.position_ids"])
    merged_model.eval()
    with torch.no_grad():
        out = merged_model.forward(*inputs, past_key_values=None, return_past_key_values=False)
    rec.add("lora.tf.out", out)
    # same forward with the float32 merge
    m2 = OmniGen.from_pretrained(model_dir).float().eval()
    sd = m2.state_dict()
    sd.update(fp32_sd)
    m2.load_state_dict(sd)
    with torch.no_grad():
        out2 = m2.forward(*inputs, past_key_values=None, return_past_key_values=False)
    rec.add("lora.tf.out_fp32merge", out2)
    report["max|lora.tf.out - lora.tf.out_fp32merge|"] = float((out - out2).abs().max())
    report["max|lora.tf.out - transformer_only tf.out (no LoRA)|"] = float((out - t["tf.out"]).abs().max())
    rec.save(os.path.join(fixtures, "lora_ref.safetensors"))
    info = {"description": __doc__, "lora_config": {"r": R, "lora_alpha": ALPHA, "init_lora_weights": "gaussian",
                                                    "target_modules": ["qkv_proj", "o_proj"], "seed": SEED},
            "adapter_config_json": adapter_cfg,
            "adapter_keys": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(ad.items())},
            "merge_report": report, "transformer_only_inputs": "transformer_only.safetensors",
            "tensors": rec.listing()}
    write_json(os.path.join(fixtures, "lora_ref.json"), info)
    print("lora ok:", json.dumps({k: v for k, v in report.items() if k != "per_weight"}),
          "max|official-emu|", max(v["max|official - bf16 emulation|"] for v in report["per_weight"].values()),
          "max|official-fp32|", max(v["max|official - fp32merge|"] for v in report["per_weight"].values()))


if __name__ == "__main__":
    main()
