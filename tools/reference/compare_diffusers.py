#!/usr/bin/env python3
"""Load the same tiny model into diffusers' OmniGenPipeline (keys converted) and compare with the official dumps.

Usage: python compare_diffusers.py fixtures/A [DIR ...]   -> prints JSON and writes DIR/diffusers_compare.json

diffusers 0.33.1 OmniGenPipeline always runs batched CFG without a KV cache, so the natural reference is an
official case with use_kv_cache=False (the *_nokv cases; exact match also needs the same rope factor choice, see
README.md). The scheduler is FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1)
(so timesteps are 0, 1/N, ... like the official OmniGenScheduler).
Initial latents are passed with `latents=` (= official randn.00) and the VAE posterior noise is injected in the
same order as the official run (official randn.01, randn.02, ...).
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Recorder, RandnInjector  # noqa: E402


def convert_official_to_diffusers(sd, cfg):
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = H // nh
    fixed = {
        "pos_embed": "patch_embedding.pos_embed",
        "x_embedder.proj.weight": "patch_embedding.output_image_proj.weight",
        "x_embedder.proj.bias": "patch_embedding.output_image_proj.bias",
        "input_x_embedder.proj.weight": "patch_embedding.input_image_proj.weight",
        "input_x_embedder.proj.bias": "patch_embedding.input_image_proj.bias",
        "final_layer.adaLN_modulation.1.weight": "norm_out.linear.weight",
        "final_layer.adaLN_modulation.1.bias": "norm_out.linear.bias",
        "final_layer.linear.weight": "proj_out.weight",
        "final_layer.linear.bias": "proj_out.bias",
        "time_token.mlp.0.weight": "time_token.linear_1.weight", "time_token.mlp.0.bias": "time_token.linear_1.bias",
        "time_token.mlp.2.weight": "time_token.linear_2.weight", "time_token.mlp.2.bias": "time_token.linear_2.bias",
        "t_embedder.mlp.0.weight": "t_embedder.linear_1.weight", "t_embedder.mlp.0.bias": "t_embedder.linear_1.bias",
        "t_embedder.mlp.2.weight": "t_embedder.linear_2.weight", "t_embedder.mlp.2.bias": "t_embedder.linear_2.bias",
    }
    out = {}
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
        elif k.startswith("llm."):
            k2 = k[4:]
            if k2.endswith("self_attn.qkv_proj.weight"):
                base = k2[: -len("qkv_proj.weight")]
                q, kk, vv = torch.split(v, [nh * hd, nkv * hd, nkv * hd], dim=0)
                out[base + "to_q.weight"], out[base + "to_k.weight"], out[base + "to_v.weight"] = q, kk, vv
            elif k2.endswith("self_attn.o_proj.weight"):
                out[k2.replace("o_proj.weight", "to_out.0.weight")] = v
            else:
                out[k2] = v
        else:
            raise KeyError(k)
    return {k: v.contiguous() for k, v in out.items()}


def build_diffusers_pipe(model_dir):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OmniGenPipeline, OmniGenTransformer2DModel
    from transformers import AutoTokenizer
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    tr = OmniGenTransformer2DModel(
        in_channels=4, patch_size=2, hidden_size=cfg["hidden_size"], rms_norm_eps=cfg["rms_norm_eps"],
        num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
        intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
        pad_token_id=cfg["pad_token_id"], vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
        original_max_position_embeddings=cfg["original_max_position_embeddings"], rope_base=int(cfg["rope_theta"]),
        rope_scaling=cfg["rope_scaling"], pos_embed_max_size=192)
    sd = convert_official_to_diffusers(load_file(os.path.join(model_dir, "model.safetensors")), cfg)
    tr.load_state_dict(sd, strict=True)
    tr = tr.float().eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(model_dir, "vae")).float().eval()
    sched = FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return OmniGenPipeline(transformer=tr, scheduler=sched, vae=vae, tokenizer=tok)


class PerRowRopeFix:
    """Context manager that patches diffusers' OmniGen rope to use each batch row's own position_ids.

    diffusers (0.33.1 .. 0.42.1 at least) computes `emb = torch.cat((freqs, freqs), dim=-1)[0]` in
    OmniGenSuScaledRotaryEmbedding.forward, i.e. the positions of batch row 0 are used for EVERY row of the batched
    CFG call. Rows are left-padded with different amounts, so all rows except those whose padding equals row 0's get
    wrong rotary phases (row 0 = cond branch is the one that comes out right)."""

    def __enter__(self):
        import math
        import diffusers.models.embeddings as emb_mod
        import diffusers.models.transformers.transformer_omnigen as tom
        self.tom, self.emb_mod = tom, emb_mod
        self.orig_fwd = tom.OmniGenSuScaledRotaryEmbedding.forward
        self.orig_apply = emb_mod.apply_rotary_emb

        def fwd(rself, hidden_states, position_ids):
            seq_len = torch.max(position_ids) + 1
            f = rself.long_factor if seq_len > rself.original_max_position_embeddings else rself.short_factor
            ext = torch.tensor(f, dtype=torch.float32)
            shape = torch.arange(0, rself.dim, 2, dtype=torch.int64).float() / rself.dim
            inv = 1.0 / (ext * rself.base ** shape)
            freqs = (inv[None, :, None].expand(position_ids.shape[0], -1, 1) @ position_ids[:, None, :].float()).transpose(1, 2)
            e = torch.cat((freqs, freqs), dim=-1)  # (B, S, D)  <- per row
            scale = rself.max_position_embeddings / rself.original_max_position_embeddings
            sf = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(rself.original_max_position_embeddings))
            return e.cos() * sf, e.sin() * sf

        orig_apply = self.orig_apply

        def apply(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
            cos, sin = freqs_cis
            if cos.dim() == 3:  # (B,S,D) -> broadcast over heads of x (B,H,S,D)
                cos, sin = cos[:, None], sin[:, None]
                x1, x2 = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
                rot = torch.cat([-x2, x1], dim=-1)
                return (x.float() * cos + rot.float() * sin).to(x.dtype)
            return orig_apply(x, freqs_cis, use_real=use_real, use_real_unbind_dim=use_real_unbind_dim,
                              sequence_dim=sequence_dim)
        tom.OmniGenSuScaledRotaryEmbedding.forward = fwd
        emb_mod.apply_rotary_emb = apply
        return self

    def __exit__(self, *a):
        self.tom.OmniGenSuScaledRotaryEmbedding.forward = self.orig_fwd
        self.emb_mod.apply_rotary_emb = self.orig_apply


def maxdiff(a, b):
    return float((a.float() - b.float()).abs().max())


def run_variant(pipe, d, name, a, fix):
    """Run the diffusers pipeline with the official case's arguments and injected noise; return diff report."""
    import contextlib
    t = load_file(os.path.join(d, name + ".safetensors"))
    j = json.load(open(os.path.join(d, name + ".json")))
    inj = RandnInjector(0, Recorder(), prefix="d")
    inj.forced = [t[f"randn.{i:02d}"] for i in range(1, j["num_vae_encodes"] + 1)]  # same VAE noise, same order
    steps = []

    def cb(p, i, ts, kw):
        steps.append(kw["latents"].clone())
        return {}
    imgs = None if a["input_images"] is None else [
        [os.path.join(d, y) for y in x] if isinstance(x, list) else os.path.join(d, x) for x in a["input_images"]]
    ctx = PerRowRopeFix() if fix else contextlib.nullcontext()
    with inj, ctx, torch.no_grad():
        out = pipe(prompt=a["prompt"], input_images=imgs, height=a["height"], width=a["width"],
                   num_inference_steps=a["num_inference_steps"], max_input_image_size=a["max_input_image_size"],
                   guidance_scale=a["guidance_scale"], img_guidance_scale=a["img_guidance_scale"],
                   use_input_image_size_as_output=a["use_input_image_size_as_output"],
                   latents=t["randn.00"].clone(), output_type="latent", callback_on_step_end=cb,
                   callback_on_step_end_tensor_inputs=["latents"])
    r = {"official_case_kv_cache": a["use_kv_cache"], "official_separate_cfg": a["separate_cfg_infer"]}
    for s, z in enumerate(steps):
        r[f"step{s}.z_out maxdiff"] = maxdiff(z, t[f"step{s}.z_out"][:1])
    r["final_latents maxdiff"] = maxdiff(out.images, t["latents.final"])
    r["final_latents max|official|"] = float(t["latents.final"].abs().max())
    return r


def compare_dir(d):
    man = json.load(open(os.path.join(d, "manifest.json")))
    pipe = build_diffusers_pipe(os.path.join(d, man["model_dir"]))
    report = {}
    for name, c in man["cases"].items():
        a = c["pipeline_call_args"]
        try:
            report[name] = {"diffusers_as_is": run_variant(pipe, d, name, a, False),
                            "diffusers_rope_per_row_fix": run_variant(pipe, d, name, a, True)}
        except Exception as e:  # e.g. a batch whose VAE-encode order differs from the official one
            report[name] = {"error": f"{type(e).__name__}: {e}"}
    with open(os.path.join(d, "diffusers_compare.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    for d in sys.argv[1:]:
        print(d, json.dumps(compare_dir(d), indent=1))
