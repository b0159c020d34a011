"""AutoencoderKL: the variational autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models"), as in Stable Diffusion 1.x/2.x and SDXL.

The encoder maps an image in [-1, 1] to a diagonal Gaussian over latents 8x smaller (with four blocks);
the decoder maps latents back to pixels. Both are stacks of ResNet blocks with one self-attention layer
in the middle, at the lowest resolution. Module names equal diffusers' checkpoint keys, so a Hub
`vae/diffusion_pytorch_model.safetensors` loads as is.

The way between diffusion latents and pixels (`image_to_latents`, `latents_to_image`) is the shared base
`Autoencoder` in autoencoder.py, which AutoencoderTiny (taesd.py) has too.
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import fused_qkv, ops
from ..device import nhwc_decode
from ..schedulers.common import randn_tensor
# check_finite, retrieve_latents: also reachable as minidiff.models.vae.<name>
from .autoencoder import (ACTIVATIONS, Autoencoder, DecoderOutput, activation, check_finite,  # noqa: F401
                          retrieve_latents, tiled)
from .base import ModelOutput


# ---------------------------------------------------------------------------------------------------------
# Building blocks


class ResnetBlock2D(nn.Module):
    """norm -> act -> conv, twice, plus a (1x1-projected when channels change) skip connection."""

    def __init__(self, in_channels, out_channels, groups, act_fn):
        super().__init__()
        self.norm1 = ops.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = ops.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # SiLU (every real VAE) runs fused with the norm through the ops seam; another act_fn runs after it
        self.nonlinearity = None if act_fn in ("silu", "swish") else activation(act_fn)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def norm_act(self, norm, x):
        return norm(x, silu=True) if self.nonlinearity is None else self.nonlinearity(norm(x))

    def forward(self, x):
        h = self.conv1(self.norm_act(self.norm1, x))
        h = self.conv2(self.norm_act(self.norm2, h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """One-head self-attention over the H*W positions of a feature map, with a residual connection."""
    heads, is_cross_attention = 1, False  # what fuse_qkv_projections reads

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = ops.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        out = ops.attention(*fused_qkv.project(self, tokens), heads=1)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class MidBlock(nn.Module):
    """ResNet, self-attention (optional), ResNet: the global mixing at the lowest resolution."""

    def __init__(self, channels, groups, act_fn, add_attention):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, act_fn) for _ in range(2)])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; the padding is one pixel on the right and bottom only, as the checkpoints were trained."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, act_fn, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
                                      for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, act_fn, add_upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
                                      for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image -> 2 * latent_channels moments (mean and log-variance), downsampling after every block but the last."""

    def __init__(self, cfg):
        super().__init__()
        ch, groups = list(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, cfg.act_fn,
                               add_downsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], groups, cfg.act_fn, cfg.mid_block_add_attention)
        self.conv_norm_out = ops.GroupNorm(groups, ch[-1], eps=1e-6)  # then SiLU whatever act_fn says, as in LDM
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class Decoder(nn.Module):
    """Latents -> image, mirroring the encoder with one more ResNet per block."""

    def __init__(self, cfg):
        super().__init__()
        ch, groups = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, cfg.act_fn, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, cfg.act_fn,
                             add_upsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = ops.GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


# ---------------------------------------------------------------------------------------------------------
# The posterior and the outputs


class DiagonalGaussianDistribution:
    """The encoder's posterior N(mean, std^2), per latent element. `moments` is mean and log-variance
    stacked on the channel axis."""

    def __init__(self, moments):
        self.parameters = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        noise = randn_tensor(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean


@dataclass
class AutoencoderKLOutput(ModelOutput):
    latent_dist: DiagonalGaussianDistribution


# ---------------------------------------------------------------------------------------------------------
# The model

@dataclass
class AutoencoderKLConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: object = 32  # int or [height, width]; only sets the tile size of tiled decoding
    scaling_factor: float = 0.18215
    shift_factor: float = None
    latents_mean: tuple = None
    latents_std: tuple = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    # diffusers' AutoencoderKL has no further arguments: nothing to declare neutral or ignored.
    NEUTRAL: ClassVar[dict] = {}
    IGNORED: ClassVar[tuple] = ()

    def validate(self, where="config"):
        def bad(key, value, want):
            raise ValueError(f"{where}: {key}={value!r} is not supported by minidiff's AutoencoderKL ({want})")

        n = len(self.block_out_channels)
        if n == 0:
            bad("block_out_channels", self.block_out_channels, "need at least one block")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(getattr(self, key))
            if any(t != want for t in types):
                bad(key, types, f"every block must be {want!r}")
            if len(types) != n:
                bad(key, types, f"need one entry per block_out_channels entry ({n})")
        if self.act_fn not in ACTIVATIONS:
            bad("act_fn", self.act_fn, f"supported: {', '.join(ACTIVATIONS)}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            bad("norm_num_groups", self.norm_num_groups, f"must divide every block_out_channels entry "
                f"{list(self.block_out_channels)}")
        if (self.latents_mean is None) != (self.latents_std is None):
            bad("latents_mean", self.latents_mean, "latents_mean and latents_std must be given together")
        for key in ("latents_mean", "latents_std"):
            value = getattr(self, key)
            if value is not None and len(value) != self.latent_channels:
                bad(key, value, f"need one value per latent channel ({self.latent_channels})")


class AutoencoderKL(Autoencoder):
    """The VAE. `encode(x)` -> `.latent_dist`; `decode(z)` -> `.sample` (images in [-1, 1]).

    `decode` takes the decoder's latent space; pipelines go through `image_to_latents` and `latents_to_image`
    (see Autoencoder), which apply the config's scaling and upcast.
    """

    config_class = AutoencoderKLConfig
    single_file_part = "vae"

    # The one legacy key form: the fp32 VAE files of SD 1.x / 2.x (and sd-vae-ft-mse/-ema), written by
    # diffusers < 0.14, name the mid-block attention `query`, `key`, `value`, `proj_attn`; their fp16
    # variants and today's files say `to_q`, `to_k`, `to_v`, `to_out.0`. Same tensors, same shapes.
    LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

    @classmethod
    def rename_key(cls, key):
        """`…attentions.0.query.weight` -> `…attentions.0.to_q.weight`; every other key is kept."""
        parts = key.split(".")
        if ".attentions." in key and parts[-2] in cls.LEGACY_ATTENTION:
            return ".".join(parts[:-2] + [cls.LEGACY_ATTENTION[parts[-2]], parts[-1]])
        return key

    def __init__(self, config):
        super().__init__(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None
        size = config.sample_size[0] if isinstance(config.sample_size, (list, tuple)) else config.sample_size
        self.tile_sample_min_size = size
        self.tile_latent_min_size = int(size / 2 ** (len(config.block_out_channels) - 1))
        self.tile_overlap_factor = 0.25

    def _encode_moments(self, x):
        if self.use_tiling and max(x.shape[2], x.shape[3]) > self.tile_sample_min_size:
            return tiled(x, self._encode_tile, self.tile_sample_min_size, self.tile_latent_min_size,
                          self.tile_overlap_factor)
        return self._encode_tile(x)

    def _encode_tile(self, x):
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode_one(self, z):
        if self.use_tiling and max(z.shape[2], z.shape[3]) > self.tile_latent_min_size:
            return tiled(z, self._decode_tile, self.tile_latent_min_size, self.tile_sample_min_size,
                          self.tile_overlap_factor)
        return self._decode_tile(z)

    def _decode_tile(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, x, return_dict=True):
        """Images (B, in_channels, H, W) in [-1, 1] -> the posterior over the decoder's latent space."""
        self._check_channels(x, self.config.in_channels, "x", "in_channels")
        moments = self._sliced(self._encode_moments, x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(posterior) if return_dict else (posterior,)

    def decode(self, z, return_dict=True, generator=None):
        """Latents (B, latent_channels, h, w) in the decoder's space -> images in about [-1, 1].
        `generator` is accepted for diffusers' signature and unused: decoding is deterministic."""
        self._check_channels(z, self.config.latent_channels, "z", "latent_channels")
        images = self._sliced(lambda t: nhwc_decode(self._decode_one, t), z)
        return DecoderOutput(images) if return_dict else (images,)

    def forward(self, sample, sample_posterior=False, return_dict=True, generator=None):
        """Reconstruct `sample`: encode, take the posterior's mean (or a sample), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
