"""The latent path: what AutoencoderKL (vae.py) and AutoencoderTiny (taesd.py) share.

Diffusion models work on `scaling_factor * (z - shift)` (unit variance), or on the per-channel `latents_mean` /
`latents_std` form some VAEs (Playground v2.5) use. `Autoencoder`, the base of both autoencoders, owns the way
between the two: `image_to_latents(images, generator)` and `latents_to_image(latents)` (scaling, float32
upcast, overflow check) are what every pipeline calls. `retrieve_latents` takes the latents of an `encode`
output of either autoencoder; slicing and tiling (`tiled`: overlapping tiles, blended) work alike on both.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import Model, ModelOutput


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


def tiled(x, fn, tile_in, tile_out, overlap_factor):
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


# ----------------------------------------------------------------------------- what the config may name

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "mish": nn.Mish}


def activation(name):
    return ACTIVATIONS[name]()
