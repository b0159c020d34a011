"""Where an SD 1.5 UNet step's time goes on a CPU, op by op: torch.profiler over one step (batch 2 or --batch 1, 64x64 latents,
random weights in the real config, bench/bench.py's files), after one warm-up step, per dtype.

    python bench/cpu_profile.py --dtypes auto bfloat16 float32 --threads 1 [--lib minidiff diffusers]

"auto" is minidiff's default (torch_dtype="auto": bf16 and channels_last on a CPU with bf16 units).

Prints, per library and dtype, the self CPU time by kind of op (convolution, matmul, attention (SDPA), group norm,
layer norm, GEGLU's gelu and product, SiLU, casts and copies, other elementwise), the top ops, and every cast or
copy with its input shapes (the hot path's conversions).
"""
import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402

KINDS = [  # (kind, op names) - the first kind whose names hold the op's name wins
    ("convolution", ("conv", "mkldnn_convolution", "_convolution")),
    ("attention (SDPA)", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    ("matmul (linear)", ("addmm", "aten::mm", "bmm", "matmul", "linear", "baddbmm")),
    ("group norm", ("group_norm",)),
    ("layer norm", ("layer_norm",)),
    ("GEGLU / GELU", ("gelu",)),
    ("SiLU", ("silu",)),
    ("casts and copies", ("copy_", "_to_copy", "aten::to", "contiguous", "clone", "cat", "empty_like")),
    ("elementwise (add, mul, ...)", ("add", "mul", "div", "sub", "cos", "sin", "exp")),
]


def kind_of(name):
    for kind, names in KINDS:
        if any(n in name for n in names):
            return kind
    return "other"


LEAVES = ("aten::mkldnn_convolution", "aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::native_group_norm", "aten::native_layer_norm", "aten::gelu", "aten::silu", "aten::silu_", "aten::copy_",
          "aten::add", "aten::add_", "aten::mul", "aten::div", "aten::cat", "aten::baddbmm")


def profile_step(lib, dtype, root, threads, batch=2):
    torch.set_num_threads(threads)
    if lib == "minidiff":
        from minidiff import UNet2DConditionModel
    else:
        from diffusers import UNet2DConditionModel
    m = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype)
    layout = "channels_last" if m.conv_in.weight.is_contiguous(memory_format=torch.channels_last) else "NCHW"
    dtype = m.dtype
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(batch, 4, 64, 64, generator=g).to(dtype), torch.randn(batch, 77, 768, generator=g).to(dtype)
    t = torch.tensor(500)
    with torch.no_grad():
        m(x, t, c)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            m(x, t, c)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    by_kind = collections.Counter()
    by_op = collections.Counter()
    counts = collections.Counter()
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
        by_op[e.key] += e.self_cpu_time_total
        counts[e.key] += e.count
    name = f"{lib} {str(dtype).replace('torch.', '')} {layout}"
    print(f"\n### {name}: one UNet step, batch {batch}, 64x64, {threads} thread(s): {total / 1e6:.2f} s of self CPU time "
          "(profiled)\n")
    print("| kind of op | s | share |\n| --- | ---: | ---: |")
    for kind, us in by_kind.most_common():
        print(f"| {kind} | {us / 1e6:.2f} | {us / total:.1%} |")
    print("\n| op | calls | s | share |\n| --- | ---: | ---: | ---: |")
    for op, us in by_op.most_common(14):
        print(f"| {op} | {counts[op]} | {us / 1e6:.3f} | {us / total:.1%} |")
    copies = [e for e in events if any(k in e.key for k in ("copy_", "_to_copy", "clone", "contiguous"))
              and e.self_cpu_time_total > 0]
    copies.sort(key=lambda e: -e.self_cpu_time_total)
    print("\ncasts and copies (self time; input shapes):\n")
    print("| op | calls | ms | input shapes |\n| --- | ---: | ---: | --- |")
    for e in copies[:12]:
        print(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | {str(e.input_shapes)[:120]} |")
    sys.stdout.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minidiff-bench"))
    p.add_argument("--dtypes", nargs="+", default=["auto", "bfloat16", "float32"])
    p.add_argument("--lib", nargs="+", default=["minidiff"], choices=["minidiff", "diffusers"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=2, help="UNet batch: 2 = classifier-free guidance, 1 = LCM")
    a = p.parse_args()
    root = os.path.join(a.cache, "sd15")
    bench.build_sd15(root)
    print(f"machine: {bench.machine()}")
    for lib in a.lib:
        for dtype in a.dtypes:
            profile_step(lib, dtype if dtype == "auto" else getattr(torch, dtype), root, a.threads, a.batch)


if __name__ == "__main__":
    main()
