"""AutoencoderTiny: TAESD, a tiny distilled autoencoder (madebyollin/taesd, taesdxl) that shares the latent
space of the Stable Diffusion VAE at a fraction of its cost (2.4M parameters, plain convs, no norms or attention).

Its latents are the diffusion latents themselves (scaling_factor 1.0), and encoding is deterministic:
`encode(x).latents` (there is no posterior to sample). It is a drop-in `vae` for pipelines: it shares
AutoencoderKL's base (minidiff.models.autoencoder.Autoencoder), so `image_to_latents`, `latents_to_image`,
`retrieve_latents(vae.encode(x))`, slicing and tiling work the same on both autoencoders.

Images are in [-1, 1] outside, [0, 1] inside (TAESD's own convention): the encoder maps x -> (x + 1) / 2 first
and the decoder returns 2y - 1. The decoder also soft-clamps its input to (-3, 3) with 3 tanh(z / 3).
Module names equal diffusers' keys (`encoder.layers.N...`, `decoder.layers.N...`).
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..device import nhwc_decode
from .base import ModelOutput
from .autoencoder import ACTIVATIONS, Autoencoder, DecoderOutput, activation

class AutoencoderTinyBlock(nn.Module):
    """Three 3x3 convs with a residual connection, then ReLU (always ReLU, whatever act_fn says)."""

    def __init__(self, channels, act_fn):
        super().__init__()
        act = activation(act_fn)
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), act,
                                  nn.Conv2d(channels, channels, 3, padding=1), act,
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.skip = nn.Identity()  # a 1x1 projection only if channels changed, which valid configs never do
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class EncoderTiny(nn.Module):
    """[0, 1] image -> latents; each stage after the first starts with a stride-2 conv."""

    def __init__(self, cfg):
        super().__init__()
        layers = []
        for i, (channels, n) in enumerate(zip(cfg.encoder_block_out_channels, cfg.num_encoder_blocks)):
            if i == 0:
                layers.append(nn.Conv2d(cfg.in_channels, channels, 3, padding=1))
            else:
                layers.append(nn.Conv2d(channels, channels, 3, padding=1, stride=2, bias=False))
            layers += [AutoencoderTinyBlock(channels, cfg.act_fn) for _ in range(n)]
        layers.append(nn.Conv2d(cfg.encoder_block_out_channels[-1], cfg.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x.add(1).div(2))


class DecoderTiny(nn.Module):
    """Latents -> [0, 1] image; each stage but the last ends with an upsample and a conv."""

    def __init__(self, cfg):
        super().__init__()
        channels = cfg.decoder_block_out_channels
        layers = [nn.Conv2d(cfg.latent_channels, channels[0], 3, padding=1), activation(cfg.act_fn)]
        for i, (ch, n) in enumerate(zip(channels, cfg.num_decoder_blocks)):
            last = i == len(channels) - 1
            layers += [AutoencoderTinyBlock(ch, cfg.act_fn) for _ in range(n)]
            if not last:
                layers.append(nn.Upsample(scale_factor=cfg.upsampling_scaling_factor, mode=cfg.upsample_fn))
            layers.append(nn.Conv2d(ch, cfg.out_channels if last else ch, 3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        z = torch.tanh(z / 3) * 3
        return self.layers(z).mul(2).sub(1)


@dataclass
class AutoencoderTinyOutput(ModelOutput):
    latents: torch.Tensor


def _ramp(n, blend):
    """Weights 0, 1/(blend-1), ..., clamped to 1: how a tile fades in over its first `blend` pixels."""
    return (torch.arange(n) / (blend - 1)).clamp(0, 1)


@dataclass
class AutoencoderTinyConfig:
    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple = (64, 64, 64, 64)
    decoder_block_out_channels: tuple = (64, 64, 64, 64)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple = (1, 3, 3, 3)
    num_decoder_blocks: tuple = (3, 3, 3, 1)
    latent_magnitude: float = 3
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    # Legacy key pipelines read (vae_scale_factor = 2 ** (len(block_out_channels) - 1)); always the decoder's
    # channels, whatever the file says, as diffusers does.
    block_out_channels: tuple = None

    NEUTRAL: ClassVar[dict] = {}
    IGNORED: ClassVar[tuple] = ()

    def __post_init__(self):
        self.block_out_channels = tuple(self.decoder_block_out_channels)
        # TAESD runs fine in float16; diffusers forces this off whatever the file says.
        self.force_upcast = False

    def validate(self, where="config"):
        def bad(key, value, want):
            raise ValueError(f"{where}: {key}={value!r} is not supported by minidiff's AutoencoderTiny ({want})")

        for side in ("encoder", "decoder"):
            channels, blocks = getattr(self, f"{side}_block_out_channels"), getattr(self, f"num_{side}_blocks")
            if len(channels) != len(blocks) or not channels:
                bad(f"{side}_block_out_channels", channels,
                    f"need one entry per num_{side}_blocks entry ({len(blocks)})")
            if len(set(channels)) != 1:
                bad(f"{side}_block_out_channels", channels, "all stages must have the same width")
        if self.act_fn not in ACTIVATIONS:
            bad("act_fn", self.act_fn, f"supported: {', '.join(ACTIVATIONS)}")
        if self.upsample_fn not in UPSAMPLE_MODES:
            bad("upsample_fn", self.upsample_fn, f"supported: {', '.join(UPSAMPLE_MODES)}")


class AutoencoderTiny(Autoencoder):
    """TAESD. `encode(x)` -> `.latents` (diffusion latents, deterministic); `decode(latents)` -> `.sample` in [-1, 1]."""

    config_class = AutoencoderTinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.encoder = EncoderTiny(config)
        self.decoder = DecoderTiny(config)
        # Tiling: 512-pixel tiles overlapping by 1/8, cross-faded with a linear ramp.
        self.spatial_scale_factor = 2 ** (len(config.num_encoder_blocks) - 1)
        self.tile_overlap_factor = 0.125
        self.tile_sample_min_size = 512
        self.tile_latent_min_size = self.tile_sample_min_size // self.spatial_scale_factor

    def scale_latents(self, x):
        """Raw latents -> [0, 1], the range TAESD latents are stored in as 8-bit images."""
        return x.div(2 * self.config.latent_magnitude).add(self.config.latent_shift).clamp(0, 1)

    def unscale_latents(self, x):
        """[0, 1] -> raw latents."""
        return x.sub(self.config.latent_shift).mul(2 * self.config.latent_magnitude)

    def _tiled(self, x, fn, tile, scale, out_channels):
        """Run `fn` (which resizes by `scale`) on tiles of x stepping by tile * (1 - overlap); each tile is
        faded in over the previous output along its top and left edges."""
        blend = int(tile * self.tile_overlap_factor)
        step = tile - blend
        ramp = _ramp(int(tile * scale), blend * scale).to(x.device, x.dtype)
        out = x.new_zeros(x.shape[0], out_channels, int(x.shape[2] * scale), int(x.shape[3] * scale))
        for i in range(0, x.shape[2], step):
            for j in range(0, x.shape[3], step):
                y = fn(x[:, :, i:i + tile, j:j + tile])
                h, w = y.shape[2], y.shape[3]
                top, left = int(i * scale), int(j * scale)
                mask_rows = ramp[:h, None] if i > 0 else torch.ones_like(ramp[:h, None])
                mask_cols = ramp[None, :w] if j > 0 else torch.ones_like(ramp[None, :w])
                mask = mask_rows * mask_cols
                region = out[:, :, top:top + h, left:left + w]
                region.copy_(mask * y + (1 - mask) * region)
        return out

    def _encode_one(self, x):
        if self.use_tiling:
            return self._tiled(x, self.encoder, self.tile_sample_min_size, 1 / self.spatial_scale_factor,
                               self.config.latent_channels)
        return self.encoder(x)

    def _decode_one(self, z):
        if self.use_tiling:
            return self._tiled(z, self.decoder, self.tile_latent_min_size, self.spatial_scale_factor,
                               self.config.out_channels)
        return self.decoder(z)

    def encode(self, x, return_dict=True):
        """Images (B, in_channels, H, W) in [-1, 1] -> diffusion latents (no sampling: TAESD is deterministic)."""
        self._check_channels(x, self.config.in_channels, "x", "in_channels")
        latents = self._sliced(self._encode_one, x)
        return AutoencoderTinyOutput(latents) if return_dict else (latents,)

    def decode(self, x, generator=None, return_dict=True):
        """Latents (B, latent_channels, h, w) -> images in [-1, 1]. `generator` is unused (diffusers' signature)."""
        self._check_channels(x, self.config.latent_channels, "x", "latent_channels")
        images = self._sliced(lambda t: nhwc_decode(self._decode_one, t), x)
        return DecoderOutput(images) if return_dict else (images,)

    def forward(self, sample, return_dict=True):
        """Round trip through 8-bit latents, as TAESD stores them: encode, quantise to 0..255, decode."""
        latents = self.encode(sample).latents
        quantised = self.scale_latents(latents).mul(255).round().byte()
        images = self.decode(self.unscale_latents(quantised / 255.0)).sample
        return DecoderOutput(images) if return_dict else (images,)


# ----------------------------------------------------------------------------- what the config may name

UPSAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")
