#!/usr/bin/env python3
"""Run the OFFICIAL OmniGen 1.0.3 OmniGenPipeline (CPU, float32) on a tiny model and dump reference tensors.

Usage: python dump_ref.py --model fixtures/A/model --out fixtures/A   (config name read from model/tiny_meta.json)

Per pipeline case NAME it writes  NAME.safetensors, NAME.json (manifest), NAME.png (pipeline output image).
Also vae_only.safetensors/json and transformer_only.safetensors/json, input PNGs, and manifest.json.
Randomness is injected: torch.randn is replaced by numpy PCG64 normals (seeded per case, see common.RandnInjector),
and every draw is saved (randn.NN); randn.00 is the initial latent noise.
A case may set vae_noise="zero": the VAE posterior sample() draws (randn.01..) are replaced by zeros, so the input-image
latents are the posterior MEAN (times scaling_factor, as the pipeline does); randn.00 is unchanged.
`--cases a,b` runs only those pipeline cases (manifest.json in --out then lists only them).
Bitwise reproduction of the committed fixtures on an AVX-512 CPU needs AVX2 kernels (2 threads):
  ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2  (default AVX-512 paths differ by ~1e-5)
"""
import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Recorder, RandnInjector, make_image, patch_official, versions, write_json  # noqa: E402

NUM_STEPS = 4

DEFAULTS = dict(height=1024, width=1024, num_inference_steps=50, guidance_scale=3, use_img_guidance=True,
                img_guidance_scale=1.6, max_input_image_size=1024, separate_cfg_infer=True, offload_model=False,
                use_kv_cache=True, offload_kv_cache=True, use_input_image_size_as_output=False, seed=None)

# input images: name -> (width, height, pattern seed)
IMAGES = {
    "A": {"edit_in.png": (72, 56, 11), "img2_in.png": (50, 90, 12)},
    "B": {"edit_in.png": (72, 56, 11), "img2_in.png": (50, 90, 12), "big_in.png": (300, 170, 13),
          "thin_in.png": (40, 10, 14)},
}

T2I = "a red cat sitting on a blue mat"
T2I_LONG = "a cat and a dog sit together in a garden, photo of a house near the sea at sunset"
EDIT = "<img><|image_1|></img> make the cat green and add a hat"
TWO = "The cat in the first image <img><|image_1|></img> and the dog in the second image <img><|image_2|></img>"
BATCH_P2 = "<img><|image_1|></img> and <img><|image_2|></img> sit together in a garden"

CASES = {
    "A": [
        dict(name="t2i", noise_seed=101, prompt="a red cat sitting on a blue mat", input_images=None,
             height=64, width=64, guidance_scale=2.5),
        dict(name="t2i_nokv", noise_seed=101, prompt="a red cat sitting on a blue mat", input_images=None,
             height=64, width=64, guidance_scale=2.5, use_kv_cache=False),
        dict(name="edit", noise_seed=102, prompt="<img><|image_1|></img> make the cat green and add a hat",
             input_images=["edit_in.png"], height=64, width=64, guidance_scale=2.0, img_guidance_scale=1.6),
        dict(name="edit_nokv", noise_seed=102, prompt="<img><|image_1|></img> make the cat green and add a hat",
             input_images=["edit_in.png"], height=64, width=64, guidance_scale=2.0, img_guidance_scale=1.6,
             use_kv_cache=False),
        # ---- added cases (the four above are the original fixtures, reproduced byte for byte)
        # joint (batched) CFG: one forward per step over [cond, uncond(, img_cond)], left-padded to a common length
        dict(name="t2i_joint", noise_seed=101, prompt=T2I, input_images=None, height=64, width=64,
             guidance_scale=2.5, separate_cfg_infer=False),
        dict(name="t2i_joint_nokv", noise_seed=101, prompt=T2I, input_images=None, height=64, width=64,
             guidance_scale=2.5, separate_cfg_infer=False, use_kv_cache=False),
        dict(name="edit_joint", noise_seed=102, prompt=EDIT, input_images=["edit_in.png"], height=64, width=64,
             guidance_scale=2.0, img_guidance_scale=1.6, separate_cfg_infer=False),
        dict(name="edit_joint_nokv", noise_seed=102, prompt=EDIT, input_images=["edit_in.png"], height=64,
             width=64, guidance_scale=2.0, img_guidance_scale=1.6, separate_cfg_infer=False, use_kv_cache=False),
        # two input images of different sizes (64x48 -> 12 tokens, 48x80 -> 15 tokens) in one prompt
        dict(name="two_img", noise_seed=103, prompt=TWO, input_images=["edit_in.png", "img2_in.png"], height=64,
             width=64, guidance_scale=2.0, img_guidance_scale=1.6),

        dict(name="two_img_joint", noise_seed=103, prompt=TWO, input_images=["edit_in.png", "img2_in.png"],
             height=64, width=64, guidance_scale=2.0, img_guidance_scale=1.6, separate_cfg_infer=False),
        # posterior MEAN for the input images (vae_noise="zero")
        dict(name="edit_mean", noise_seed=102, prompt=EDIT, input_images=["edit_in.png"], height=64, width=64,
             guidance_scale=2.0, img_guidance_scale=1.6, vae_noise="zero"),
        dict(name="edit_mean_nokv", noise_seed=102, prompt=EDIT, input_images=["edit_in.png"], height=64,
             width=64, guidance_scale=2.0, img_guidance_scale=1.6, vae_noise="zero", use_kv_cache=False),
        dict(name="two_img_mean", noise_seed=103, prompt=TWO, input_images=["edit_in.png", "img2_in.png"],
             height=64, width=64, guidance_scale=2.0, img_guidance_scale=1.6, vae_noise="zero"),
        dict(name="two_img_mean_nokv", noise_seed=103, prompt=TWO, input_images=["edit_in.png", "img2_in.png"],
             height=64, width=64, guidance_scale=2.0, img_guidance_scale=1.6, vae_noise="zero",
             use_kv_cache=False),
        # a batch of two prompts of different lengths (prompt list + input_images list of lists); prompt 1 has one
        # image, prompt 2 has two (the same two files in swapped order)
        dict(name="batch2", noise_seed=104, prompt=[EDIT, BATCH_P2],
             input_images=[["edit_in.png"], ["img2_in.png", "edit_in.png"]], height=64, width=64,
             guidance_scale=2.0, img_guidance_scale=1.6),
        dict(name="batch2_joint", noise_seed=104, prompt=[EDIT, BATCH_P2],
             input_images=[["edit_in.png"], ["img2_in.png", "edit_in.png"]], height=64, width=64,
             guidance_scale=2.0, img_guidance_scale=1.6, separate_cfg_infer=False),
        # batch of two text-only prompts, joint CFG: 4 rows [cond1, cond2, uncond1, uncond2] padded together
        dict(name="batch2_t2i_joint", noise_seed=105, prompt=[T2I, T2I_LONG], input_images=None, height=64,
             width=64, guidance_scale=2.5, separate_cfg_infer=False),
    ],
    # Config B: original_max_position_embeddings = 72, rope_scaling type "longrope". Sequence lengths S (text + time
    # token + output image tokens): t2i 64x64 cond 60 (SHORT) / uncond 159 (LONG); edit cond 77 (LONG) / uncond 159
    # (LONG) / img_cond 66 (SHORT). Joint CFG pads all rows to 159 -> LONG for every row.
    "B": [
        dict(name="t2i", noise_seed=201, prompt=T2I, input_images=None, height=64, width=64, guidance_scale=2.5),
        dict(name="t2i_nokv", noise_seed=201, prompt=T2I, input_images=None, height=64, width=64,
             guidance_scale=2.5, use_kv_cache=False),
        dict(name="t2i_joint", noise_seed=201, prompt=T2I, input_images=None, height=64, width=64,
             guidance_scale=2.5, separate_cfg_infer=False),
        # joint + no cache: the one official mode that diffusers (with the per-row rope fix) reproduces on B
        dict(name="t2i_joint_nokv", noise_seed=201, prompt=T2I, input_images=None, height=64, width=64,
             guidance_scale=2.5, separate_cfg_infer=False, use_kv_cache=False),
        dict(name="edit", noise_seed=202, prompt=EDIT, input_images=["edit_in.png"], height=64, width=64,
             guidance_scale=2.0, img_guidance_scale=1.6),
        dict(name="edit_nokv", noise_seed=202, prompt=EDIT, input_images=["edit_in.png"], height=64, width=64,
             guidance_scale=2.0, img_guidance_scale=1.6, use_kv_cache=False),
        dict(name="edit_joint", noise_seed=202, prompt=EDIT, input_images=["edit_in.png"], height=64, width=64,
             guidance_scale=2.0, img_guidance_scale=1.6, separate_cfg_infer=False),
        # non-square output 48x80 (HxW): 3x5 = 15 image tokens
        dict(name="t2i_48x80", noise_seed=203, prompt=T2I, input_images=None, height=48, width=80,
             guidance_scale=2.5),
        # resize: 300x170 input with max_input_image_size=64: BOX halving to 150x85, BICUBIC to 64x36, crop 64x32
        dict(name="resize_big", noise_seed=204, prompt=EDIT, input_images=["big_in.png"], height=32, width=64,
             guidance_scale=2.0, img_guidance_scale=1.6, max_input_image_size=64),
        # resize: 40x10 input: BICUBIC upscale (min side < 16) to 64x16
        dict(name="resize_thin", noise_seed=205, prompt=EDIT, input_images=["thin_in.png"], height=32, width=64,
             guidance_scale=2.0, img_guidance_scale=1.6),
        # output size = processed input size (72x56 -> 64x48, i.e. H=48, W=64); height/width arguments ignored
        dict(name="edit_inputsize", noise_seed=206, prompt=EDIT, input_images=["edit_in.png"], height=64, width=64,
             guidance_scale=2.0, img_guidance_scale=1.6, use_input_image_size_as_output=True),
    ],
}

# (file name, case, CFG branch index 0 cond / 1 uncond / 2 img_cond) of the direct transformer dumps
TF_ONLY = {
    "A": [("transformer_only", "edit", 0)],
    "B": [("transformer_only", "edit", 0), ("transformer_only_imgcond", "edit", 2)],
}
# size (H, W) of the vae_only dump (default: the first case's output size)
VAE_ONLY_SIZE = {"B": (48, 80)}
# the original fixtures: their JSON files keep exactly the original fields
LEGACY = {("A", "t2i"), ("A", "t2i_nokv"), ("A", "edit"), ("A", "edit_nokv")}

# per-case options that are harness settings, not OmniGenPipeline.__call__ arguments
HARNESS_KEYS = ("name", "noise_seed", "vae_noise")

BRANCH_NAMES = ["cond", "uncond", "img_cond"]


def load_pipeline(model_dir):
    ogp = patch_official()
    from OmniGen import OmniGenPipeline
    pipe = OmniGenPipeline.from_pretrained(model_dir)
    return ogp, pipe


def record_processor(rec, info, data, separate, mask_u8=False):
    """Store the processor (collator) output. separate: list per CFG branch; batched: one batch.
    mask_u8 (all cases except the original A ones, to save space): store the 0/1 attention masks as uint8, and the
    input images as `pixel_u8.J` (uint8 [1,3,h,w], the cropped image) instead of `pixel_values.J`; the float pixel
    values are exactly (pixel_u8 / 255 - 0.5) / 0.5 in float32 (checked here)."""
    def m(x):
        if mask_u8:
            assert bool(((x == 0) | (x == 1)).all())
            return x.to(torch.uint8)
        return x

    def add_pix(p, k, px):
        if not mask_u8:
            rec.add(p + f".pixel_values.{k}", px)
            return
        u8 = torch.round((px * 0.5 + 0.5) * 255).to(torch.uint8)
        assert torch.equal((u8.float() / 255 - 0.5) / 0.5, px), "pixel_values not reproducible from uint8"
        rec.add(p + f".pixel_u8.{k}", u8)
    if separate:
        for b, (ids, am, pos, pix, sizes) in enumerate(zip(data["input_ids"], data["attention_mask"],
                                                         data["position_ids"], data["input_pixel_values"],
                                                         data["input_image_sizes"])):
            p = f"proc.b{b}"
            rec.add(p + ".input_ids", ids)
            rec.add(p + ".attention_mask", m(am))
            rec.add(p + ".position_ids", pos)
            for k, px in enumerate(pix):
                add_pix(p, k, px)
            info[p] = {"branch": BRANCH_NAMES[b], "input_image_sizes": {str(k): v for k, v in sizes.items()},
                       "num_pixel_values": len(pix)}
    else:
        p = "proc.batch"
        rec.add(p + ".input_ids", data["input_ids"])
        rec.add(p + ".attention_mask", m(data["attention_mask"]))
        rec.add(p + ".position_ids", data["position_ids"])
        for k, px in enumerate(data["input_pixel_values"]):
            add_pix(p, k, px)
        info[p] = {"branches_in_batch_order": BRANCH_NAMES[:len(data["input_ids"])],
                   "input_image_sizes": {str(k): v for k, v in data["input_image_sizes"].items()},
                   "num_pixel_values": len(data["input_pixel_values"])}


def run_case(ogp, pipe, case, img_dir, out_dir, cfg_name):
    from OmniGen import OmniGenProcessor
    rec = Recorder()
    info = {"case": case["name"], "config": cfg_name}
    legacy = (cfg_name, case["name"]) in LEGACY
    args = dict(DEFAULTS)
    args.update({k: v for k, v in case.items() if k not in HARNESS_KEYS})
    args["num_inference_steps"] = NUM_STEPS
    args["dtype"] = "torch.float32"
    def map_images(imgs, f):  # input_images: list of names, or (prompt list) list of lists of names
        if imgs is None:
            return None
        return [[f(y) for y in x] if isinstance(x, list) else f(x) for x in imgs]
    if args["input_images"] is not None:
        args["input_images"] = map_images(args["input_images"], lambda x: os.path.join(img_dir, x))
    call_args = dict(args)
    call_args["dtype"] = torch.float32
    info["pipeline_call_args"] = dict(args)
    if args["input_images"] is not None:
        info["pipeline_call_args"]["input_images"] = map_images(args["input_images"], os.path.basename)
    info["noise_seed_numpy_pcg64"] = case["noise_seed"]
    vae_noise = case.get("vae_noise", "sample")
    if vae_noise != "sample":  # recorded only for non-default cases (default-mode JSONs carry no vae_noise key)
        info["vae_noise"] = vae_noise
    inj = RandnInjector(case["noise_seed"], rec, vae_noise=vae_noise)

    # --- processor capture (class-level patch: the pipeline may build a new processor instance)
    orig_proc_call = OmniGenProcessor.__call__
    proc_state = {}

    def proc_call(self, instructions, input_images=None, **kw):
        data = orig_proc_call(self, instructions, input_images, **kw)
        proc_state["data"] = data
        proc_state["kw"] = {k: v for k, v in kw.items()}
        proc_state["max_image_size"] = self.max_image_size
        tok = self.text_tokenizer
        prompts = {"cond": self.add_prefix_instruction(instructions[0] if isinstance(instructions, list) else instructions)}
        import inspect
        negp = inspect.signature(orig_proc_call).parameters["negative_prompt"].default
        prompts["uncond"] = self.add_prefix_instruction(negp)
        if input_images is not None and input_images[0]:
            n = len(input_images[0])
            prompts["img_cond"] = self.add_prefix_instruction(" ".join(f"<img><|image_{i+1}|></img>" for i in range(n)))
        if isinstance(instructions, list) and len(instructions) > 1:  # batch: prompts of rows 2.. as cond.K
            for r in range(1, len(instructions)):
                prompts[f"cond.{r}"] = self.add_prefix_instruction(instructions[r])
                imgs_r = input_images[r] if input_images is not None else None
                if imgs_r:
                    prompts[f"img_cond.{r}"] = self.add_prefix_instruction(
                        " ".join(f"<img><|image_{i+1}|></img>" for i in range(len(imgs_r))))
                elif kw.get("use_img_cfg", True) and input_images is not None:
                    prompts[f"img_cond.{r}"] = prompts["uncond"]  # no image: img_cond input = negative prompt
        proc_state["prompts"] = prompts
        return data

    OmniGenProcessor.__call__ = proc_call

    # --- VAE encode / decode capture
    vae = pipe.vae
    enc_count = [0]
    orig_encode, orig_decode = vae.encode, vae.decode

    def enc(x, *a, **k):
        out = orig_encode(x, *a, **k)
        i = enc_count[0]
        enc_count[0] += 1
        ld = out.latent_dist
        rec.add(f"vae_enc.{i}.mean", ld.mean)
        rec.add(f"vae_enc.{i}.logvar", ld.logvar)
        rec.add(f"vae_enc.{i}.std", ld.std)
        orig_sample = ld.sample

        def sample(generator=None):
            with inj.vae_sample():  # marks this torch.randn draw as VAE posterior noise (zeroed if vae_noise="zero")
                s = orig_sample(generator)
            rec.add(f"vae_enc.{i}.sample", s)  # unscaled; the pipeline then multiplies by scaling_factor in place
            return s
        ld.sample = sample
        return out

    # vae_dec.output (float decode) is kept for the original A cases, every config-B case (second VAE config,
    # non-square sizes) and batches; other added A cases only keep image_uint8 (size budget)
    keep_dec = legacy or cfg_name != "A" or isinstance(case["prompt"], list)

    def dec(z, *a, **k):
        out = orig_decode(z, *a, **k)
        rec.add("vae_dec.input", z)
        if keep_dec:
            rec.add("vae_dec.output", out.sample)
        return out

    vae.encode, vae.decode = enc, dec

    # --- transformer capture
    model = pipe.model
    st = {"step": -1, "branch": 0}
    orig_fwd = model.forward

    def fwd(x, timestep, input_ids, input_img_latents, input_image_sizes, attention_mask, position_ids,
            padding_latent=None, past_key_values=None, return_past_key_values=True, offload_model=False):
        s, b = st["step"], st["branch"]
        st["branch"] += 1
        p = f"step{s}.b{b}" if args["separate_cfg_infer"] else f"step{s}.batch"
        rec.add(p + ".x", x)
        rec.add(p + ".timestep", timestep)
        if s <= 1:
            # attention masks are not duplicated here: step 0 uses proc.*.attention_mask; with the KV cache,
            # steps >= 1 use proc mask[..., -(n_img_tokens+1):, :] (rows of time token + image tokens)
            rec.add(p + ".position_ids", position_ids)
            if input_ids is not None:
                rec.add(p + ".input_ids", input_ids)
                if input_img_latents is not None:
                    for k, l in enumerate(input_img_latents):
                        rec.add(p + f".input_img_latents.{k}", l)
        out = orig_fwd(x, timestep, input_ids, input_img_latents, input_image_sizes, attention_mask, position_ids,
                       padding_latent=padding_latent, past_key_values=past_key_values,
                       return_past_key_values=return_past_key_values, offload_model=offload_model)
        rec.add(p + ".out", out[0] if isinstance(out, tuple) else out)
        return out

    model.forward = fwd
    fname = "forward_with_separate_cfg" if args["separate_cfg_infer"] else "forward_with_cfg"
    orig_cfg = getattr(model, fname)

    def cfg_fn(x, timestep, *a, **k):
        st["step"] += 1
        st["branch"] = 0
        s = st["step"]
        rec.add(f"step{s}.z_in", x)
        rec.add(f"step{s}.t", timestep)
        res = orig_cfg(x, timestep, *a, **k)
        pred = res[0] if isinstance(res, tuple) else res
        rec.add(f"step{s}.pred", pred)
        return res

    setattr(model, fname, cfg_fn)

    # --- LongRoPE factor choice per transformer call (layer 0 only; not recorded for the original A cases)
    from transformers.models.phi3 import modeling_phi3 as mp3
    rope_cls = mp3.Phi3LongRoPEScaledRotaryEmbedding
    orig_rope_fwd = rope_cls.forward
    rope_calls = []
    rope0 = pipe.model.llm.layers[0].self_attn.rotary_emb

    def rope_fwd(rself, x, position_ids, seq_len=None):
        if rself is rope0:
            sl = int(seq_len or (torch.max(position_ids) + 1))
            p = f"step{st['step']}.b{st['branch'] - 1}" if args["separate_cfg_infer"] else f"step{st['step']}.batch"
            rope_calls.append({"call": p, "kv_seq_len": sl, "num_new_tokens": int(position_ids.shape[-1]),
                               "factors": "long" if sl > rself.original_max_position_embeddings else "short"})
        return orig_rope_fwd(rself, x, position_ids, seq_len=seq_len)
    if not legacy and isinstance(rope0, rope_cls):
        rope_cls.forward = rope_fwd

    # --- scheduler capture
    orig_sched_cls = ogp.OmniGenScheduler

    class RecScheduler(orig_sched_cls):
        def __call__(self, z, func, model_kwargs, use_kv_cache=True, offload_kv_cache=True):
            rec.add("sched.sigma", self.sigma)
            rec.add("latents.init", z)
            out = super().__call__(z, func, model_kwargs, use_kv_cache=use_kv_cache, offload_kv_cache=offload_kv_cache)
            rec.add("latents.final_all_branches", out)
            return out

    ogp.OmniGenScheduler = RecScheduler
    try:
        t0 = time.time()
        with inj, torch.no_grad():
            images = pipe(**call_args)
        info["wall_s"] = round(time.time() - t0, 3)
    finally:
        OmniGenProcessor.__call__ = orig_proc_call
        vae.encode, vae.decode = orig_encode, orig_decode
        del model.forward
        delattr(model, fname)
        ogp.OmniGenScheduler = orig_sched_cls
        rope_cls.forward = orig_rope_fwd

    # z after each step: step{i}.z_out == step{i+1}.z_in ; last one = scheduler output
    for s in range(NUM_STEPS - 1):
        rec.add(f"step{s}.z_out", rec.t[f"step{s+1}.z_in"])
    rec.add(f"step{NUM_STEPS-1}.z_out", rec.t["latents.final_all_branches"])
    num_prompt = rec.t["randn.00"].shape[0]  # = len(prompt); latents.final = first chunk (cond rows)
    rec.add("latents.final", rec.t["latents.final_all_branches"][:num_prompt])
    img = np.array(images[0])
    rec.add("image_uint8", torch.from_numpy(img))
    if legacy:  # added cases write no PNG (image_uint8 holds the same pixels)
        images[0].save(os.path.join(out_dir, case["name"] + ".png"))
    for r in range(1, len(images)):  # batch: image of prompt r
        rec.add(f"image_uint8.{r}", torch.from_numpy(np.array(images[r])))

    data = proc_state["data"]
    record_processor(rec, info, data, args["separate_cfg_infer"], mask_u8=not legacy)
    tok = pipe.processor.text_tokenizer
    info["prompts_after_prefix"] = proc_state["prompts"]
    info["prompt_tokens"] = {k: tok.convert_ids_to_tokens(tok(v).input_ids) for k, v in proc_state["prompts"].items()
                             if "<|image_" not in v}
    info["processor_max_image_size"] = proc_state["max_image_size"]
    info["randn_calls"] = inj.calls
    info["randn_meaning"] = ("randn.00 = initial latent noise (num_prompt,4,H/8,W/8); it is repeated over the CFG "
                             "branches to form latents.init. randn.01.. = noise of each VAE latent_dist.sample() "
                             "(one per vae_enc.N, same order): sample = mean + std * noise; fed latent = sample * "
                             "scaling_factor")
    if vae_noise == "zero":
        zeroed = [c["name"] for c in inj.calls if c["zeroed"]]
        assert not inj.calls[0]["zeroed"] and len(zeroed) == enc_count[0] == len(inj.calls) - 1, inj.calls
        info["randn_meaning"] += (". vae_noise='zero': randn.01.. (every VAE latent_dist.sample() draw) are ZEROS "
                                  "(the PCG64 stream is still advanced), so vae_enc.N.sample == vae_enc.N.mean and "
                                  "fed latent = mean * scaling_factor; randn.00 is the normal PCG64 draw")
    info["vae_scaling_factor"] = float(pipe.vae.config.scaling_factor)
    info["vae_shift_factor"] = pipe.vae.config.shift_factor
    info["num_vae_encodes"] = enc_count[0]
    info["attn_implementation"] = pipe.model.llm.config._attn_implementation
    info["cfg_formula"] = ("2 branches: pred = uncond + g*(cond-uncond); 3 branches: pred = uncond + "
                           "ig*(img_cond-uncond) + g*(cond-img_cond); pred is repeated for all branches")
    info["step_update"] = "z_out = z_in + (sigma[i+1]-sigma[i]) * pred, t_i = sigma[i] (0 = pure noise)"
    if not legacy:
        info["num_prompt"] = num_prompt
        info["num_cfg_branches"] = rec.t["latents.init"].shape[0] // num_prompt
        info["output_height_width"] = list(rec.t["image_uint8"].shape[:2])
        info["original_max_position_embeddings"] = pipe.model.llm.config.original_max_position_embeddings
        info["rope_calls_layer0"] = rope_calls
        info["rope_note"] = ("LongRoPE factors: 'long' iff kv_seq_len > original_max_position_embeddings; kv_seq_len "
                             "= full sequence length of that forward (cached + new tokens), per separate CFG branch "
                             "or for the whole padded batch in joint CFG")
    info["tensors"] = rec.listing()
    rec.save(os.path.join(out_dir, case["name"] + ".safetensors"))
    write_json(os.path.join(out_dir, case["name"] + ".json"), info)
    return info


def vae_only(pipe, out_dir, cfg_name, H, W):
    rec = Recorder()
    vae = pipe.vae.float().eval()
    img = make_image(W, H, seed=33)
    img.save(os.path.join(out_dir, "vae_in.png"))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    rng = np.random.default_rng(44)
    with torch.no_grad():
        ld = vae.encode(x).latent_dist
        dec_mean = vae.decode(ld.mean).sample
        z = torch.from_numpy(rng.standard_normal((1, 4, H // 8, W // 8)).astype(np.float32))
        dec_z = vae.decode(z).sample
    rec.add("vae.x", x)
    rec.add("vae.enc.mean", ld.mean)
    rec.add("vae.enc.logvar", ld.logvar)
    rec.add("vae.enc.std", ld.std)
    rec.add("vae.dec_of_mean", dec_mean)
    rec.add("vae.z_rand", z)
    rec.add("vae.dec_of_z_rand", dec_z)
    info = {"case": "vae_only", "config": cfg_name,
            "description": ("vae.x = vae_in.png as float (x/127.5-1), NCHW. vae.enc.* = encoder posterior "
                            "(logvar clamped to [-30,20] by diffusers, std=exp(0.5*logvar)). vae.dec_of_mean = "
                            "decode(mean) (no scaling factor applied). vae.dec_of_z_rand = decode(vae.z_rand), "
                            "z_rand = numpy PCG64 seed 44 standard normal."),
            "tensors": rec.listing()}
    rec.save(os.path.join(out_dir, "vae_only.safetensors"))
    write_json(os.path.join(out_dir, "vae_only.json"), info)
    return info


def transformer_only(model_dir, pipe, out_dir, cfg_name, case, fname="transformer_only", branch=0):
    """Direct OmniGen.forward (no KV cache, no CFG) on the cond branch of a case with input images,
    with random (seeded) x and input-image latents. Hooks record intermediates."""
    from OmniGen.model import OmniGen
    from OmniGen import OmniGenProcessor
    rec = Recorder()
    model = OmniGen.from_pretrained(model_dir).float().eval()
    model.llm.config.use_cache = False
    proc = OmniGenProcessor(pipe.processor.text_tokenizer, max_image_size=case.get("max_input_image_size", 1024))
    img_dir = out_dir
    imgs = [os.path.join(img_dir, x) for x in case["input_images"]]
    H, W = case["height"], case["width"]
    data = proc([case["prompt"]], [imgs], height=H, width=W, use_img_cfg=True, separate_cfg_input=True)
    input_ids = data["input_ids"][branch]
    attention_mask = data["attention_mask"][branch]
    position_ids = data["position_ids"][branch]
    sizes = data["input_image_sizes"][branch]
    pix = data["input_pixel_values"][branch]
    rng = np.random.default_rng(55)
    x = torch.from_numpy(rng.standard_normal((1, 4, H // 8, W // 8)).astype(np.float32))
    lat = [torch.from_numpy(rng.standard_normal((1, 4, p.shape[-2] // 8, p.shape[-1] // 8)).astype(np.float32))
           for p in pix]
    timestep = torch.tensor([0.37], dtype=torch.float32)
    hooks = []

    def hook(name):
        def f(mod, inp, out):
            o = out[0] if isinstance(out, tuple) else out
            rec.add(name, o)
        return f
    for i, layer in enumerate(model.llm.layers):
        hooks.append(layer.register_forward_hook(hook(f"tf.layer{i}.out")))
    hooks.append(model.llm.norm.register_forward_hook(hook("tf.llm_norm_out")))
    hooks.append(model.time_token.register_forward_hook(hook("tf.time_token_emb")))
    hooks.append(model.t_embedder.register_forward_hook(hook("tf.t_embedder_emb")))
    hooks.append(model.x_embedder.register_forward_hook(hook("tf.x_embedder_out")))
    hooks.append(model.input_x_embedder.register_forward_hook(lambda m, i, o: None))
    cos_sin = {}

    def rope_hook(mod, inp, out):
        if "cos" not in cos_sin:
            cos_sin["cos"], cos_sin["sin"] = out
    hooks.append(model.llm.layers[0].self_attn.rotary_emb.register_forward_hook(rope_hook))

    def pre(mod, args, kwargs):
        rec.add("tf.llm_inputs_embeds", kwargs["inputs_embeds"])
    hooks.append(model.llm.register_forward_pre_hook(pre, with_kwargs=True))
    with torch.no_grad():
        out = model.forward(x, timestep, input_ids, lat if lat else None, sizes, attention_mask, position_ids,
                            past_key_values=None, return_past_key_values=False)
    for h in hooks:
        h.remove()
    rec.add("tf.rope_cos_layer0", cos_sin["cos"])
    rec.add("tf.rope_sin_layer0", cos_sin["sin"])
    rec.add("tf.x", x)
    rec.add("tf.timestep", timestep)
    rec.add("tf.input_ids", input_ids)
    rec.add("tf.attention_mask", attention_mask if (cfg_name, fname) == ("A", "transformer_only")
            else attention_mask.to(torch.uint8))
    rec.add("tf.position_ids", position_ids)
    for k, l in enumerate(lat):
        rec.add(f"tf.input_img_latents.{k}", l)
    rec.add("tf.out", out)
    info = {"case": fname, "config": cfg_name, "source_case": case["name"],
            "prompt": case["prompt"], "input_images": case["input_images"], "height": H, "width": W,
            "input_image_sizes": {str(k): v for k, v in sizes.items()},
            "description": ("OmniGen.forward(x, timestep, input_ids, input_img_latents, input_image_sizes, "
                            "attention_mask, position_ids) with use_cache=False, fp32, weights loaded from "
                            "model.safetensors. x/input_img_latents are numpy PCG64(seed 55) normals (NOT VAE). "
                            "tf.llm_inputs_embeds = [text embeds with image-latent patches spliced in | time token | "
                            "x patches + pos_embed]. tf.layerN.out = hidden state after decoder layer N; "
                            "tf.llm_norm_out after final RMSNorm; tf.out = velocity (1,4,H/8,W/8). "
                            "tf.rope_cos/sin_layer0 = (cos,sin) incl. LongRoPE factor selection and attention "
                            "scaling factor."),
            "attn_implementation": model.llm.config._attn_implementation,
            "tensors": rec.listing()}
    if (cfg_name, fname) != ("A", "transformer_only"):  # extra fields (the original A dump keeps its JSON)
        S = int(attention_mask.shape[-1])
        orig = model.llm.config.original_max_position_embeddings
        info.update({"branch": BRANCH_NAMES[branch], "seq_len": S, "original_max_position_embeddings": orig,
                     "rope_factors": "long" if S > orig else "short"})
    rec.save(os.path.join(out_dir, fname + ".safetensors"))
    write_json(os.path.join(out_dir, fname + ".json"), info)
    return info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=None, help="comma list of case names (default all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    with open(os.path.join(args.model, "tiny_meta.json")) as f:
        meta = json.load(f)
    cfg = meta["config"]
    os.makedirs(args.out, exist_ok=True)
    for name, (w, h, s) in IMAGES[cfg].items():
        make_image(w, h, s).save(os.path.join(args.out, name))
    ogp, pipe = load_pipeline(args.model)
    manifest = {"config": cfg, "model_dir": os.path.relpath(args.model, args.out), "versions": versions(),
                "tiny_meta": {k: v for k, v in meta.items() if k != "keys"},
                "input_images": {k: {"width": v[0], "height": v[1], "pattern_seed": v[2]} for k, v in IMAGES[cfg].items()},
                "num_inference_steps": NUM_STEPS, "pipeline_defaults": DEFAULTS, "cases": {}}
    wanted = None if args.cases is None else set(args.cases.split(","))
    for case in CASES[cfg]:
        if wanted and case["name"] not in wanted:
            continue
        info = run_case(ogp, pipe, case, args.out, args.out, cfg)
        manifest["cases"][case["name"]] = {k: info[k] for k in ["pipeline_call_args", "noise_seed_numpy_pcg64",
                                                                "vae_noise", "wall_s", "num_vae_encodes",
                                                                "attn_implementation"] if k in info}
        print("case", case["name"], "ok", info["wall_s"], "s", flush=True)
    H, W = VAE_ONLY_SIZE.get(cfg, (CASES[cfg][0]["height"], CASES[cfg][0]["width"]))
    vae_only(pipe, args.out, cfg, H, W)
    by_name = {c["name"]: c for c in CASES[cfg]}
    for fname, cname, branch in TF_ONLY[cfg]:
        transformer_only(args.model, pipe, args.out, cfg, by_name[cname], fname=fname, branch=branch)
    manifest["extra_cases"] = ["vae_only"] + [x[0] for x in TF_ONLY[cfg]]
    write_json(os.path.join(args.out, "manifest.json"), manifest)
    print("done")


if __name__ == "__main__":
    main()
