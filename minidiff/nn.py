"""The few building blocks every model shares: one attention function, one group norm, the
sinusoidal embedding. Fused kernels plug in here and nowhere else."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention(q, k, v, heads, mask=None, causal=False, upcast=False):
    """Multi-head scaled dot-product attention on (batch, tokens, channels) tensors.

    q: (B, Lq, C), k: (B, Lk, C), v: (B, Lk, Cv) -> (B, Lq, Cv). `mask` is a boolean (True = attend)
    or additive float mask broadcastable to (B, heads, Lq, Lk). `upcast` computes in fp32, as
    SD 2.x's `upcast_attention` asks, since fp16 scores overflow there.
    """
    b, lq, c = q.shape
    cv = v.shape[-1]
    q = q.view(b, lq, heads, c // heads).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, c // heads).transpose(1, 2)
    v = v.view(b, v.shape[1], heads, cv // heads).transpose(1, 2)
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    return out.transpose(1, 2).reshape(b, lq, cv).to(dtype)


def group_norm(x, num_groups, weight, bias, eps):
    return F.group_norm(x, num_groups, weight, bias, eps)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameter names) routed through `group_norm`, the one place to fuse it."""

    def forward(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=1.0, max_period=10000, scale=1.0):
    """Sinusoidal embedding of (fractional) timesteps t: (B,) -> (B, dim), as in DDPM / Stable Diffusion.

    Frequencies exp(-log(max_period) * i / (half - freq_shift)); `flip_sin_to_cos` puts cos first.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t[:, None].float() * torch.exp(exponent)[None, :] * scale
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb
