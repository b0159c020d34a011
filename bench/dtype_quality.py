"""Is bf16 the same picture? The bundled model's benchmark (minidiff/toy/bench.py) in fp32 and in another dtype:
the evaluator's accuracy of each, and the PSNR of each image against its fp32 twin (same prompt, same seed).

    python bench/dtype_quality.py --prompts 256 --dtype bfloat16 --modes euler lcm
"""
import argparse
import time

import numpy as np
import torch

from minidiff.toy import bench


def psnr(a, b):
    """Per-image PSNR in dB of uint8 images (n, H, W, 3); identical images count as 99 dB."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return np.where(mse == 0, 99.0, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--modes", nargs="+", default=["euler", "lcm"], choices=list(bench.MODES))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    items = bench.benchmark_prompts(a.prompts)
    prompts, scenes, seeds = [p for p, _, _ in items], [s for _, s, _ in items], [s for _, _, s in items]
    for mode in a.modes:
        steps, guidance, lcm = bench.MODES[mode]
        images = {}
        for dtype in ("float32", a.dtype):
            pipe = bench.load_pipeline(lcm=lcm)
            pipe.to(dtype=getattr(torch, dtype))
            start = time.perf_counter()
            images[dtype] = bench.generate(pipe, prompts, seeds, steps, guidance)
            res = bench.accuracy(images[dtype], scenes)
            print(f"[dtype] {mode} {dtype}: colour {res['colour']:.1%}, shape {res['shape']:.1%}, both {res['both']:.1%}, "
                  f"background {res['background']:.1%} over {a.prompts} prompts ({time.perf_counter() - start:.0f} s, "
                  f"{a.threads} threads)", flush=True)
        q = psnr(images[a.dtype], images["float32"])
        diff = np.abs(images[a.dtype].astype(int) - images["float32"].astype(int))
        print(f"[dtype] {mode} {a.dtype} vs float32: PSNR median {np.median(q):.1f} dB, min {q.min():.1f} dB, "
              f"mean |diff| {diff.mean():.2f} /255, max {diff.max()}", flush=True)


if __name__ == "__main__":
    main()
