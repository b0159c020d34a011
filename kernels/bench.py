"""The kernel workbench: per op and per shape of the real SD 1.5 / SDXL layers, the Triton kernel's error
against the fp32 reference and the time of the reference, the kernel and the compiled reference.

    python -m minidiff.kernels.bench                      # every op, SD 1.5 and SDXL shapes, fp16 on CUDA
    python -m minidiff.kernels.bench --model sd15 --op group_norm --dtype bf16
    python -m minidiff.kernels.bench --small --no-compile # the CPU dry run: quarter-size shapes

Shapes are those of a batch-2 (classifier-free guidance) UNet step at 512x512 (SD 1.5, 64x64 latents) and
1024x1024 (SDXL, 128x128 latents). Time: median of --repeat calls after warm-up, CUDA synchronised.
Triton runs only on CUDA (elsewhere its columns say n/a). A kernel is added to this table by adding its
shapes to SHAPES and a make-inputs function to INPUTS.
"""
import argparse
import platform
import statistics
import time

import torch

from minidiff import kernels, ops

# (model, op, description, shape args); batch 2 = one CFG step
SHAPES = [
    ("sd15", "group_norm", "resnet 320 @64x64, +SiLU", dict(x=(2, 320, 64, 64), groups=32, silu=True)),
    ("sd15", "group_norm", "resnet 640 @32x32, +SiLU", dict(x=(2, 640, 32, 32), groups=32, silu=True)),
    ("sd15", "group_norm", "resnet 1280 @16x16, +SiLU", dict(x=(2, 1280, 16, 16), groups=32, silu=True)),
    ("sd15", "group_norm", "transformer in 320 @64x64", dict(x=(2, 320, 64, 64), groups=32, silu=False)),
    ("sd15", "group_norm", "VAE decoder 512 @64x64, +SiLU (batch 1)", dict(x=(1, 512, 64, 64), groups=32, silu=True)),
    ("sd15", "layer_norm", "transformer 320, 4096 tokens", dict(x=(2, 4096, 320))),
    ("sd15", "layer_norm", "transformer 640, 1024 tokens", dict(x=(2, 1024, 640))),
    ("sd15", "layer_norm", "transformer 1280, 256 tokens", dict(x=(2, 256, 1280))),
    ("sd15", "geglu", "feed-forward 320 (h 2560), 4096 tokens", dict(x=(2, 4096, 2560))),
    ("sd15", "geglu", "feed-forward 1280 (h 10240), 256 tokens", dict(x=(2, 256, 10240))),
    ("sd15", "lora_linear", "to_q 320x320, rank 8, 4096 tokens", dict(x=(2, 4096, 320), out=320, rank=8)),
    ("sd15", "lora_linear", "ff.net.2 5120->1280, rank 16, 256 tokens", dict(x=(2, 256, 5120), out=1280, rank=16)),
    ("sdxl", "group_norm", "resnet 320 @128x128, +SiLU", dict(x=(2, 320, 128, 128), groups=32, silu=True)),
    ("sdxl", "group_norm", "resnet 640 @64x64, +SiLU", dict(x=(2, 640, 64, 64), groups=32, silu=True)),
    ("sdxl", "group_norm", "resnet 1280 @32x32, +SiLU", dict(x=(2, 1280, 32, 32), groups=32, silu=True)),
    ("sdxl", "group_norm", "resnet 640 @64x64, +SiLU, channels_last", dict(x=(2, 640, 64, 64), groups=32, silu=True, channels_last=True)),
    ("sdxl", "layer_norm", "transformer 640, 4096 tokens", dict(x=(2, 4096, 640))),
    ("sdxl", "layer_norm", "transformer 1280, 1024 tokens", dict(x=(2, 1024, 1280))),
    ("sdxl", "geglu", "feed-forward 640 (h 5120), 4096 tokens", dict(x=(2, 4096, 5120))),
    ("sdxl", "geglu", "feed-forward 1280 (h 10240), 1024 tokens", dict(x=(2, 1024, 10240))),
    ("sdxl", "lora_linear", "to_k 1280x1280, rank 32, 1024 tokens", dict(x=(2, 1024, 1280), out=1280, rank=32)),
    ("sdxl", "lora_linear", "to_k of the text 2048->640, rank 32, 77 tokens", dict(x=(2, 77, 2048), out=640, rank=32)),
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def shrink(shape, small):
    """--small: a quarter of every dim past the first two (the CPU dry run)."""
    return tuple(shape[:2]) + tuple(max(1, d // 4) for d in shape[2:]) if small else tuple(shape)


def inputs(op, spec, dtype, device, small):
    """(positional args of the op, in the reference's order) for one row."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device, dtype)
    x = rand(*shrink(spec["x"], small))
    if op == "group_norm":
        if spec.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        c = x.shape[1]
        return (x, spec["groups"], rand(c, std=0.1) + 1, rand(c, std=0.1), 1e-5, spec["silu"])
    if op == "layer_norm":
        c = x.shape[-1]
        return (x, rand(c, std=0.1) + 1, rand(c, std=0.1), 1e-5, -1)
    if op == "geglu":
        return (x,)
    k, n, r = x.shape[-1], spec["out"], spec["rank"]
    return (x, rand(n, k, std=k ** -0.5), rand(n, std=0.1), [(rand(r, k, std=k ** -0.5), rand(n, r, std=r ** -0.5), None, 1.0)])


def to_fp32(args):
    def f(a):
        if isinstance(a, torch.Tensor):
            return a.float()
        if isinstance(a, (list, tuple)):
            return type(a)(f(b) for b in a)
        return a
    return f(args)


def timed(fn, args, repeat, device):
    """Median milliseconds of fn(*args) over `repeat` calls, after two warm-up calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn(*args)
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn(*args)
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def machine(device):
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd15", "sdxl", "all"], default="all")
    p.add_argument("--op", choices=sorted({row[1] for row in SHAPES}) + ["all"], default="all")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--small", action="store_true", help="quarter-size spatial/token dims (CPU dry run)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference column")
    a = p.parse_args(argv)
    dtype = DTYPES[a.dtype or ("fp16" if a.device == "cuda" else "fp32")]
    triton_ok = a.device == "cuda"
    impls = kernels.triton_ops() if triton_ok else {}
    print(f"# minidiff kernel workbench: {machine(a.device)}, {dtype}, median of {a.repeat}"
          + ("" if triton_ok else "; no CUDA here: the Triton columns are n/a"))
    print("| model | op | layer | shape | max err kernel vs fp32 ref (/ max abs ref) | ref ms | triton ms | compiled ref ms | ref / triton |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, op, what, spec in SHAPES:
        if a.model not in ("all", model) or a.op not in ("all", op):
            continue
        args = inputs(op, spec, dtype, a.device, a.small)
        ref_fn = ops.REFERENCES[op]
        with torch.no_grad():
            ref_ms = timed(ref_fn, args, a.repeat, a.device)
            err, tri_ms, comp_ms = "n/a", None, None
            if triton_ok:
                ref32 = ref_fn(*to_fp32(args)).float()
                out = impls[op](*args).float()
                err = f"{(out - ref32).abs().max().item() / ref32.abs().max().item():.2e}"
                tri_ms = timed(impls[op], args, a.repeat, a.device)
            if not a.no_compile:
                torch._dynamo.reset()
                comp_ms = timed(torch.compile(ref_fn, fullgraph=True), args, a.repeat, a.device)

        def ms(v):
            return "n/a" if v is None else f"{v:.3f}"
        ratio = f"{ref_ms / tri_ms:.2f}x" if tri_ms else "n/a"
        shape = "x".join(map(str, args[0].shape))
        print(f"| {model} | {op} | {what} | {shape} | {err} | {ms(ref_ms)} | {ms(tri_ms)} | {ms(comp_ms)} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
