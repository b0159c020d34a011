"""What a distillation trains on, encoded once: latents (posterior mean and std) and text embeddings.

Three sources, named by `--data`:
  shapes        the bundled model's world (minidiff/toy/shapes.py): drawn pictures and their captions
  FOLDER        a folder of images (.png, .jpg, .jpeg, .webp) each with a caption in a .txt of the same
                stem, as diffusers' and kohya's training folders hold them; images are resized (shorter
                side) and centre-cropped to the model's resolution
  PROMPTS.txt   prompts only, one a line: the teacher draws each (its pipeline, seeded, `steps` steps),
                and its final latent is the training latent (std 0)
The cache is a dict of tensors: "mean", "std" (N, C, h, w) float16, "text" (N, L, D) float16 and "uncond"
(1, L, D) (the empty prompt, for classifier-free guidance dropout). `cached` writes it once to
out/cache.safetensors (rank 0; the others wait and read it) and reads it back on resume.
"""
import json
import os

import numpy as np
import torch

from . import parallel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_source(data):
    """Which kind of source `data` names ('shapes', 'folder', 'prompts'); errors before any work."""
    if data == "shapes":
        return "shapes"
    if os.path.isdir(data):
        images = [f for f in sorted(os.listdir(data)) if f.lower().endswith(IMAGE_SUFFIXES)]
        if not images:
            raise ValueError(f"--data {data!r}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        missing = [f for f in images if not os.path.isfile(os.path.join(data, os.path.splitext(f)[0] + ".txt"))]
        if missing:
            raise ValueError(f"--data {data!r}: {missing[0]!r} has no caption file "
                             f"{os.path.splitext(missing[0])[0] + '.txt'!r} ({len(missing)} images lack one)")
        return "folder"
    if os.path.isfile(data):
        if not prompt_lines(data):
            raise ValueError(f"--data {data!r}: the prompts file holds no prompt (one a line)")
        return "prompts"
    raise ValueError(f"--data {data!r}: neither 'shapes', a folder of images with .txt captions, "
                     "nor a prompts file")


def prompt_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


@torch.no_grad()
def embed(pipe, texts, batch=64):
    """Text-encoder hidden states of `texts`, as the pipeline conditions its UNet (float16)."""
    out = [pipe.encode_prompt(texts[i:i + batch], do_classifier_free_guidance=False)[0].half().cpu()
           for i in range(0, len(texts), batch)]
    return torch.cat(out)


@torch.no_grad()
def encode_images(vae, images, batch=64):
    """Posterior mean and std of images (N, 3, H, W) in [-1, 1], in diffusion units (float16)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i:i + batch].to(vae.device, vae.dtype)).latent_dist
        mean = vae.encoder_output_to_latents(post.mean)
        means.append(mean.half().cpu())
        stds.append((vae.encoder_output_to_latents(post.mean + post.std) - mean).half().cpu())  # the same affine map
    return torch.cat(means), torch.cat(stds)


def load_folder(folder, resolution):
    """(images (N, 3, r, r) in [-1, 1], captions) of a folder of images with .txt captions."""
    from PIL import Image
    names = [f for f in sorted(os.listdir(folder)) if f.lower().endswith(IMAGE_SUFFIXES)]
    images, captions = [], []
    for name in names:
        with Image.open(os.path.join(folder, name)) as im:
            im = im.convert("RGB")
            scale = resolution / min(im.size)
            im = im.resize((max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))),
                           Image.BICUBIC)
            left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            images.append(np.asarray(im))
        with open(os.path.join(folder, os.path.splitext(name)[0] + ".txt"), encoding="utf-8") as f:
            captions.append(f.read().strip())
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, captions


@torch.no_grad()
def teacher_latents(pipe, prompts, steps, guidance, seed, batch=16):
    """The teacher's own final latents for `prompts`, one seeded generator per prompt."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(seed + i + k) for k in range(len(prompts[i:i + batch]))]
        out.append(pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                        output_type="latent").images.half().cpu())
    return torch.cat(out)


def build_cache(pipe, data, n_images=2000, seed=0, teacher_steps=25, guidance=5.0, log=print):
    """The cache dict (see the module's docstring) of one source."""
    kind = check_source(data)
    if kind == "shapes":
        from ..toy import shapes
        log(f"[distill] drawing {n_images} pictures of the shapes world (seed {seed}) and encoding them")
        images, captions, _ = shapes.dataset(n_images, seed)
        mean, std = encode_images(pipe.vae, shapes.to_tensor(images))
    elif kind == "folder":
        resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        images, captions = load_folder(data, resolution)
        log(f"[distill] encoding {len(captions)} images of {data} at {resolution}x{resolution}")
        mean, std = encode_images(pipe.vae, images)
    else:
        captions = prompt_lines(data)
        log(f"[distill] the teacher draws {len(captions)} prompts of {data} ({teacher_steps} steps, "
            f"guidance {guidance:g})")
        mean = teacher_latents(pipe, captions, teacher_steps, guidance, seed)
        std = torch.zeros_like(mean)
    return {"mean": mean, "std": std, "text": embed(pipe, captions), "uncond": embed(pipe, [""])}


def read_key(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("source")


def cached(pipe, data, out, log=print, **options):
    """The cache of `data`, built once by rank 0 into out/cache.safetensors and read from there by every
    process (and by a resumed run); rebuilt when the source or its options differ from the file's."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(out, "cache.safetensors")
    key = json.dumps({"data": os.path.abspath(data) if data != "shapes" else data, **options}, sort_keys=True)
    if parallel.is_main() and not (os.path.isfile(path) and read_key(path) == key):
        cache = build_cache(pipe, data, log=log, **options)
        os.makedirs(out, exist_ok=True)
        save_file({k: v.contiguous() for k, v in cache.items()}, path + ".tmp", metadata={"source": key})
        os.replace(path + ".tmp", path)
    parallel.barrier()
    return load_file(path)
