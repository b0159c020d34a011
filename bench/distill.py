"""Block-removal distillation of the bundled model, measured: parameters, time per image, accuracy.

    python bench/distill.py                         # small and tiny students, feature-loss ablation on small
    python bench/distill.py --archs bk-sdm-small --steps 200 --prompts 64
    python bench/distill.py --timing /tmp/distill-bench/bk-sdm-small /tmp/distill-bench/bk-sdm-tiny
                                                    # time per image only, teacher and students interleaved

For each student: `minidiff.distill.blocks.distill` from minidiff/assets/shapes-sd on the shapes world
(one thread), then the bundled benchmark (minidiff/toy/bench.py: 256 prompts, Euler 25 steps, guidance 5,
the evaluator reading colour and shape back) and the time per image (one prompt per call). The teacher
is benchmarked the same way on the same load. Prints a table and writes a JSON summary.
"""
import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from minidiff.assets import MODEL_DIR  # noqa: E402
from minidiff.distill import blocks  # noqa: E402
from minidiff.toy.bench import run_benchmark  # noqa: E402


def unet_parameters(folder):
    from minidiff.models.unet import UNet2DConditionModel
    return sum(p.numel() for p in UNet2DConditionModel.from_pretrained(folder, subfolder="unet").parameters())


@torch.no_grad()
def unet_ms(folder, reps=40):
    """Fastest of `reps` UNet calls at the benchmark's shape (batch 2: guidance's two halves), in ms: the
    minimum, the figure a shared machine disturbs least."""
    from minidiff.models.unet import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
    text = torch.randn(2, 20, c.cross_attention_dim)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        unet(x, torch.tensor([500, 500]), text)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def bench(folder, prompts, threads):
    res = run_benchmark(folder, n_prompts=prompts, modes=("euler",), threads=threads)["euler"]
    out = {k: float(res[k]) for k in ("colour", "shape", "both", "background", "seconds_per_image")}
    out["unet_ms"] = unet_ms(folder)
    return out


def interleaved_timing(folders, threads, rounds=15):
    """Seconds per 64x64 image (Euler 25 steps, guidance 5, one prompt per call) of each pipeline folder, the
    calls interleaved round by round so that a shared machine's load falls on all alike: (median, min)."""
    import numpy as np
    from minidiff.toy.bench import load_pipeline
    pipes = {f: load_pipeline(f) for f in folders}
    times = {f: [] for f in folders}
    for r in range(rounds + 1):
        for f, pipe in pipes.items():
            start = time.perf_counter()
            pipe("a red circle on a blue background", num_inference_steps=25, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(r), output_type="np")
            if r:
                times[f].append(time.perf_counter() - start)
    return {f: (float(np.median(t)), float(np.min(t))) for f, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["bk-sdm-small", "bk-sdm-tiny"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-ablation", action="store_true", help="skip the feature-loss-off run of the first arch")
    p.add_argument("--ablation-only", action="store_true", help="only the feature-loss-off run of the first arch")
    p.add_argument("--out", default="/tmp/distill-bench")
    p.add_argument("--json", default=None)
    p.add_argument("--timing", nargs="+", default=None, metavar="FOLDER", help="only time these pipelines' images "
                   "against the teacher's, interleaved")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.timing:
        for f, (median, best) in interleaved_timing([MODEL_DIR, *a.timing], a.threads).items():
            print(f"[timing] {f}: {median:.3f} s per image (median), {best:.3f} s (fastest); UNet call "
                  f"{unet_ms(f, reps=200):.2f} ms (fastest of 200, batch 2)", flush=True)
        return
    runs = [] if a.ablation_only else [(arch, (1.0, 1.0, 1.0)) for arch in a.archs]
    if not a.no_ablation:
        runs.append((a.archs[0], (1.0, 1.0, 0.0)))
    n_teacher = unet_parameters(MODEL_DIR)
    results = {}
    if not a.ablation_only:
        results["teacher"] = {"parameters": n_teacher, **bench(MODEL_DIR, a.prompts, a.threads)}
        print(f"[bench] teacher: {json.dumps(results['teacher'])}", flush=True)
    for arch, weights in runs:
        name = arch + ("" if weights[2] else "-nofeature")
        folder = os.path.join(a.out, name)
        start = time.perf_counter()
        _, last = blocks.distill(MODEL_DIR, folder, arch=arch, steps=a.steps, batch=a.batch, lr=a.lr,
                                 weights=weights, n_images=a.images, fp16=True, save_every=0, log_every=100)
        minutes = (time.perf_counter() - start) / 60
        n = unet_parameters(folder)
        results[name] = {"parameters": n, "reduction": 1 - n / n_teacher, "train_minutes": minutes,
                         "weights": weights, "final_losses": last, **bench(folder, a.prompts, a.threads)}
        print(f"[bench] {name}: {json.dumps(results[name])}", flush=True)
    print("\n| UNet | parameters | fewer | training | colour | shape | both | background | s per image | UNet call |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        fewer = f"{r['reduction']:.1%}" if "reduction" in r else "-"
        train = f"{r['train_minutes']:.1f} min" if "train_minutes" in r else "-"
        print(f"| {name} | {r['parameters'] / 1e6:.2f}M | {fewer} | {train} | {r['colour']:.1%} | {r['shape']:.1%} "
              f"| {r['both']:.1%} | {r['background']:.1%} | {r['seconds_per_image']:.3f} | {r['unet_ms']:.2f} ms |")
    print(f"\n{a.steps} steps of {a.batch}, lr {a.lr:g}, {a.images} drawn images, {a.threads} thread(s); "
          f"{a.prompts} benchmark prompts", flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
