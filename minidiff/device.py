"""Which dtype runs fastest here without changing the picture, and what "auto" means for `torch_dtype`.

On a CPU, bf16 matmuls and convolutions run on the AVX512_BF16 or AMX units (oneDNN) at ~1.8x fp32's
speed for an SD 1.5 UNet step; without those units bf16 is emulated and slower than fp32, so fp32 stays.
On CUDA, bf16 where the GPU has it (same range as fp32: no VAE overflow), else fp16.

    from minidiff.device import fast_dtype
    pipe = StableDiffusionPipeline.from_pretrained(repo, torch_dtype=fast_dtype())   # or torch_dtype="auto"

The library's default stays diffusers' (fp32 when nothing is passed); the CLI picks fast_dtype().
Note: here "auto" means "this device's fast dtype", not transformers' "the dtype the file was saved in".
"""
import functools
import os

import torch

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@functools.lru_cache(maxsize=None)
def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (an empty set where there is no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16():
    """True where the CPU computes bf16 natively: AVX512_BF16 (Cooper Lake, Zen 4+) or AMX (Sapphire Rapids+)."""
    flags = cpu_flags()
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    # no /proc/cpuinfo (macOS, Windows): ask torch's dispatcher what it found (AMX-capable builds name it)
    capability = str(torch.backends.cpu.get_cpu_capability())
    return "AMX" in capability or "BF16" in capability


def fast_dtype(device="cpu"):
    """The fastest dtype that keeps the picture on `device`: bf16 on a CPU with bf16 units, else fp32; on CUDA
    bf16 where supported, else fp16; fp32 elsewhere."""
    kind = torch.device(device).type
    if kind == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_dtype(torch_dtype, device=None):
    """`torch_dtype` as a torch.dtype: None stays None (the file's / diffusers' default), "auto" becomes
    fast_dtype(device), a name ("bfloat16", "bf16", ...) its dtype; a torch.dtype passes through."""
    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype == "auto":
        return fast_dtype(device or "cpu")
    if isinstance(torch_dtype, str) and torch_dtype in DTYPE_NAMES:
        return DTYPE_NAMES[torch_dtype]
    raise ValueError(f"torch_dtype={torch_dtype!r}: pass a torch dtype, 'auto' (this device's fast dtype: "
                     f"{fast_dtype(device or 'cpu')}) or one of {sorted(DTYPE_NAMES)}")


def latent_dtype(dtype):
    """The dtype the pipelines keep latents in between steps: fp32 for bf16 models (bf16's 8-bit mantissa,
    rounded after each of 20+ scheduler updates, visibly drifts the picture), else the model's own (fp16 and
    fp32 as diffusers keeps them, so fp16 runs match diffusers')."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def fast_memory_format(dtype, device="cpu"):
    """The layout convolutions run fastest in, where it differs from PyTorch's default: channels_last (NHWC) for
    bf16 on a CPU, whose oneDNN kernels compute in NHWC and otherwise reorder every NCHW input and output (an SD 1.5
    bf16 UNet step: 13% less CPU time, its VAE decode 3x less, measured in docs/cpu_profile.md); None elsewhere
    (fp32 convolutions measured the same in both layouts here)."""
    if torch.device(device or "cpu").type == "cpu" and dtype == torch.bfloat16:
        return torch.channels_last
    return None


def use_fast_layout(model, device=None):
    """Put a model with convolutions (UNet, VAE, ...) in fast_memory_format(its dtype); returns whether it did.
    What torch_dtype="auto" and the CLI's --dtype auto do after loading; the output is the same up to the dtype's
    rounding (a different summation order)."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    fmt = fast_memory_format(convs[0].weight.dtype, device or convs[0].weight.device) if convs else None
    if fmt is None:
        return False
    model.to(memory_format=fmt)
    return True


def free_cores(cores=None, load=None):
    """How many cores other processes leave this one: the cores it may run on less the 1-minute load average
    (the processes that were runnable), at least 1. PyTorch's OpenMP threads wait for each other at every op, so
    one thread more than there are free cores runs the whole step at the speed of the busiest core (on 2 cores
    with one busy: 2 threads 3.6x slower than 1, README "Threads")."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - load)))


def auto_threads():
    """The CLI's default thread count: torch's (one per core), lowered to free_cores() on a busy machine."""
    return min(torch.get_num_threads(), free_cores())
