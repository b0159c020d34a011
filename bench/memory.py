"""Peak memory (issues 18 and 19): every row is one fresh process, run one at a time, measured from inside.

    python bench/memory.py sd15    # a whole 512x512 SD 1.5 image (1 Euler step, guidance 7.5): minidiff default
                                   # (torch_dtype="auto"), fp32, and bf16 computed layerwise from the fp32
                                   # weights; diffusers fp32 and bf16; fp32 files
    python bench/memory.py sdxl    # one SDXL UNet step (batch 2, 64x64 latents) from an fp16 file, each mode:
                                   # cast up front (fp32, bf16), layerwise casting (fp32, bf16), diffusers' modes
    python bench/memory.py sdxl --rows "layerwise fp32"   # only the rows whose name holds these words
                                   # (the "diffusers: cast up front to fp32" row peaks near 15 GB of RSS)

Random weights in the real layouts: SD 1.5 saved by diffusers in fp32 (bench/bench.py's build_sd15); SDXL's
UNet written tensor by tensor in fp16 from diffusers' own state-dict layout (no 10 GB model in memory).

Measures, in MB: peak RSS is the kernel's VmHWM (every page the process had resident at once, file-backed
pages of memory-mapped weights included: what `top` and the OOM killer see); peak anonymous RSS is RssAnon
sampled every 5 ms by a thread (memory the process owns; mapped file pages are the shared, reclaimable page
cache and are not in it); "anon after" is RssAnon once the call returned. All above a bare interpreter with the
library imported. Load is the wall time of from_pretrained (files in the page cache).
"""
import argparse
import json
import math
import os
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (the real configs, build_sd15, machine())

CHILD = r"""
import json, os, sys, threading, time
import torch
torch.set_num_threads({threads})
sys.path.insert(0, {here!r})
{imports}

def status():
    with open("/proc/self/status") as f:
        return {{l.split(":")[0]: int(l.split()[1]) / 1024 for l in f if l.startswith(("VmHWM", "RssAnon", "RssFile"))}}

base = status()
peak = {{"RssAnon": 0.0, "RssFile": 0.0}}
done = False
def sample():
    while not done:
        s = status()
        for k in peak:
            peak[k] = max(peak[k], s[k])
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
{load}
load_s = time.perf_counter() - t
with torch.no_grad():
{setup}
    t = time.perf_counter()
{call}
    call_s = time.perf_counter() - t
done = True
end = status()
print("RESULT", json.dumps({{"peak_rss": end["VmHWM"] - base["VmHWM"], "peak_anon": peak["RssAnon"] - base["RssAnon"],
                             "peak_file": peak["RssFile"], "anon_after": end["RssAnon"] - base["RssAnon"],
                             "load": load_s, "call": call_s}}))
"""


def indent(code, n):
    return "\n".join(" " * n + line for line in code.strip().splitlines())


def run(name, imports, load, setup, call, threads):
    code = CHILD.format(threads=threads, here=HERE, imports=imports, load=load, setup=indent(setup, 4),
                        call=indent(call, 4))
    # from "/": `python -c` puts the working folder first on sys.path, and PYTHONPATH must pick the minidiff measured
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    if proc.returncode:
        raise RuntimeError(f"{name}: child failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1].split(" ", 1)[1])
    print(f"  {name}: {res}", file=sys.stderr, flush=True)
    return res


def table(title, rows, a):
    print(f"\n## {title}\n\nmachine: {bench.machine()}, {a.threads} threads, load average {os.getloadavg()[0]:.1f} at the "
          "end; one fresh process per row, run one at a time\n")
    print("| mode | peak RSS (MB) | peak anonymous RSS (MB) | peak file-backed RSS (MB) | anon after (MB) | load (s) | call (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows:
        print(f"| {name} | {r['peak_rss']:.0f} | {r['peak_anon']:.0f} | {r['peak_file']:.0f} | {r['anon_after']:.0f} | "
              f"{r['load']:.2f} | {r['call']:.1f} |")
    sys.stdout.flush()


def pick(rows, a):
    return [r for r in rows if not a.rows or any(w in r[0] for w in a.rows)]


# ---- SD 1.5: a whole image -------------------------------------------------------------------------------

def sd15(a):
    root = os.path.join(a.cache, "sd15")
    bench.build_sd15(root)
    sides = {"minidiff default (torch_dtype='auto': bf16 here)": ("minidiff", "'auto'"),
             "minidiff fp32": ("minidiff", "torch.float32"),
             "minidiff layerwise fp32 file -> bf16 compute": ("minidiff", "torch.float32"),
             "diffusers fp32 (its default)": ("diffusers", "torch.float32"),
             "diffusers bf16": ("diffusers", "torch.bfloat16")}
    rows = []
    for name, (lib, dtype) in pick(list(sides.items()), a):
        extra = ", safety_checker=None" if lib == "diffusers" else ""
        rows.append((name, run(
            name, f"from {lib} import StableDiffusionPipeline as C, EulerDiscreteScheduler as E",
            f"p = C.from_pretrained({root!r}, torch_dtype={dtype}{extra})"
            + ("\np.enable_layerwise_casting(storage_dtype=torch.float32, compute_dtype=torch.bfloat16)"
               if "layerwise" in name else ""),
            "p.scheduler = E.from_config(p.scheduler.config)\np.set_progress_bar_config(disable=True)",
            f"p('a photo of a cat', num_inference_steps={a.steps}, guidance_scale=7.5, "
            "generator=torch.Generator().manual_seed(0))", a.threads)))
    table(f"SD 1.5, whole 512x512 image, {a.steps} Euler step(s), guidance 7.5 (fp32 files)", rows, a)


# ---- SDXL: one UNet step from an fp16 file -------------------------------------------------------------------

def write_fp16_unet(folder, config, seed=0):
    """diffusers' UNet state-dict layout for `config` (built on the meta device), written tensor by tensor in
    fp16 with seeded random values (matrices N(0, 0.02), norm scales 1, biases 0), plus its config.json."""
    import torch
    import diffusers
    if os.path.exists(os.path.join(folder, "config.json")):
        return
    os.makedirs(folder, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in diffusers.UNet2DConditionModel(**config).state_dict().items()}
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2 * math.prod(shape)
        header[k] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    with open(path + ".partial", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k, shape in shapes.items():
            if len(shape) > 1:
                t = torch.randn(shape, generator=g).mul_(0.02)
            else:
                t = torch.full(shape, 1.0 if k.endswith("weight") else 0.0)
            f.write(t.half().numpy().tobytes())
    os.rename(path + ".partial", path)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.39.0", **config}, f)


# diffusers' layerwise casting needs the model loaded in the compute dtype (10 GB here); from the fp16 load its
# norms stay fp16 and fail against fp32 activations, so they (every module but Linear/Conv) are cast by hand.
DIFFUSERS_LAYERWISE = """m = C.from_pretrained({folder!r}, torch_dtype=torch.float16)
for mod in m.modules():
    if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
        for p in mod.parameters(recurse=False): p.data = p.data.float()
m.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32, skip_modules_pattern=())"""


def sdxl(a):
    folder = os.path.join(a.cache, "sdxl-fp16", "unet")
    write_fp16_unet(folder, bench.SDXL_UNET)
    s = a.side
    setup = (f"x, c = torch.randn(2, 4, {s}, {s}), torch.randn(2, 77, 2048)\n"
             "added = {'text_embeds': torch.randn(2, 1280), 'time_ids': torch.tensor([[1024., 1024, 0, 0, 1024, 1024]] * 2)}\n"
             "x, c = x.to(m.dtype), c.to(m.dtype)\nadded = {k: v.to(m.dtype) for k, v in added.items()}")
    mini, diff = "from minidiff import UNet2DConditionModel as C", "from diffusers import UNet2DConditionModel as C"
    layerwise = ("m = C.from_pretrained({f!r}, torch_dtype=torch.float16)\n"
                 "m.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype={d})")
    modes = [
        ("minidiff: cast up front to fp32", mini, f"m = C.from_pretrained({folder!r}, torch_dtype=torch.float32)"),
        ("minidiff: cast up front to bf16", mini, f"m = C.from_pretrained({folder!r}, torch_dtype=torch.bfloat16)"),
        ("minidiff: layerwise fp16 -> fp32", mini, layerwise.format(f=folder, d="torch.float32")),
        ("minidiff: layerwise fp16 -> bf16", mini, layerwise.format(f=folder, d="torch.bfloat16")),
        ("diffusers: cast up front to fp32", diff, f"m = C.from_pretrained({folder!r}, torch_dtype=torch.float32)"),
        ("diffusers: cast up front to bf16", diff, f"m = C.from_pretrained({folder!r}, torch_dtype=torch.bfloat16)"),
        ("diffusers: layerwise fp16 -> fp32 (norms cast by hand)", diff, DIFFUSERS_LAYERWISE.format(folder=folder)),
    ]
    rows = [(name, run(name, imports, load, setup, "m(x, 500, c, added_cond_kwargs=added)", a.threads))
            for name, imports, load in pick(modes, a)]
    table(f"SDXL UNet, one step, batch 2, {s}x{s} latents, from an fp16 file "
          f"({os.path.getsize(os.path.join(folder, 'diffusion_pytorch_model.safetensors')) / 2 ** 20:.0f} MB)", rows, a)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["sd15", "sdxl"])
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minidiff-bench"))
    p.add_argument("--steps", type=int, default=1, help="Euler steps of the SD 1.5 image")
    p.add_argument("--side", type=int, default=64, help="SDXL latent side (64: 512x512 pixels)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rows", nargs="*", help="only the rows whose name holds one of these words")
    a = p.parse_args()
    {"sd15": sd15, "sdxl": sdxl}[a.which](a)


if __name__ == "__main__":
    main()
