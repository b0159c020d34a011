"""The UNet's building blocks, in the order the UNet runs them (unet.py assembles them into the model).

The timestep's sinusoid and its MLP (`timestep_embedding`, `TimestepEmbedding`); the ResNet block that adds the
time vector to its features; the transformer (attention, GEGLU feed-forward, BasicTransformerBlock, and
Transformer2DModel around them: norm, proj_in, blocks, proj_out, + residual); down/upsamplers; and the three
block kinds the config names (DownBlock for CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock).
Every attention, norm and GEGLU computes through minidiff/ops.py; module names equal diffusers' keys.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidiff import fused_qkv, ops, prepack


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


class TimestepEmbedding(nn.Module):
    """MLP lifting a sinusoidal timestep embedding (or any vector) to the width the resnets add."""

    def __init__(self, in_dim, dim, cond_proj_dim=None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        # LCM: an embedding of the guidance scale w, added to the timestep's
        self.cond_proj = nn.Linear(cond_proj_dim, in_dim, bias=False) if cond_proj_dim else None

    def forward(self, x, condition=None):
        if condition is not None:
            x = x + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(x)))


def tile_batch(x, n):
    """`x` repeated along the batch up to n rows, as torch.cat([x] * (n // len(x))): a UNet given the latents once
    for classifier-free guidance's halves tiles its features where the conditioning first enters."""
    return x if x.shape[0] == n else torch.cat([x] * (n // x.shape[0]))  # cat keeps channels_last; repeat does not


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block; the time embedding is added between the two convolutions."""

    def __init__(self, in_channels, out_channels, temb_channels, groups, eps, output_scale_factor=1.0):
        super().__init__()
        self.norm1 = ops.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = ops.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # 1x1 conv to match widths on the skip path
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb):
        h = self.conv1(self.norm1(x, silu=True))
        t = self.time_emb_proj(F.silu(temb))[:, :, None, None]
        n = max(h.shape[0], t.shape[0])  # the embedding may have the text's rows (a timestep per row)
        h = self.conv2(self.norm2(tile_batch(h, n) + tile_batch(t, n), silu=True))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = tile_batch(x, n) + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Attention(nn.Module):
    """Multi-head attention of x (B, L, dim) over context (B, Lk, context_dim), self-attention without one."""

    def __init__(self, query_dim, heads, head_dim, context_dim=None, upcast=False):
        super().__init__()
        inner = heads * head_dim
        self.is_cross_attention = context_dim is not None  # fuse_qkv_projections fuses k, v only then
        context_dim = context_dim or query_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # the checkpoint's to_out.1 was dropout

    def forward(self, x, context=None, mask=None):
        q, k, v = fused_qkv.project(self, x, context)  # one matmul after fuse_qkv_projections()
        out = ops.attention(q, k, v, self.heads, mask=mask, upcast=self.upcast)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection gives the value and its gate."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        # where the projection is oneDNN's CPU matmul (minidiff.prepack), the GELU and the product run inside it
        # (prepack.onednn_geglu: the first level's feed-forward 0.6x the time in bf16); a kernel put in the seam
        # (ops.use(geglu=...)) takes every call
        weights = prepack.fusable_weights(self.proj) if ops.geglu is ops.ref_geglu else None
        if weights is not None and prepack.onednn_matmul_can_take(x, *weights):
            return prepack.onednn_geglu(x, *weights)
        return ops.geglu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # net.1 was dropout; kept as a no-op so that the output layer is net.2 as in the checkpoint
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer layer: self-attention, cross-attention to the text, GEGLU MLP."""

    def __init__(self, dim, heads, head_dim, context_dim, only_cross_attention=False, upcast=False):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = ops.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, context_dim if only_cross_attention else None, upcast)
        self.norm2 = ops.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, upcast)
        self.norm3 = ops.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, mask=None, context_mask=None):
        # branch first: the sum takes the branch's contiguous layout, so that the tokens of an NCHW map (a transposed
        # view) are copied once, by norm1, not again by each norm after it (the same sum: addition commutes)
        n = x.shape[0] if context is None else context.shape[0]
        if self.only_cross_attention:
            x = tile_batch(x, n)
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None, mask) + x
        x = tile_batch(x, n)  # the text enters here: from here on, one row per prompt
        x = self.attn2(self.norm2(x), context, context_mask) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Transformer layers over the pixels of a feature map, as a residual branch of the UNet."""

    def __init__(self, channels, heads, layers, context_dim, groups, linear_projection, only_cross_attention, upcast):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.linear_projection = linear_projection
        self.norm = ops.GroupNorm(groups, channels, eps=1e-6)
        # SD 1.x projects with 1x1 convolutions, SD 2.x / SDXL with Linear layers: same map, different keys
        self.proj_in = nn.Linear(channels, inner) if linear_projection else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim, only_cross_attention, upcast)
             for _ in range(layers)])
        self.proj_out = nn.Linear(inner, channels) if linear_projection else nn.Conv2d(inner, channels, 1)

    def forward(self, x, context, mask=None, context_mask=None):
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, C, H, W) -> tokens (B, HW, C)
        if self.linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, mask, context_mask)
        if self.linear_projection:
            x = self.proj_out(x)
        x = x.reshape(-1, h, w, x.shape[-1]).permute(0, 3, 1, 2)  # -1: the blocks may have tiled the batch
        if not self.linear_projection:
            x = self.proj_out(x)
        return tile_batch(residual, x.shape[0]) + x  # residual first: the sum takes its contiguous layout, no extra copy


class Downsample2D(nn.Module):
    def __init__(self, channels, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:  # old checkpoints pad right and bottom only
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        # `size`: the skip connection's, so that an odd size halved on the way down (9 -> 5) comes back (5 -> 9)
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def transformer_layers(value, n):
    """transformer_layers_per_block entry for one block: an int for all its layers, or a list per layer."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def transformers(channels, layers, cfg, context_dim, heads, transformer_layers_per_layer, only_cross_attention):
    """The `attentions` of a down or up block: one Transformer2DModel after each of its resnets."""
    depth = transformer_layers(transformer_layers_per_layer, layers)
    return nn.ModuleList([Transformer2DModel(channels, heads, depth[i], context_dim, cfg.norm_num_groups,
                                             cfg.use_linear_projection, only_cross_attention, cfg.upcast_attention)
                          for i in range(layers)])


class DownBlock(nn.Module):
    """diffusers' CrossAttnDownBlock2D (with `context_dim`) or DownBlock2D (without).

    Returns the features and every intermediate output, which the up path takes as skip connections.
    """

    def __init__(self, in_channels, out_channels, temb_channels, layers, cfg, add_downsample,
                 context_dim=None, heads=None, transformer_layers_per_layer=None, only_cross_attention=False):
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
             for i in range(layers)])
        self.has_cross_attention = context_dim is not None
        if self.has_cross_attention:
            self.attentions = transformers(out_channels, layers, cfg, context_dim, heads, transformer_layers_per_layer,
                                           only_cross_attention)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, cfg.downsample_padding)]) if add_downsample else None

    def forward(self, x, temb, context=None, mask=None, context_mask=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.has_cross_attention:
                x = self.attentions[i](x, context, mask, context_mask)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """At the lowest resolution: resnet, transformer, resnet. Without `context_dim` it is diffusers'
    UNetMidBlock2D as UNet2DConditionModel builds it (num_layers=0, no attention): one resnet (SSD-1B, Vega)."""

    def __init__(self, channels, temb_channels, cfg, context_dim=None, heads=None, transformer_layers_per_layer=1):
        super().__init__()
        groups, eps, scale = cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.has_cross_attention = context_dim is not None
        if self.has_cross_attention:
            layers = transformer_layers(transformer_layers_per_layer, 1)[0]
            self.attentions = nn.ModuleList([Transformer2DModel(channels, heads, layers, context_dim, groups,
                                                                cfg.use_linear_projection, False, cfg.upcast_attention)])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb_channels, groups, eps, scale)
                                      for _ in range(2 if self.has_cross_attention else 1)])

    def forward(self, x, temb, context=None, mask=None, context_mask=None):
        x = self.resnets[0](x, temb)
        if not self.has_cross_attention:
            return x
        x = self.attentions[0](x, context, mask, context_mask)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """diffusers' CrossAttnUpBlock2D (with `context_dim`) or UpBlock2D (without).

    Each resnet reads the features concatenated with one skip connection, the last-made first; the
    last resnet's skip comes from the level below (`skip_channels`).
    """

    def __init__(self, in_channels, skip_channels, out_channels, temb_channels, layers, cfg, add_upsample,
                 context_dim=None, heads=None, transformer_layers_per_layer=None, only_cross_attention=False):
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock2D((in_channels if i == 0 else out_channels) + (skip_channels if i == layers - 1 else out_channels),
                           out_channels, temb_channels, groups, eps) for i in range(layers)])
        self.has_cross_attention = context_dim is not None
        if self.has_cross_attention:
            self.attentions = transformers(out_channels, layers, cfg, context_dim, heads, transformer_layers_per_layer,
                                           only_cross_attention)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x, skips, temb, context=None, mask=None, context_mask=None, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.has_cross_attention:
                x = self.attentions[i](x, context, mask, context_mask)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x
