"""An attention kernel for x86 CPUs with AVX512_BF16, bf16 and fp32 (cpu_attention.cpp), for the ops seam:

    from minidiff import kernels
    kernels.use("cpu")        # ops.attention -> this kernel where it can take the call (CLI: --kernels cpu)

PyTorch's CPU flash attention does not use the bf16 dot-product units of CPUs without AMX (Zen 4: its bf16 is no
faster than its fp32), and attention is a third of a bf16 SD 1.5 step there. This kernel runs both matmuls on them
and keeps the softmax in fp32 (cpu_attention.cpp says how): 0.4-0.5x SDPA's time on SD 1.5's and SDXL's shapes, the
same error against float64 (tests/test_cpu_attention.py). Its fp32 form (the same loops on fused multiply-adds)
takes 0.75-0.86x SDPA's fp32 time on SD 1.5's self-attentions, 0.6x on its cross-attentions. It is C++, outside
plain PyTorch, so it is opt-in: built by torch.utils.cpp_extension at its first use (~10 s on 2 cores; needs a C++
compiler and ninja) and kept in torch's extensions folder ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)
for later processes.

It takes bf16 and fp32 CPU calls without a mask, causal flag, fp32 upcast or the classic math, with even head
widths up to 512 in bf16 (the VAE's 1 x 512) and 256 in fp32, and no autograd, outside torch.compile; every other
call goes to ops.ref_attention (SDPA) unchanged.
"""
import functools
import os
import shutil
import sys
import time

import torch

from minidiff import ops
from minidiff.device import cpu_flags
from minidiff.prepack import compiling

NAME = "minidiff_cpu_attention"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_attention.cpp")
FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")  # what the kernel is compiled for
CFLAGS = ["-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
          "-fopenmp"]  # -fopenmp: at::parallel_for is OpenMP in PyTorch's CPU wheels
STALE_LOCK_S = 300  # a build takes ~10 s here; a lock older than this is a killed build's
WIDEST = {torch.bfloat16: 512, torch.float32: 256}  # head widths taken; wider fp32 heads: SDPA is as fast (1 x 512:
# 246 ms against the kernel's 256 ms on a Zen 4, where bf16's is 217 against 103 ms)


def missing():
    """Why the kernel cannot run here (a sentence), or None where it can: the CPU's AVX-512 flags, a C++ compiler
    and ninja (what torch.utils.cpp_extension builds with)."""
    lacking = [f for f in FLAGS if f not in cpu_flags()]
    if lacking:
        return f"this CPU lacks {', '.join(lacking)} (/proc/cpuinfo)"
    try:
        from torch.utils.cpp_extension import is_ninja_available
    except ImportError as e:  # it imports setuptools, which Python 3.12's venvs lack
        return f"torch.utils.cpp_extension cannot be imported ({e}; pip install setuptools)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} is not on PATH (set CXX)"
    if not is_ninja_available():
        return "ninja is missing (pip install ninja)"
    return None


@functools.lru_cache(maxsize=None)
def load():
    """Build (first use) or load (cached) the kernel; returns torch.ops.minidiff_cpu.attention. Raises RuntimeError
    with the reason where it cannot run here."""
    reason = missing()
    if reason:
        raise RuntimeError(f"minidiff.kernels.use('cpu'): the CPU attention kernel cannot run here: {reason}")
    from torch.utils.cpp_extension import get_default_build_root, load as build
    # one folder per torch version: the built library links against that torch's ABI
    folder = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(), f"{NAME}-{torch.__version__}")
    if not os.path.exists(os.path.join(folder, f"{NAME}.so")):
        print(f"minidiff: compiling {SOURCE} (once; ~10 s on 2 cores; kept in {folder})", file=sys.stderr)
    os.makedirs(folder, exist_ok=True)
    lock = os.path.join(folder, "lock")  # torch's build lock: a build killed midway leaves it, and every later
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_S:  # load would wait forever
        print(f"minidiff: removing {lock}, left by a build that did not finish", file=sys.stderr)
        os.remove(lock)
    build(NAME, [SOURCE], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], build_directory=folder,
          is_python_module=False, verbose=False)
    return torch.ops.minidiff_cpu.attention


def can_take(q, k, v, heads, mask, causal, upcast, classic):
    c, cv = q.shape[-1], v.shape[-1]
    return (not compiling() and mask is None and not causal and not upcast and not classic
            and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype and q.dtype in WIDEST
            and q.dim() == 3 and c == cv and c % heads == 0 and (c // heads) % 2 == 0 and c // heads <= WIDEST[q.dtype]
            and k.shape[1] >= 1 and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))))


def attention(q, k, v, heads, mask=None, causal=False, upcast=False, classic=False):
    """ops.attention's signature: (B, Lq, C) q, (B, Lk, C) k and v -> (B, Lq, C), through the kernel where it can
    take the call, else ops.ref_attention. The projections' strided views go in as they are (the kernel reads any
    token stride) and the output comes back in (B, Lq, heads, width) order, so no copy on either side."""
    if not can_take(q, k, v, heads, mask, causal, upcast, classic):
        return ops.ref_attention(q, k, v, heads, mask=mask, causal=causal, upcast=upcast, classic=classic)
    b, lq, c = q.shape
    d = c // heads

    def split(t):  # (B, L, heads * d) -> (B, heads, L, d), a view: the kernel needs only d contiguous
        return (t if t.stride(-1) == 1 else t.contiguous()).unflatten(-1, (heads, d)).transpose(1, 2)
    return load()(split(q), split(k), split(v), d ** -0.5).view(b, lq, c)
