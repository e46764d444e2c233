#!/usr/bin/env python3
"""A random-weight OmniGen checkpoint of the real shapes, in the official layout, made with torch.

The real config (benches/configs/wide: hidden 3072, MLP 8192, 32 heads x 96, the real rope factors and SDXL
VAE) with `--layers` decoder layers (default 32: the full 3.9 B-parameter model, 7.6 GB of bf16). Weights
follow make_tiny.py's rules (unit-scale activations through every layer, so nothing overflows in bf16) and
are drawn on `--device` (a GPU makes the full model in seconds). The tokenizer is the committed small one:
sequence lengths differ from the real Phi-3 tokenizer's by a few text tokens, the image tokens (4,096 at
1024²) are the same.

Usage: python make_full.py --out DIR [--layers 32] [--device cuda]
Needs torch, safetensors, diffusers (the VAE) and the official `OmniGen` package on the path (its model
class names every key and shape).
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
WIDE = os.path.join(ROOT, "benches", "configs", "wide")


def tensor_for(name, shape, gen, device):
    """make_tiny.py's value rules, drawn in f32 on `device`, stored as bf16."""
    def randn(*s):
        return torch.randn(*s, generator=gen, device=device, dtype=torch.float32)

    if name.endswith("layernorm.weight") or name == "llm.norm.weight":
        v = 1.0 + 0.1 * randn(shape)
    elif name.endswith("embed_tokens.weight"):
        v = 0.5 * randn(shape)
    elif name.endswith(".bias"):
        v = 0.05 * randn(shape)
    elif len(shape) >= 2:
        v = randn(shape) / math.sqrt(math.prod(shape[1:]))
    else:
        v = 0.1 * randn(shape)
    return v.to(torch.bfloat16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=3072)
    args = ap.parse_args()
    t0 = time.time()
    os.makedirs(os.path.join(args.out, "vae"), exist_ok=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        shutil.copy(os.path.join(WIDE, f), os.path.join(args.out, f))
    with open(os.path.join(WIDE, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = args.layers
    cfg["torch_dtype"] = "bfloat16"
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    shutil.copy(os.path.join(WIDE, "vae", "config.json"), os.path.join(args.out, "vae", "config.json"))

    from safetensors.torch import save_file
    from OmniGen.model import OmniGen
    from OmniGen.transformer import Phi3Config

    # The model on the meta device names every parameter and its shape without allocating it; the
    # position embedding is a computed buffer, taken as the official code computes it.
    with torch.device("meta"):
        model = OmniGen(Phi3Config.from_pretrained(args.out))
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    sd = {}
    for name, v in sorted(model.state_dict().items()):
        if name == "pos_embed":
            from OmniGen.model import get_2d_sincos_pos_embed
            pe = get_2d_sincos_pos_embed(cfg["hidden_size"], model.pos_embed_max_size,
                                         interpolation_scale=model.pe_interpolation, base_size=64)
            sd[name] = torch.from_numpy(pe).float().unsqueeze(0).to(torch.bfloat16)
        else:
            sd[name] = tensor_for(name, tuple(v.shape), gen, args.device).cpu()
    n_params = sum(v.numel() for v in sd.values())
    save_file(sd, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    del sd

    from diffusers import AutoencoderKL
    with open(os.path.join(WIDE, "vae", "config.json")) as f:
        vcfg = json.load(f)
    vae = AutoencoderKL.from_config(vcfg).to(args.device)
    vgen = torch.Generator(device=args.device).manual_seed(args.seed + 3)
    with torch.no_grad():
        for name, p in sorted(vae.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=vgen, device=args.device))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=vgen, device=args.device))
            else:
                p.copy_(torch.randn(p.shape, generator=vgen, device=args.device) / math.sqrt(math.prod(p.shape[1:])))
    save_file({k: v.detach().float().cpu().contiguous() for k, v in vae.state_dict().items()},
              os.path.join(args.out, "vae", "diffusion_pytorch_model.safetensors"))
    print(json.dumps({"out": args.out, "layers": args.layers, "transformer_params": n_params,
                      "device": args.device, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    sys.exit(main())
