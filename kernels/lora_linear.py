"""The LoRA-adapted linear, x W^T + b + sum_i s_i ((x A_i^T) B_i^T + c_i), in two kernel launches.

The plan: every adapter's down is stacked into one A = [A_1; A_2; ...] (rank r = sum r_i) and every
scaled up into one B = [s_1 B_1 | s_2 B_2 | ...]; the up biases fold into the bias. Then
  1. t = x A^T            (M x r, r small: one cheap matmul launch), and
  2. out = x W^T + t B^T + b, ONE matmul whose K loop runs over the in features of x/W and then over
     the r columns of t/B, accumulating both into the same fp32 tile: [x | t] [W | B]^T without
     building either concatenation. The big output is written once (the reference writes it twice).
Both launches use the same kernel (launch 1 has no second segment and no bias). Fixed 64 x 64 x 32
tiles (32 under the interpreter), no autotuning yet. fp32 inputs use IEEE fp32 dots (no TF32), so the
kernel matches the reference. Reference: minidiff.ops.ref_lora_linear.
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from minidiff import ops
from minidiff.kernels._op import INTERPRET, reference_backward, runs_kernel


@triton.jit
def _accumulate(acc, a_ptr, b_ptr, m, n, k, M, N, K, sam, sak, sbn, sbk,
                IEEE: tl.constexpr, UPCAST: tl.constexpr, BK: tl.constexpr):
    """acc += a[m, :K] b[n, :K]^T, BK columns at a time."""
    for start in range(0, K, BK):
        kk = start + k
        a = tl.load(a_ptr + m[:, None] * sam + kk[None, :] * sak, mask=(m[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + n[None, :] * sbn + kk[:, None] * sbk, mask=(n[None, :] < N) & (kk[:, None] < K), other=0.0)
        if UPCAST:  # Triton 3.9's interpreter gets bf16 dots wrong (raw bits); fp32 there only
            a, b = a.to(tl.float32), b.to(tl.float32)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    return acc


@triton.jit
def _matmul2_kernel(x_ptr, w_ptr, t_ptr, u_ptr, bias_ptr, out_ptr, M, N, K, R,
                    sxm, sxk, swn, swk, stm, str_, sun, sur, som, son,
                    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[M, N] = x[M, K] w[N, K]^T + t[M, R] u[N, R]^T (+ bias[N]); R = 0 skips the second segment."""
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _accumulate(acc, x_ptr, w_ptr, m, n, k, M, N, K, sxm, sxk, swn, swk, IEEE, UPCAST, BK)
    acc = _accumulate(acc, t_ptr, u_ptr, m, n, k, M, N, R, stm, str_, sun, sur, IEEE, UPCAST, BK)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * som + n[None, :] * son, acc.to(out_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & (n[None, :] < N))


def _matmul2(x, w, t=None, u=None, bias=None):
    M, K = x.shape
    N = w.shape[0]
    R = 0 if t is None else t.shape[1]
    t = x if t is None else t  # unread when R = 0
    u = w if u is None else u
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bm = bn = 32 if INTERPRET else 64
    bk = 32
    _matmul2_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        x, w, t, u, bias, out, M, N, K, R, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        t.stride(0), t.stride(1), u.stride(0), u.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        UPCAST=INTERPRET and x.dtype == torch.bfloat16, BM=bm, BN=bn, BK=bk)
    return out


@torch.library.custom_op("minidiff::lora_linear", mutates_args=())
def lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], down: torch.Tensor,
                   up: torch.Tensor) -> torch.Tensor:
    """x W^T + b + (x down^T) up^T, scales already folded into `up` (the stacked adapters)."""
    rows = x.reshape(-1, x.shape[-1])
    t = _matmul2(rows, down)
    return _matmul2(rows, weight, t, up, bias).view(*x.shape[:-1], weight.shape[0])


@lora_linear_op.register_fake
def _(x, weight, bias, down, up):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _stacked_reference(x, weight, bias, down, up):
    return F.linear(F.linear(x, down), up) + F.linear(x, weight, bias)


reference_backward(lora_linear_op, _stacked_reference, 5)


def lora_linear(x, weight, bias, loras):
    """Same contract as minidiff.ops.ref_lora_linear; the kernels on CUDA (or interpreted) tensors with at
    least one adapter (none: plain F.linear, already one cuBLAS call)."""
    if not loras or not runs_kernel(x) or any(d.dtype != x.dtype or u.dtype != x.dtype for d, u, _, _ in loras):
        return ops.ref_lora_linear(x, weight, bias, loras)
    down = torch.cat([d for d, _, _, _ in loras])
    up = torch.cat([u * s for _, u, _, s in loras], dim=1)
    for _, _, c, s in loras:
        if c is not None:
            bias = c * s if bias is None else bias + c * s
    return lora_linear_op(x, weight, bias, down, up)
