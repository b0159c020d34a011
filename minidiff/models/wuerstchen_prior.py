"""Würstchen v2 stage C: the text-conditional prior that denoises the 16-channel image embedding.

A flat stack (no down/up-sampling) of `depth` triples [ResBlock, TimestepBlock, AttnBlock] at
constant width c over the tiny (24x24 for 1024px) latent. Text tokens from CLIP bigG are mapped to
c channels once and attended by every AttnBlock together with the image tokens. The network
predicts a and b and returns the noise estimate (x - a) / |1 - b|.
Attribute names equal the diffusers checkpoint keys (warp-ai/wuerstchen-prior, prior/).
"""
from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from .base import Model

from .wuerstchen_common import AttnBlock, channel_norm, ResBlock, TimestepBlock, r_embedding


@dataclass
class WuerstchenPriorConfig:
    c_in: int = 16
    c: int = 1280
    c_cond: int = 1024
    c_r: int = 64
    depth: int = 16
    nhead: int = 16
    dropout: float = 0.1

    NEUTRAL: ClassVar[dict] = {}
    IGNORED: ClassVar[tuple] = ()

    def validate(self, where):
        if self.nhead <= 0 or self.c % self.nhead:
            raise ValueError(f"{where}: nhead={self.nhead!r} must be a positive divisor of c={self.c}")
        if self.c_r < 4:
            raise ValueError(f"{where}: c_r={self.c_r!r} is too small for a sinusoidal embedding (need >= 4)")


class WuerstchenPrior(Model):
    config_class = WuerstchenPriorConfig

    def __init__(self, config):
        super().__init__(config)
        cfg = config
        c = cfg.c
        self.projection = nn.Conv2d(cfg.c_in, c, kernel_size=1)
        self.cond_mapper = nn.Sequential(nn.Linear(cfg.c_cond, c), nn.LeakyReLU(0.2), nn.Linear(c, c))
        # keys blocks.{3i, 3i+1, 3i+2}: the checkpoint stores the triples flat. The attention computes its
        # scores as diffusers' prior does (it sets the classic AttnProcessor): same rounding, same image.
        blocks = []
        for _ in range(cfg.depth):
            blocks += [ResBlock(c, dropout=cfg.dropout), TimestepBlock(c, cfg.c_r),
                       AttnBlock(c, c, cfg.nhead, self_attn=True, dropout=cfg.dropout, classic_attention=True)]
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(channel_norm(c),
                                 nn.Conv2d(c, cfg.c_in * 2, kernel_size=1))

    def forward(self, x, r, c):
        """x: (B, c_in, H, W) noisy embedding, r: (B,) noise level in [0, 1], c: (B, L, c_cond) text
        states -> predicted noise, same shape as x."""
        x_in = x
        x = self.projection(x)
        cond = self.cond_mapper(c)
        r_embed = r_embedding(r, self.config.c_r)
        for i in range(0, len(self.blocks), 3):
            x = self.blocks[i](x)
            x = self.blocks[i + 1](x, r_embed)
            x = self.blocks[i + 2](x, cond)
        a, b = self.out(x).chunk(2, dim=1)
        return (x_in - a) / ((1 - b).abs() + 1e-5)
