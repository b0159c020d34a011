"""Command line: `minidiff generate "a prompt" --out image.png` (or `python -m minidiff generate ...`).

With no --model it uses the small model bundled with minidiff (trained by minidiff itself on drawn shapes),
so it works offline on any CPU in seconds.
"""
import argparse
import inspect
import math
import os
import sys
import time

from . import ops
from .errors import ArgumentError
from .infotext import format_infotext, parse_infotext, read_png_infotext
from .output_file import check_output_path
from .pipelines.arguments import MAX_SIDE, MAX_STEPS, check_memory, check_text, decode_bytes

MAX_SEED = 2 ** 64 - 1  # what torch.Generator.manual_seed takes
# what generate() passes to every pipeline it runs
CALL_ARGS = ("prompt", "num_inference_steps", "guidance_scale", "width", "height", "generator")

SMALL_NAME = "minidiff/shapes-sd-small (bundled)"  # --model small, as the PNG's infotext names it


def parse_args(argv):
    p = argparse.ArgumentParser(prog="minidiff", description="Text-to-image with minidiff.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="turn a prompt into a PNG",
                       description="Turn a prompt into a PNG. Prompts use A1111's syntax by default: (word:1.2), "
                                   "(word), [word], BREAK, and prompts longer than 77 tokens (--prompt-syntax plain "
                                   "reads them as diffusers does).")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt (optional with --from-png)")
    g.add_argument("--from-png", default=None, metavar="PNG",
                   help="re-create an image from the parameters minidiff or A1111 wrote into PNG (prompt, negative "
                        "prompt, steps, CFG scale, seed, size, model, clip skip); options given here override them")
    g.add_argument("--prompt-syntax", default=None, choices=["a1111", "plain"],
                   help="how prompts are read: 'a1111' (the default): (word) x1.1, (word:1.3), [word] /1.1, \\( for "
                        "a literal bracket, BREAK, long prompts in 75-token windows; 'plain': diffusers' plain text, "
                        "cut at 77 tokens")
    g.add_argument("--clip-skip", type=int, default=None, help="A1111's clip skip: 1 = the last layer (default), "
                                                              "2 = the one before, ...")
    g.add_argument("--model", default=None, help="Hub repo id, local folder, or one checkpoint file "
                                                 "(.safetensors, A1111/ComfyUI layout) (default: the bundled shapes "
                                                 "model; 'small': its distilled student, minidiff/distill)")
    g.add_argument("--vae", default=None, help="replace the model's VAE: a VAE-only file (e.g. "
                                               "vae-ft-mse-840000-ema-pruned.safetensors), a VAE folder or repo "
                                               "(AutoencoderKL or a TAESD AutoencoderTiny), or 'taesd': "
                                               "madebyollin/taesd (taesdxl for SDXL), a fast decode for LCM/Turbo")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first step; inductor "
                                                          "caches the kernels across runs)")
    g.add_argument("--prepack", action="store_true", help="CPU: the denoiser's convolution weights reordered once "
                                                          "for oneDNN (one more copy of them; faster fp32 steps)")
    g.add_argument("--kernels", choices=["cpu"], default=None, help="cpu: bf16/fp32 attention through the AVX512_BF16 "
                   "C++ kernel (kernels/cpu_attention.py; built at first use: a C++ compiler and ninja)")
    g.add_argument("--out", default="out.png", help="PNG file to write (default: out.png)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: 25, or 4 with --lcm)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: 7.5 / bundled 5.0 / 1.0 with --lcm)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--negative", default=None, help="negative prompt")
    g.add_argument("--lcm", action="store_true", help="LCM-LoRA, 4 steps (the bundled model's own LCM-LoRA "
                                                     "unless --lora is given)")
    g.add_argument("--lora", default=None, help="LoRA file or repo to load (e.g. an LCM-LoRA)")
    g.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="textual inversion embedding to load (repeatable); the prompt names it by its token "
                        "(the embedding's name, or the file's name for A1111 files)")
    g.add_argument("--sampler", default=None, help="sampler by its A1111 or ComfyUI name, e.g. 'DPM++ 2M Karras', "
                                                   "'Euler a', 'Heun' (default: the model's own scheduler)")
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights and compute dtype (default: auto = bfloat16 on a CPU with AVX512_BF16 or AMX, "
                        "float32 on other CPUs; see minidiff/device.py; --from-png: the PNG's)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: auto = torch's, one per core, "
                   "fewer on a busy machine: the cores the load average leaves free)")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.add_argument("--allow-pickle", action="store_true", help="read pickle checkpoints/LoRAs (.bin, .ckpt; with "
                   "torch.load(weights_only=True)); refused by default")
    g.add_argument("--verbose", action="store_true", help="on an error, show the whole traceback")
    add_compress(sub)
    from .distill.cli import add_distill
    add_distill(sub)
    return p.parse_args(argv)


def check_args(a):
    """Every argument checked before anything is loaded (the rules: check_cli_args, below)."""
    if a.prompt is None:
        raise SystemExit("minidiff: generate needs a prompt (or --from-png image.png)")
    if getattr(a, "threads", None) is not None and a.threads < 1:
        raise SystemExit(f"minidiff: --threads {a.threads} must be >= 1")
    if a.clip_skip is not None and a.clip_skip < 1:
        raise SystemExit(f"minidiff: --clip-skip {a.clip_skip} must be >= 1 (1 = the last layer)")
    from .errors import MinidiffError
    try:
        check_cli_args(a)
    except (MinidiffError, FileNotFoundError) as e:
        if getattr(a, "verbose", False):
            raise
        raise SystemExit(f"minidiff: {' '.join(str(e).split())} (--verbose shows the traceback)") from None
    if a.sampler is not None:
        from .samplers import sampler_name, scheduler_class
        try:
            a.sampler = sampler_name(a.sampler)
            scheduler_class(a.sampler)  # the class exists
        except ValueError as e:
            raise SystemExit(f"minidiff: --sampler: {e}") from None
    if a.model is not None and not os.path.exists(a.model) and a.model.count("/") != 1:
        raise SystemExit(f"minidiff: --model {a.model!r} is neither a local folder nor a Hub repo id (owner/name)")
    if a.lora is not None and not os.path.exists(a.lora):
        from .weights.hub import looks_like_path
        if looks_like_path(a.lora) or a.lora.lower().endswith((".safetensors", ".bin", ".pt", ".ckpt")):
            raise SystemExit(f"minidiff: --lora {a.lora}: no such file")
    if a.vae is not None and a.vae != "taesd" and not os.path.exists(a.vae) and a.vae.count("/") != 1:
        raise SystemExit(f"minidiff: --vae {a.vae!r} is neither a local file or folder nor a Hub repo id (owner/name)")


# the rules: the output file, numbers that must be finite and in range, the device, the prompt's text, and that
# the model is one the CLI can run
def check_cli_args(a):
    check_output_path(a.out, a.overwrite, ".png")
    if a.steps is not None and not 1 <= a.steps <= MAX_STEPS:
        raise ArgumentError(f"--steps {a.steps} must be in [1, {MAX_STEPS}]")
    for name in ("width", "height"):
        v = getattr(a, name)
        if v is not None and (v <= 0 or v % 8 or v > MAX_SIDE):
            raise ArgumentError(f"--{name} {v} must be a positive multiple of 8 (at most {MAX_SIDE})")
    if a.guidance is not None and not math.isfinite(a.guidance):
        raise ArgumentError(f"--guidance {a.guidance} must be a finite number")
    if a.seed is not None and not 0 <= a.seed <= MAX_SEED:
        raise ArgumentError(f"--seed {a.seed} must be in [0, 2**64 - 1]")
    check_text("the prompt", a.prompt)
    check_text("--negative", a.negative)
    check_device(a.device)
    if a.width and a.height:
        check_memory(f"--width {a.width} --height {a.height}",
                     decode_bytes(1, a.height, a.width, itemsize=2 if a.dtype != "float32" else 4), a.device)
    if a.lcm and a.model is not None and a.lora is None:
        raise ArgumentError("--lcm with --model needs --lora (e.g. latent-consistency/lcm-lora-sdv1-5)")
    for name in ("model", "lora", "vae"):
        v = getattr(a, name, None)
        if v is None or os.path.exists(v) or (name == "vae" and v == "taesd"):
            continue
        if v.startswith((".", "/", "~")) or (os.path.dirname(v) and os.path.isdir(os.path.dirname(v))):
            raise ArgumentError(f"--{name} {v!r}: no such folder or file (a path is never looked up on the Hub)")
        if v.count("/") != 1:
            raise ArgumentError(f"--{name} {v!r} is neither a local path nor a Hub repo id (owner/name)")
    if a.model is not None and os.path.isdir(a.model):
        check_runnable(a.model, a.negative)


def check_device(device):
    import torch
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ArgumentError(f"--device {device!r} is not a device (use cpu, cuda, cuda:1, mps): {e}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"--device {device}: CUDA is not available here (use --device cpu)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ArgumentError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ArgumentError(f"--device {device}: MPS is not available here (use --device cpu)")
    elif d.type != "cpu":
        raise ArgumentError(f"--device {device}: the CLI runs on cpu, cuda or mps")


def check_runnable(model, negative):
    """The pipeline class the folder names must exist in minidiff and take the arguments the CLI passes."""
    from .pipelines import PIPELINES
    from .weights.hub import read_json
    name = read_json(model, "model_index.json").get("_class_name")
    where = os.path.join(model, "model_index.json")
    if name not in PIPELINES:
        raise ArgumentError(f"--model {model}: {where} names pipeline {name!r}, which minidiff does not implement "
                            f"(known: {', '.join(sorted(PIPELINES))})")
    if name.endswith("PriorPipeline"):
        raise ArgumentError(f"--model {model}: the CLI cannot run a {name} (it returns image embeddings, not "
                            "images); use the combined pipeline's folder or the Python API")
    params = inspect.signature(PIPELINES[name].__call__).parameters
    missing = [p for p in CALL_ARGS + (("negative_prompt",) if negative else ()) if p not in params]
    if missing:
        raise ArgumentError(f"--model {model}: the CLI cannot run a {name} (it takes no {', '.join(missing)}); "
                            "use the Python API")


def png_parameters(a, steps, guidance, width, height, sampler, model, dtype=None):
    """The text block image tools (A1111, ComfyUI readers) show for a PNG: prompt, negative, settings."""
    settings = {"Steps": steps, "Sampler": sampler, "CFG scale": guidance, "Seed": a.seed, "Size": f"{width}x{height}",
                "Model": model, "LoRA": "LCM" if a.lcm else None, "Clip skip": a.clip_skip,
                "Prompt syntax": a.prompt_syntax, "Dtype": dtype, "Layout": getattr(a, "layout", None),
                "Prepacked": "yes" if getattr(a, "prepack", False) else None, "Kernels": getattr(a, "kernels", None)}
    return format_infotext(a.prompt, a.negative, settings)


def apply_png(a):
    """Fill the options not given on the command line from the parameters of `a.from_png`."""
    try:
        prompt, negative, s = parse_infotext(read_png_infotext(a.from_png))
    except ValueError as e:
        raise SystemExit(f"minidiff: --from-png: {e}") from None

    def number(key, kind):
        try:
            return kind(s[key]) if key in s else None
        except ValueError:
            raise SystemExit(f"minidiff: --from-png {a.from_png}: {key}: {s[key]!r} is not a number") from None

    a.prompt = a.prompt if a.prompt is not None else prompt
    a.negative = a.negative if a.negative is not None else (negative or None)
    for attr, key, kind in (("steps", "Steps", int), ("guidance", "CFG scale", float), ("seed", "Seed", int),
                            ("clip_skip", "Clip skip", int)):
        if getattr(a, attr) is None:
            setattr(a, attr, number(key, kind))
    if "Size" in s and a.width is None and a.height is None:
        w, _, h = s["Size"].partition("x")
        if not (w.isdigit() and h.isdigit()):
            raise SystemExit(f"minidiff: --from-png {a.from_png}: Size: {s['Size']!r} is not WIDTHxHEIGHT")
        a.width, a.height = int(w), int(h)
    # an infotext without "Prompt syntax" is A1111's own, which reads prompts its way
    a.prompt_syntax = a.prompt_syntax or s.get("Prompt syntax", "a1111")
    a.lcm = a.lcm or s.get("LoRA") == "LCM"
    if getattr(a, "dtype", "auto") is None and s.get("Dtype") in ("float32", "float16", "bfloat16"):
        a.dtype = s["Dtype"]  # the same dtype makes the same picture
        a.layout = s.get("Layout")  # and the same layout (channels_last: another summation order)
    a.prepack = getattr(a, "prepack", False) or s.get("Prepacked") == "yes"
    a.kernels = getattr(a, "kernels", None) or (s.get("Kernels") if s.get("Kernels") == "cpu" else None)
    model = s.get("Model")
    if a.model is None and model == SMALL_NAME:
        a.model = "small"
    elif a.model is None and model is not None and not model.endswith("(bundled)"):
        if not (os.path.exists(model) or model.count("/") == 1):
            raise SystemExit(f"minidiff: --from-png {a.from_png} was made with model {model!r}, which is neither a "
                             "local folder nor a Hub repo id (an A1111 checkpoint name?): pass --model")
        a.model = model
    if "Sampler" in s and a.sampler is None:
        from .samplers import sampler_name, scheduler_class
        name = s["Sampler"]
        if s.get("Schedule type", "").lower() == "karras" and not name.endswith("Karras"):
            name += " Karras"  # A1111 1.9+ writes the Karras schedule as its own setting
        try:
            a.sampler = sampler_name(name)
        except ValueError:  # e.g. minidiff's "PNDMScheduler": the model's own scheduler, said if it differs
            a.png_sampler = s["Sampler"]
            return
        try:
            scheduler_class(a.sampler)
        except ValueError as e:
            raise SystemExit(f"minidiff: --from-png {a.from_png}: {e}; pass --sampler to choose another") from None


def load_vae(path, current, dtype, device, xl=False):
    """--vae: a single file (LDM or VAE-only layout) or a VAE folder / repo (or a pipeline folder's vae/);
    'taesd': the tiny autoencoder for the model's family."""
    from .models.taesd import AutoencoderTiny
    from .models.vae import AutoencoderKL
    from .weights.hub import read_json
    tiny = path == "taesd"
    if tiny:
        path = "madebyollin/taesdxl" if xl else "madebyollin/taesd"
    if os.path.isfile(path):
        vae = AutoencoderKL.from_single_file(path, torch_dtype=dtype, device=device)
        # a single file carries no scaling factor: keep the model family's (SD 0.18215, SDXL 0.13025)
        vae.config.scaling_factor = current.config.scaling_factor
        return vae
    sub = "vae" if os.path.isfile(os.path.join(path, "vae", "config.json")) else None
    tiny = tiny or read_json(path, "config.json", sub).get("_class_name") == "AutoencoderTiny"
    return (AutoencoderTiny if tiny else AutoencoderKL).from_pretrained(path, subfolder=sub, torch_dtype=dtype,
                                                                        device=device)


def generate(a):
    import torch
    from PIL import PngImagePlugin

    from .device import auto_threads, fast_memory_format, keep_freed_memory, resolve_dtype, use_fast_layout, use_fast_linear
    from .pipelines import DiffusionPipeline
    from .samplers import name_of, scheduler_for
    from .schedulers import LCMScheduler
    from .assets import LORA_DIR as BUNDLED_LCM_LORA, MODEL_DIR as BUNDLED

    small = getattr(a, "small", False)  # --model small: the bundled pipeline with its distilled UNet
    model = a.model or BUNDLED
    bundled = a.model is None
    if bundled and not os.path.isdir(BUNDLED):
        raise SystemExit(f"minidiff: the bundled model is missing from {BUNDLED}; pass --model")
    if a.threads is not None or torch.device(a.device).type == "cpu":
        threads = a.threads or auto_threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        print(f"minidiff: threads {threads}" + ("" if a.threads else f" (auto: {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f}; --threads N to choose)"), file=sys.stderr)
        if torch.device(a.device).type == "cpu" and keep_freed_memory():  # glibc: large temporaries reused, not faulted in afresh at every layer
            print("minidiff: malloc keeps freed memory for reuse (device.keep_freed_memory)", file=sys.stderr)
    a.dtype = a.dtype or "auto"
    dtype = resolve_dtype(a.dtype, a.device)
    print(f"minidiff: dtype {str(dtype).replace('torch.', '')}"
          + (" (auto: this device's fast dtype; --dtype float32 for fp32)" if a.dtype == "auto" else ""), file=sys.stderr)
    if getattr(a, "kernels", None) == "cpu":  # built (or loaded) before the model: an error comes before any work
        from .kernels import use as use_kernels
        try:
            use_kernels("cpu")
        except RuntimeError as e:
            raise SystemExit(f"minidiff: --kernels cpu: {e}") from None
        print("minidiff: attention through the CPU kernel (bf16 and fp32 calls; the rest on SDPA)", file=sys.stderr)
    wanted = getattr(a, "layout", "fast") in ("fast", "channels_last")  # a --from-png: its layout, else the fast one
    fmt = fast_memory_format(dtype, a.device) if wanted else None  # set while the weights are read: one copy
    if os.path.isfile(model):
        pipe = DiffusionPipeline.from_single_file(model, torch_dtype=dtype, device=a.device,
                                                  allow_pickle=a.allow_pickle, memory_format=fmt)
    else:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, variant=a.variant, device=a.device,
                                                 allow_pickle=a.allow_pickle, memory_format=fmt)
    if small:
        from .assets import SMALL_UNET_DIR
        from .models.unet import UNet2DConditionModel
        pipe.unet = UNet2DConditionModel.from_pretrained(SMALL_UNET_DIR, subfolder="unet", torch_dtype=dtype,
                                                         device=a.device, memory_format=fmt)
    if a.vae:
        pipe.vae = load_vae(a.vae, pipe.vae, dtype, a.device, xl="XL" in type(pipe).__name__)
    a.layout = None
    if wanted and any([use_fast_layout(m, a.device) for m in pipe.modules()]):
        a.layout = "channels_last"  # recorded in the PNG: --from-png makes the same picture
        print("minidiff: layout channels_last (bf16 convolutions on a CPU run in NHWC)", file=sys.stderr)
    linears = sum([use_fast_linear(m, a.device) for m in pipe.modules()])
    if linears:  # the same picture (bf16 bitwise, fp32 to summation order), so not recorded in the PNG
        print(f"minidiff: {linears} linear layers on oneDNN's matmul (measured faster here than PyTorch's own)",
              file=sys.stderr)
    if a.prepack:
        from .prepack import prepack_weights
        # the models every step calls; the VAE / VQGAN decode once per image, so packing them only adds the
        # reorder (SD 1.5 on Zen 4: decodes of 7.7-10.1 s packed against 6.9-8.1 s)
        stepped = [m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)
                   and name not in ("vae", "vqgan")]
        try:
            count = prepack_weights(*stepped)
        except RuntimeError as e:
            raise SystemExit(f"minidiff: --prepack: {e}") from None
        print(f"minidiff: --prepack: {count} convolution weights prepacked for oneDNN", file=sys.stderr)
    if a.lcm:
        from .assets import SMALL_LORA_DIR
        lora = a.lora or (SMALL_LORA_DIR if small else BUNDLED_LCM_LORA if bundled else None)
        if lora is None:
            raise SystemExit("minidiff: --lcm with --model needs --lora (e.g. latent-consistency/lcm-lora-sdv1-5)")
        pipe.load_lora_weights(lora, adapter_name="lcm", allow_pickle=a.allow_pickle)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    elif a.lora:
        pipe.load_lora_weights(a.lora, allow_pickle=a.allow_pickle)
    for path in a.embedding:
        pipe.load_textual_inversion(path, allow_pickle=a.allow_pickle)
    if a.sampler is not None:
        try:
            pipe.scheduler = scheduler_for(a.sampler, pipe.scheduler.config)
        except ValueError as e:
            raise SystemExit(f"minidiff: --sampler: {e}") from None
    if a.compile:  # nn.Module.compile (torch.compile in place): the first step compiles, later ones are fast
        if not isinstance(getattr(pipe, "unet", None), torch.nn.Module):
            raise SystemExit(f"minidiff: --compile compiles a UNet; {type(pipe).__name__} has none")
        pipe.unet.compile()
        print("minidiff: --compile: the first step compiles (minutes on a small CPU; cached for the next run)",
              file=sys.stderr)
    steps = a.steps or (4 if a.lcm else 25)
    guidance = a.guidance if a.guidance is not None else (1.0 if a.lcm else 5.0 if bundled else 7.5)
    generator = torch.Generator("cpu").manual_seed(a.seed)
    start = time.perf_counter()
    if getattr(a, "png_sampler", None) not in (None, type(pipe.scheduler).__name__):
        print(f"minidiff: the PNG names sampler {a.png_sampler!r}; this run uses the model's "
              f"{type(pipe.scheduler).__name__}", file=sys.stderr)
    clip_skip = a.clip_skip - 1 if a.clip_skip and a.clip_skip > 1 else None  # A1111's 2 is diffusers' 1
    accepted = inspect.signature(pipe.__call__).parameters
    if "prompt_syntax" in accepted:
        a.prompt_syntax = a.prompt_syntax or "a1111"
    elif a.prompt_syntax == "a1111" or clip_skip:
        raise SystemExit(f"minidiff: {type(pipe).__name__} reads prompts as plain text only (no --prompt-syntax "
                         "a1111, no --clip-skip)")
    else:  # Wuerstchen: its own CLIP-G prompt path, plain text
        a.prompt_syntax = "plain"
    extra = {"prompt_syntax": a.prompt_syntax, "clip_skip": clip_skip} if "prompt_syntax" in accepted else {}
    if a.sampler == "TCD":
        extra["eta"] = 0.3  # TCD's gamma: its step's default
    image = pipe(a.prompt, negative_prompt=a.negative, num_inference_steps=steps, guidance_scale=guidance,
                 width=a.width, height=a.height, generator=generator, **extra).images[0]
    seconds = time.perf_counter() - start
    info = PngImagePlugin.PngInfo()
    sampler = a.sampler or name_of(pipe.scheduler)
    info.add_text("parameters", png_parameters(a, steps, guidance, image.width, image.height, sampler,
                                               SMALL_NAME if small else
                                               "minidiff/shapes-sd (bundled)" if bundled else model,
                                               str(dtype).replace("torch.", "")))
    # a temporary file beside --out, moved into place when complete (never over a file that appeared meanwhile)
    from .output_file import write_new_file
    write_new_file(a.out, lambda f: image.save(f, format="PNG", pnginfo=info), overwrite=a.overwrite)
    print(f"wrote {a.out} ({image.width}x{image.height}, {steps} steps, {seconds:.2f} s)")


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.command == "generate":
        if a.from_png:
            apply_png(a)
        a.small = a.model == "small"
        a.model = None if a.small else a.model
        if a.small and a.lcm and a.lora is None:
            from .assets import SMALL_LORA_DIR
            if not os.path.isdir(SMALL_LORA_DIR):
                raise SystemExit(f"minidiff: --model small --lcm: its LCM-LoRA is not shipped ({SMALL_LORA_DIR}); "
                                 "pass --lora")
        a.seed = 0 if a.seed is None else a.seed
        check_args(a)
        try:
            with ops.use():  # what --kernels puts in the seam is taken out again when the image is done
                generate(a)
        except (ValueError, OSError, TypeError, RuntimeError, KeyError) as e:
            if a.verbose:
                raise
            # the library's messages say what is wrong and what to pass: one line, the traceback on --verbose
            message = " ".join(str(e).split()) or type(e).__name__
            raise SystemExit(f"minidiff: {message} (--verbose shows the traceback)") from None
    elif a.command == "compress":
        run_compress(a)
    elif a.command == "distill":
        from .distill.cli import run_distill
        run_distill(a)


# ----------------------------------------------------------------------------- minidiff compress

def add_compress(sub):
    """`minidiff compress analyse|apply`: mixed-bit palettisation (minidiff/compress.py)."""
    from .compress import MIN_SIZE
    c = sub.add_parser("compress", help="mixed-bit palettisation of a pipeline's UNet (Apple's recipe)")
    verbs = c.add_subparsers(dest="verb", required=True)
    an = verbs.add_parser("analyse", help="measure each layer's impact and write recipes (slow, resumable)")
    an.add_argument("--model", default=None, help="pipeline folder or Hub repo (default: the bundled model)")
    an.add_argument("--out", required=True, help="analysis JSON to write (resumed if it exists)")
    an.add_argument("--steps", type=int, default=4)
    an.add_argument("--guidance", type=float, default=None)
    an.add_argument("--min-size", type=int, default=None, help=f"smallest layer to palettise (default {MIN_SIZE}; "
                                                               "1000 for the bundled model)")
    an.add_argument("--group-size", type=int, default=None, help="output channels per LUT (default: one per tensor)")
    an.add_argument("--targets", default="6.5,4.5,3.4", help="average bit widths of the recipes to build")
    ap = verbs.add_parser("apply", help="palettise the UNet as a recipe says and write the pipeline folder")
    ap.add_argument("--model", default=None, help="pipeline folder (default: the bundled model)")
    ap.add_argument("--recipe", required=True, help="recipe JSON: an analysis file (with --selected-recipe) or "
                                                    "{layer: bits}")
    ap.add_argument("--selected-recipe", default=None)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--out", required=True, help="new folder for the compressed pipeline")


def _compress_pipeline(model):
    from .compress import BUNDLED
    from .pipelines import DiffusionPipeline
    return DiffusionPipeline.from_pretrained(model or BUNDLED), model or BUNDLED


def run_compress(a):
    import shutil

    from .compress import BUNDLED, MIN_SIZE, analyse, apply_recipe, read_recipe, save_palettised
    if a.verb == "analyse":
        if os.path.isdir(a.out):
            raise SystemExit(f"minidiff: --out {a.out} is a folder; name a .json file")
        targets = tuple(float(t) for t in a.targets.split(","))
        pipe, model = _compress_pipeline(a.model)
        kwargs = {"num_inference_steps": a.steps}
        if a.guidance is not None:
            kwargs["guidance_scale"] = a.guidance
        min_size = a.min_size if a.min_size is not None else (1000 if a.model is None else MIN_SIZE)
        res = analyse(pipe, a.out, min_size=min_size, group_size=a.group_size, targets=targets,
                      model_version=str(model), **kwargs)
        for k, v in res["baselines"].items():
            print(f"{k}: {v} dB")
        print(f"wrote {a.out}")
    else:
        if os.path.exists(a.out):
            raise SystemExit(f"minidiff: --out {a.out} exists; name a new folder")
        src = a.model or BUNDLED
        if not os.path.isdir(src):
            raise SystemExit(f"minidiff: --model {src!r} must be a local pipeline folder for compress apply")
        recipe = read_recipe(a.recipe, a.selected_recipe)
        from . import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet")
        stats = apply_recipe(unet, recipe, a.group_size, where=a.recipe)
        tmp = a.out.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("unet"))
        save_palettised(unet, os.path.join(tmp, "unet"), recipe)
        os.replace(tmp, a.out)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(a.out, "unet")) for f in fs)
        print(f"wrote {a.out}: UNet palettised to {stats['nbits']:.2f} bits on average over the recipe's layers, "
              f"{size / 1e6:.2f} MB on disk")


if __name__ == "__main__":
    main()
