"""Würstchen v2 stage B: DiffNeXt, the U-Net that denoises 4-channel VQGAN latents conditioned on
the stage C embedding ("effnet") and on CLIP text states.

Input is patchified (pixel-unshuffle + 1x1 conv), then each level runs `blocks[i]` repeats of the
block pattern `level_config[i]` (C = ResBlock, T = TimestepBlock, A = AttnBlock); levels are joined
by 2x2 strided convs down and transposed convs up, and the first block of each up level takes the
matching down output as a skip. The stage C embedding is resized (bicubic, antialiased) to a
level's resolution, mapped by a 1x1 conv to c_cond channels and fed as extra skip channels to that
level's ResBlocks where `inject_effnet` says so. The head predicts a and b, b squashed into
(eps, 1 - eps) by a sigmoid, and the noise estimate is (x - a) / b.
Attribute names equal the diffusers checkpoint keys (warp-ai/wuerstchen, decoder/).
"""
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .base import Model
from .wuerstchen_common import AttnBlock, channel_norm, ResBlockStageB, TimestepBlock, r_embedding


@dataclass
class WuerstchenDiffNeXtConfig:
    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1024
    c_hidden: list = field(default_factory=lambda: [320, 640, 1280, 1280])
    nhead: list = field(default_factory=lambda: [-1, 10, 20, 20])
    blocks: list = field(default_factory=lambda: [4, 4, 14, 4])
    level_config: list = field(default_factory=lambda: ["CT", "CTA", "CTA", "CTA"])
    inject_effnet: list = field(default_factory=lambda: [False, True, True, True])
    effnet_embd: int = 16
    clip_embd: int = 1024
    kernel_size: int = 3
    dropout: object = 0.1  # one float, or one per level

    NEUTRAL: ClassVar[dict] = {}
    IGNORED: ClassVar[tuple] = ()

    def validate(self, where):
        n = len(self.c_hidden)
        for key in ("nhead", "blocks", "level_config", "inject_effnet"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"{where}: {key}={getattr(self, key)!r} needs one entry per level "
                                 f"({n} levels, as c_hidden={self.c_hidden!r})")
        if isinstance(self.dropout, list) and len(self.dropout) != n:
            raise ValueError(f"{where}: dropout={self.dropout!r} needs one value per level ({n}) or a single float")
        for i, pattern in enumerate(self.level_config):
            bad = set(pattern) - set("CTA")
            if bad:
                raise ValueError(f"{where}: level_config[{i}]={pattern!r} has unknown block types {sorted(bad)}; "
                                 "supported: C (ResBlock), T (TimestepBlock), A (AttnBlock)")
            if "A" in pattern and (self.nhead[i] <= 0 or self.c_hidden[i] % self.nhead[i]):
                raise ValueError(f"{where}: nhead[{i}]={self.nhead[i]!r} must be a positive divisor of "
                                 f"c_hidden[{i}]={self.c_hidden[i]} since level {i} has attention")
        if self.c_r < 4:
            raise ValueError(f"{where}: c_r={self.c_r!r} is too small for a sinusoidal embedding (need >= 4)")


class WuerstchenDiffNeXt(Model):
    config_class = WuerstchenDiffNeXtConfig

    def __init__(self, config):
        super().__init__(config)
        cfg = config
        c_hidden, levels = cfg.c_hidden, len(cfg.c_hidden)
        dropout = cfg.dropout if isinstance(cfg.dropout, list) else [cfg.dropout] * levels

        # conditioning: text tokens -> c_cond; one effnet mapper per down level then per up level
        # (deepest first), None where that level takes no effnet
        self.clip_mapper = nn.Linear(cfg.clip_embd, cfg.c_cond)
        inject = list(cfg.inject_effnet) + list(reversed(cfg.inject_effnet))
        self.effnet_mappers = nn.ModuleList(
            [nn.Conv2d(cfg.effnet_embd, cfg.c_cond, kernel_size=1) if on else None for on in inject])
        self.seq_norm = ops.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)

        p = cfg.patch_size
        self.embedding = nn.Sequential(nn.PixelUnshuffle(p), nn.Conv2d(cfg.c_in * p * p, c_hidden[0], kernel_size=1),
                                       channel_norm(c_hidden[0]))

        def make(kind, i, c_skip):
            if kind == "C":
                return ResBlockStageB(c_hidden[i], c_skip, kernel_size=cfg.kernel_size, dropout=dropout[i])
            if kind == "A":
                return AttnBlock(c_hidden[i], cfg.c_cond, cfg.nhead[i], self_attn=True, dropout=dropout[i])
            return TimestepBlock(c_hidden[i], cfg.c_r)

        effnet_skip = [cfg.c_cond if on else 0 for on in cfg.inject_effnet]
        self.down_blocks = nn.ModuleList()
        for i in range(levels):
            level = nn.ModuleList()
            if i > 0:
                level.append(nn.Sequential(channel_norm(c_hidden[i - 1]),
                                           nn.Conv2d(c_hidden[i - 1], c_hidden[i], kernel_size=2, stride=2)))
            for _ in range(cfg.blocks[i]):
                for kind in cfg.level_config[i]:
                    level.append(make(kind, i, effnet_skip[i]))
            self.down_blocks.append(level)

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.ModuleList()
            for j in range(cfg.blocks[i]):
                for k, kind in enumerate(cfg.level_config[i]):
                    # the very first block of a non-deepest level also takes the U-Net skip
                    unet_skip = c_hidden[i] if i < levels - 1 and j == 0 and k == 0 else 0
                    level.append(make(kind, i, unet_skip + effnet_skip[i]))
            if i > 0:
                level.append(nn.Sequential(channel_norm(c_hidden[i]),
                                           nn.ConvTranspose2d(c_hidden[i], c_hidden[i - 1], kernel_size=2, stride=2)))
            self.up_blocks.append(level)

        self.clf = nn.Sequential(channel_norm(c_hidden[0]),
                                 nn.Conv2d(c_hidden[0], 2 * cfg.c_out * p * p, kernel_size=1),
                                 nn.PixelShuffle(p))

    def effnet_features(self, mapper_index, effnet, size):
        """Stage C embedding at one level's resolution, mapped to c_cond channels (None if not injected)."""
        mapper = self.effnet_mappers[mapper_index]
        if mapper is None:
            return None
        # resized in fp32: half-precision bicubic antialias is not available everywhere
        resized = F.interpolate(effnet.float(), size=size, mode="bicubic", antialias=True, align_corners=True)
        return mapper(resized.to(effnet.dtype))

    def run_block(self, block, x, skip, r_embed, clip):
        if isinstance(block, ResBlockStageB):
            return block(x, skip)
        if isinstance(block, AttnBlock):
            return block(x, clip)
        if isinstance(block, TimestepBlock):
            return block(x, r_embed)
        return block(x)  # down- or up-sampler

    def forward(self, x, r, effnet, clip=None, x_cat=None, eps=1e-3, return_noise=True):
        """x: (B, c_in, H, W) noisy latents, r: (B,) noise level in [0, 1], effnet: (B, effnet_embd, h, w)
        stage C embedding, clip: (B, L, clip_embd) text states -> predicted noise like x
        (or (a, b) when return_noise=False)."""
        if x_cat is not None:
            x = torch.cat([x, x_cat], dim=1)
        r_embed = r_embedding(r, self.config.c_r)
        if clip is not None:
            clip = self.seq_norm(self.clip_mapper(clip))
        x_in = x
        x = self.embedding(x)

        levels = len(self.down_blocks)
        skips = []
        for i, level in enumerate(self.down_blocks):
            effnet_c = None
            for block in level:
                if isinstance(block, ResBlockStageB) and effnet_c is None:
                    effnet_c = self.effnet_features(i, effnet, x.shape[-2:])
                x = self.run_block(block, x, effnet_c, r_embed, clip)
            skips.append(x)

        for i, level in enumerate(self.up_blocks):  # deepest level first
            effnet_c = None
            for j, block in enumerate(level):
                skip = None
                if isinstance(block, ResBlockStageB):
                    if effnet_c is None:
                        effnet_c = self.effnet_features(levels + i, effnet, x.shape[-2:])
                    unet_skip = skips[levels - 1 - i] if j == 0 and i > 0 else None
                    parts = [t for t in (unet_skip, effnet_c) if t is not None]
                    skip = torch.cat(parts, dim=1) if len(parts) > 1 else (parts[0] if parts else None)
                x = self.run_block(block, x, skip, r_embed, clip)

        a, b = self.clf(x).chunk(2, dim=1)
        b = b.sigmoid() * (1 - eps * 2) + eps
        if return_noise:
            return (x_in - a) / b
        return a, b
