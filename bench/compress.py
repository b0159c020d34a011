"""Mixed-bit palettisation measured: the bundled model (quality), SD 1.5 / SDXL-shaped UNets (size, speed).

    python bench/compress.py bundled --prompts 256   # analysis, recipes; PSNR, accuracy, size; docs/compress.png
    python bench/compress.py sd15                    # random-weight SD 1.5 UNet: file size, load, RSS, one step
    python bench/compress.py sizes                   # SD 1.5 and SDXL UNet file sizes per recipe (exact, no weights)

On random weights only sizes and speeds mean something; quality is measured on the bundled model, whose
pictures the evaluator can read. Recipes for the random-weight UNets are size-only: every candidate at 4 bits,
then the largest layers raised to 6 (or 8) bits until the average reaches the target.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import SD15_UNET, SDXL_UNET, machine  # noqa: E402  (bench/bench.py: the real configs)

from minidiff import UNet2DConditionModel, compress  # noqa: E402
from minidiff.compress import Palettised, packed_size  # noqa: E402


def image_psnr(ref, test):
    """Mean over images of 20 log10(255 / RMSE) of uint8 pictures (inf when identical)."""
    out = []
    for r, t in zip(ref.astype(np.float64), test.astype(np.float64)):
        rmse = math.sqrt(((r - t) ** 2).mean())
        out.append(float("inf") if rmse == 0 else 20 * math.log10(255 / rmse))
    return float(np.mean(out))


def size_recipe(unet, target, min_size=compress.MIN_SIZE):
    """A size-only recipe: all candidates at 2 bits, the largest raised to 4, 6, 8 until the average >= target."""
    cands = sorted(compress.palettisable(unet, min_size), key=lambda c: -c[1])
    recipe = {n: 2 for n, _ in cands}
    total = sum(s for _, s in cands)
    for bits in (4, 6, 8):
        for n, s in cands:
            if sum(recipe[m] * t for m, t in cands) / total >= target:
                return recipe
            recipe[n] = bits
    return recipe


def file_bytes(unet, recipe):
    """Bytes of tensor data save_palettised writes for `recipe` (the file adds its JSON header)."""
    total = 0
    for name, t in unet.state_dict().items():
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and recipe.get(layer, 16) != 16:
            total += packed_size(t.numel(), recipe[layer]) + 2 * 2 ** recipe[layer]
        else:
            total += 2 * t.numel()
    return total


def sizes(a):
    print(f"\n## Palettised UNet sizes (exact byte counts of the tensors save_palettised writes; config only)\n")
    print("| UNet | float16 | linear 8-bit* | 6.5-bit | 4.5-bit | 3.4-bit |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, cfg in (("SD 1.5", SD15_UNET), ("SDXL base", SDXL_UNET)):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(cfg) if hasattr(UNet2DConditionModel, "from_config") else \
                UNet2DConditionModel(UNet2DConditionModel.config_class(**cfg))
        row = [2 * sum(t.numel() for t in unet.state_dict().values())]
        weights = sum(n for _, n in compress.palettisable(unet, 0))
        row.append(row[0] - weights)  # 8-bit: one byte per weight (+ a scale and zero point per channel, not counted)
        row += [file_bytes(unet, size_recipe(unet, t)) for t in (6.5, 4.5, 3.4)]
        print(f"| {name} | " + " | ".join(f"{b / 1e9:.2f} GB" for b in row) + " |")
    print("\n*linear 8-bit is only simulated by the analysis (coremltools' int8 formula), not stored.")


CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from minidiff import UNet2DConditionModel, compress
def anon_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:")) / 1024
base = anon_mb()
t = time.perf_counter()
unet = UNet2DConditionModel.from_pretrained({folder!r})
if {dequantise}:
    compress.dequantise(unet)
load = time.perf_counter() - t
g = torch.Generator().manual_seed(0)
x, c = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
with torch.no_grad():
    t = time.perf_counter()
    unet(x, torch.tensor([500, 500]), c)
    step = time.perf_counter() - t
print("RESULT", json.dumps({{"load": load, "rss": anon_mb() - base, "step": step}}))
"""


def measure(folder, dequantise, threads):
    code = CHILD.format(root=os.path.dirname(HERE), threads=threads, folder=folder, dequantise=dequantise)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1].split(" ", 1)[1])


def sd15(a):
    root = os.path.join(a.cache, "compress-sd15")
    fp16 = os.path.join(root, "fp16")
    if not os.path.exists(os.path.join(fp16, "diffusion_pytorch_model.safetensors")):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(UNet2DConditionModel.config_class(**SD15_UNET))
        for p in unet.parameters():
            p.data.normal_(0, 0.02)
        unet.half().save_pretrained(fp16)
    folders = {"float16 file, run in float32": (fp16, False)}
    for target in a.targets:
        out = os.path.join(root, f"{target}-bit")
        if not os.path.exists(os.path.join(out, "diffusion_pytorch_model.safetensors")):
            unet = UNet2DConditionModel.from_pretrained(fp16)
            recipe = size_recipe(unet, target)
            t = time.perf_counter()
            stats = compress.apply_recipe(unet, recipe)
            print(f"  palettised to {stats['nbits']:.2f} bits in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            compress.save_palettised(unet, out, recipe)
        folders[f"{target}-bit palettised, on the fly"] = (out, False)
        folders[f"{target}-bit palettised, dequantised at load"] = (out, True)
    print(f"\n## SD 1.5-shaped UNet (random weights), palettised\n\nmachine: {machine()}, {a.threads} threads; "
          f"one step = batch 2, 64x64 latents, fp32 compute; each row a fresh process, medians of {a.reps}\n")
    print("| weights | file | load | anonymous RSS | one step |\n| --- | ---: | ---: | ---: | ---: |")
    for name, (folder, deq) in folders.items():
        runs = [measure(folder, deq, a.threads) for _ in range(a.reps)]
        med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        size = os.path.getsize(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        print(f"| {name} | {size / 1e6:.0f} MB | {med['load']:.2f} s | {med['rss']:.0f} MB | {med['step']:.1f} s |",
              flush=True)


def bundled(a):
    from minidiff.toy import bench as toy
    torch.set_num_threads(a.threads)
    items = toy.benchmark_prompts(a.prompts)
    prompts, scenes, seeds = [p for p, _, _ in items], [s for _, s, _ in items], [s for _, _, s in items]
    pipe = toy.load_pipeline()
    analysis = os.path.join(a.cache, "compress-bundled-analysis.json")
    os.makedirs(a.cache, exist_ok=True)
    t = time.perf_counter()
    res = compress.analyse(pipe, analysis, min_size=a.min_size, num_inference_steps=4, guidance_scale=5.0,
                           targets=tuple(a.targets), model_version="minidiff/shapes-sd")
    print(f"  analysis: {time.perf_counter() - t:.0f} s ({len(res['sizes'])} layers)", file=sys.stderr)
    original = {n: m.weight.data.clone() for n, m in pipe.unet.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)}
    ref = toy.generate(pipe, prompts, seeds, 25, 5.0)
    rows, grids = [], [ref[:a.grid]]
    acc = toy.accuracy(ref, scenes)
    shipped = os.path.getsize(os.path.join(compress.BUNDLED, "unet", "diffusion_pytorch_model.safetensors"))
    rows.append(("original (float16 file, float32 compute)", "-", acc, shipped))
    for n, w in original.items():
        pipe.unet.get_submodule(n).weight.data = compress.linear_8bit(w)
    images = toy.generate(pipe, prompts, seeds, 25, 5.0)
    grids.append(images[:a.grid])
    weights = sum(w.numel() for w in original.values())
    rows.append(("linear 8-bit (every layer)", image_psnr(ref, images), toy.accuracy(images, scenes),
                 shipped - weights + 4 * sum(w.shape[0] for w in original.values())))
    for n, w in original.items():
        pipe.unet.get_submodule(n).weight.data = w
    for key, recipe in res["recipes"].items():
        unet = UNet2DConditionModel.from_pretrained(compress.BUNDLED, subfolder="unet")
        stats = compress.apply_recipe(unet, recipe)
        with tempfile.TemporaryDirectory() as d:
            size = os.path.getsize(compress.save_palettised(unet, d, recipe))
        pipe.unet = unet
        images = toy.generate(pipe, prompts, seeds, 25, 5.0)
        grids.append(images[:a.grid])
        rows.append((f"mixed {stats['nbits']:.2f}-bit ({key})", image_psnr(ref, images), toy.accuracy(images, scenes),
                     size))
    print(f"\n## Palettising the bundled model's UNet\n\nmachine: {machine()}, {a.threads} threads; {a.prompts} "
          f"benchmark prompts, Euler 25 steps, guidance 5; analysis: 4 prompts, 4 Euler steps, layers over "
          f"{a.min_size} weights ({len(res['sizes'])} of them)\n")
    print("| UNet weights | UNet output PSNR (analysis) | image PSNR vs original | colour | shape | UNet file |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    apple = res["baselines"]
    names = ["original", "linear_8bit"] + list(res["recipes"])
    for (name, p, acc_, size), key in zip(rows, names):
        p = p if isinstance(p, str) else ("identical" if math.isinf(p) else f"{p:.1f} dB")
        print(f"| {name} | {apple[key]:.1f} dB | {p} | {acc_['colour']:.1%} | {acc_['shape']:.1%} | "
              f"{size / 1e6:.2f} MB |")
    if a.picture:
        toy.save_grid(np.concatenate(grids), a.picture, columns=a.grid)
        print(f"\nwrote {a.picture} (rows: " + ", ".join(r[0] for r in rows) + ")")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["bundled", "sd15", "sizes"])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--min-size", type=int, default=20_000)
    p.add_argument("--targets", type=float, nargs="+", default=[6.5, 4.5, 3.4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--grid", type=int, default=8, help="pictures per row in --picture")
    p.add_argument("--picture", default=None, help="PNG of the first --grid pictures of each variant, a row each")
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minidiff-bench"))
    a = p.parse_args()
    {"bundled": bundled, "sd15": sd15, "sizes": sizes}[a.what](a)


if __name__ == "__main__":
    main()
