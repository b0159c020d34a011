"""The CLI's arguments, each checked before anything is loaded: the output file, numbers that must be finite
and in range, the device, the prompt's text, and that the model is one the CLI can run."""
import inspect
import math
import os

from .errors import ArgumentError
from .output_file import check_output_path
from .pipelines.arguments import MAX_SIDE, MAX_STEPS, check_memory, check_text, decode_bytes

MAX_SEED = 2 ** 64 - 1  # what torch.Generator.manual_seed takes
# what generate() passes to every pipeline it runs
CALL_ARGS = ("prompt", "num_inference_steps", "guidance_scale", "width", "height", "generator")


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
