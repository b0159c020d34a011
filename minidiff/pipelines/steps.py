"""The steps of a pipeline call that every pipeline shares, in the order a call takes them: the input image
(`preprocess_image`), the scheduler's timesteps (`retrieve_timesteps`), the first latents (`initial_latents`;
`repeat_to` batches an img2img input), classifier-free guidance's rescale and LCM's guidance embedding, the
step-end callback (`step_callback`), the decoded images out (`postprocess`), and the progress bar (`progress`).
"""
import inspect
import sys
import time

import numpy as np
import torch
from PIL import Image

from ..errors import ArgumentError
from ..schedulers.common import randn_tensor
from .arguments import check_latents


def preprocess_image(image, vae_scale_factor, height=None, width=None, latent_channels=4):
    """PIL / numpy / tensor image(s) in [0, 1] -> (B, 3, H, W) tensor in [-1, 1], H and W multiples of the VAE factor.

    A tensor with `latent_channels` channels is taken as latents and returned unchanged.
    """
    images = image if isinstance(image, list) else [image]
    if not images:
        raise ArgumentError("image is an empty list")
    first = images[0]
    if isinstance(first, Image.Image):
        bad = [im.mode for im in images if im.mode != "RGB"]
        if bad:
            raise ArgumentError(f"image has mode {bad[0]!r}; an RGB image is needed: pass image.convert('RGB')")
        h = height or first.height
        w = width or first.width
        h, w = h - h % vae_scale_factor, w - w % vae_scale_factor
        images = [im.resize((w, h), resample=Image.LANCZOS, reducing_gap=None) for im in images]
        arr = np.stack([np.array(im).astype(np.float32) / 255.0 for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    elif isinstance(first, (np.ndarray, torch.Tensor)):
        if isinstance(first, np.ndarray):
            arr = np.concatenate(images) if first.ndim == 4 else np.stack(images)
            if arr.ndim == 3:
                arr = arr[..., None]
            x = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
        else:
            x = torch.cat(images) if first.ndim == 4 else torch.stack(images)
            if x.shape[1] == latent_channels:
                return x
        if x.shape[1] != 3:
            raise ArgumentError(f"image has {x.shape[1]} channels; an RGB image (3 channels) or latents "
                             f"({latent_channels} channels) are needed")
        h = height or x.shape[2]
        w = width or x.shape[3]
        h, w = h - h % vae_scale_factor, w - w % vae_scale_factor
        if (h, w) != tuple(x.shape[2:]):
            x = torch.nn.functional.interpolate(x, size=(h, w))
    else:
        raise ArgumentError(f"image of type {type(first).__name__}: pass a PIL image, a numpy array or a torch tensor")
    if x.min() < 0:  # already in [-1, 1]
        return x
    return x * 2 - 1


def retrieve_timesteps(scheduler, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
    """Set the scheduler's loop from a step count, or from custom `timesteps` or `sigmas` (then the count is
    theirs, as in diffusers); returns (timesteps, num_inference_steps)."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass either `timesteps` or `sigmas`, not both")
    accepted = inspect.signature(scheduler.set_timesteps).parameters
    for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
        if value is not None:
            if name not in accepted:
                raise ValueError(f"{type(scheduler).__name__}.set_timesteps takes no custom `{name}`: use a "
                                 f"scheduler that does (e.g. EulerDiscreteScheduler) or num_inference_steps")
            scheduler.set_timesteps(**{name: value}, device=device)
            return scheduler.timesteps, len(scheduler.timesteps)
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.timesteps, num_inference_steps


def initial_latents(shape, generator, device, dtype, latents, scheduler):
    """Gaussian latents drawn as diffusers draws them (CPU generator, same shape), scaled to the scheduler's
    first noise level; given `latents` are checked and scaled the same way."""
    check_latents(latents, shape)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return latents.to(device) * scheduler.init_noise_sigma


def repeat_to(x, n):
    """A batch of images or latents repeated to `n` (a multiple of its size), as img2img batches its input."""
    if n < x.shape[0]:
        raise ArgumentError(f"{x.shape[0]} images passed for {n} prompts x images per prompt")
    if n % x.shape[0]:
        raise ArgumentError(f"cannot repeat {x.shape[0]} images to a batch of {n}")
    return torch.cat([x] * (n // x.shape[0])) if n > x.shape[0] else x


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules..."): match the text branch's std
    to undo over-exposure from large guidance, blended by `guidance_rescale`."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def guidance_scale_embedding(w, dim, dtype=torch.float32):
    """LCM's guidance embedding: w (B,) scaled by 1000, sin then cos, frequencies exp(-log(1e4) i / (half - 1)).

    Computed in diffusers' order of float32 operations: at arguments near 1000 w, one rounding step of a
    frequency moves sin by ~1e-4, which the first LCM step amplifies to ~1e-4 of the latents' scale."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    args = (w.float() * 1000.0)[:, None] * torch.exp(torch.arange(half, dtype=torch.float32) * -step)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


def step_callback(callback, pipe, i, t, latents):
    """diffusers' callback_on_step_end(pipe, step, timestep, {"latents": ...}); what it returns replaces them."""
    if callback is None:
        return latents
    out = callback(pipe, i, t, {"latents": latents}) or {}
    return out.get("latents", latents)


def postprocess(image, output_type="pil"):
    """Decoded images in [-1, 1] (B, C, H, W) -> "pt" tensor in [0, 1], "np" (B, H, W, C) array, or PIL list."""
    if output_type not in ("pil", "np", "pt"):
        raise ArgumentError(f"output_type={output_type!r}: use 'pil', 'np', 'pt' or 'latent'")
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return image
    return numpy_to_pil(image)


def numpy_to_pil(images):
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(im[..., 0], mode="L") for im in images]
    return [Image.fromarray(im) for im in images]


def progress(iterable, desc="", disable=False, stream=None, order=1):
    """A one-line progress bar on stderr: `desc  12/25 [00:01<00:02, 9.1it/s]`. With `order` model calls per
    step it advances once per `order` items and on the last, as diffusers' bar does."""
    items = list(iterable)
    if disable or not items:
        yield from items
        return
    stream = stream or sys.stderr
    n, start, done = -(-len(items) // order), time.perf_counter(), 0
    for i, item in enumerate(items):
        yield item
        if (i + 1) % order and i != len(items) - 1:
            continue
        done += 1
        elapsed = time.perf_counter() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (n - done) / rate if rate > 0 else 0.0
        bar = "#" * (20 * done // n)
        stream.write(f"\r{desc} |{bar:<20}| {done}/{n} [{elapsed:5.1f}s<{left:5.1f}s, {rate:5.2f}it/s]")
        stream.flush()
    stream.write("\n")
