"""How good is the bundled model? Generate pictures for many prompts and read them back with the evaluator.

    python -m minidiff.toy.bench                 # 256 prompts, Euler 25 steps and LCM 4 steps
    python -m minidiff.toy.bench --prompts 64 --modes euler --grid euler.png

Prompts cycle through every shape x colour pair, with a random background, size, position and caption
template, each with its own seed. Images come from minidiff's StableDiffusionPipeline exactly as a user
gets them (Euler: 25 steps, guidance 5; LCM: the bundled LCM-LoRA, LCMScheduler, 4 steps, guidance 1).
The time per image is measured separately, one prompt per call as a user runs it.
"""
import argparse
import time

import numpy as np
import torch

from . import evaluate, shapes
from .common import LORA_DIR, MODEL_DIR, SEED_BENCH

MODES = {
    # name: (steps, guidance scale, LCM-LoRA)
    "euler": (25, 5.0, False),
    "lcm": (4, 1.0, True),
}


def shape_colour_pair(i):
    """The i-th of the 32 shape x colour pairs, in an order where every 4 in a row hold all four shapes and
    every 32 in a row all pairs (colour index 3k + s mod 8 runs through all colours as k does)."""
    s, k = i % len(shapes.SHAPES), (i // len(shapes.SHAPES)) % len(shapes.COLOURS)
    return shapes.SHAPES[s], list(shapes.COLOURS)[(3 * k + s) % len(shapes.COLOURS)]


def benchmark_prompts(n, seed=SEED_BENCH):
    """n (prompt, scene, seed) triples; the shape x colour pairs come round in turn, so n >= 32 covers all."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape, colour = shape_colour_pair(i)
        scene = shapes.random_scene(rng, shape=shape, colour=colour)
        template = int(rng.integers(len(shapes.TEMPLATES)))
        out.append((shapes.caption(scene, template=template), scene, seed * 1000 + i))
    return out


def load_pipeline(model_dir=MODEL_DIR, lcm=False, lora_dir=LORA_DIR):
    from ..pipelines.stable_diffusion import StableDiffusionPipeline
    from ..schedulers import LCMScheduler
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    if lcm:
        pipe.load_lora_weights(lora_dir, adapter_name="lcm")
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts, seeds, steps, guidance, batch=16):
    """uint8 images (n, H, W, 3), one seeded generator per prompt (so batching does not change them)."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        images = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                      output_type="np").images
        out.append(np.round(images * 255).astype(np.uint8))
    return np.concatenate(out)


def seconds_per_image(pipe, steps, guidance, n=5):
    """Median wall time of one-prompt calls (after one warm-up call)."""
    prompts = [p for p, _, _ in benchmark_prompts(n + 1, seed=SEED_BENCH + 1)]
    times = []
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
             generator=torch.Generator().manual_seed(i), output_type="np")
        if i:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def accuracy(images, scenes):
    """Overall fractions right plus per-shape and per-colour breakdowns."""
    readings = [evaluate.read(im) for im in images]
    res = evaluate.score(images, scenes)
    res["per_shape"] = {s: np.mean([r.shape == s for r, sc in zip(readings, scenes) if sc.shape == s])
                        for s in shapes.SHAPES if any(sc.shape == s for sc in scenes)}
    res["per_colour"] = {c: np.mean([r.colour == c for r, sc in zip(readings, scenes) if sc.colour == c])
                         for c in shapes.COLOURS if any(sc.colour == c for sc in scenes)}
    return res


def save_grid(images, path, columns=16):
    from PIL import Image
    n = len(images)
    rows = -(-n // columns)
    h, w = images.shape[1:3]
    grid = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    Image.fromarray(grid).save(path)


def run_benchmark(model_dir=MODEL_DIR, n_prompts=256, modes=("euler", "lcm"), lora_dir=LORA_DIR, threads=2,
                  timing=True, grid=None):
    torch.set_num_threads(threads)
    items = benchmark_prompts(n_prompts)
    prompts = [p for p, _, _ in items]
    scenes = [s for _, s, _ in items]
    seeds = [s for _, _, s in items]
    results = {}
    for mode in modes:
        steps, guidance, lcm = MODES[mode]
        pipe = load_pipeline(model_dir, lcm=lcm, lora_dir=lora_dir)
        start = time.perf_counter()
        images = generate(pipe, prompts, seeds, steps, guidance)
        batch_time = time.perf_counter() - start
        res = accuracy(images, scenes)
        res["seconds_per_image"] = seconds_per_image(pipe, steps, guidance) if timing else None
        results[mode] = res
        label = f"{mode} {steps} steps, guidance {guidance:g}"
        timing_text = (f"; {res['seconds_per_image']:.2f} s per image ({threads} threads, one prompt per call)"
                       if timing else "")
        print(f"[bench] {label}: colour {res['colour']:.1%}, shape {res['shape']:.1%}, both {res['both']:.1%}, "
              f"background {res['background']:.1%} over {n_prompts} prompts{timing_text}; "
              f"batched generation {batch_time:.0f} s", flush=True)
        print("[bench]   shape:  " + ", ".join(f"{k} {v:.0%}" for k, v in res["per_shape"].items()), flush=True)
        print("[bench]   colour: " + ", ".join(f"{k} {v:.0%}" for k, v in res["per_colour"].items()), flush=True)
        if grid:
            path = grid if len(modes) == 1 else grid.replace(".png", f"-{mode}.png")
            save_grid(images, path)
            print(f"[bench]   wrote {path}", flush=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=MODEL_DIR)
    p.add_argument("--lora", default=LORA_DIR)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--modes", nargs="+", default=["euler", "lcm"], choices=list(MODES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--grid", default=None, help="save the generated images as one PNG")
    a = p.parse_args()
    acc = evaluate.self_check()
    print(f"[bench] evaluator on 1000 held-out drawn images: colour {acc['colour']:.1%}, shape {acc['shape']:.1%}",
          flush=True)
    run_benchmark(a.model, a.prompts, tuple(a.modes), a.lora, a.threads, not a.no_timing, a.grid)


if __name__ == "__main__":
    main()
