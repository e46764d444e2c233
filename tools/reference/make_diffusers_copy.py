#!/usr/bin/env python3
"""Write a diffusers-layout copy of a tiny official checkpoint, stored in bf16 like Shitao/OmniGen-v1-diffusers.

Usage: python make_diffusers_copy.py --fixtures tests/fixtures/A      (reads A/model, writes A/model_diffusers)

Layout (as diffusers' OmniGenPipeline.save_pretrained writes it, = the real -diffusers repo layout):
  model_index.json
  transformer/config.json, transformer/diffusion_pytorch_model.safetensors   (BF16, keys renamed exactly as
      diffusers' scripts/convert_omnigen_to_diffusers.py: see compare_diffusers.convert_official_to_diffusers)
  vae -> ../model/vae  (relative symlink: save_pretrained wrote exactly model/vae's config and float32 values)
  scheduler/scheduler_config.json   FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1)
  tokenizer/tokenizer.json, tokenizer_config.json, special_tokens_map.json
The tiny checkpoint's values are bf16-exact, so the bf16 copy is lossless. Checks (written to
model_diffusers_check.json next to the dir): every transformer tensor equals the converted float32 tensor, and
diffusers' OmniGenTransformer2DModel loaded from the copy (cast to float32) reproduces the official
transformer_only.safetensors output.
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fixtures_arg, write_json  # noqa: E402
from compare_diffusers import build_diffusers_pipe, convert_official_to_diffusers  # noqa: E402


def main():
    fixtures, model_dir = fixtures_arg()
    out = os.path.join(fixtures, "model_diffusers")
    shutil.rmtree(out, ignore_errors=True)
    pipe = build_diffusers_pipe(model_dir)
    pipe.transformer.to(torch.bfloat16)
    pipe.save_pretrained(out, safe_serialization=True)

    from diffusers import OmniGenTransformer2DModel
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    ref = convert_official_to_diffusers(load_file(os.path.join(model_dir, "model.safetensors")), cfg)
    saved = load_file(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(ref), set(saved) ^ set(ref)
    dtypes = sorted({str(v.dtype) for v in saved.values()})
    maxd = max(float((saved[k].float() - ref[k]).abs().max()) for k in ref)

    tr = OmniGenTransformer2DModel.from_pretrained(os.path.join(out, "transformer")).float().eval()
    t = load_file(os.path.join(fixtures, "transformer_only.safetensors"))
    j = json.load(open(os.path.join(fixtures, "transformer_only.json")))
    sizes = {int(k): v for k, v in j["input_image_sizes"].items()}
    lat = [t[k] for k in sorted(x for x in t if x.startswith("tf.input_img_latents."))]
    with torch.no_grad():
        o = tr(t["tf.x"], t["tf.timestep"], t["tf.input_ids"], lat, sizes, t["tf.attention_mask"].float(),
               t["tf.position_ids"], return_dict=False)[0]
    fdiff = float((o - t["tf.out"]).abs().max())
    report = {"transformer_dtypes": dtypes, "num_tensors": len(saved),
              "max_abs_diff_vs_converted_fp32": maxd,
              "diffusers_forward_vs_official_transformer_only_tf.out": fdiff,
              "keys": sorted(saved)}
    # vae/: the saved VAE has exactly the values of model/vae; to save 1.3 MB it is replaced by a relative symlink
    vs = load_file(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"))
    vo = load_file(os.path.join(model_dir, "vae", "diffusion_pytorch_model.safetensors"))
    assert set(vs) == set(vo) and all(torch.equal(vs[k], vo[k]) for k in vo)
    cs = json.load(open(os.path.join(out, "vae", "config.json")))
    cs.pop("_name_or_path", None)  # the only difference: save_pretrained records the absolute source path
    assert cs == json.load(open(os.path.join(model_dir, "vae", "config.json")))
    shutil.rmtree(os.path.join(out, "vae"))
    os.symlink(os.path.join("..", "model", "vae"), os.path.join(out, "vae"))
    report["vae"] = "symlink model_diffusers/vae -> ../model/vae (identical to what save_pretrained wrote)"
    write_json(os.path.join(fixtures, "model_diffusers_check.json"), report)
    assert dtypes == ["torch.bfloat16"] and maxd == 0.0 and fdiff < 1e-5, report
    print("diffusers copy ok:", {k: v for k, v in report.items() if k != "keys"})


if __name__ == "__main__":
    main()
