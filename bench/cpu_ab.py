"""SD 1.5 UNet steps of several sides taken in turns in one process (issue 18): on a VM whose speed drifts
10-30% from minute to minute, alternating the sides step by step puts the drift on all of them alike, so the
ratios hold where separate processes' timings do not. Same random-weight SD 1.5 files as bench/cpu.py.

    python bench/cpu_ab.py --rounds 6 --batch 2 "minidiff fp32" "minidiff fp32 prepack" "diffusers fp32"
    python bench/cpu_ab.py --rounds 5 "minidiff bf16 channels_last" "diffusers bf16"

A side is "LIBRARY DTYPE [channels_last] [prepack] [onednn] [fuse] [views] [shared] [unfused] [cpuattn]" (minidiff or diffusers; fp32, bf16 or
fp16; onednn: the linears through oneDNN, minidiff.prepack.onednn_linears; prepack: that and the convolutions
prepacked; views: bf16 attention on the projections' strided views, as before ops.HEAD_MAJOR_FROM; shared: the
latents given once for guidance's two halves, as minidiff's pipelines give them (batch 2 only); unfused: GEGLU's
GELU and product as separate ops after oneDNN's matmul, as before prepack.onednn_geglu; cpuattn: attention through
the C++ AVX512_BF16 kernel, kernels.use("cpu"); --keep-freed:
the CLI's allocator setting, for every side). Prints
each side's median and min step time and its ratio to the first side's median, and the machine.
"""
import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402 (the SD 1.5 files' builder)

OPTIONS = {"channels_last", "prepack", "onednn", "fuse", "views", "shared", "unfused", "cpuattn"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check(spec):
    lib, dt, *options = spec.split() + [""]
    options = [o for o in options if o]
    if lib not in ("minidiff", "diffusers") or dt not in DTYPES or set(options) - OPTIONS:
        raise SystemExit(f"cpu_ab.py: side {spec!r}: want 'minidiff|diffusers fp32|bf16|fp16 [channels_last] "
                         "[prepack] [onednn] [fuse] [views] [shared] [unfused] [cpuattn]'")
    if set(options) - {"channels_last", "fuse"} and lib != "minidiff":
        raise SystemExit(f"cpu_ab.py: side {spec!r}: options but channels_last and fuse are minidiff's")
    return lib, dt, options


def load(spec, root):
    lib, dt, options = check(spec)
    model = __import__(lib).UNet2DConditionModel.from_pretrained(os.path.join(root, "unet"), torch_dtype=DTYPES[dt])
    model.eval()
    if "channels_last" in options:
        model.to(memory_format=torch.channels_last)
    if "prepack" in options:
        from minidiff.prepack import prepack_weights
        prepack_weights(model)
    if "onednn" in options:
        from minidiff.prepack import onednn_linears
        onednn_linears(model)
    if "fuse" in options:
        model.fuse_qkv_projections()
    return model, DTYPES[dt], options


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sides", nargs="+")
    p.add_argument("--rounds", type=int, default=6, help="timed steps per side (after one warm-up step each)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch: 2 = classifier-free guidance, 1 = LCM")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--keep-freed", action="store_true", help="minidiff.device.keep_freed_memory() first, as the CLI "
                   "does (process-wide: every side gets it)")
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minidiff-bench"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.keep_freed:
        from minidiff.device import keep_freed_memory
        keep_freed_memory()
    for spec in a.sides:
        if "shared" in check(spec)[2] and a.batch != 2:
            raise SystemExit(f"cpu_ab.py: side {spec!r}: shared needs --batch 2 (guidance's two halves)")
    # (checked before the 4 GB of files are built)
    root = os.path.join(a.cache, "sd15")
    bench.build_sd15(root)
    g = torch.Generator().manual_seed(0)
    x, c, t = torch.randn(a.batch, 4, 64, 64, generator=g), torch.randn(a.batch, 77, 768, generator=g), torch.tensor(500.0)
    from minidiff import ops
    head_major_from = ops.HEAD_MAJOR_FROM
    if any("cpuattn" in check(spec)[2] for spec in a.sides):
        from minidiff.kernels import cpu_attention
        cpu_attention.load()  # built before the timing
    sides = []
    for spec in a.sides:
        model, dtype, options = load(spec, root)
        layout = torch.channels_last if "channels_last" in options else torch.contiguous_format
        xs = (x[:1] if "shared" in options else x).to(dtype).contiguous(memory_format=layout)
        sides.append((spec, model, (xs, t, c.to(dtype)), [], options))
    print(f"# {bench.machine()}; {torch.get_num_threads()} threads; batch {a.batch}, 64x64 latents")
    with torch.no_grad():
        for _, model, args, _, _ in sides:
            model(*args)  # warm-up: oneDNN makes its kernels on the first call
        for r in range(a.rounds):
            for spec, model, args, times, options in (sides if r % 2 == 0 else sides[::-1]):
                ops.HEAD_MAJOR_FROM = float("inf") if "views" in options else head_major_from
                # any op in the seam but the reference itself turns the fused GEGLU off (unet_blocks.GEGLU)
                ops.geglu = (lambda h: ops.ref_geglu(h)) if "unfused" in options else ops.ref_geglu
                ops.attention = cpu_attention.attention if "cpuattn" in options else ops.ref_attention
                start = time.perf_counter()
                model(*args)
                times.append(time.perf_counter() - start)
    ops.HEAD_MAJOR_FROM, ops.geglu, ops.attention = head_major_from, ops.ref_geglu, ops.ref_attention
    base = statistics.median(sides[0][3])
    for spec, _, _, times, _ in sides:
        print(f"{spec:34s} median {statistics.median(times):7.3f} s  min {min(times):7.3f} s  "
              f"/ first {statistics.median(times) / base:.3f}  steps {[round(v, 2) for v in times]}")


if __name__ == "__main__":
    main()
