"""Layer norm over the last dim (affine or affine-free), or over the channels of a (B, C, H, W) map.

One program per row: mean and variance about the mean in fp32, one rounding at the store. A row wider
than BLOCK is walked in chunks (three passes), so any width works. dim=1 runs the same kernel on a
channels-last view. Reference: minidiff.ops.ref_layer_norm.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from minidiff import ops
from minidiff.kernels._op import reference_backward, runs_kernel


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, C, row_stride, eps,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * row_stride
    out_ptr += row * C
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, C, BLOCK):
        acc += tl.load(x_ptr + start + offs, mask=start + offs < C, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / C
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, C, BLOCK):
        inside = start + offs < C
        d = tl.load(x_ptr + start + offs, mask=inside, other=0.0).to(tl.float32) - mean
        acc += tl.where(inside, d * d, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / C + eps)
    for start in range(0, C, BLOCK):
        c = start + offs
        inside = c < C
        y = (tl.load(x_ptr + c, mask=inside, other=0.0).to(tl.float32) - mean) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + c, mask=inside, other=1.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + c, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + c, y.to(out_ptr.dtype.element_ty), mask=inside)


def _rows(x, weight, bias, eps):
    """The kernel on the last dim of x (any leading shape); returns a contiguous tensor of x's shape."""
    c = x.shape[-1]
    rows = x.reshape(-1, c)  # a view when it can be
    if rows.numel() and rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = min(4096, triton.next_power_of_2(max(c, 16)))
    if rows.shape[0]:
        _layer_norm_kernel[(rows.shape[0],)](rows, weight, bias, out, c, rows.stride(0), eps,
                                             HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=block)
    return out


@torch.library.custom_op("minidiff::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                  dim: int) -> torch.Tensor:
    if dim == 1:  # over the channels of (B, C, H, W): the rows of its channels-last view
        return _rows(x.permute(0, 2, 3, 1), weight, bias, eps).permute(0, 3, 1, 2)
    return _rows(x, weight, bias, eps)


@layer_norm_op.register_fake
def _(x, weight, bias, eps, dim):
    if dim == 1:
        return torch.empty_like(x, memory_format=torch.channels_last)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


reference_backward(layer_norm_op, ops.ref_layer_norm, 5)


def layer_norm(x, weight, bias, eps, dim=-1):
    """Same contract as minidiff.ops.ref_layer_norm; the kernel on CUDA (or interpreted) tensors."""
    if not runs_kernel(x) or dim not in (-1, 1) or (dim == 1 and x.dim() != 4):
        return ops.ref_layer_norm(x, weight, bias, eps, dim=dim)
    return layer_norm_op(x, weight, bias, float(eps), int(dim))
