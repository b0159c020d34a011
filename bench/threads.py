"""How many threads serve a shared 2-core box? The bundled model's 64x64 image (25 Euler steps) and one SD 1.5
UNet step (bf16, batch 2; needs bench/bench.py's cache), at 1 and 2 threads, with and without a competing
busy process on one core, in fresh processes taking turns.

    python bench/threads.py --reps 3 [--sd15]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, time, torch
torch.set_num_threads({threads})
from minidiff import StableDiffusionPipeline, UNet2DConditionModel
from minidiff.assets import MODEL_DIR
times = []
if {sd15}:
    m = UNet2DConditionModel.from_pretrained({root!r}, subfolder="unet", torch_dtype=torch.bfloat16)
    x, c = torch.randn(2, 4, 64, 64, dtype=torch.bfloat16), torch.randn(2, 77, 768, dtype=torch.bfloat16)
    run = lambda i: m(x, 500, c)
else:
    p = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    p.set_progress_bar_config(disable=True)
    run = lambda i: p("a red circle", num_inference_steps=25, guidance_scale=5.0, generator=torch.Generator().manual_seed(i))
with torch.no_grad():
    for i in range(4):
        t = time.perf_counter(); run(i); times.append(time.perf_counter() - t)
print(json.dumps(sorted(times[1:])[1]))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sd15", action="store_true")
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minidiff-bench", "sd15"))
    a = p.parse_args()
    res = {}
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            for _ in range(a.reps):
                for threads in (1, 2):
                    code = CHILD.format(threads=threads, sd15=a.sd15, root=a.cache)
                    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
                    if out.returncode:
                        raise RuntimeError(out.stderr[-2000:])
                    res.setdefault((busy, threads), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(f"  busy={busy} threads={threads}: {res[(busy, threads)][-1]:.3f} s", file=sys.stderr, flush=True)
        finally:
            if hog is not None:
                hog.kill()
    what = "SD 1.5 UNet step, bf16, batch 2" if a.sd15 else "bundled model, 64x64 image, 25 Euler steps"
    print(f"\n{what}; load average at the end {os.getloadavg()[0]:.1f}; medians of {a.reps} alternating runs\n")
    print("| competing busy process | 1 thread (s) | 2 threads (s) | 2 / 1 |\n| --- | ---: | ---: | ---: |")
    for busy in (False, True):
        one, two = (statistics.median(res[(busy, t)]) for t in (1, 2))
        print(f"| {'yes, one core' if busy else 'no'} | {one:.3f} | {two:.3f} | {two / one:.2f} |")


if __name__ == "__main__":
    main()
