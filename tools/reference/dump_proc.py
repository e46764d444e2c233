#!/usr/bin/env python3
"""Processor-only reference dumps (no model run): image preprocessing and prompt tokenisation of the OFFICIAL
OmniGen 1.0.3 OmniGenProcessor.

Usage: python dump_proc.py --model tests/fixtures/A/model --out tests/fixtures/proc

Writes into --out:
  * resize_K.png input images (deterministic patterns, common.make_image; K = case name)
  * proc_resize.safetensors / .json: for every image, the intermediate images of OmniGen.utils.crop_arr as uint8
    HWC (`NAME.after_box` after the BOX halving loop (only if it ran), `NAME.after_down` after the BICUBIC downscale
    (only if it ran), `NAME.after_up` after the BICUBIC upscale of a side < 16 (only if it ran), `NAME.cropped` = final
    crop_arr output) and `NAME.pixel_values` [3,h,w] float32 = the official image_transform output
    (ToTensor + Normalize(0.5, 0.5)) = (cropped / 255 - 0.5) / 0.5 in float32 bit for bit (asserted for every image,
    stored for r_identity only); checked equal to OmniGenProcessor(max_image_size).process_image(path).
  * proc_prompts.safetensors / .json: for each prompt (+ images), the official processor output of the cond branch
    (`pK.input_ids` [1,L] int64, `pK.attention_mask` [1,S,S] uint8 0/1, `pK.position_ids` [1,S] int64) for the output
    size in the JSON (pixel values: see proc_resize, the images are its r_* files), plus the raw tokenizer ids of the text chunks (`pK.chunkJ.ids`); the JSON has prompts, token
    strings, image spans and pixel sizes.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Recorder, make_image, patch_official, write_json  # noqa: E402

# name -> (width, height, pattern seed, max_input_image_size, PIL mode of the saved PNG, what it exercises)
RESIZE = {
    "r_box_down": (200, 150, 31, 48, "RGB", "BOX halving 200x150->100x75, BICUBIC down to 48x36, crop 48x32"),
    "r_box_down_up": (257, 64, 32, 32, "RGB", "BOX halving 257x64->128x32, BICUBIC down to 32x8, BICUBIC up "
                                              "(side < 16) to 64x16"),
    "r_up": (40, 10, 33, 1024, "RGB", "BICUBIC upscale 40x10 -> 64x16 (min side < 16)"),
    "r_up_crop": (15, 100, 34, 1024, "RGB", "BICUBIC upscale 15x100 -> 16x107, center crop to 16x96 (rows 5..101)"),
    "r_down_crop": (99, 31, 35, 64, "RGB", "BICUBIC down 99x31 -> 64x20 (round(20.04)), crop 64x16"),
    "r_crop_only": (17, 17, 36, 1024, "RGB", "no resize, crop 17x17 -> 16x16 (x1=0, x2=1)"),
    "r_slight_down": (130, 67, 37, 128, "RGB", "BICUBIC down by 128/130: 130x67 -> 128x66, crop 128x64"),
    "r_identity": (64, 48, 38, 1024, "RGB", "no resize, no crop"),
    "r_crop_odd": (33, 70, 39, 1024, "RGB", "no resize, crop 33x70 -> 32x64"),
    "r_round_half_even_down": (128, 81, 40, 64, "RGB", "BICUBIC down 128x81 -> 64x40: 81*0.5 = 40.5 -> Python round "
                                                       "= 40 (banker's rounding), crop 64x32"),
    "r_round_half_even_up": (128, 83, 41, 64, "RGB", "BICUBIC down 128x83 -> 64x42: 41.5 -> round = 42, crop 64x32"),
    "r_gray": (50, 40, 42, 1024, "L", "grayscale PNG (mode L) -> convert('RGB'), crop 48x32"),
    "r_rgba": (40, 40, 43, 1024, "RGBA", "RGBA PNG -> convert('RGB') drops alpha (no compositing), crop 32x32"),
}

PROMPTS = [
    dict(name="p_t2i", prompt="a red cat sitting on a blue mat", images=[], height=64, width=64),
    dict(name="p_unicode", prompt="caf\u00e9 au lait \u2615 na\u00efve \u6771\u4eac\nsecond line", images=[],
         height=32, width=48),
    dict(name="p_empty", prompt="", images=[], height=32, width=32),
    dict(name="p_spaces", prompt="  two  spaces  and trailing newline\n", images=[], height=32, width=32),
    dict(name="p_special_in_text", prompt="hello <|endoftext|> world <s> </s> <|end|>", images=[], height=32,
         width=32),
    dict(name="p_one_img", prompt="<img><|image_1|></img> make the cat green and add a hat",
         images=["r_identity"], height=64, width=64),
    dict(name="p_img_repeated", prompt="<img><|image_1|></img> left and <img><|image_1|></img> right",
         images=["r_identity"], height=32, width=32),
    dict(name="p_img_no_wrapper", prompt="look at <|image_1|> now", images=["r_identity"], height=32, width=32),
    dict(name="p_img_reversed", prompt="<img><|image_2|></img> then <img><|image_1|></img>",
         images=["r_identity", "r_crop_odd"], height=32, width=64),
    dict(name="p_img_first_no_text", prompt="<|image_1|>", images=["r_crop_only"], height=16, width=16),
]


def crop_arr_steps(pil_image, max_image_size):
    """Copy of OmniGen.utils.crop_arr that also returns the intermediate images."""
    from PIL import Image
    steps = {}
    ran = False
    while min(*pil_image.size) >= 2 * max_image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
        ran = True
    if ran:
        steps["after_box"] = np.array(pil_image)
    if max(*pil_image.size) > max_image_size:
        scale = max_image_size / max(*pil_image.size)
        pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
        steps["after_down"] = np.array(pil_image)
    if min(*pil_image.size) < 16:
        scale = 16 / min(*pil_image.size)
        pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
        steps["after_up"] = np.array(pil_image)
    arr = np.array(pil_image)
    crop_y1 = (arr.shape[0] % 16) // 2
    crop_y2 = arr.shape[0] % 16 - crop_y1
    crop_x1 = (arr.shape[1] % 16) // 2
    crop_x2 = arr.shape[1] % 16 - crop_x1
    arr = arr[crop_y1:arr.shape[0] - crop_y2, crop_x1:arr.shape[1] - crop_x2]
    steps["cropped"] = arr
    return steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="tiny model dir (only its tokenizer is used)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    patch_official()
    from PIL import Image
    from OmniGen import OmniGenProcessor
    from OmniGen.utils import crop_arr
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)

    # ---- image preprocessing
    rec = Recorder()
    info = {"description": __doc__, "images": {}}
    paths = {}
    for name, (w, h, seed, max_size, mode, what) in RESIZE.items():
        max_size = int(max_size)
        img = make_image(w, h, seed)
        if mode == "L":
            img = img.convert("L")
        elif mode == "RGBA":
            a = np.array(img)
            alpha = (np.arange(w)[None, :].repeat(h, 0) * 255 // max(w - 1, 1)).astype(np.uint8)
            img = Image.fromarray(np.concatenate([a, alpha[..., None]], -1), "RGBA")
        path = os.path.join(args.out, f"{name}.png")
        img.save(path)
        paths[name] = path
        pil = Image.open(path).convert("RGB")
        steps = crop_arr_steps(pil, max_size)
        assert np.array_equal(np.array(crop_arr(Image.open(path).convert("RGB"), max_size)), steps["cropped"])
        proc = OmniGenProcessor(tok, max_image_size=max_size)
        pv = proc.process_image(path)
        for k, v in steps.items():
            rec.add(f"{name}.{k}", torch.from_numpy(np.ascontiguousarray(v)))
        u8 = torch.from_numpy(np.ascontiguousarray(steps["cropped"])).permute(2, 0, 1)
        assert torch.equal((u8.float() / 255 - 0.5) / 0.5, pv), name  # the formula below, bit for bit
        if name == "r_identity":  # float pixel values kept for one image only (size budget)
            rec.add(f"{name}.pixel_values", pv)
        info["images"][name] = {"file": f"{name}.png", "png_mode": mode, "input_wh": [w, h],
                                "max_input_image_size": max_size, "what": what,
                                "steps_hw": {k: list(v.shape[:2]) for k, v in steps.items()},
                                "pixel_values_shape": list(pv.shape)}
    info["pixel_values_formula"] = "pixel_values = (uint8 / 255 - 0.5) / 0.5 (float32, torchvision ToTensor + Normalize)"
    info["tensors"] = rec.listing()
    rec.save(os.path.join(args.out, "proc_resize.safetensors"))
    write_json(os.path.join(args.out, "proc_resize.json"), info)

    # ---- prompts
    import re
    rec = Recorder()
    info = {"description": __doc__, "prompts": {}}
    for i, c in enumerate(PROMPTS):
        proc = OmniGenProcessor(tok, max_image_size=1024)
        imgs = [paths[x] for x in c["images"]]
        data = proc([c["prompt"]], [imgs] if imgs else None, height=c["height"], width=c["width"],
                    use_img_cfg=True, separate_cfg_input=True)
        p = c["name"]
        rec.add(p + ".input_ids", data["input_ids"][0])
        am = data["attention_mask"][0]
        assert bool(((am == 0) | (am == 1)).all())
        rec.add(p + ".attention_mask", am.to(torch.uint8))
        rec.add(p + ".position_ids", data["position_ids"][0])
        pix_shapes = [list(px.shape) for px in data["input_pixel_values"][0]]
        text = proc.add_prefix_instruction(c["prompt"])
        chunks = re.split(r"<\|image_\d+\|>", text) if imgs else [text]
        chunk_info = []
        for j, ch in enumerate(chunks):
            ids = tok(ch).input_ids
            rec.add(p + f".chunk{j}.ids", torch.tensor(ids, dtype=torch.int64))
            chunk_info.append({"text": ch, "tokens": tok.convert_ids_to_tokens(ids)})
        info["prompts"][p] = {"prompt": c["prompt"], "images": [f"{x}.png" for x in c["images"]],
                              "height": c["height"], "width": c["width"], "text_after_prefix": text,
                              "chunks": chunk_info,
                              "input_image_sizes": {str(k): v for k, v in data["input_image_sizes"][0].items()},
                              "num_branches": len(data["input_ids"]), "pixel_values_shapes": pix_shapes,
                              "note": "cond branch only; chunkJ.ids = tokenizer(chunk) with BOS, the processor "
                                      "drops a leading BOS (id 1) from chunks 1.."}
    info["tensors"] = rec.listing()
    rec.save(os.path.join(args.out, "proc_prompts.safetensors"))
    write_json(os.path.join(args.out, "proc_prompts.json"), info)
    print("proc dumps ok")


if __name__ == "__main__":
    main()
