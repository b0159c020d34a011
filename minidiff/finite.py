"""NaN and inf: found at the first denoising step whose latents stop being finite (and in the decoded images
before anything is returned or saved), with the cause that fits the run, not a guess.

The cause is looked for in order: non-finite weights (a corrupt or badly converted checkpoint) or LoRA
tensors, a LoRA or guidance scale so large it overflows, float16 overflow (only when the run is float16),
and otherwise the latents/embeddings passed in or a callback's latents. Only a failing run pays for the
search; a passing step costs one isfinite reduction.
"""
import math

import torch

from .errors import NonFiniteError

LARGE_SCALE = 1e3  # a guidance or LoRA scale beyond this is named as the likely cause


def _what(x):
    return "NaN" if torch.isnan(x).any() else "inf"


def likely_cause(modules, dtype=None, guidance_scale=None):
    """The most likely reason a run with `modules` (its models) and run dtype `dtype` went non-finite."""
    modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    for m in modules:
        for name, p in m.named_parameters():
            if p.is_floating_point() and not torch.isfinite(p).all():
                return (f"non-finite weights: {type(m).__name__}.{name} holds {_what(p)} (a corrupt or badly "
                        "converted checkpoint?)")
    for m in modules:
        for name, b in m.named_buffers():
            if b is not None and b.is_floating_point() and not torch.isfinite(b).all():
                return f"non-finite tensors: {type(m).__name__}.{name} holds {_what(b)} (a corrupt LoRA file?)"
        for name, layer in m.named_modules():
            adapters = getattr(layer, "adapters", None)
            if not getattr(type(layer), "is_lora_layer", False) or not adapters:
                continue
            for a_name in layer.active:
                s = adapters[a_name].scale * layer.adapter_weights[a_name] * layer.call_scale
                if not math.isfinite(s) or abs(s) > LARGE_SCALE:
                    return f"LoRA scale {s:g} of adapter {a_name!r} on {type(m).__name__}.{name}"
    if guidance_scale is not None and (not math.isfinite(guidance_scale) or abs(guidance_scale) > LARGE_SCALE):
        return f"guidance_scale={guidance_scale} (so large that the guided prediction overflows)"
    dtypes = {dtype} if dtype is not None else {p.dtype for m in modules for p in m.parameters()}
    if torch.float16 in dtypes:
        return ("float16 overflow (activations beyond 65504): run in float32 or bfloat16 (for SDXL's VAE: "
                "madebyollin/sdxl-vae-fp16-fix)")
    return ("the latents or embeddings passed in, or a callback's latents (the weights are finite and the run is "
            f"{', '.join(sorted(str(d).replace('torch.', '') for d in dtypes)) or 'not float16'})")


def check_step(latents, model, step, total, modules=(), guidance_scale=None, dtype=None):
    """Raise NonFiniteError if `latents` (after step `step`, 0-based, of `total`) hold NaN or inf."""
    if torch.isfinite(latents).all():
        return latents
    cause = likely_cause(list(modules) or [model], dtype, guidance_scale)
    raise NonFiniteError(f"{type(model).__name__}: the latents became {_what(latents)} at denoising step {step + 1} "
                         f"of {total}; likely cause: {cause}")


def check_output(images, where, modules=(), dtype=None, guidance_scale=None):
    """Raise NonFiniteError if decoded images (or returned latents) hold NaN or inf; nothing is returned or saved."""
    if isinstance(images, torch.Tensor) and not torch.isfinite(images).all():
        cause = likely_cause(modules, dtype, guidance_scale) if modules or dtype else (
            "float16 overflow: load the VAE in float32 or use madebyollin/sdxl-vae-fp16-fix"
            if images.dtype == torch.float16 else "non-finite weights or latents (the run is not float16)")
        raise NonFiniteError(f"{where}: decode produced {_what(images)} (dtype {images.dtype}); likely cause: {cause}")
    return images
