"""GEGLU, value * gelu(gate) on a projection h = (..., 2d), with the exact (erf) GELU diffusers uses.

One elementwise pass: each output reads its value and its gate from the same row of h (no chunk
copies), computes in fp32 and rounds once. Reference: minidiff.ops.ref_geglu.
"""
import torch
import triton
import triton.language as tl

from minidiff import ops
from minidiff.kernels._op import reference_backward, runs_kernel


@triton.jit
def _geglu_kernel(h_ptr, out_ptr, numel, d, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < numel
    row = i // d
    col = i % d
    value = tl.load(h_ptr + row * 2 * d + col, mask=inside, other=0.0).to(tl.float32)
    gate = tl.load(h_ptr + row * 2 * d + d + col, mask=inside, other=0.0).to(tl.float32)
    gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    tl.store(out_ptr + i, (value * gelu).to(out_ptr.dtype.element_ty), mask=inside)


@torch.library.custom_op("minidiff::geglu", mutates_args=())
def geglu_op(h: torch.Tensor) -> torch.Tensor:
    h = h.contiguous()
    d = h.shape[-1] // 2
    out = torch.empty(*h.shape[:-1], d, dtype=h.dtype, device=h.device)
    block = 1024
    if out.numel():
        _geglu_kernel[(triton.cdiv(out.numel(), block),)](h, out, out.numel(), d, BLOCK=block)
    return out


@geglu_op.register_fake
def _(h):
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


reference_backward(geglu_op, ops.ref_geglu, 1)


def geglu(h):
    """Same contract as minidiff.ops.ref_geglu; the kernel on CUDA (or interpreted) tensors."""
    if not runs_kernel(h) or h.shape[-1] % 2:
        return ops.ref_geglu(h)
    return geglu_op(h)
