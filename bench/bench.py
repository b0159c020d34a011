"""minidiff vs diffusers on the real model configs (random weights), measured side by side in one run.

    python bench/bench.py sd15            # SD 1.5 UNet, VAE, text encoder; whole 512x512 image
    python bench/bench.py sdxl            # SDXL UNet: load, peak memory, one step at 128x128 latents
    python bench/bench.py lcm             # SD 1.5 + LCM-LoRA-shaped adapter: 4 LCM steps at 512x512
    python bench/bench.py wuerstchen      # stage B and stage C: load, peak memory, one step

Configs are the Hub repos' (CHECKPOINTS.md); weights are random and saved once under --cache.
Loads run in fresh subprocesses (time, and peak RSS above the bare interpreter with torch imported);
compute runs in one process with both models, alternating minidiff and diffusers so that drift of this
shared machine hits both alike. Prints a table with minidiff/diffusers ratios and the machine.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch



def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"python {platform.python_version()}")


# ---- loading, in subprocesses ---------------------------------------------------------------------
LOADERS = {
    "minidiff": "from {mod} import {cls} as C\nm = C.from_pretrained({path!r}, subfolder={sub!r})",
    "diffusers": "from {dmod} import {cls} as C\nm = C.from_pretrained({path!r}, subfolder={sub!r})",
}
CHILD = """
import resource, sys, time, torch
torch.set_num_threads({threads})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
{imports}
t = time.perf_counter()
{load}
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT", dt, (peak - base) / 1024)
"""


def load_once(side, spec, path, threads):
    mod, dmod, cls, sub = spec
    imports = f"import {mod if side == 'minidiff' else dmod}"
    code = CHILD.format(threads=threads, imports=imports,
                        load=LOADERS[side].format(mod=mod, dmod=dmod, cls=cls, path=path, sub=sub))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    _, dt, mb = out.strip().splitlines()[-1].split()
    return float(dt), float(mb)


def bench_loads(specs, path, reps, threads):
    rows = []
    for name, spec in specs.items():
        res = {"minidiff": [], "diffusers": []}
        for _ in range(reps):
            for side in ("minidiff", "diffusers"):  # alternate
                res[side].append(load_once(side, spec, path, threads))
        m_t = statistics.median(r[0] for r in res["minidiff"])
        d_t = statistics.median(r[0] for r in res["diffusers"])
        m_mb = statistics.median(r[1] for r in res["minidiff"])
        d_mb = statistics.median(r[1] for r in res["diffusers"])
        rows.append((f"load {name} (s)", m_t, d_t))
        rows.append((f"peak RSS loading {name} (MB)", m_mb, d_mb))
    return rows


# ---- compute, alternating in one process ------------------------------------------------------------
def timed(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def alternate(name, ours, theirs, reps):
    """Time two callables turn about (warm-up first), return (name, median ours, median theirs)."""
    ours(), theirs()
    a, b = [], []
    for _ in range(reps):
        a += timed(ours, 1, 0)
        b += timed(theirs, 1, 0)
    return name, statistics.median(a), statistics.median(b)


def print_table(title, rows, note=""):
    print(f"\n## {title}\n")
    print(f"machine: {machine()}")
    if note:
        print(note)
    print("\n| measure | minidiff | diffusers | minidiff/diffusers |\n| --- | ---: | ---: | ---: |")
    for name, m, d in rows:
        print(f"| {name} | {m:.3f} | {d:.3f} | {m / d:.2f} |")
    sys.stdout.flush()


# ---- the real configs (CHECKPOINTS.md) --------------------------------------------------------------
SD15_UNET = dict(attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], layers_per_block=2,
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64)
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, sample_size=512)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
SDXL_UNET = dict(addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
                 block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
                 projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10],
                 use_linear_projection=True, sample_size=128)


def build_once(folder, make):
    """Save a randomly initialised diffusers model once; later runs reuse the folder."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        torch.manual_seed(0)
        make().save_pretrained(folder)
    return folder


def sd15(a):
    import diffusers
    import transformers
    from minidiff import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    root = os.path.join(a.cache, "sd15")
    build_once(f"{root}/unet", lambda: diffusers.UNet2DConditionModel(**SD15_UNET))
    build_once(f"{root}/vae", lambda: diffusers.AutoencoderKL(**SD15_VAE))
    build_once(f"{root}/text_encoder", lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT)))
    specs = {"UNet": ("minidiff", "diffusers", "UNet2DConditionModel", "unet"),
             "VAE": ("minidiff", "diffusers", "AutoencoderKL", "vae"),
             "text encoder": ("minidiff", "transformers", "CLIPTextModel", "text_encoder")}
    rows = bench_loads(specs, root, a.reps, a.threads)
    with torch.no_grad():
        ours, theirs = UNet2DConditionModel.from_pretrained(root, subfolder="unet"), diffusers.UNet2DConditionModel.from_pretrained(root, subfolder="unet")
        x, t, c = torch.randn(2, 4, 64, 64), torch.tensor(500), torch.randn(2, 77, 768)
        rows.append(alternate("UNet step, batch 2, 64x64 latents (s)", lambda: ours(x, t, c), lambda: theirs(x, t, c), a.reps))
        del ours, theirs
        ours, theirs = AutoencoderKL.from_pretrained(root, subfolder="vae"), diffusers.AutoencoderKL.from_pretrained(root, subfolder="vae")
        z = torch.randn(1, 4, 64, 64)
        rows.append(alternate("VAE decode 512x512 (s)", lambda: ours.decode(z), lambda: theirs.decode(z), a.reps))
        del ours, theirs
        ours, theirs = CLIPTextModel.from_pretrained(root, subfolder="text_encoder"), transformers.CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
        ids = torch.randint(0, 49408, (2, 77))
        rows.append(alternate("text encoder, batch 2 (s)", lambda: ours(ids), lambda: theirs(ids), a.reps))
    print_table("SD 1.5 (random weights)", rows)


RUNS = {"sd15": sd15}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["sd15", "sdxl", "lcm", "wuerstchen"])
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minidiff-bench"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="steps of the whole-image run")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    RUNS[a.which](a)


if __name__ == "__main__":
    main()
