"""The CPU peers of bench/cpu.py on the same random-weight SD 1.5 files: stable-diffusion.cpp (through the
stable-diffusion-cpp-python package, built from source) and OpenVINO (through optimum-intel, its own export of
the same diffusers folder). Optional benchmark dependencies, in their own environment, never needed by minidiff
or its tests:

    python3 -m venv /work/peers/venv
    /work/peers/venv/bin/pip install torch==2.13.0 stable-diffusion-cpp-python "optimum-intel[openvino]" diffusers
    /work/peers/venv/bin/python bench/cpu_peers.py prepare                  # the LDM file and the OpenVINO export
    /work/peers/venv/bin/python bench/cpu_peers.py speed --log peers.jsonl  # then: bench/cpu.py table --log a b

Same runs, same rows, same JSONL fields as bench/cpu.py (whole 512x512 images, 20 Euler steps at guidance 7.5 and
4 LCM steps at guidance 1; UNet step = median of the step-end callbacks' intervals from the second on; VAE
decode = the last step's end to the image; CPU time from getrusage; peak RSS = VmHWM). stable-diffusion.cpp has
no text-encoder hook: its first step's interval also holds the text encoding (not in the median).

Settings, each peer's own recommendation for a CPU:
- stable-diffusion.cpp: the LDM single file (bench/ldm_single_file.py, fp16 as SD 1.5 files are published),
  built with GGML_NATIVE (-march=native: AVX-512, AVX512_BF16 here), `n_threads` = the benchmark's threads,
  sample_method "euler" / "lcm"; "q8_0" also quantizes the weights at load (its README's advice for CPU memory
  and speed).
- OpenVINO: `OVStableDiffusionPipeline` on the CPU device, which runs bf16 by itself on a CPU with AMX /
  AVX512_BF16 (INFERENCE_PRECISION_HINT left at its default), PERFORMANCE_HINT LATENCY,
  INFERENCE_NUM_THREADS = the benchmark's threads, and the static 512x512 shapes of `pipe.reshape(...)` (its
  documentation's advice for CPU speed) for the 20-step run; the LCM run (no guidance, UNet batch 1) keeps
  dynamic shapes.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cpu import RUNS, run_child  # noqa: E402 (the child runner with the RSS limit)

SIDES = {"sd.cpp f16": "sdcpp", "sd.cpp q8_0": "sdcpp", "sd.cpp q8_0 fa": "sdcpp", "OpenVINO": "openvino"}
# "fa": its diffusion_flash_attn (--diffusion-fa), the fused attention it offers for the UNet
# the one-off export peaked at 8.0 GB with transformers 4.57 and was killed past 8 GB with transformers 5.5 / torch 2.14
EXPORT_MAX_RSS_MB = 16000

COMMON = r"""
import json, os, resource, statistics, sys, time
def cpu():
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024
marks = []
def mark(what):
    marks.append((what, time.perf_counter(), cpu()))
out = dict(loadavg_start=os.getloadavg()[0], threads={threads})
steps_n, guidance = {steps}, {guidance}
"""

FINISH = r"""
import numpy as np
img = np.asarray(image, dtype=np.float32) / (255.0 if np.asarray(image).dtype == np.uint8 else 1.0)
at = {}
for what, w, c in marks:
    at.setdefault(what, []).append((w, c))
steps = [at["call"][0]] + at["step"][-steps_n:]
step_w = [b[0] - a[0] for a, b in zip(steps, steps[1:])]
step_c = [b[1] - a[1] for a, b in zip(steps, steps[1:])]
d = lambda a, b, k: b[k] - a[k]
out.update(load=d(at["start"][0], at["loaded"][0], 0), load_cpu=d(at["start"][0], at["loaded"][0], 1),
           image=d(at["call"][0], at["end"][0], 0), image_cpu=d(at["call"][0], at["end"][0], 1),
           steps=step_w, steps_cpu=step_c,
           step=statistics.median(step_w[1:] or step_w), step_cpu=statistics.median(step_c[1:] or step_c),
           decode=d(at["step"][-1], at["end"][0], 0), decode_cpu=d(at["step"][-1], at["end"][0], 1),
           peak_rss=status("VmHWM"), anon_rss=status("RssAnon"), loadavg_end=os.getloadavg()[0],
           image_mean=float(img.mean()), image_std=float(img.std()), callbacks=len(at["step"]))
out["first_step_extra"] = step_w[0] - out["step"]
print("RESULT", json.dumps(out))
"""

SDCPP = r"""
from stable_diffusion_cpp import StableDiffusion
mark("start")
sd = StableDiffusion(model_path={ldm!r}, n_threads={threads}, wtype={wtype!r}, diffusion_flash_attn={fa},
                     verbose=False)
mark("loaded")
def on_step(step, steps, t):
    if steps == steps_n:
        mark("step")
mark("call")
image = sd.generate_image(prompt="a photo of a cat", cfg_scale=guidance, sample_method={method!r},
                          sample_steps=steps_n, seed=0, width=512, height=512, progress_callback=on_step)[0]
mark("end")
"""

OPENVINO = r"""
import torch
torch.set_num_threads({threads})
from optimum.intel import OVStableDiffusionPipeline
from diffusers import {scheduler} as S
mark("start")
p = OVStableDiffusionPipeline.from_pretrained({ov!r}, compile=False,
    ov_config={{"INFERENCE_NUM_THREADS": "{threads}", "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": ""}})
if guidance > 1:
    p.reshape(batch_size=1, height=512, width=512, num_images_per_prompt=1)
p.compile()
mark("loaded")
p.scheduler = S.from_config(p.scheduler.config)
p.set_progress_bar_config(disable=True)
def on_step(pipe, i, t, kw):
    mark("step")
    return kw
mark("call")
image = p("a photo of a cat", num_inference_steps=steps_n, guidance_scale=guidance, height=512, width=512,
          generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step).images[0]
mark("end")
"""


def paths(cache):
    root = os.path.join(cache, "sd15")
    return root, os.path.join(cache, "sd15-ldm-f16.safetensors"), os.path.join(cache, "sd15-openvino")


def prepare(a):
    """The LDM single file for stable-diffusion.cpp and optimum-intel's export of the folder (timed, RSS-capped)."""
    root, ldm, ov = paths(a.cache)
    if not os.path.exists(ldm):
        from ldm_single_file import convert
        convert(root, ldm)
    print(f"LDM file: {ldm}", flush=True)
    if not os.path.isdir(ov):
        code = (COMMON.format(threads=a.threads, steps=0, guidance=0) +
                f"from optimum.intel import OVStableDiffusionPipeline\nmark('start')\n"
                f"p = OVStableDiffusionPipeline.from_pretrained({root!r}, export=True, compile=False)\n"
                f"p.save_pretrained({ov + '.partial'!r})\nmark('end')\n"
                "print('RESULT', json.dumps(dict(export=marks[-1][1] - marks[0][1], export_cpu=marks[-1][2] - marks[0][2], "
                "peak_rss=status('VmHWM'))))\n")
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        r = run_child(code, env, limit_mb=EXPORT_MAX_RSS_MB)
        os.rename(ov + ".partial", ov)
        print(f"OpenVINO export: {r}", flush=True)
        with open(os.path.join(a.cache, "openvino-export.json"), "w") as f:
            json.dump(r, f)


def measure(side, run, a):
    root, ldm, ov = paths(a.cache)
    steps, guidance, scheduler = RUNS[run]
    code = COMMON.format(threads=a.threads, steps=steps, guidance=guidance)
    if SIDES[side] == "sdcpp":
        code += SDCPP.format(ldm=ldm, threads=a.threads, wtype="q8_0" if "q8_0" in side else "default",
                             fa=side.endswith(" fa"),
                             method="euler" if run == "euler20" else "lcm")
    else:
        code += OPENVINO.format(ov=ov, threads=a.threads, scheduler=scheduler)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    return run_child(code + FINISH, env)


def speed(a):
    import bench
    plan = [(run, side) for run in a.runs for side in a.sides]
    for run, side in plan:
        try:
            r = measure(side, run, a)
        except RuntimeError as e:
            r = {"error": str(e)[-1500:]}
        r.update(side=side, run=run, rep=0, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 machine=bench.machine())
        with open(a.log, "a") as f:
            f.write(json.dumps(r) + "\n")
        brief = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k not in ("steps", "steps_cpu", "machine")}
        print(f"  {run} | {side} | {brief}", file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["prepare", "speed"])
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minidiff-bench"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sides", nargs="*", default=["sd.cpp f16", "OpenVINO"], choices=list(SIDES))
    p.add_argument("--runs", nargs="*", default=["lcm4", "euler20"], choices=list(RUNS))
    p.add_argument("--log", default="cpu-peers.jsonl")
    a = p.parse_args()
    {"prepare": prepare, "speed": speed}[a.which](a)


if __name__ == "__main__":
    main()
