"""Command line: `minidiff generate "a prompt" --out image.png` (or `python -m minidiff generate ...`).

With no --model it uses the small model bundled with minidiff (trained by minidiff itself on drawn shapes),
so it works offline on any CPU in seconds.
"""
import argparse
import os
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(prog="minidiff", description="Text-to-image with minidiff.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="turn a prompt into a PNG")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="Hub repo id, local folder, or one checkpoint file "
                                                 "(.safetensors, A1111/ComfyUI layout) (default: the bundled shapes model)")
    g.add_argument("--vae", default=None, help="replace the model's VAE: a VAE-only file (e.g. "
                                               "vae-ft-mse-840000-ema-pruned.safetensors), a VAE folder or repo")
    g.add_argument("--out", default="out.png", help="PNG file to write (default: out.png)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: 25, or 4 with --lcm)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: 7.5 / bundled 5.0 / 1.0 with --lcm)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--lcm", action="store_true", help="LCM-LoRA, 4 steps (the bundled model's own LCM-LoRA "
                                                     "unless --lora is given)")
    g.add_argument("--lora", default=None, help="LoRA file or repo to load (e.g. an LCM-LoRA)")
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g.add_argument("--device", default="cpu")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.add_argument("--verbose", action="store_true", help="on an error, show the whole traceback")
    return p.parse_args(argv)


def check_args(a):
    if not a.out.lower().endswith(".png"):
        raise SystemExit(f"minidiff: --out {a.out!r} must end in .png")
    if os.path.exists(a.out) and not a.overwrite:
        raise SystemExit(f"minidiff: {a.out} exists; pass --overwrite to replace it")
    if a.steps is not None and a.steps < 1:
        raise SystemExit(f"minidiff: --steps {a.steps} must be >= 1")
    for name in ("width", "height"):
        v = getattr(a, name)
        if v is not None and (v <= 0 or v % 8):
            raise SystemExit(f"minidiff: --{name} {v} must be a positive multiple of 8")
    if a.model is not None and not os.path.exists(a.model) and a.model.count("/") != 1:
        raise SystemExit(f"minidiff: --model {a.model!r} is neither a local folder nor a Hub repo id (owner/name)")
    if a.lora is not None and not os.path.exists(a.lora):
        from .weights.hub import looks_like_path
        if looks_like_path(a.lora) or a.lora.lower().endswith((".safetensors", ".bin", ".pt", ".ckpt")):
            raise SystemExit(f"minidiff: --lora {a.lora}: no such file")
    if a.vae is not None and not os.path.exists(a.vae) and a.vae.count("/") != 1:
        raise SystemExit(f"minidiff: --vae {a.vae!r} is neither a local file or folder nor a Hub repo id (owner/name)")


def png_parameters(a, steps, guidance, width, height, sampler, model):
    """The text block image tools (A1111, ComfyUI readers) show for a PNG: prompt, negative, settings."""
    lines = [a.prompt]
    if a.negative:
        lines.append(f"Negative prompt: {a.negative}")
    lines.append(f"Steps: {steps}, Sampler: {sampler}, CFG scale: {guidance}, Seed: {a.seed}, "
                 f"Size: {width}x{height}, Model: {model}" + (", LoRA: LCM" if a.lcm else ""))
    return "\n".join(lines)


def load_vae(path, current, dtype, device):
    """--vae: a single file (LDM or VAE-only layout) or a VAE folder / repo (or a pipeline folder's vae/)."""
    from .models.vae import AutoencoderKL
    if os.path.isfile(path):
        vae = AutoencoderKL.from_single_file(path, torch_dtype=dtype, device=device)
        # a single file carries no scaling factor: keep the model family's (SD 0.18215, SDXL 0.13025)
        vae.config.scaling_factor = current.config.scaling_factor
        return vae
    sub = "vae" if os.path.isfile(os.path.join(path, "vae", "config.json")) else None
    return AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=dtype, device=device)


def generate(a):
    import torch
    from PIL import PngImagePlugin

    from .pipelines import DiffusionPipeline
    from .schedulers import LCMScheduler
    from .toy.common import LORA_DIR as BUNDLED_LCM_LORA, MODEL_DIR as BUNDLED

    model = a.model or BUNDLED
    bundled = a.model is None
    if bundled and not os.path.isdir(BUNDLED):
        raise SystemExit(f"minidiff: the bundled model is missing from {BUNDLED}; pass --model")
    dtype = getattr(torch, a.dtype)
    if os.path.isfile(model):
        pipe = DiffusionPipeline.from_single_file(model, torch_dtype=dtype, device=a.device)
    else:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, variant=a.variant, device=a.device)
    if a.vae:
        pipe.vae = load_vae(a.vae, pipe.vae, dtype, a.device)
    if a.lcm:
        lora = a.lora or (BUNDLED_LCM_LORA if bundled else None)
        if lora is None:
            raise SystemExit("minidiff: --lcm with --model needs --lora (e.g. latent-consistency/lcm-lora-sdv1-5)")
        pipe.load_lora_weights(lora, adapter_name="lcm")
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    elif a.lora:
        pipe.load_lora_weights(a.lora)
    steps = a.steps or (4 if a.lcm else 25)
    guidance = a.guidance if a.guidance is not None else (1.0 if a.lcm else 5.0 if bundled else 7.5)
    generator = torch.Generator("cpu").manual_seed(a.seed)
    start = time.perf_counter()
    image = pipe(a.prompt, negative_prompt=a.negative, num_inference_steps=steps, guidance_scale=guidance,
                 width=a.width, height=a.height, generator=generator).images[0]
    seconds = time.perf_counter() - start
    info = PngImagePlugin.PngInfo()
    sampler = type(pipe.scheduler).__name__
    info.add_text("parameters", png_parameters(a, steps, guidance, image.width, image.height, sampler,
                                               "minidiff/shapes-sd (bundled)" if bundled else model))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    image.save(a.out, pnginfo=info)
    print(f"wrote {a.out} ({image.width}x{image.height}, {steps} steps, {seconds:.2f} s)")


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.command == "generate":
        check_args(a)
        try:
            generate(a)
        except (ValueError, OSError, TypeError, RuntimeError, KeyError) as e:
            if a.verbose:
                raise
            # the library's messages say what is wrong and what to pass: one line, the traceback on --verbose
            message = " ".join(str(e).split()) or type(e).__name__
            raise SystemExit(f"minidiff: {message} (--verbose shows the traceback)") from None


if __name__ == "__main__":
    main()
