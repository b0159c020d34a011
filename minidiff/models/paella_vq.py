"""Würstchen v2 stage A: Paella's VQGAN, which maps images to 4-channel latents at 1/4 resolution
and back.

Encoder: pixel-unshuffle + 1x1 conv, one MixingResidualBlock per level with 4x4 strided convs
between levels, then a 1x1 conv and BatchNorm to unit-variance latents. A codebook of
num_vq_embeddings vectors quantises them (nearest neighbour); Würstchen decodes stage B's latents
without quantising (`force_not_quantize=True`). Decoder: 1x1 conv, bottleneck_blocks mixing blocks at
the deepest level, transposed convs up, pixel shuffle out. Pipelines take `latents_to_image`, which
scales latents by scale_factor first.
Attribute names equal the diffusers checkpoint keys (warp-ai/wuerstchen, vqgan/); older configs
name the class VQModelPaella, which does not matter here.
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .. import ops
from .base import Model, ModelOutput
from .autoencoder import DecoderOutput


@dataclass
class VQEncoderOutput(ModelOutput):
    latents: torch.Tensor


class MixingResidualBlock(nn.Module):
    """Two pre-norm residual branches, a 3x3 depthwise conv (replicate padding) and a channel MLP,
    each modulated by learned scalars: gammas = (scale, shift, gate) per branch."""

    def __init__(self, c, c_hidden):
        super().__init__()
        self.norm1 = ops.LayerNorm(c, elementwise_affine=False, eps=1e-6, dim=1)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = ops.LayerNorm(c, elementwise_affine=False, eps=1e-6)  # on channels-last x
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        g = self.gammas
        h = self.norm1(x) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]
        h = self.norm2(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]  # channels-last for the MLP
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


class VectorQuantizer(nn.Module):
    """Nearest codebook vector per latent pixel (Euclidean distance)."""

    def __init__(self, num_embeddings, dim):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)

    def forward(self, z):
        """z: (B, C, H, W) -> (quantised z, code indices (B*H*W,))."""
        z = z.permute(0, 2, 3, 1)
        flat = z.reshape(-1, z.shape[-1])
        indices = torch.cdist(flat, self.embedding.weight).argmin(dim=1)
        z_q = self.embedding(indices).view(z.shape)
        z_q = z + (z_q - z).detach()  # straight-through gradient, for training through the quantiser
        return z_q.permute(0, 3, 1, 2).contiguous(), indices


@dataclass
class PaellaVQModelConfig:
    in_channels: int = 3
    out_channels: int = 3
    up_down_scale_factor: int = 2
    levels: int = 2
    bottleneck_blocks: int = 12
    embed_dim: int = 384
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = 0.3764

    NEUTRAL: ClassVar[dict] = {}
    IGNORED: ClassVar[tuple] = ()

    def validate(self, where):
        if self.levels < 1 or self.embed_dim % (2 ** (self.levels - 1)):
            raise ValueError(f"{where}: embed_dim={self.embed_dim!r} must be divisible by 2**(levels-1) "
                             f"(levels={self.levels!r}): level widths are embed_dim / 2**k")


class PaellaVQModel(Model):
    config_class = PaellaVQModelConfig

    def __init__(self, config):
        super().__init__(config)
        cfg = config
        f, levels = cfg.up_down_scale_factor, cfg.levels
        widths = [cfg.embed_dim // 2 ** k for k in reversed(range(levels))]  # shallow to deep

        self.in_block = nn.Sequential(nn.PixelUnshuffle(f),
                                      nn.Conv2d(cfg.in_channels * f * f, widths[0], kernel_size=1))
        down = []
        for i in range(levels):
            if i > 0:
                down.append(nn.Conv2d(widths[i - 1], widths[i], kernel_size=4, stride=2, padding=1))
            down.append(MixingResidualBlock(widths[i], widths[i] * 4))
        down.append(nn.Sequential(nn.Conv2d(widths[-1], cfg.latent_channels, kernel_size=1, bias=False),
                                  nn.BatchNorm2d(cfg.latent_channels)))
        self.down_blocks = nn.Sequential(*down)

        self.vquantizer = VectorQuantizer(cfg.num_vq_embeddings, cfg.latent_channels)

        up = [nn.Sequential(nn.Conv2d(cfg.latent_channels, widths[-1], kernel_size=1))]
        for i in range(levels):
            c = widths[levels - 1 - i]
            up += [MixingResidualBlock(c, c * 4) for _ in range(cfg.bottleneck_blocks if i == 0 else 1)]
            if i < levels - 1:
                up.append(nn.ConvTranspose2d(c, widths[levels - 2 - i], kernel_size=4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(widths[0], cfg.out_channels * f * f, kernel_size=1),
                                       nn.PixelShuffle(f))

    def encode(self, x, return_dict=True):
        """Image (B, in_channels, H, W) in [0, 1] -> unquantised latents `.latents`
        (B, latent_channels, H / (f * 2**(levels-1)), ...), f = up_down_scale_factor."""
        h = self.down_blocks(self.in_block(x))
        return VQEncoderOutput(latents=h) if return_dict else (h,)

    def decode(self, h, force_not_quantize=True, return_dict=True):
        """Latents -> image `.sample`; snaps them to the codebook first unless force_not_quantize."""
        quant = h if force_not_quantize else self.vquantizer(h)[0]
        dec = self.out_block(self.up_blocks(quant))
        return DecoderOutput(sample=dec) if return_dict else (dec,)

    def latents_to_image(self, latents):
        """Stage B's latents -> images in [0, 1]: scaled by config.scale_factor, decoded without snapping to the
        codebook, clamped (the Würstchen pipelines' way to pixels, as AutoencoderKL.latents_to_image is SD's)."""
        return self.decode(latents * self.config.scale_factor).sample.clamp(0, 1)

    def forward(self, sample, return_dict=True):
        dec = self.decode(self.encode(sample).latents).sample
        return DecoderOutput(sample=dec) if return_dict else (dec,)
