"""One UNet step (batch 2, classifier-free guidance) of SD 1.5 at 512x512 and SDXL at 1024x1024, random
weights in the real configs, in each mode: eager, torch.compile, Triton kernels, kernels + compile.
Prints a table: median ms per step and peak GPU memory (torch.cuda.max_memory_allocated) per mode.

    python bench/unet_step.py                  # CUDA, fp16, both models
    python bench/unet_step.py --tiny           # the CPU dry run: tiny configs, fp32, same code path
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import SD15_UNET, SDXL_UNET  # noqa: E402  (the real configs, one copy)

from minidiff import kernels  # noqa: E402
from minidiff.models import unet  # noqa: E402

TINY = dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
TINY_XL = dict(TINY, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
               use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=32 + 6 * 8)


def case(name, tiny, device, dtype):
    """(model, inputs) for one step: latents, timestep, text states (+ SDXL's pooled text and time ids)."""
    xl = name == "sdxl"
    config = (TINY_XL if xl else TINY) if tiny else {k: v for k, v in (SDXL_UNET if xl else SD15_UNET).items() if k != "sample_size"}
    with torch.device("meta"):  # no fp32 copy on the host: the weights are made on the device
        m = unet.UNet2DConditionModel(unet.UNet2DConditionConfig(**config))
    m = m.to_empty(device=device)
    with torch.no_grad():  # random weights (the real ones are not needed to time a step); norm scales 1
        for pname, p in m.named_parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0 if pname.endswith("norm.weight") or ".norm" in pname and pname.endswith("weight") else 0.0)
        for b in m.buffers():
            raise RuntimeError("bench/unet_step.py: the UNet now has buffers; initialise them here")
    m = m.to(dtype).eval()
    side = 16 if tiny else (128 if xl else 64)
    ctx = (32 if tiny else 2048 if xl else 768)
    args = (torch.randn(2, 4, side, side, device=device, dtype=dtype), torch.tensor([500.0, 500.0], device=device),
            torch.randn(2, 77, ctx, device=device, dtype=dtype))
    kw = {}
    if xl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32 if tiny else 1280, device=device, dtype=dtype),
                                   "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=device, dtype=dtype)}
    return m, args, kw


def step_ms(fn, args, kw, repeat, device):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn(*args, **kw)
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn(*args, **kw)
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sd15", "sdxl", "all"], default="all")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    print(f"# UNet step, batch 2: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, {dtype}, torch {torch.__version__}"
          + ("" if device == "cuda" else "; no CUDA: 'kernels' runs the references, memory n/a"))
    print("| model | mode | ms / step | peak GPU memory (GiB) | max abs diff vs eager |")
    print("| --- | --- | --- | --- | --- |")
    modes = [("eager", "reference", False), ("compiled", "reference", True), ("kernels", "triton", False),
             ("kernels + compiled", "triton", True)]
    for name in ["sd15", "sdxl"] if a.model == "all" else [a.model]:
        m, args, kw = case(name, a.tiny, device, dtype)
        ref = None
        for mode, impl, compiled in modes:
            if compiled and a.no_compile:
                continue
            if impl == "triton" and device != "cuda":
                impl = "reference"  # CPU tensors take the reference anyway; the row checks the switch
            torch._dynamo.reset()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with kernels.use(impl), torch.no_grad():
                fn = torch.compile(m, fullgraph=True) if compiled else m
                ms = step_ms(fn, args, kw, a.repeat, device)
                out = fn(*args, **kw).sample
            peak = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f}" if device == "cuda" else "n/a"
            ref = out if ref is None else ref
            print(f"| {name} | {mode} | {ms:.1f} | {peak} | {(out.float() - ref.float()).abs().max().item():.2e} |", flush=True)
        del m


if __name__ == "__main__":
    main()
