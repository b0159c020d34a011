"""minidiff vs diffusers on the real model configs (random weights), measured side by side in one run.

    python bench/bench.py sd15          # SD 1.5 UNet, VAE, text encoder; whole 512x512 image
    python bench/bench.py lcm           # SD 1.5 + an LCM-LoRA-shaped adapter: 4 LCM steps at 512x512
    python bench/bench.py sdxl          # SDXL UNet: load, peak memory, one step at 128x128 latents
    python bench/bench.py wuerstchen    # stage C prior and stage B decoder: load, peak memory, one step

Configs are the Hub repos' (see shared CHECKPOINTS.md); weights are random, saved once under --cache
by diffusers. Every measurement runs in a fresh subprocess, minidiff and diffusers turn about
(m, d, m, d, ...), so that the drift of a shared machine hits both alike; the table gives medians.
Load: wall time of from_pretrained, after an untimed round has brought the files into the page cache.
Memory: anonymous RSS (memory the process owns, not the shared page cache that safetensors maps the files
from on both sides) after the load and the calls, above the interpreter with the library imported.
Compute: the median of timed calls after one warm-up call (whole images: no warm-up), same subprocess.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# ---- the real configs ---------------------------------------------------------------------------------
SD15_UNET = dict(attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], layers_per_block=2,
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64)
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, sample_size=512)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
SDXL_UNET = dict(addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
                 block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
                 projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10],
                 use_linear_projection=True, sample_size=128)
W_PRIOR = dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.1)
W_DECODER = dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1024, c_hidden=[320, 640, 1280, 1280],
                 nhead=[-1, 10, 20, 20], blocks=[4, 4, 14, 4], level_config=["CT", "CTA", "CTA", "CTA"],
                 inject_effnet=[False, True, True, True], effnet_embd=16, clip_embd=1024, kernel_size=3, dropout=0.1)


def machine():
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (CPU), python {platform.python_version()}"


# ---- one measurement in a fresh process ----------------------------------------------------------------
CHILD = r"""
import json, resource, sys, time, statistics, torch
sys.path.insert(0, {here!r})
torch.set_num_threads({threads})
torch.manual_seed(0)
{imports}
def anon_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:")) / 1024
base = anon_mb()
t = time.perf_counter()
{load}
load_s = time.perf_counter() - t
times = []
with torch.no_grad():
{setup}
    for i in range({calls} + {warmup}):
        t = time.perf_counter()
{call}
        if i >= {warmup}:
            times.append(time.perf_counter() - t)
# Memory the process owns (anonymous RSS) after load and calls: safetensors maps files on both sides, and the
# page cache that maps them is shared and reclaimable, so file-backed pages are not counted.
peak_mb = anon_mb() - base
print("RESULT", json.dumps({{"load": load_s, "peak": peak_mb, "call": statistics.median(times) if times else None}}))
"""


def indent(code, n):
    return "\n".join(" " * n + line for line in code.strip().splitlines())


def measure(job, side, threads, calls, warmup=None):
    setup = job.get("setup", "pass")
    setup = setup[side] if isinstance(setup, dict) else setup
    code = CHILD.format(here=HERE, threads=threads, imports=job["imports"][side], load=job["load"][side],
                        setup=indent(setup, 4), calls=calls, warmup=job.get("warmup", 1) if warmup is None else warmup, call=indent(job.get("call", "pass"), 8))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{side} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1].split(" ", 1)[1])


def compare(title, jobs, a, note=""):
    """Run each job for both sides, turn about, `a.reps` times; print one table."""
    rows = []
    for name, job in jobs.items():
        res = {"minidiff": [], "diffusers": []}
        for side in ("minidiff", "diffusers"):  # an untimed load: the files into the page cache, for both sides
            measure(job, side, a.threads, calls=0, warmup=0)
        for _ in range(a.reps):
            for side in ("minidiff", "diffusers"):
                res[side].append(measure(job, side, a.threads, job.get("calls", 1)))
                print(f"  {name} {side}: {res[side][-1]}", file=sys.stderr, flush=True)
        med = {s: {k: statistics.median(r[k] for r in res[s]) if res[s][0][k] is not None else None
                   for k in ("load", "peak", "call")} for s in res}
        if job.get("load_row", True):
            rows.append((f"{name}: load (s)", med["minidiff"]["load"], med["diffusers"]["load"]))
            rows.append((f"{name}: anonymous RSS after load and calls (MB)", med["minidiff"]["peak"], med["diffusers"]["peak"]))
        if med["minidiff"]["call"] is not None:
            rows.append((f"{name}: {job['call_name']} (s)", med["minidiff"]["call"], med["diffusers"]["call"]))
    print(f"\n## {title}\n")
    print(f"machine: {machine()}, {a.threads} threads; medians of {a.reps} alternating runs")
    if note:
        print(note)
    print("\n| measure | minidiff | diffusers | minidiff / diffusers |\n| --- | ---: | ---: | ---: |")
    for name, m, d in rows:
        print(f"| {name} | {m:.2f} | {d:.2f} | {m / d:.2f} |")
    sys.stdout.flush()


def model_job(folder, sub, ours, theirs, theirs_mod="diffusers", setup="pass", call="pass", call_name="", **kw):
    """Load one model (minidiff class `ours` vs `theirs` from diffusers/transformers) and time one call of `m`."""
    return dict(imports={"minidiff": f"from minidiff import {ours} as C", "diffusers": f"from {theirs_mod} import {theirs} as C"},
                load={s: f"m = C.from_pretrained({folder!r}, subfolder={sub!r})" for s in ("minidiff", "diffusers")},
                setup=setup, call=call, call_name=call_name, **kw)


def build_once(folder, make):
    """Save `make()` (seeded) into `folder` unless it is there. Written beside it and then renamed, so that
    an interrupted build (a multi-GB save) is redone rather than mistaken for a finished one."""
    if os.path.isdir(folder):
        return
    import torch
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(0)
    make().save_pretrained(partial)
    os.rename(partial, folder)


def build_sd15(root):
    import diffusers
    import transformers
    build_once(f"{root}/unet", lambda: diffusers.UNet2DConditionModel(**SD15_UNET))
    build_once(f"{root}/vae", lambda: diffusers.AutoencoderKL(**SD15_VAE))
    build_once(f"{root}/text_encoder", lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT)))
    if not os.path.exists(f"{root}/model_index.json"):
        from minidiff.weights.single_file import clip_tokenizer  # the real CLIP vocabulary, shipped with minidiff
        clip_tokenizer("<|endoftext|>").save_pretrained(f"{root}/tokenizer")
        diffusers.PNDMScheduler.from_config(SD15_SCHEDULER).save_pretrained(f"{root}/scheduler")
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.39.0",
                 "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
                 "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}
        with open(f"{root}/model_index.json", "w") as f:
            json.dump(index, f)


def pipe_job(root, steps, call_kw="", name="whole 512x512 image"):
    """Build the SD pipeline from `root` (untimed here: its loads are the model rows) and time one image."""
    return dict(imports={"minidiff": "from minidiff import StableDiffusionPipeline as C",
                         "diffusers": "from diffusers import StableDiffusionPipeline as C"},
                load={"minidiff": f"p = C.from_pretrained({root!r})",
                      "diffusers": f"p = C.from_pretrained({root!r}, safety_checker=None)"},
                setup="p.set_progress_bar_config(disable=True)",
                call=f"p('a photo of a cat', num_inference_steps={steps}, generator=torch.Generator().manual_seed(0){call_kw})",
                call_name=name, load_row=False, warmup=0)


def sd15(a):
    root = os.path.join(a.cache, "sd15")
    build_sd15(root)
    steps = a.steps or 3
    jobs = {
        "UNet": model_job(root, "unet", "UNet2DConditionModel", "UNet2DConditionModel",
                          setup="x, t, c = torch.randn(2, 4, 64, 64), torch.tensor(500), torch.randn(2, 77, 768)",
                          call="m(x, t, c)", call_name="one step, batch 2, 64x64 latents, fp32"),
        "VAE": model_job(root, "vae", "AutoencoderKL", "AutoencoderKL", setup="z = torch.randn(1, 4, 64, 64)",
                         call="m.decode(z)", call_name="decode to 512x512"),
        "text encoder": model_job(root, "text_encoder", "CLIPTextModel", "CLIPTextModel", theirs_mod="transformers",
                                  setup="ids = torch.randint(0, 49408, (2, 77))", call="m(ids)",
                                  call_name="encode, batch 2"),
        "pipeline": pipe_job(root, steps, name=f"whole 512x512 image, {steps} PNDM steps, guidance 7.5"),
    }
    compare("SD 1.5 (real configs, random weights)", jobs, a)


def lcm(a):
    root = os.path.join(a.cache, "sd15")
    build_sd15(root)
    lora = os.path.join(a.cache, "lcm_lora.safetensors")
    if not os.path.exists(lora):
        sys.path.insert(0, HERE)
        from make_lcm_lora import write_lcm_lora  # kohya keys, diffusers names, rank 64, alpha 8
        write_lcm_lora(os.path.join(root, "unet"), lora)
    # by folder + weight_name: diffusers refuses a bare file path when HF_HUB_OFFLINE is set
    load = f"p.load_lora_weights({a.cache!r}, weight_name='lcm_lora.safetensors', adapter_name='lcm')\n"
    setup = {lib: "p.set_progress_bar_config(disable=True)\n" + load +
             f"from {lib} import LCMScheduler\np.scheduler = LCMScheduler.from_config(p.scheduler.config)"
             for lib in ("minidiff", "diffusers")}
    job = pipe_job(root, 4, call_kw=", guidance_scale=1.0",
                   name="whole 512x512 image, 4 LCM steps, guidance 1 (one UNet pass per step), LoRA unfused")
    job["setup"] = setup
    compare("SD 1.5 + LCM-LoRA (real configs, random weights)", {"LCM-LoRA": job}, a)


def sdxl(a):
    import diffusers
    root = os.path.join(a.cache, "sdxl")
    build_once(f"{root}/unet", lambda: diffusers.UNet2DConditionModel(**SDXL_UNET))
    setup = ("x, t, c = torch.randn(1, 4, 128, 128), torch.tensor(500), torch.randn(1, 77, 2048)\n"
             "added = {'text_embeds': torch.randn(1, 1280), 'time_ids': torch.tensor([[1024., 1024, 0, 0, 1024, 1024]])}")
    jobs = {"UNet": model_job(root, "unet", "UNet2DConditionModel", "UNet2DConditionModel", setup=setup,
                              call="m(x, t, c, added_cond_kwargs=added)",
                              call_name="one step, batch 1, 128x128 latents, fp32")}
    compare("SDXL UNet (real config, random weights)", jobs, a)


def wuerstchen(a):
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt, WuerstchenPrior
    root = os.path.join(a.cache, "wuerstchen")
    build_once(f"{root}/prior", lambda: WuerstchenPrior(**W_PRIOR))
    build_once(f"{root}/decoder", lambda: WuerstchenDiffNeXt(**W_DECODER))
    mod = "diffusers.pipelines.deprecated.wuerstchen"
    jobs = {
        "stage C prior": model_job(root, "prior", "WuerstchenPrior", "WuerstchenPrior", theirs_mod=mod,
                                   setup="x, r, c = torch.randn(2, 16, 24, 24), torch.rand(2), torch.randn(2, 77, 1280)",
                                   call="m(x, r, c)", call_name="one step, batch 2 (CFG), 24x24 latents (1024 px)"),
        "stage B decoder": model_job(root, "decoder", "WuerstchenDiffNeXt", "WuerstchenDiffNeXt", theirs_mod=mod,
                                     setup=("x, r = torch.randn(1, 4, 128, 128), torch.rand(1)\n"
                                            "e, c = torch.randn(1, 16, 12, 12), torch.randn(1, 77, 1024)"),
                                     call="m(x, r, e, c)", call_name="one step, batch 1, 128x128 latents (512 px)"),
    }
    compare("Würstchen v2 stages B and C (real configs, random weights)", jobs, a)


RUNS = {"sd15": sd15, "lcm": lcm, "sdxl": sdxl, "wuerstchen": wuerstchen}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=sorted(RUNS))
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minidiff-bench"))
    p.add_argument("--reps", type=int, default=3, help="alternating runs per side")
    p.add_argument("--steps", type=int, default=None, help="steps of the whole-image run (sd15; default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    RUNS[a.which](a)


if __name__ == "__main__":
    main()
