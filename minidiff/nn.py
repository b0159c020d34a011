"""Building blocks every model shares: GroupNorm routed through the ops seam (`minidiff/ops.py`, where
kernels plug in) and the sinusoidal embedding."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidiff import ops


def attention(q, k, v, heads, mask=None, causal=False, upcast=False):
    """Late-bound: whatever `minidiff.ops.attention` is at call time."""
    return ops.attention(q, k, v, heads, mask=mask, causal=causal, upcast=upcast)


def group_norm(x, num_groups, weight, bias, eps):
    return ops.group_norm(x, num_groups, weight, bias, eps)


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
