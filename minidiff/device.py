"""Which dtype runs fastest here without changing the picture, and what "auto" means for `torch_dtype`.

On a CPU, bf16 matmuls and convolutions run on the AMX units (oneDNN) at ~4x fp32's speed for an SD 1.5 UNet
step, on AVX512_BF16 alone anywhere from 1.8x faster (AMD Zen 4) to 1.3x slower (an Intel Xeon VM without AMX),
so that case is measured once per process; without those units bf16 is emulated and slower, so fp32 stays.
On CUDA, bf16 where the GPU has it (same range as fp32: no VAE overflow), else fp16.

    from minidiff.device import fast_dtype
    pipe = StableDiffusionPipeline.from_pretrained(repo, torch_dtype=fast_dtype())   # or torch_dtype="auto"

The library's default stays diffusers' (fp32 when nothing is passed); the CLI picks fast_dtype().
Note: here "auto" means "this device's fast dtype", not transformers' "the dtype the file was saved in".
"""
import collections
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
    """True where bf16 runs faster than fp32 on this CPU: AMX (Sapphire Rapids+, 4x here) by its flag; AVX512_BF16
    alone (Cooper Lake, Zen 4+, an Intel VM that hides AMX) only where bf16_is_faster() measures it, because its
    dot-product units are not always faster than fp32's FMAs (an Intel Xeon VM without AMX: an SD 1.5 bf16 UNet
    step 1.3x slower than fp32; an AMD EPYC Zen 4: 1.8x faster)."""
    flags = cpu_flags()
    if flags:
        if "amx_bf16" in flags:
            return True
        return "avx512_bf16" in flags and bf16_is_faster()
    # no /proc/cpuinfo (macOS, Windows): ask torch's dispatcher what it found (AMX-capable builds name it)
    capability = str(torch.backends.cpu.get_cpu_capability())
    return "AMX" in capability or ("BF16" in capability and bf16_is_faster())


@functools.lru_cache(maxsize=None)
def bf16_is_faster(margin=0.8):
    """Whether a 3x3 convolution plus a matmul (the two kinds of work of a UNet step, small sizes) take under
    `margin` of their fp32 time in bf16 here: the best of 3 alternating rounds, ~0.1 s once per process. The margin
    keeps a loaded machine from flipping the answer (whole UNet steps measured 0.55x on Zen 4, 1.3x on an
    Intel Xeon without AMX; this probe's ratio there: between 1.2 and 2)."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 256, 32, 32, generator=g), torch.randn(256, 256, 3, 3, generator=g) * 0.02
    a, b = torch.randn(2048, 512, generator=g), torch.randn(512, 512, generator=g)
    cases = {dtype: [t.to(dtype) for t in (x, w, a, b)] for dtype in (torch.float32, torch.bfloat16)}
    best = best_times({dtype: lambda x=x, w=w, a=a, b=b: (F.conv2d(x, w, padding=1), a @ b)
                       for dtype, (x, w, a, b) in cases.items()})
    return best[torch.bfloat16] < margin * best[torch.float32]


def best_times(ways, rounds=3):
    """{name: best seconds of `rounds`} for each no-argument function of `ways`, called in alternating rounds
    after one warm-up round (oneDNN makes its kernels on the first call), without autograd."""
    import time
    best = {k: float("inf") for k in ways}
    with torch.no_grad():
        for i in range(rounds + 1):
            for k, f in ways.items():
                start = time.perf_counter()
                f()
                if i:
                    best[k] = min(best[k], time.perf_counter() - start)
    return best


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
    (an fp32 UNet measured the same in both layouts, so it keeps NCHW and its memory-mapped weights; fp32
    autoencoders decode in NHWC without a copy of their weights: nhwc_decode)."""
    if torch.device(device or "cpu").type == "cpu" and dtype == torch.bfloat16:
        return torch.channels_last
    return None


def nhwc_decode(decode, z):
    """decode(z) with z in channels_last where that is faster: an fp32 decode on a CPU, whose oneDNN convolutions
    then run their NHWC kernels on the autoencoder's 128-512-channel maps at 256-512 px (SD 1.5's VAE to 512x512
    15.0 s against 18.7-20.2 s in NCHW, TAESD 1.08 s against 1.60 s; Zen 4, 2 threads). The weights stay as loaded
    (the file's mapped pages: no copy, no memory), the image comes back in NCHW, equal to the NCHW decode to fp32
    rounding. Elsewhere decode(z) as it is (bf16 models are laid out in NHWC already: fast_memory_format)."""
    if z.device.type == "cpu" and z.dtype == torch.float32 and z.dim() == 4:
        return decode(z.contiguous(memory_format=torch.channels_last)).contiguous()
    return decode(z)


def use_fast_layout(model, device=None):
    """Put a model with convolutions (UNet, VAE, ...) in fast_memory_format(its dtype); returns whether it did.
    What torch_dtype="auto" and the CLI do after loading; the output is the same up to the dtype's rounding (a
    different summation order). Where that copies weights, the model's
    other tensors are copied too: loaded as the file's dtype they are its memory-mapped pages, and while one of them
    lives the whole mapping does, every page read so far included (the old convolution weights: an SD 1.5 VAE
    loaded in fp32 and laid out kept +0.3 GB resident beside their copies)."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    fmt = fast_memory_format(convs[0].weight.dtype, device or convs[0].weight.device) if convs else None
    if fmt is None:
        return False
    tensors = list(model.parameters()) + list(model.buffers())
    before = [t.data_ptr() for t in tensors]
    model.to(memory_format=fmt)
    storages = collections.Counter(t.untyped_storage().data_ptr() for t in tensors)
    if any(t.data_ptr() != p for t, p in zip(tensors, before)):  # something was copied: copy the rest
        for t, p in zip(tensors, before):  # (not views of a shared storage, a fused QKV's: they stay one)
            if t.data_ptr() == p and t.numel() and storages[t.untyped_storage().data_ptr()] == 1:
                t.data = t.data.clone()
    return True


@functools.lru_cache(maxsize=None)
def onednn_linear_is_faster(dtype=torch.float32, margin=0.9):
    """Whether oneDNN's matmul (minidiff.prepack.OneDNNLinear) beats PyTorch's own CPU linear for `dtype` here.
    bf16: yes wherever oneDNN is built in (PyTorch's bf16 linear is the same oneDNN matmul plus a copy of the bias
    into the output). fp32: PyTorch calls MKL's sgemm, fast on Intel CPUs and about half oneDNN's speed on AMD
    ones (Zen 5: an SD 1.5 UNet's linears 0.45x the time), so it is measured: a 1024 x 640 -> 1280 linear both
    ways, best of 3 alternating rounds (~0.1 s, once per process); oneDNN only under `margin` of MKL's time."""
    import torch.nn.functional as F
    from .prepack import available
    if not available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    if dtype == torch.bfloat16:
        return True
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1024, 640, generator=g), torch.randn(1280, 640, generator=g), torch.randn(1280, generator=g)
    best = best_times({"mkl": lambda: F.linear(x, w, b),
                       "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")})
    return best["onednn"] < margin * best["mkl"]


def use_fast_linear(model, device=None):
    """Route a model's nn.Linear layers through oneDNN (minidiff.prepack.onednn_linears: a class swap, no copy,
    the same result to summation order) where onednn_linear_is_faster() says so for their dtype on a CPU; returns
    how many. What torch_dtype="auto" and the CLI do after loading."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    if not linears or torch.device(device or linears[0].weight.device).type != "cpu":
        return 0
    if not onednn_linear_is_faster(linears[0].weight.dtype):
        return 0
    from .prepack import onednn_linears
    return onednn_linears(model)


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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(threshold=2 ** 27):
    """Ask glibc's malloc to serve blocks up to `threshold` bytes from its heap and keep freed memory for reuse,
    instead of mapping each large temporary afresh and handing it back to the OS when freed: a UNet step frees
    and re-allocates the same ~10-85 MB activations at every layer, and each fresh mapping is faulted in page by
    page (hundreds of thousands of page faults per step). Measured on an Intel Xeon VM without AMX (fp32 SD 1.5
    UNet, batch 1, fresh processes in turns): 5.0 s per step against 5.5-6.9 s, peak RSS not higher. 128 MiB
    rather than more: the VAE's 512x512 decode maps ~134 MB tensors, which a larger threshold kept on a
    fragmented heap (an fp32 batch-2 image on an AMD Zen 5: peak RSS 6150 MB with 1 GiB, 5442 MB with 128 MiB,
    diffusers' 5656 MB; its steps as fast). A process-wide setting, so the CLI makes it and the library does not;
    returns False where the C library has no mallopt (macOS, musl)."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))
