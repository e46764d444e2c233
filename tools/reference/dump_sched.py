#!/usr/bin/env python3
"""Drive the OFFICIAL OmniGen 1.0.3 transformer with diffusers 0.33.1 schedulers and record every step.

Usage: python dump_sched.py --fixtures tests/fixtures   (reads A/model, B/model; writes tests/fixtures/sched/)

The official `OmniGenPipeline` runs as in dump_ref.py (CPU, float32, injected PCG64 noise, kv cache off, separate
CFG), but its `OmniGenScheduler` is replaced by a loop over a diffusers scheduler, in the convention of
docs/schedulers.md:
  * diffusers' flow sigma is OmniGen's 1 - t;
  * for each timestep the scheduler yields, the model is evaluated at t = 1 - timestep / 1000 (the timestep value
    itself, int64 for DPM-Solver++ / UniPC, float for the flow-match schedulers);
  * the scheduler receives -v, v being the guided OmniGen velocity (data - noise), since diffusers' flow
    prediction is noise - data.
`euler` is the official scheduler itself (OmniGenScheduler, optionally with time_shifting_factor); with custom
sigmas it is diffusers' own equivalent, FlowMatchEulerDiscreteScheduler(invert_sigmas=True,
num_train_timesteps=1, shift=S), whose timesteps are OmniGen times.

CFG range (START, END): evaluation i of N applies guidance iff START <= i/N < END (float32); the other evaluations
run only the conditional branch (OmniGen.forward on branch 0) and use its output as the velocity.

Per case NAME: sched/NAME.safetensors and sched/NAME.json. Tensors (P = prompts, cond rows only):
  stepI.t [1]            time the model was evaluated at (OmniGen t)
  stepI.z_in [P,4,h,w]   latents the model saw;  stepI.pred  guided velocity v;  stepI.z_out  latents after the step
  sched.timesteps, sched.sigmas   the scheduler's own arrays (float32 copies)
  latents.final, image_uint8, randn.NN (as in dump_ref.py)
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Recorder, RandnInjector, versions, write_json  # noqa: E402
from dump_ref import DEFAULTS, EDIT, T2I, load_pipeline  # noqa: E402

NUM_STEPS = 6

# (name, config, base case, scheduler, time_shift, sigmas, cfg_range)
T2I_A = dict(noise_seed=301, prompt=T2I, input_images=None, height=64, width=64, guidance_scale=2.5)
EDIT_B = dict(noise_seed=302, prompt=EDIT, input_images=["edit_in.png"], height=64, width=64, guidance_scale=2.0,
              img_guidance_scale=1.6)
SIGMAS = [1.0, 0.9, 0.7, 0.45, 0.2, 0.05]
CASES = [
    ("A", "t2i_euler", T2I_A, "euler", 1.0, None, None),
    ("A", "t2i_heun", T2I_A, "heun", 1.0, None, None),
    ("A", "t2i_dpmpp-2m", T2I_A, "dpmpp-2m", 1.0, None, None),
    ("A", "t2i_unipc", T2I_A, "unipc", 1.0, None, None),
    ("A", "t2i_euler-shifted", T2I_A, "euler-shifted", 3.0, None, None),
    ("A", "t2i_euler_shift3", T2I_A, "euler", 3.0, None, None),
    ("A", "t2i_heun_shift3", T2I_A, "heun", 3.0, None, None),
    ("A", "t2i_dpmpp-2m_shift3", T2I_A, "dpmpp-2m", 3.0, None, None),
    ("A", "t2i_unipc_shift3", T2I_A, "unipc", 3.0, None, None),
    ("A", "t2i_euler_sigmas", T2I_A, "euler", 1.0, SIGMAS, None),
    ("A", "t2i_euler-shifted_sigmas", T2I_A, "euler-shifted", 2.0, SIGMAS, None),
    ("A", "t2i_euler_cfgrange", T2I_A, "euler", 1.0, None, (0.25, 0.75)),
    ("A", "t2i_dpmpp-2m_cfgrange", T2I_A, "dpmpp-2m", 1.0, None, (0.0, 0.5)),
    ("B", "edit_euler", EDIT_B, "euler", 1.0, None, None),
    ("B", "edit_heun", EDIT_B, "heun", 1.0, None, None),
    ("B", "edit_dpmpp-2m", EDIT_B, "dpmpp-2m", 1.0, None, None),
    ("B", "edit_unipc", EDIT_B, "unipc", 1.0, None, None),
    ("B", "edit_euler-shifted", EDIT_B, "euler-shifted", 3.0, None, None),
    ("B", "edit_unipc_cfgrange", EDIT_B, "unipc", 1.0, None, (0.2, 0.8)),
]


def make_scheduler(official, kind, shift, sigmas, n):
    """(timesteps, model time of each, step(i, z, v) -> z, arrays to record) for one run of n steps."""
    from diffusers import (DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                           FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler)
    if kind == "euler" and sigmas is None:
        sigma = official(num_steps=n, time_shifting_factor=shift).sigma
        times = [sigma[i] for i in range(n)]

        def step(i, z, v):
            return z + (sigma[i + 1] - sigma[i]) * v
        return times, times, step, {"sched.sigmas": sigma}
    if kind == "euler":
        s = FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1, shift=shift)
        s.set_timesteps(sigmas=sigmas)
        times = list(s.timesteps)  # num_train_timesteps=1 and inverted sigmas: the timesteps are OmniGen times

        def step(i, z, v):
            return s.step(v, s.timesteps[i], z).prev_sample
        return list(s.timesteps), times, step, {"sched.sigmas": s.sigmas, "sched.timesteps": s.timesteps}
    if kind == "euler-shifted":
        s = FlowMatchEulerDiscreteScheduler(shift=shift)
        if sigmas is None:
            s.set_timesteps(n)
        else:
            s.set_timesteps(sigmas=sigmas)
    elif kind == "heun":
        s = FlowMatchHeunDiscreteScheduler(shift=shift)
        s.set_timesteps(n)
    elif kind == "dpmpp-2m":
        s = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
                                        algorithm_type="dpmsolver++", solver_order=2)
        s.set_timesteps(n)
    elif kind == "unipc":
        s = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
        s.set_timesteps(n)
    else:
        raise ValueError(kind)
    times = [1.0 - s.timesteps[i].to(torch.float32) / 1000.0 for i in range(len(s.timesteps))]

    def step(i, z, v):
        return s.step(-v, s.timesteps[i], z).prev_sample
    return list(s.timesteps), times, step, {"sched.sigmas": s.sigmas, "sched.timesteps": s.timesteps.float()}


def guided(i, n, cfg_range):
    if cfg_range is None:
        return True
    f = np.float32(i) / np.float32(n)
    return bool(np.float32(cfg_range[0]) <= f < np.float32(cfg_range[1]))


def run_case(ogp, pipe, cfg, name, base, kind, shift, sigmas, cfg_range, img_dir, out_dir):
    rec = Recorder()
    args = dict(DEFAULTS)
    args.update({k: v for k, v in base.items() if k != "noise_seed"})
    args.update(num_inference_steps=NUM_STEPS if sigmas is None else len(sigmas), use_kv_cache=False,
                separate_cfg_infer=True)
    call_args = dict(args, dtype=torch.float32)
    if args["input_images"] is not None:
        call_args["input_images"] = [os.path.join(img_dir, x) for x in args["input_images"]]
    inj = RandnInjector(base["noise_seed"], rec)
    model = pipe.model
    json_args = dict(args, dtype="torch.float32")
    if args["input_images"] is not None:  # relative to sched/, where the Rust tests resolve them
        json_args["input_images"] = [f"../{cfg}/{x}" for x in args["input_images"]]
    info = {"case": name, "config": cfg, "pipeline_call_args": json_args,
            "noise_seed_numpy_pcg64": base["noise_seed"],
            "scheduler": {"name": kind, "time_shift": shift, "sigmas": sigmas,
                          "cfg_range": list(cfg_range) if cfg_range else None}}

    class Driven:
        def __init__(self, num_steps=50, time_shifting_factor=1):
            self.n = num_steps

        def __call__(self, z, func, model_kwargs, use_kv_cache=True, offload_kv_cache=True):
            assert not use_kv_cache
            timesteps, times, step, arrays = make_scheduler(orig, kind, shift, sigmas, self.n)
            for k, v in arrays.items():
                rec.add(k, torch.as_tensor(v).float())
            nb = len(model_kwargs["input_ids"])
            rows = len(z) // nb
            n_evals = len(times)
            info["num_evaluations"] = n_evals
            info["guided"] = []
            for i, t in enumerate(times):
                t = torch.as_tensor(t, dtype=torch.float32)
                ts = torch.zeros(len(z)) + t
                g = guided(i, n_evals, cfg_range)
                info["guided"].append(g)
                if g:
                    pred, _ = func(z, ts, past_key_values=None, **model_kwargs)
                else:  # conditional branch only: no unconditional or image-only forward
                    kw = model_kwargs
                    model.llm.config.use_cache = False
                    out = model.forward(z[:rows], ts[:rows], kw["input_ids"][0], kw["input_img_latents"][0],
                                        kw["input_image_sizes"][0], kw["attention_mask"][0], kw["position_ids"][0],
                                        past_key_values=None, return_past_key_values=False,
                                        offload_model=kw["offload_model"])
                    out = out[0] if isinstance(out, tuple) else out
                    pred = torch.cat([out] * nb, 0)
                rec.add(f"step{i}.t", t.reshape(1))
                rec.add(f"step{i}.z_in", z[:rows])
                rec.add(f"step{i}.pred", pred[:rows])
                z = step(i, z, pred)
                rec.add(f"step{i}.z_out", z[:rows])
            rec.add("latents.final", z[:rows])
            return z

    orig = ogp.OmniGenScheduler
    ogp.OmniGenScheduler = Driven
    try:
        with inj, torch.no_grad():
            images = pipe(**call_args)
    finally:
        ogp.OmniGenScheduler = orig
    rec.add("image_uint8", torch.from_numpy(np.array(images[0])))
    info["randn_calls"] = inj.calls
    info["tensors"] = rec.listing()
    rec.save(os.path.join(out_dir, name + ".safetensors"))
    write_json(os.path.join(out_dir, name + ".json"), info)
    return info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--cases", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    out_dir = os.path.join(a.fixtures, "sched")
    os.makedirs(out_dir, exist_ok=True)
    wanted = None if a.cases is None else set(a.cases.split(","))
    manifest = {"versions": versions(), "num_steps": NUM_STEPS, "cases": {}}
    for cfg in ["A", "B"]:
        ogp, pipe = load_pipeline(os.path.join(a.fixtures, cfg, "model"))
        for c, name, base, kind, shift, sigmas, cfg_range in CASES:
            if c != cfg or (wanted and name not in wanted):
                continue
            info = run_case(ogp, pipe, cfg, name, base, kind, shift, sigmas, cfg_range,
                            os.path.join(a.fixtures, cfg), out_dir)
            manifest["cases"][name] = {"config": cfg, "scheduler": info["scheduler"],
                                       "num_evaluations": info["num_evaluations"]}
            print("case", name, "ok", info["num_evaluations"], "evaluations", flush=True)
    write_json(os.path.join(out_dir, "manifest.json"), manifest)


if __name__ == "__main__":
    main()
