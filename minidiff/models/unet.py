"""The Stable Diffusion UNet (SD 1.x/2.x, SDXL, SDXL-Turbo, LCM, Segmind distilled UNets).

A noise predictor eps(x_t, t, text): a convolutional U-Net whose resolution levels are
ResNet blocks interleaved with transformers that cross-attend to the text encoder's hidden states.
Module names equal diffusers' UNet2DConditionModel checkpoint keys, so Hub weights load as they are.

Layout, for block_out_channels (c0, c1, ..., cN):
    conv_in -> down blocks (each: resnets [+ transformers], then a stride-2 conv but the last)
            -> mid block (resnet, transformer, resnet; SSD-1B/Vega: one resnet) -> up blocks (mirror, each resnet taking a
            skip connection from the down path, then nearest x2 upsample + conv) -> norm, SiLU, conv_out.
The timestep (and for SDXL the pooled text embedding + image size "time ids") becomes one vector
that every resnet adds to its features.
"""
from dataclasses import dataclass
from typing import ClassVar

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidiff import fused_qkv, ops
from .base import Model, ModelOutput

# ----------------------------------------------------------------------------- building blocks

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
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.norm2(h, silu=True))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
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
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None, mask) + x
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
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not self.linear_projection:
            x = self.proj_out(x)
        return residual + x  # residual first: the sum takes its contiguous layout, no extra copy


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


# ----------------------------------------------------------------------------- the UNet

@dataclass
class UNet2DConditionOutput(ModelOutput):
    sample: torch.Tensor


@dataclass
class UNet2DConditionConfig:
    sample_size: object = None  # latent side (int or [h, w]); informs pipelines of the default resolution
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: object = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: object = False  # bool or per block: attn1 attends to the text too
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: object = 2  # int or per block
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: object = 1280  # int or per block
    transformer_layers_per_block: object = 1  # int, per block, or per block and layer
    reverse_transformer_layers_per_block: object = None  # up path, when the above is per layer
    attention_head_dim: object = 8  # read as the number of heads (see heads_per_block)
    num_attention_heads: object = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    class_embed_type: object = None
    addition_embed_type: object = None
    addition_time_embed_dim: object = None
    projection_class_embeddings_input_dim: object = None
    time_embedding_dim: object = None
    time_cond_proj_dim: object = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    mid_block_only_cross_attention: object = None  # read only by UNetMidBlock2DSimpleCrossAttn: no effect here

    NEUTRAL: ClassVar[dict] = {
        "act_fn": ("silu", "swish"),
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "num_class_embeds": None,
        "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional",
        "time_embedding_act_fn": None,
        "timestep_post_act": None,
        "attention_type": "default",
        "class_embeddings_concat": False,
    }
    # dropout acts in training only; the rest are read only by block types minidiff does not build
    # (the Simple*/ResnetDownsample blocks) or by addition_embed_type "text".
    IGNORED: ClassVar[tuple] = ("dropout", "cross_attention_norm", "resnet_skip_time_act", "resnet_out_scale_factor",
                                "addition_embed_type_num_heads")

    def per_block(self, key):
        """A config value that may be one for all blocks or a list, as a list with one entry per down block."""
        value = getattr(self, key)
        return list(value) if isinstance(value, (list, tuple)) else [value] * len(self.down_block_types)

    def heads_per_block(self):
        # Trap kept from diffusers: configs written before `num_attention_heads` existed call the number
        # of heads `attention_head_dim` (SD 1.5: 8 heads of 40, 80, 160 channels).
        if self.num_attention_heads is not None:
            return self.per_block("num_attention_heads")
        return self.per_block("attention_head_dim")

    def validate(self, where="config.json"):
        def bad(key, value, why):
            raise ValueError(f"{where}: {key}={value!r} {why}")

        n = len(self.down_block_types)
        for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            for t in getattr(self, key):
                if t not in allowed:
                    bad(key, getattr(self, key), f"has {t!r}, not supported by minidiff (supported: {allowed})")
        if self.mid_block_type not in MID_BLOCKS:
            bad("mid_block_type", self.mid_block_type, f"is not supported (supported: {MID_BLOCKS})")
        for key in ("up_block_types", "block_out_channels", "only_cross_attention", "layers_per_block",
                    "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads"):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)) and len(value) != n:
                bad(key, value, f"must have one entry per down block ({n}: {self.down_block_types})")
        tlpb = self.transformer_layers_per_block
        if isinstance(tlpb, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in tlpb):
            if self.reverse_transformer_layers_per_block is None:
                bad("transformer_layers_per_block", tlpb, "is per layer, which needs reverse_transformer_layers_per_block")
        if self.reverse_transformer_layers_per_block is not None and len(self.reverse_transformer_layers_per_block) != n:
            bad("reverse_transformer_layers_per_block", self.reverse_transformer_layers_per_block,
                f"must have one entry per up block ({n})")
        if self.norm_num_groups is None:
            bad("norm_num_groups", None, "is not supported (an int such as 32 is)")
        key = "attention_head_dim" if self.num_attention_heads is None else "num_attention_heads"
        if not all(isinstance(h, int) and h > 0 for h in self.heads_per_block()):
            bad(key, getattr(self, key), "must be a positive number of heads, or one per block")
        if self.addition_embed_type not in (None, "text_time"):
            bad("addition_embed_type", self.addition_embed_type, "is not supported (supported: None or 'text_time')")
        if self.class_embed_type not in (None, "timestep", "identity", "projection"):
            bad("class_embed_type", self.class_embed_type,
                "is not supported (supported: None, 'timestep', 'identity', 'projection')")
        needs_projection = self.addition_embed_type == "text_time" or self.class_embed_type == "projection"
        if needs_projection and self.projection_class_embeddings_input_dim is None:
            bad("projection_class_embeddings_input_dim", None, "must be set for text_time / projection embeddings")
        if self.addition_embed_type == "text_time" and self.addition_time_embed_dim is None:
            bad("addition_time_embed_dim", None, "must be set when addition_embed_type is 'text_time'")


class UNet2DConditionModel(Model):
    """diffusers' UNet2DConditionModel for the SD 1.x/2.x/XL families: `unet(sample, t, text).sample`."""

    config_class = UNet2DConditionConfig
    single_file_part = "unet"

    def __init__(self, config):
        super().__init__(config)
        cfg = config
        n = len(cfg.down_block_types)
        channels = list(cfg.block_out_channels)
        heads = cfg.heads_per_block()
        context_dims = cfg.per_block("cross_attention_dim")
        only_cross = cfg.per_block("only_cross_attention")
        layers = cfg.per_block("layers_per_block")
        tlpb = cfg.per_block("transformer_layers_per_block")

        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2)

        # time: sinusoid of width c0 -> MLP of width 4 c0 (or time_embedding_dim)
        temb = cfg.time_embedding_dim or 4 * channels[0]
        self.time_embedding = TimestepEmbedding(channels[0], temb, cfg.time_cond_proj_dim)
        self.class_embedding = None
        if cfg.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(channels[0], temb)
        elif cfg.class_embed_type == "projection":
            self.class_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
        if cfg.addition_embed_type == "text_time":
            # SDXL: pooled text embedding ++ sinusoids of the size/crop (or aesthetic score) ids
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            attn = kind == "CrossAttnDownBlock2D"
            self.down_blocks.append(DownBlock(
                channels[max(i - 1, 0)], channels[i], temb, layers[i], cfg, add_downsample=i < n - 1,
                context_dim=context_dims[i] if attn else None, heads=heads[i],
                transformer_layers_per_layer=tlpb[i], only_cross_attention=only_cross[i]))

        self.mid_block = None
        if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], temb, cfg, context_dims[-1], heads[-1], tlpb[-1])
        elif cfg.mid_block_type == "UNetMidBlock2D":
            self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], temb, cfg)

        # the up path mirrors the down path, with one more resnet per block (it also eats the downsampler's skip)
        reverse_tlpb = cfg.reverse_transformer_layers_per_block or tlpb[::-1]
        rc = channels[::-1]
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            attn = kind == "CrossAttnUpBlock2D"
            j = n - 1 - i  # the matching down block
            self.up_blocks.append(UpBlock(
                rc[max(i - 1, 0)], rc[min(i + 1, n - 1)], rc[i], temb, layers[j] + 1, cfg, add_upsample=i < n - 1,
                context_dim=context_dims[j] if attn else None, heads=heads[j],
                transformer_layers_per_layer=reverse_tlpb[i], only_cross_attention=only_cross[j]))

        self.conv_norm_out = ops.GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, cfg.conv_out_kernel,
                                  padding=(cfg.conv_out_kernel - 1) // 2)

    def time_embed(self, sample, timestep, timestep_cond, class_labels, added_cond_kwargs):
        """The vector every resnet adds: embedded timestep [+ class/guidance] [+ SDXL text/size ids]."""
        cfg, b = self.config, sample.shape[0]
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep, device=sample.device)
        t = t.to(sample.device).reshape(-1).expand(b)  # a number or (1,) broadcasts to the batch
        sinusoid = timestep_embedding(t, self.config.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(sinusoid.to(sample.dtype), timestep_cond)
        if cfg.class_embed_type is not None:
            if class_labels is None:
                raise ValueError(f"class_labels must be given: this UNet has class_embed_type={cfg.class_embed_type!r}")
            if cfg.class_embed_type == "timestep":
                class_labels = timestep_embedding(class_labels.reshape(-1), cfg.block_out_channels[0],
                                                  cfg.flip_sin_to_cos, cfg.freq_shift).to(sample.dtype)
            class_emb = class_labels if self.class_embedding is None else self.class_embedding(class_labels)
            emb = emb + class_emb.to(sample.dtype)
        if cfg.addition_embed_type == "text_time":
            for key in ("text_embeds", "time_ids"):
                if not added_cond_kwargs or key not in added_cond_kwargs:
                    raise ValueError(f"added_cond_kwargs[{key!r}] must be given: this UNet has "
                                     "addition_embed_type='text_time' (SDXL)")
            text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            time_embeds = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                             cfg.freq_shift).reshape(text_embeds.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        return emb

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None, *,
                encoder_attention_mask=None, return_dict=True):
        """Predict the noise (or v) of `sample` (B, C, H, W) at `timestep` given text `encoder_hidden_states`.

        Masks are (B, tokens), 1 = keep: `encoder_attention_mask` over the text, `attention_mask` over
        what attn1 attends to. `cross_attention_kwargs` (e.g. a LoRA {"scale": s}) is accepted and unused:
        LoRA acts through the modules it replaces. The residual arguments are ControlNet's additions.
        """
        context = encoder_hidden_states
        # keep = 0, drop = -10000 added to the attention logits, as diffusers does
        mask = None if attention_mask is None else ((1 - attention_mask.to(sample.dtype)) * -10000.0)[:, None, None]
        context_mask = None if encoder_attention_mask is None else (
            (1 - encoder_attention_mask.to(sample.dtype)) * -10000.0)[:, None, None]
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.time_embed(sample, timestep, timestep_cond, class_labels, added_cond_kwargs)

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context, mask, context_mask)
            skips += block_skips
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context, mask, context_mask)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual

        for block in self.up_blocks:
            block_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            # upsample to the size of the next skip: odd sizes halved by a stride-2 conv come back exactly
            size = tuple(skips[-1].shape[-2:]) if skips else None
            x = block(x, block_skips, emb, context, mask, context_mask, upsample_size=size)

        x = self.conv_out(self.conv_norm_out(x, silu=True))
        return UNet2DConditionOutput(sample=x) if return_dict else (x,)


# ----------------------------------------------------------------------------- what the config may name

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
