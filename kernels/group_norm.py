"""Group norm with the SiLU that follows it in every resnet block, fused, NCHW or channels_last.

One program per (sample, group): three passes over the group's elements (mean, variance about the
mean, normalise + affine + SiLU + store), all in fp32, the output rounded once to the input dtype.
The group's elements are walked in memory order (channel-major for NCHW, pixel-major for
channels_last), so both layouts read contiguously. Reference: minidiff.ops.ref_group_norm.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from minidiff import ops
from minidiff.kernels._op import reference_backward, runs_kernel


@triton.jit
def _where(j, g, group_channels, C, HW, CHANNELS_LAST: tl.constexpr):
    """Channel and offset (within the sample) of group g's j-th element, in memory order."""
    if CHANNELS_LAST:
        c = g * group_channels + j % group_channels
        return c, (j // group_channels) * C + c
    c = g * group_channels + j // HW
    return c, c * HW + j % HW


@triton.jit
def _group_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, C, HW, group_channels, eps,
                       CHANNELS_LAST: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SILU: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    g = tl.program_id(1)
    count = group_channels * HW
    base = n.to(tl.int64) * C * HW
    offs = tl.arange(0, BLOCK)

    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, count, BLOCK):
        j = start + offs
        inside = j < count
        c, at = _where(j, g, group_channels, C, HW, CHANNELS_LAST)
        acc += tl.load(x_ptr + base + at, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / count

    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, count, BLOCK):
        j = start + offs
        inside = j < count
        c, at = _where(j, g, group_channels, C, HW, CHANNELS_LAST)
        d = tl.load(x_ptr + base + at, mask=inside, other=0.0).to(tl.float32) - mean
        acc += tl.where(inside, d * d, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / count + eps)

    for start in range(0, count, BLOCK):
        j = start + offs
        inside = j < count
        c, at = _where(j, g, group_channels, C, HW, CHANNELS_LAST)
        y = (tl.load(x_ptr + base + at, mask=inside, other=0.0).to(tl.float32) - mean) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + c, mask=inside, other=1.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(b_ptr + c, mask=inside, other=0.0).to(tl.float32)
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(out_ptr + base + at, y.to(out_ptr.dtype.element_ty), mask=inside)


def _launch(x, num_groups, weight, bias, eps, silu):
    n, c = x.shape[:2]
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if not channels_last:
        x = x.contiguous()
    out = torch.empty_like(x)  # keeps channels_last
    hw = x[0, 0].numel()
    group_channels = c // num_groups
    block = min(1024, triton.next_power_of_2(max(group_channels * hw, 16)))
    _group_norm_kernel[(n, num_groups)](x, weight, bias, out, c, hw, group_channels, eps,
                                        CHANNELS_LAST=channels_last, HAS_WEIGHT=weight is not None,
                                        HAS_BIAS=bias is not None, SILU=silu, BLOCK=block)
    return out


@torch.library.custom_op("minidiff::group_norm", mutates_args=())
def group_norm_op(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  eps: float, silu: bool) -> torch.Tensor:
    return _launch(x, num_groups, weight, bias, eps, silu)


@group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, silu):
    return torch.empty_like(x)


reference_backward(group_norm_op, ops.ref_group_norm, 6)


def group_norm(x, num_groups, weight, bias, eps, silu=False):
    """Same contract as minidiff.ops.ref_group_norm; the kernel on CUDA (or interpreted) tensors."""
    if not runs_kernel(x) or x.shape[1] % num_groups:
        return ops.ref_group_norm(x, num_groups, weight, bias, eps, silu=silu)
    return group_norm_op(x, num_groups, weight, bias, float(eps), bool(silu))
