"""Whole images on a GPU (issue 19): SD 1.5 at 512x512 and SDXL at 1024x1024, fp16, random weights in the real
configs, Euler, guidance 7.5, in each mode: no offload eager, compiled (`pipe.unet.compile()`), Triton kernels
(`kernels.use("triton")`), model CPU offload, sequential CPU offload. Prints one Markdown table:

| model | mode | first call (s) | image (s) | peak GPU memory (GiB) | max abs diff vs eager |

"first call" is a 2-step warm-up image (compiling, for the compiled row); "image" the timed N-step image;
peak GPU memory is torch.cuda.max_memory_allocated over that image (reset before it); the diff is against the
eager row's image, in [0, 1] pixel units. A row that fails prints its error in place of the figures.

    python bench/gpu_images.py                 # CUDA (bench/gpu.sh runs it)
    python bench/gpu_images.py --tiny          # the CPU dry run: tiny configs, fp32, device='cpu' as the
                                               # offload stand-in, kernels fall back to the references
"""
import argparse
import os
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import SD15_TEXT, SD15_UNET, SD15_VAE, SDXL_UNET  # noqa: E402  (the real configs, one copy)

from minidiff import (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, EulerDiscreteScheduler,  # noqa: E402
                      StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel, kernels)
from minidiff.models import clip, unet, vae  # noqa: E402
from minidiff.weights.single_file import clip_tokenizer  # noqa: E402

SDXL_TEXT = dict(SD15_TEXT, eos_token_id=2)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=1280,
                   bos_token_id=0, eos_token_id=2, pad_token_id=1)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, timestep_spacing="leading")
TINY_UNET = dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=8, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], sample_size=8)
TINY_XL_UNET = dict(TINY_UNET, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], cross_attention_dim=64,
                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8)
TINY_VAE = dict(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2, norm_num_groups=8,
                up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, layers_per_block=1)
TINY_TEXT = dict(SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32)
MODES = ["eager", "compiled", "kernels", "model offload", "sequential offload"]


class Skipped(Exception):
    pass


def random_(model, dtype):
    """Seeded random weights (matrices N(0, 0.02), norm scales 1, the rest 0), built straight in `dtype`."""
    g = torch.Generator().manual_seed(0)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return model.to(dtype).eval()


def build(cls, config_cls, config, dtype):
    fields = config_cls.__dataclass_fields__
    with torch.device("meta"):
        m = cls(config_cls(**{k: v for k, v in config.items() if k in fields}))
    return random_(m, dtype)


def pipeline(name, tiny, dtype):
    """The pipeline of `name` on the CPU in `dtype`, every model with random weights."""
    xl = name == "sdxl"
    u = build(UNet2DConditionModel, unet.UNet2DConditionConfig,
              (TINY_XL_UNET if xl else TINY_UNET) if tiny else (SDXL_UNET if xl else SD15_UNET), dtype)
    v_cfg = dict(TINY_VAE if tiny else SD15_VAE, **({"scaling_factor": 0.13025, "force_upcast": True} if xl else {}))
    v = build(AutoencoderKL, vae.AutoencoderKLConfig, v_cfg, dtype)
    te_cfg = TINY_TEXT if tiny else (SDXL_TEXT if xl else SD15_TEXT)
    te = build(CLIPTextModel, clip.CLIPTextConfig, te_cfg, dtype)
    sched = EulerDiscreteScheduler(**SCHEDULER)
    if not xl:
        return StableDiffusionPipeline(vae=v, text_encoder=te, tokenizer=clip_tokenizer("<|endoftext|>"), unet=u,
                                       scheduler=sched)
    te2 = build(CLIPTextModelWithProjection, clip.CLIPTextConfig, TINY_TEXT if tiny else SDXL_TEXT_2, dtype)
    return StableDiffusionXLPipeline(vae=v, text_encoder=te, text_encoder_2=te2, tokenizer=clip_tokenizer("<|endoftext|>"),
                                     tokenizer_2=clip_tokenizer("!"), unet=u, scheduler=sched)


def image(pipe, side, steps, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = pipe("a photo of a cat", height=side, width=side, num_inference_steps=steps, guidance_scale=7.5,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def row(pipe, mode, side, steps, device, compile_ok):
    """(first call s, image s, peak GiB or None, image) of one mode; the pipeline is left in its plain state."""
    pipe.remove_all_hooks()
    if mode.endswith("offload"):
        pipe.to("cpu")
        getattr(pipe, "enable_model_cpu_offload" if mode == "model offload" else "enable_sequential_cpu_offload")(
            device=device)
    else:
        pipe.to(device)
    if mode == "compiled":
        if not compile_ok:
            raise Skipped("skipped (--no-compile)")
        pipe.unet.compile(fullgraph=True)
    impl = "triton" if mode == "kernels" and device == "cuda" else "reference"  # CPU: the switch, the references
    try:
        with kernels.use(impl):
            _, first = image(pipe, side, 2, device)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            out, secs = image(pipe, side, steps, device)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    finally:
        pipe.unet._compiled_call_impl = None  # nn.Module.compile's undo
        pipe.remove_all_hooks()
    return first, secs, peak, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd15", "sdxl", "all"], default="all")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", nargs="*", default=MODES, choices=MODES)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    print(f"# whole images, Euler {a.steps} steps, guidance 7.5: "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, {dtype}, torch {torch.__version__}"
          + ("" if device == "cuda" else "; no CUDA: offload to device='cpu' (the stand-in), kernels = references, "
                                         "memory n/a"))
    print("| model | mode | first call (s) | image (s) | peak GPU memory (GiB) | max abs diff vs eager |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in ["sd15", "sdxl"] if a.model == "all" else [a.model]:
        pipe = pipeline(name, a.tiny, dtype)
        pipe.set_progress_bar_config(disable=True)
        side = (64 if a.tiny else 1024) if name == "sdxl" else (64 if a.tiny else 512)
        results = {}
        for mode in sorted(a.modes, key=lambda m: m != "eager"):  # eager first: the reference image
            torch._dynamo.reset()
            try:
                results[mode] = row(pipe, mode, side, a.steps, device, not a.no_compile)
            except Skipped as e:
                results[mode] = str(e)
            except Exception as e:  # noqa: BLE001  (one failed row must not end the run)
                results[mode] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                traceback.print_exc(file=sys.stderr)
        ref = results.get("eager")
        for mode in a.modes:
            r = results[mode]
            if isinstance(r, str):
                print(f"| {name} | {mode} | {r} | | | |", flush=True)
                continue
            first, secs, peak, out = r
            diff = f"{np.abs(out - ref[3]).max():.1e}" if not isinstance(ref, (str, type(None))) else "n/a"
            print(f"| {name} | {mode} | {first:.2f} | {secs:.2f} | {'n/a' if peak is None else f'{peak:.2f}'} | "
                  f"{diff} |", flush=True)
        del pipe


if __name__ == "__main__":
    main()
