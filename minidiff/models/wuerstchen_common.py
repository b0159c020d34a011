"""Building blocks shared by Würstchen's stage C (prior) and stage B (DiffNeXt) denoisers.

Both stages are ConvNeXt-style stacks on 2D feature maps: a depthwise conv mixes space, a
per-pixel MLP with Global Response Norm mixes channels, a TimestepBlock modulates by the noise
level r, and an AttnBlock attends over the image tokens together with the text tokens.
Attribute names equal the diffusers checkpoint keys.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops


def r_embedding(r, c_r, max_positions=10000):
    """Sinusoidal embedding of the continuous noise level r in [0, 1]: (B,) -> (B, c_r), sin first.

    Same formula as minidiff.models.unet.timestep_embedding(r * 1e4, c_r, flip_sin_to_cos=False), but the
    frequencies are rounded as the checkpoints were trained with: arguments reach 1e4, so one ulp
    in a frequency moves sin/cos by ~1e-3.
    """
    r = r * max_positions  # in r's dtype, as the reference computes it
    half = c_r // 2
    step = math.log(max_positions) / (half - 1)
    freqs = torch.arange(half, device=r.device).float().mul(-step).exp()
    args = r[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb.to(r.dtype)


def channel_norm(c):
    """Affine-free LayerNorm over the channels of a (B, C, H, W) map, as every Würstchen block uses it."""
    return ops.LayerNorm(c, eps=1e-6, elementwise_affine=False, dim=1)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN on channels-last (B, H, W, C): scale each channel by its spatial L2 norm
    relative to the mean over channels, so channels compete."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        norm = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        relative = norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * relative) + self.beta + x


def channel_mlp(c_in, c, dropout):
    # indices 0..4 are the checkpoint's channelwise.{0,2,4}
    return nn.Sequential(nn.Linear(c_in, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout),
                         nn.Linear(c * 4, c))


class ResBlock(nn.Module):
    """Stage C block: skip features are concatenated before the depthwise conv."""

    def __init__(self, c, c_skip=0, kernel_size=3, dropout=0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = channel_norm(c)
        self.channelwise = channel_mlp(c, c, dropout)

    def forward(self, x, x_skip=None):
        h = x if x_skip is None else torch.cat([x, x_skip], dim=1)
        h = self.norm(self.depthwise(h))
        return self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x


class ResBlockStageB(nn.Module):
    """Stage B block: skip features (U-Net skip, EfficientNet map) join after the depthwise conv,
    in the channel MLP."""

    def __init__(self, c, c_skip=0, kernel_size=3, dropout=0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = channel_norm(c)
        self.channelwise = channel_mlp(c + c_skip, c, dropout)

    def forward(self, x, x_skip=None):
        h = self.norm(self.depthwise(x))
        if x_skip is not None:
            h = torch.cat([h, x_skip], dim=1)
        return self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x


class TimestepBlock(nn.Module):
    """FiLM by the noise-level embedding: x * (1 + a) + b."""

    def __init__(self, c, c_timestep):
        super().__init__()
        self.mapper = nn.Linear(c_timestep, c * 2)

    def forward(self, x, t):
        a, b = self.mapper(t)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + a) + b


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (to_q, to_k, to_v, to_out.0). `classic`: scores by
    baddbmm as diffusers' prior computes them (see ops.ref_attention)."""

    def __init__(self, c, heads, dropout=0.0, classic=False):
        super().__init__()
        self.heads, self.classic = heads, classic
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(dropout)])

    def forward(self, x, context):
        if self.classic:
            out = ops.attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, classic=True)
        else:
            out = ops.attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out[1](self.to_out[0](out))


class AttnBlock(nn.Module):
    """Image tokens attend over themselves plus the conditioning tokens (mapped to c channels)."""

    def __init__(self, c, c_cond, nhead, self_attn=True, dropout=0.0, classic_attention=False):
        super().__init__()
        self.self_attn = self_attn
        self.norm = channel_norm(c)
        self.attention = Attention(c, nhead, dropout, classic_attention)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x, kv):
        b, c, h, w = x.shape
        kv = self.kv_mapper(kv)
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.self_attn:
            kv = torch.cat([tokens, kv], dim=1)
        out = self.attention(tokens, kv)
        return x + out.transpose(1, 2).reshape(b, c, h, w)
