"""AutoencoderKL: the variational autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models"), as in Stable Diffusion 1.x/2.x and SDXL.

The encoder maps an image in [-1, 1] to a diagonal Gaussian over latents 8x smaller (with four blocks);
the decoder maps latents back to pixels. Both are stacks of ResNet blocks with one self-attention layer
in the middle, at the lowest resolution. Module names equal diffusers' checkpoint keys, so a Hub
`vae/diffusion_pytorch_model.safetensors` loads as is.

Latents and pixels. Diffusion models work on `scaling_factor * (z - shift)` (unit variance), or on the
per-channel `latents_mean` / `latents_std` form some VAEs (Playground v2.5) use. `Autoencoder`, the base of
this VAE and of AutoencoderTiny, owns the way between the two: `image_to_latents(images, generator)` and
`latents_to_image(latents)` (scaling, float32 upcast, overflow check) are what every pipeline calls.
`retrieve_latents` takes the latents of an `encode` output of either autoencoder.
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import fused_qkv, ops
from ..schedulers.common import randn_tensor
from .base import Model, ModelOutput

def activation(name):
    return ACTIVATIONS[name]()


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


@dataclass
class DecoderOutput(ModelOutput):
    sample: torch.Tensor


def retrieve_latents(encoder_output, generator=None, sample_mode="sample"):
    """Raw latents from `vae.encode(x)` of AutoencoderKL (a sample of, or with sample_mode="argmax" the mean
    of, `.latent_dist`) or of AutoencoderTiny (its deterministic `.latents`), as diffusers' img2img does."""
    if sample_mode not in ("sample", "argmax"):
        raise ValueError(f"retrieve_latents: sample_mode={sample_mode!r} must be 'sample' or 'argmax'")
    if hasattr(encoder_output, "latent_dist"):
        dist = encoder_output.latent_dist
        return dist.sample(generator) if sample_mode == "sample" else dist.mode()
    if hasattr(encoder_output, "latents"):
        return encoder_output.latents
    raise TypeError(f"retrieve_latents: {type(encoder_output).__name__} has neither .latent_dist nor .latents")


def check_finite(images, where="decode", modules=(), dtype=None):
    """Raise NonFiniteError (a FloatingPointError) if a decoded batch holds NaN or inf, naming the likely cause:
    float16 overflow only when the run is float16 (minidiff/finite.py)."""
    from ..finite import check_output
    return check_output(images, where, modules, dtype)


def _blend_tiles(prev, tile, extent, dim):
    """Cross-fade the first `extent` rows (dim=2) or columns (dim=3) of `tile` from the last ones of `prev`,
    in place: later tiles blend against already-blended neighbours, as diffusers' tiling does."""
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    if extent <= 0:
        return tile
    w = (torch.arange(extent, dtype=torch.float64) / extent).to(tile.device, tile.dtype)
    w = w.view(-1, 1) if dim == 2 else w.view(1, -1)
    head = tile.narrow(dim, 0, extent)
    head.copy_(prev.narrow(dim, prev.shape[dim] - extent, extent) * (1 - w) + head * w)
    return tile


def _tiled(x, fn, tile_in, tile_out, overlap_factor):
    """Run `fn` on overlapping tile_in-sized tiles of x (stride tile_in * (1 - overlap)), blend the overlaps and
    keep the top-left (tile_out - blend) of each output tile."""
    stride = int(tile_in * (1 - overlap_factor))
    blend = int(tile_out * overlap_factor)
    keep = tile_out - blend
    rows = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend_tiles(rows[i - 1][j], tile, blend, dim=2)
            if j > 0:
                _blend_tiles(row[j - 1], tile, blend, dim=3)
        out_rows.append(torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3))
    return torch.cat(out_rows, dim=2)


# ---------------------------------------------------------------------------------------------------------
# The model


class Autoencoder(Model):
    """What AutoencoderKL and AutoencoderTiny share: the one way between diffusion latents and pixels that
    every pipeline takes (`image_to_latents`, `latents_to_image`), the config's latent scaling, the float32
    upcast, and the slicing / tiling switches."""

    def __init__(self, config):
        super().__init__(config)
        # Slicing runs a batch one image at a time; tiling runs big images in overlapping tiles (both save memory).
        self.use_slicing = False
        self.use_tiling = False

    def enable_slicing(self):
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def enable_tiling(self):
        self.use_tiling = True

    def disable_tiling(self):
        self.use_tiling = False

    def needs_upcast(self):
        """True when this float16 VAE is known to overflow (config.force_upcast): decode it in float32."""
        return self.dtype == torch.float16 and bool(self.config.force_upcast)

    def _statistics(self, like):
        """Per-channel (mean, std) shaped for (B, C, H, W) latents, or None (as diffusers builds them: fp32, then cast)."""
        if getattr(self.config, "latents_mean", None) is None:
            return None
        return tuple(torch.tensor(v).view(1, -1, 1, 1).to(like.device, like.dtype)
                     for v in (self.config.latents_mean, self.config.latents_std))

    def latents_to_decoder_input(self, latents):
        """Diffusion latents -> the decoder's latent space: z = latents / scaling_factor + shift_factor, or, for a
        config with latents_mean/std (Playground v2.5), z = latents * std / scaling_factor + mean."""
        stats = self._statistics(latents)
        if stats is not None:
            mean, std = stats
            return latents * std / self.config.scaling_factor + mean
        z = latents / self.config.scaling_factor
        return z + self.config.shift_factor if self.config.shift_factor else z

    def encoder_output_to_latents(self, z):
        """The encoder's latent space -> diffusion latents, the inverse of `latents_to_decoder_input`."""
        stats = self._statistics(z)
        if stats is not None:
            mean, std = stats
            return (z - mean) * self.config.scaling_factor / std
        if self.config.shift_factor:
            z = z - self.config.shift_factor
        return z * self.config.scaling_factor

    def image_to_latents(self, image, generator=None, upcast=True):
        """Images (B, C, H, W) in [-1, 1] -> diffusion latents in the images' dtype: encoded, a posterior sample
        drawn with `generator` (a list: one per image), scaled by the config.

        upcast=True encodes in float32 whenever config.force_upcast says so (diffusers' SDXL img2img);
        diffusers' SD img2img encodes in the VAE's dtype (upcast=False)."""
        dtype, own = image.dtype, self.dtype
        upcast = upcast and bool(self.config.force_upcast)
        if upcast:
            image = image.float()
            self.to(torch.float32)
        try:
            if isinstance(generator, list):
                z = torch.cat([retrieve_latents(self.encode(image[i:i + 1]), generator[i]) for i in range(len(image))])
            else:
                z = retrieve_latents(self.encode(image), generator)
        finally:
            if upcast:
                self.to(own)
        return self.encoder_output_to_latents(z.to(dtype))

    def latents_to_image(self, latents, upcast=True):
        """Diffusion latents -> images (B, C, H, W) in about [-1, 1], checked for overflow (NaN/inf).

        upcast=True decodes a float16 VAE whose config says force_upcast in float32 (diffusers' SDXL
        pipelines); diffusers' SD pipelines decode in the VAE's dtype (upcast=False)."""
        upcast = upcast and self.needs_upcast()
        if upcast:
            self.to(torch.float32)
        try:
            images = self.decode(self.latents_to_decoder_input(latents.to(self.dtype)), return_dict=False)[0]
        finally:
            if upcast:
                self.to(torch.float16)
        return check_finite(images, f"{type(self).__name__}.decode", modules=(self,))  # the cause: finite.py

    def _sliced(self, fn, x):
        """fn(x), one image at a time when slicing is on."""
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(one) for one in x.split(1)])
        return fn(x)

    def _check_channels(self, t, want, arg, key):
        if t.ndim != 4 or t.shape[1] != want:
            raise ValueError(f"{type(self).__name__}: {arg} has shape {tuple(t.shape)}; expected (batch, {want}, "
                             f"height, width) with {want} = config.{key}")


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
            return _tiled(x, self._encode_tile, self.tile_sample_min_size, self.tile_latent_min_size,
                          self.tile_overlap_factor)
        return self._encode_tile(x)

    def _encode_tile(self, x):
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode_one(self, z):
        if self.use_tiling and max(z.shape[2], z.shape[3]) > self.tile_latent_min_size:
            return _tiled(z, self._decode_tile, self.tile_latent_min_size, self.tile_sample_min_size,
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
        images = self._sliced(self._decode_one, z)
        return DecoderOutput(images) if return_dict else (images,)

    def forward(self, sample, sample_posterior=False, return_dict=True, generator=None):
        """Reconstruct `sample`: encode, take the posterior's mean (or a sample), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)


# ----------------------------------------------------------------------------- what the config may name

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "mish": nn.Mish}
