"""Every argument of a pipeline call checked before any work: types, finiteness, ranges, and whether the
requested size fits in memory at all.

`check_arguments(pipe, locals())` is the first line of each pipeline's __call__: it looks at the arguments by
name (an argument a pipeline does not have is simply absent), so every pipeline gets the same rules:
`height=0` is an error (not the default size), `guidance_scale=nan` is an error (not "guidance off"),
`generator=5` and `prompt=[]` are errors naming the argument. Relations between arguments (list lengths,
embeddings' shapes) stay in each pipeline's own checks, which run next.
"""
import math
import numbers
import os

import torch

from ..errors import ArgumentError, ArgumentTypeError, TooLargeError

MAX_STEPS = 10_000  # far beyond any schedule in use (1,000 training steps); 1e9 would be hours of UNet calls
MAX_SIDE = 1 << 17  # pixels; what really bounds a size is the memory estimate below
MAX_IMAGES = 4096
# latent positions one attention layer may span: 2048 x 2048 pixels for SD/SDXL, twice SDXL's trained size;
# beyond it the UNet's attention costs hours per step and, without a fused kernel, tokens^2 memory
MAX_TOKENS = 1 << 16
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
STEP_ARGS = ("num_inference_steps", "prior_num_inference_steps")
SIZE_ARGS = ("height", "width")
# finite real numbers, with their allowed range (None: unbounded)
REALS = {"guidance_scale": None, "prior_guidance_scale": None, "decoder_guidance_scale": None,
         "guidance_rescale": (0.0, 1.0), "eta": (0.0, 1.0), "strength": (0.0, 1.0), "denoising_start": (0.0, 1.0),
         "denoising_end": (0.0, 1.0), "aesthetic_score": None, "negative_aesthetic_score": None}
PROMPTS = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")
TENSORS = ("latents", "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
           "negative_pooled_prompt_embeds")
CALLBACKS = ("callback_on_step_end", "prior_callback_on_step_end")


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_int(name, v, low, high, optional=False, want=None):
    if v is None and optional:
        return
    want = want or f"an integer >= {low} (at most {high})"
    if not _is_int(v):
        raise ArgumentTypeError(f"{name}={v!r} must be {want}, not {type(v).__name__}")
    if not low <= v <= high:
        raise ArgumentError(f"{name}={v!r} must be {want}")


def check_real(name, v, bounds=None, optional=False):
    if v is None and optional:
        return
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if not _is_real(v):
        raise ArgumentTypeError(f"{name}={v!r} must be a real number, not {type(v).__name__}")
    if not math.isfinite(v):
        raise ArgumentError(f"{name}={v!r} must be a finite number")
    if bounds is not None and not bounds[0] <= v <= bounds[1]:
        raise ArgumentError(f"{name}={v!r} must be in [{bounds[0]}, {bounds[1]}]")


def check_text(name, v, allow_none=True, allow_empty_list=False):
    """A prompt: a string or a non-empty list of strings, each valid Unicode (no lone surrogates)."""
    if v is None:
        if allow_none:
            return
        raise ArgumentError(f"{name} is needed")
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)) or not all(isinstance(p, str) for p in items):
        raise ArgumentTypeError(f"{name} must be a string or a list of strings, got {_describe(v)}")
    if not items and not allow_empty_list:
        raise ArgumentError(f"{name}=[] holds no prompt: pass a string or a non-empty list of strings")
    for i, p in enumerate(items):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            where = name if isinstance(v, str) else f"{name}[{i}]"
            raise ArgumentError(f"{where} is not valid Unicode text (undecodable character at {e.start}: "
                                "was it read with the wrong encoding?)") from None


def _describe(v):
    if isinstance(v, (list, tuple)):
        kinds = sorted({type(x).__name__ for x in v})
        return f"a {type(v).__name__} of {', '.join(kinds) or 'nothing'}"
    return f"{type(v).__name__} {v!r}"[:80]


def check_generator(v):
    if v is None or isinstance(v, torch.Generator):
        return
    if isinstance(v, (list, tuple)) and v and all(isinstance(g, torch.Generator) for g in v):
        return
    raise ArgumentTypeError(f"generator={_describe(v)}: pass a torch.Generator (e.g. "
                            "torch.Generator().manual_seed(5)), a list of them, or None")


def check_tensor(name, v):
    if v is None:
        return
    if not isinstance(v, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if not v.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
    if not v.is_meta and not torch.isfinite(v).all():
        raise ArgumentError(f"{name} holds NaN or inf values")


def available_bytes(device):
    """Memory a run on `device` can use at most (total, not free: a lower bound on what is refused)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def decode_bytes(n, height, width, channels=128, itemsize=4):
    """A lower bound on a decoder's peak: three full-resolution activations of its top block (SD's VAE: 128 channels)."""
    return 3 * n * height * width * channels * itemsize


def _pipe_decode_bytes(pipe, n, height, width):
    vae = getattr(pipe, "vae", None) or getattr(pipe, "vqgan", None)
    channels = 128
    if vae is not None and hasattr(getattr(vae, "config", None), "block_out_channels"):
        channels = min(vae.config.block_out_channels)
    dtype = pipe.dtype
    return decode_bytes(n, height, width, channels, torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4)


def check_memory(what, need, device):
    have = available_bytes(device)
    if have is not None and need > have:
        raise TooLargeError(f"{what} needs at least {need / 2**30:.1f} GiB to decode (estimate), more than the "
                            f"{have / 2**30:.1f} GiB of {device}: use a smaller size or fewer images")


def check_arguments(pipe, args):
    """Check the arguments of a pipeline call (`args`: the call's locals()) by name; see the module docstring."""
    for name in STEP_ARGS:
        # timesteps= or sigmas= stand for the step count (diffusers lets num_inference_steps be None then)
        if name in args and not (name == "num_inference_steps" and (args.get("timesteps") is not None
                                                                     or args.get("sigmas") is not None)):
            check_int(name, args[name], 1, MAX_STEPS)
    for name in SIZE_ARGS:
        if name in args:
            v = args[name]
            if v is not None:
                check_int(name, v, 1, MAX_SIDE, want=f"a positive integer (pixels, at most {MAX_SIDE})")
                factor = getattr(pipe, "vae_scale_factor", 1) if hasattr(pipe, "unet") else 1
                if v % factor:
                    raise ArgumentError(f"{name}={v} must be a positive multiple of {factor} (the VAE's scale factor)")
    for name, bounds in REALS.items():
        if name in args:
            check_real(name, args[name], bounds, optional=name.startswith(("denoising", "aesthetic", "negative")))
    for name in PROMPTS:
        if name in args:
            check_text(name, args[name])
    for name in TENSORS:
        if name in args:
            check_tensor(name, args[name])
    if "generator" in args:
        check_generator(args["generator"])
    if "num_images_per_prompt" in args:
        check_int("num_images_per_prompt", args["num_images_per_prompt"], 1, MAX_IMAGES)
    if "output_type" in args and args["output_type"] not in OUTPUT_TYPES:
        raise ArgumentError(f"output_type={args['output_type']!r}: use one of {', '.join(map(repr, OUTPUT_TYPES))}")
    for name in CALLBACKS:
        if args.get(name) is not None and not callable(args[name]):
            raise ArgumentTypeError(f"{name}={args[name]!r} must be callable (pipe, step, timestep, tensors) -> dict")
    cak = args.get("cross_attention_kwargs")
    if cak is not None:
        if not isinstance(cak, dict):
            raise ArgumentTypeError(f"cross_attention_kwargs must be a dict, got {type(cak).__name__}")
        check_real("cross_attention_kwargs['scale']", cak.get("scale"), optional=True)
    if args.get("clip_skip") is not None:
        encoder = getattr(pipe, "text_encoder", None)
        layers = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
        check_int("clip_skip", args["clip_skip"], 0, (layers - 1) if layers else 1000)
    timesteps = args.get("timesteps")
    if timesteps is not None:
        if not isinstance(timesteps, (list, tuple)) or not all(_is_real(t) and math.isfinite(t) for t in timesteps):
            raise ArgumentTypeError(f"timesteps={_describe(timesteps)} must be a list of numbers")
        if len(timesteps) > MAX_STEPS:
            raise ArgumentError(f"timesteps has {len(timesteps)} entries, more than {MAX_STEPS}")
    _check_size(pipe, args)


def _check_size(pipe, args):
    height, width = args.get("height"), args.get("width")
    if not (_is_int(height) and _is_int(width)):
        return
    prompt = args.get("prompt")
    n = len(prompt) if isinstance(prompt, (list, tuple)) else 1
    n *= args.get("num_images_per_prompt") or 1
    what = f"height={height}, width={width} for {n} image(s)"
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        f = pipe.vae_scale_factor
        tokens = (height // f) * (width // f)
        if tokens > MAX_TOKENS:
            raise TooLargeError(f"{what}: {tokens} latent positions, more than the {MAX_TOKENS} (2048x2048 pixels) "
                                f"one attention layer is run on; its attention alone would need {tokens ** 2 * 4 / 2**30:.0f} "
                                "GiB per head without a fused kernel")
    check_memory(what, _pipe_decode_bytes(pipe, n, height, width), getattr(pipe, "_execution_device", "cpu"))


# ---- the checks every __call__ shares: the prompt batch, size and steps, generators, negative prompts, the
# step-end callback's tensors, given latents ---------------------------------------------------------------
def steps_of(num_inference_steps, timesteps=None, sigmas=None):
    """The loop length a call asks for: the custom schedule's when given (sigmas end with the final 0)."""
    if timesteps is not None:
        return len(timesteps)
    if sigmas is not None:
        return max(len(sigmas) - 1, 1)
    return num_inference_steps


def prompt_batch(prompt, prompt_embeds):
    if prompt is None and prompt_embeds is None:
        raise ArgumentError("pass `prompt` or `prompt_embeds`")
    if prompt is not None and prompt_embeds is not None:
        raise ArgumentError("pass either `prompt` or `prompt_embeds`, not both")
    if prompt is None:
        return prompt_embeds.shape[0]
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return len(prompt)
    raise ArgumentError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}")


def check_size_and_steps(height, width, num_inference_steps, vae_scale_factor):
    for name, v in (("height", height), ("width", width)):
        if v is not None and (not isinstance(v, int) or v <= 0 or v % vae_scale_factor):
            raise ArgumentError(f"{name}={v!r} must be a positive multiple of {vae_scale_factor}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ArgumentError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1")


def check_batch(num_images_per_prompt, generator, n):
    """num_images_per_prompt, and one generator or exactly one per image of the batch of `n`."""
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ArgumentError(f"num_images_per_prompt={num_images_per_prompt!r} must be an integer >= 1")
    if isinstance(generator, list) and len(generator) != n:
        raise ArgumentError(f"{len(generator)} generators were passed for a batch of {n} images "
                         f"(prompts x num_images_per_prompt); pass one generator or exactly {n}")


def check_negative(batch, negative_prompt, negative_prompt_embeds=None, prompt_embeds=None):
    """A negative prompt or negative embeddings (not both); one negative prompt, or one per prompt of the
    `batch`; negative embeddings shaped as the prompt's."""
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ArgumentError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        negative_list(negative_prompt, batch)
    if (prompt_embeds is not None and negative_prompt_embeds is not None
            and prompt_embeds.shape != negative_prompt_embeds.shape):
        raise ArgumentError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                         f"{tuple(negative_prompt_embeds.shape)} must have the same shape")


def negative_list(negative_prompt, batch_size):
    """The negative prompt as a list of `batch_size` strings ("" when absent)."""
    if negative_prompt is None:
        return [""] * batch_size
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch_size
    if len(negative_prompt) != batch_size:
        raise ArgumentError(f"negative_prompt has {len(negative_prompt)} entries but prompt has {batch_size}: "
                         "pass one negative prompt per prompt, or a single string")
    return list(negative_prompt)


def callback_inputs(pipe, callback, names):
    """The tensors a step-end callback receives: those it names (diffusers' PipelineCallback objects carry
    their own list), each one the pipeline offers; checked before any work."""
    if callback is None:
        return []
    if hasattr(callback, "tensor_inputs"):
        names = callback.tensor_inputs
    names = list(names if names is not None else ["latents"])
    bad = [n for n in names if n not in pipe._callback_tensor_inputs]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs has {bad}, which {type(pipe).__name__} does not "
                         f"offer (it offers {pipe._callback_tensor_inputs})")
    if not callable(callback):
        raise ValueError(f"callback_on_step_end={callback!r} is not callable")
    return names


def check_latents(latents, shape):
    if latents is not None and tuple(latents.shape) != tuple(shape):
        raise ArgumentError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)}")
