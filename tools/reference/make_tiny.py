#!/usr/bin/env python3
"""Create a tiny random-weight OmniGen model in the OFFICIAL checkpoint layout.

Layout written to --out DIR (same as Shitao/OmniGen-v1):
  config.json                 Phi-3 backbone config (transformers Phi3Config)
  model.safetensors           official OmniGen state_dict keys (fp32, values bf16-exact, see below)
  tokenizer.json              tiny Llama/Phi-3-style BPE (byte_fallback) built with `tokenizers`
  tokenizer_config.json, special_tokens_map.json
  vae/config.json             diffusers AutoencoderKL (SDXL structure: 4 down/up blocks, mid attention)
  vae/diffusion_pytorch_model.safetensors
  tiny_meta.json              what this script used (seed, sizes, ...)

All weights in model.safetensors are rounded to bfloat16 and stored as float32: the official
OmniGenPipeline.__init__ does model.to(torch.bfloat16) and __call__ then model.to(dtype); with
bf16-exact values this round trip is lossless, so an fp32 reimplementation that loads the file
as-is reproduces the official fp32 run.

Usage: python make_tiny.py --config A --out fixtures/A/model
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

# Phi-3 settings every config shares.
PHI3_BASE = dict(rms_norm_eps=1e-5, rope_theta=10000.0)

CONFIGS = {
    # Config A: hidden 48, 2 layers, 3 heads (head_dim 16), rope_scaling type spelled "su" (legacy Phi-3 name),
    # original_max_position_embeddings=4096 is larger than every fixture sequence -> only the SHORT factors are used
    # (the LongRoPE attention scaling sqrt(1 + ln(131072/4096)/ln(4096)) still applies).
    "A": dict(
        PHI3_BASE, seed=1234,
        hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
        max_position_embeddings=131072, original_max_position_embeddings=4096, rope_type_in_file="su",
        vae=dict(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8),
    ),
    # Config B: smaller than A (hidden 16, 2 heads, head_dim 8: pos_embed [1,36864,16] is 2.4 MB), rope_scaling type
    # spelled "longrope" (current name)
    # with original_max_position_embeddings=72 and max_position_embeddings=4096 (attention scaling
    # sqrt(1 + ln(4096/72)/ln(72))): sequences longer than 72 use the LONG factors, so the CFG branches of one case
    # straddle the threshold (t2i 64x64: cond 60 short / uncond 159 long; edit: cond 77 long / img_cond 66 short).
    # Second VAE config: block_out [8,16,16,16], layers_per_block 2, groups 4.
    "B": dict(
        PHI3_BASE, seed=4321,
        hidden_size=16, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=4096, original_max_position_embeddings=72, rope_type_in_file="longrope",
        vae=dict(block_out_channels=[8, 16, 16, 16], layers_per_block=2, norm_num_groups=4),
    ),
    # Config M: MEDIUM model for bench.py only (not a fixture): hidden 512, 4 layers, 8 heads (head_dim 64),
    # and a VAE with the real SDXL VAE architecture (random weights).
    "M": dict(
        PHI3_BASE, seed=777,
        hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=131072, original_max_position_embeddings=4096, rope_type_in_file="su",
        vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
    ),
    # Config W: the REAL model width for bench.py only (not a fixture): hidden 3072, MLP 8192, 32 heads x 96,
    # 4 of the 32 layers, the real SDXL VAE architecture (random weights); the real rope factors, read from the
    # committed benches/configs/wide/config.json.
    "W": dict(
        PHI3_BASE, seed=3072,
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=131072, original_max_position_embeddings=4096, rope_type_in_file="su",
        rope_factors_from="benches/configs/wide/config.json",
        vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
    ),
}

SPECIAL_ADDED = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]

CORPUS = [
    "Generate an image according to the following instructions",
    "a red cat sitting on a blue mat",
    "a cat and a dog sit together in a garden",
    "make the cat green and add a hat",
    "The cat in the first image and the dog in the second image",
    "low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra fingers, mutated hands",
    "poorly drawn hands, poorly drawn face, mutation, deformed, blurry, bad anatomy, bad proportions",
    "extra limbs, cloned face, disfigured, gross proportions, malformed limbs, missing arms, missing legs",
    "<img> </img> <|diffusion|> photo of a house near the sea at sunset",
    "user assistant image images picture draw",
]


def build_tokenizer(out_dir):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers, decoders, processors, AddedToken

    # 1) train merges on a tiny corpus (Metaspace words, like sentencepiece)
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=220, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  min_frequency=1)
    t.train_from_iterator(CORPUS * 3, trainer=trainer)
    trained = json.loads(t.to_str())["model"]
    tvocab = trained["vocab"]
    merges = trained["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]

    # 2) Llama/Phi-3 style vocab: <unk>=0 <s>=1 </s>=2, <0x00>..<0xFF> = 3..258, then trained pieces
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab["<0x%02X>" % b] = len(vocab)
    for piece, _ in sorted(tvocab.items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(x, normalized=False, special=True) for x in ["<unk>", "<s>", "</s>"]])
    tok.add_special_tokens([AddedToken(x, normalized=False, special=True, lstrip=False, rstrip=False)
                            for x in SPECIAL_ADDED])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 131072, "legacy": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>",
                   "pad_token": "<|endoftext|>"}, f, indent=2)
    return tok.get_vocab_size(with_added_tokens=True), eot


def bf16_exact(t):
    return t.to(torch.bfloat16).to(torch.float32).contiguous()


def randomize_omnigen(model, seed):
    g = torch.Generator().manual_seed(seed + 1)
    sd = model.state_dict()
    out = {}
    for name in sorted(sd.keys()):
        v = sd[name]
        if name == "pos_embed":
            nv = v.clone()
        elif name.endswith("layernorm.weight") or name == "llm.norm.weight":
            nv = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        elif name.endswith("embed_tokens.weight"):
            nv = 0.5 * torch.randn(v.shape, generator=g)
        elif name.endswith(".bias"):
            nv = 0.05 * torch.randn(v.shape, generator=g)
        elif v.dim() >= 2:
            fan_in = int(np.prod(v.shape[1:]))
            nv = torch.randn(v.shape, generator=g) / np.sqrt(fan_in)
        else:
            nv = 0.1 * torch.randn(v.shape, generator=g)
        out[name] = bf16_exact(nv)
    model.load_state_dict(out, strict=True)
    return out


def build_vae(cfg, seed, out_dir):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed + 2)
    vc = cfg["vae"]
    n = len(vc["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=vc["block_out_channels"], layers_per_block=vc["layers_per_block"],
        act_fn="silu", latent_channels=4, norm_num_groups=vc["norm_num_groups"], sample_size=64,
        scaling_factor=0.13025, force_upcast=True,
    )
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for name, p in sorted(vae.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
    vae.save_pretrained(os.path.join(out_dir, "vae"), safe_serialization=True)
    return vae


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    os.makedirs(args.out, exist_ok=True)
    seed = cfg["seed"]
    torch.manual_seed(seed)

    vocab_size, eot = build_tokenizer(args.out)

    from transformers import Phi3Config
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    rng = np.random.default_rng(seed)
    short_factor = [round(float(x), 4) for x in 1.0 + 0.5 * rng.random(head_dim // 2)]
    long_factor = [round(float(x), 4) for x in 2.0 + 8.0 * np.sort(rng.random(head_dim // 2))]
    if "rope_factors_from" in cfg:
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
        with open(os.path.join(root, cfg["rope_factors_from"])) as f:
            committed = json.load(f)["rope_scaling"]
        short_factor, long_factor = committed["short_factor"], committed["long_factor"]
    pcfg = Phi3Config(
        vocab_size=vocab_size, hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
        hidden_act="silu", max_position_embeddings=cfg["max_position_embeddings"],
        original_max_position_embeddings=cfg["original_max_position_embeddings"], initializer_range=0.02,
        rms_norm_eps=cfg["rms_norm_eps"], use_cache=True, tie_word_embeddings=False, rope_theta=cfg["rope_theta"],
        rope_scaling={"type": "longrope", "short_factor": short_factor, "long_factor": long_factor},
        bos_token_id=1, eos_token_id=eot, pad_token_id=eot, sliding_window=None,
    )
    pcfg.architectures = ["Phi3ForCausalLM"]
    pcfg.save_pretrained(args.out)
    # rewrite config.json deterministically (drop transformers_version noise, set rope type spelling)
    cpath = os.path.join(args.out, "config.json")
    with open(cpath) as f:
        cj = json.load(f)
    cj["rope_scaling"]["type"] = cfg["rope_type_in_file"]
    cj.pop("transformers_version", None)
    cj["torch_dtype"] = "float32"
    with open(cpath, "w") as f:
        json.dump(cj, f, indent=2, sort_keys=True)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from OmniGen.model import OmniGen
    from OmniGen.transformer import Phi3Config as OGPhi3Config
    pcfg2 = OGPhi3Config.from_pretrained(args.out)
    model = OmniGen(pcfg2)
    sd = randomize_omnigen(model, seed)
    from safetensors.torch import save_file
    save_file(sd, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})

    build_vae(cfg, seed, args.out)

    meta = dict(config=args.config, seed=seed, vocab_size=vocab_size, endoftext_id=eot, head_dim=head_dim,
                rope_short_factor=short_factor, rope_long_factor=long_factor,
                weights_note="model.safetensors values are bf16-exact float32",
                n_params_transformer=int(sum(v.numel() for v in sd.values())),
                keys=sorted(sd.keys()), **{k: v for k, v in cfg.items() if k != "seed"})
    with open(os.path.join(args.out, "tiny_meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(json.dumps({k: meta[k] for k in ["config", "seed", "vocab_size", "n_params_transformer"]}))


if __name__ == "__main__":
    main()
