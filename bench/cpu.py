"""CPU speed (issue 18): minidiff's default, each dtype and layout, against diffusers fp32 and bf16, on the
SD 1.5 configs with random weights (bench/bench.py builds them once), in fresh processes taking turns.

    python bench/cpu.py speed --reps 3 --threads 2     # UNet step, VAE decode, whole image: every side
    python bench/cpu.py error                          # bf16 (and layouts) against fp32 eager, one process

Sides: "minidiff default" is what the CLI runs (torch_dtype="auto": bf16 on a CPU with AVX512_BF16 / AMX);
the others name dtype and option. Ratios are against diffusers fp32, its default.
"""
import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402 (the measuring machinery and the SD 1.5 configs)

# side: (library, torch_dtype expression, what is done to each loaded model)
SIDES = {
    "minidiff default (auto)": ("minidiff", "'auto'", ""),
    "minidiff fp32": ("minidiff", "torch.float32", ""),
    "minidiff fp32 channels_last": ("minidiff", "torch.float32", "m.to(memory_format=torch.channels_last)"),
    "minidiff bf16": ("minidiff", "torch.bfloat16", ""),
    "minidiff bf16 channels_last": ("minidiff", "torch.bfloat16", "m.to(memory_format=torch.channels_last)"),
    "minidiff bf16 fused qkv": ("minidiff", "torch.bfloat16", "m.fuse_qkv_projections()"),
    "diffusers fp32": ("diffusers", "torch.float32", ""),
    "diffusers bf16": ("diffusers", "torch.bfloat16", ""),
}


def model_job(root, sub, cls, setup, call, sides):
    def prep(side):
        lib, dtype, option = SIDES[side]
        return f"m = C.from_pretrained({root!r}, subfolder={sub!r}, torch_dtype={dtype})\n{option}"
    return dict(imports={s: f"from {SIDES[s][0]} import {cls} as C" for s in sides},
                load={s: prep(s).replace("\n", "; ") for s in sides}, setup=setup, call=call)


def pipe_job(root, steps, sides):
    def load(side):
        lib, dtype, option = SIDES[side]
        extra = ", safety_checker=None" if lib == "diffusers" else ""
        fix = f"; m = p.unet; {option}; m = p.vae; {option}" if option else ""
        return f"p = C.from_pretrained({root!r}, torch_dtype={dtype}{extra}){fix}"
    setup = {s: (f"from {SIDES[s][0]} import EulerDiscreteScheduler as E\n"
                 "p.scheduler = E.from_config(p.scheduler.config)\np.set_progress_bar_config(disable=True)")
             for s in sides}
    return dict(imports={s: f"from {SIDES[s][0]} import StableDiffusionPipeline as C" for s in sides},
                load={s: load(s) for s in sides}, setup=setup, warmup=0,
                call=f"p('a photo of a cat', num_inference_steps={steps}, guidance_scale=7.5, "
                     "generator=torch.Generator().manual_seed(0))")


def speed(a):
    root = os.path.join(a.cache, "sd15")
    bench.build_sd15(root)
    sides = [s for s in SIDES if not a.sides or any(k in s for k in a.sides)]
    x = "x, t, c = torch.randn(2, 4, 64, 64), torch.tensor(500), torch.randn(2, 77, 768)\n"
    jobs = {
        "UNet step, batch 2, 64x64 latents (s)": model_job(
            root, "unet", "UNet2DConditionModel",
            x + "x, c = x.to(m.dtype), c.to(m.dtype)\nif 'channels_last' in {opt!r}: x = x.to(memory_format=torch.channels_last)",
            "m(x, t, c)", sides),
        "VAE decode to 512x512 (s)": model_job(root, "vae", "AutoencoderKL", "z = torch.randn(1, 4, 64, 64).to(m.dtype)",
                                               "m.decode(z)", sides),
        f"whole 512x512 image, {a.steps} Euler steps, guidance 7.5 (s)": pipe_job(root, a.steps, sides),
    }
    results = {}
    for name, job in jobs.items():
        if a.only and not any(k in name for k in a.only):
            continue
        job["setup"] = {s: (job["setup"][s] if isinstance(job["setup"], dict) else job["setup"]).replace(
            "{opt!r}", repr(SIDES[s][2])) for s in sides}
        for s in sides:  # untimed: the files into the page cache
            bench.measure(job, s, a.threads, calls=0, warmup=0)
        res = {s: [] for s in sides}
        for _ in range(a.reps):
            for s in sides:
                res[s].append(bench.measure(job, s, a.threads, calls=job.get("calls", 1)))
                print(f"  {name} | {s}: {res[s][-1]}", file=sys.stderr, flush=True)
        results[name] = {s: {k: statistics.median(r[k] for r in res[s]) for k in ("call", "peak", "load")}
                         for s in sides}
    print(f"\nmachine: {bench.machine()}, {a.threads} threads, load average at the end "
          f"{os.getloadavg()[0]:.1f}; medians of {a.reps} alternating fresh-process runs\n")
    for name, by in results.items():
        ref = by.get("diffusers fp32", {}).get("call")
        print(f"| {name} | s | / diffusers fp32 | anon RSS MB |\n| --- | ---: | ---: | ---: |")
        for s, r in by.items():
            ratio = f"{r['call'] / ref:.2f}" if ref else "-"
            print(f"| {s} | {r['call']:.2f} | {ratio} | {r['peak']:.0f} |")
        print()


def error(a):
    """Relative error (max |diff| / max |ref|, and RMS / RMS) of each variant's UNet step against fp32 eager."""
    import torch
    from minidiff import UNet2DConditionModel
    torch.set_num_threads(a.threads)
    root = os.path.join(a.cache, "sd15")
    bench.build_sd15(root)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
    m = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    with torch.no_grad():
        ref = m(x, 500, c).sample
        variants = {"fp32 channels_last": (torch.float32, "cl"), "fp32 fused qkv": (torch.float32, "fused"),
                    "bf16": (torch.bfloat16, ""), "bf16 channels_last": (torch.bfloat16, "cl"),
                    "bf16 fused qkv": (torch.bfloat16, "fused")}
        for name, (dtype, option) in variants.items():
            m.unfuse_qkv_projections()
            m.to(dtype=dtype, memory_format=torch.channels_last if option == "cl" else torch.contiguous_format)
            if option == "fused":
                m.fuse_qkv_projections()
            xi = x.to(dtype, memory_format=torch.channels_last if option == "cl" else torch.contiguous_format)
            out = m(xi, 500, c.to(dtype)).sample.float()
            d = out - ref
            print(f"| {name} | {d.abs().max() / ref.abs().max():.2e} | {d.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt():.2e} |",
                  flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["speed", "error"])
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minidiff-bench"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="Euler steps of the whole image (20 in the issue)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--sides", nargs="*", help="only the sides whose name holds one of these words")
    p.add_argument("--only", nargs="*", help="only the measures whose name holds one of these words")
    a = p.parse_args()
    {"speed": speed, "error": error}[a.which](a)


if __name__ == "__main__":
    main()
