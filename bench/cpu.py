"""CPU speed (issue 18): whole 512x512 SD 1.5 images, minidiff's default, each dtype and compiled, against
diffusers fp32 and bf16, on the same random-weight SD 1.5 files (the Hub layout, bench/bench.py builds them),
in fresh processes taking turns.

    python bench/cpu.py speed --threads 1 --reps 1 --lcm-reps 2 --log /work/notes/speed-bench.jsonl
    python bench/cpu.py table --log /work/notes/speed-bench.jsonl [more.jsonl]   # the tables again (+ peers)
    python bench/cpu.py error                          # bf16 (and layouts) against fp32 eager, one process

Two runs per side: 20 Euler steps at guidance 7.5 (classifier-free guidance: UNet batch 2, 64x64 latents) and
4 LCM steps at guidance 1 (LCMScheduler on the same UNet: an LCM-shaped run, batch 1; the random UNet is not
LCM-distilled, so only the cost is real). Each process loads the whole pipeline (timed: load), makes one
image (timed: whole image), and step-end callbacks plus a hook on the text encoder split the image into text
encoding, UNet steps (the median of steps 2..n; step 1 holds one-off costs, e.g. compiling) and the VAE decode
(the last step's end to the image: decode and postprocess). Each of these is measured as wall time and as the
process's CPU time (getrusage user + sys, its own and its finished children's: the C++ compiler of
torch.compile): with the thread count fixed, CPU time barely moves when other jobs
share the machine, wall time does. Peak RSS is the process's VmHWM (file-backed pages of the mapped weights
included), anon RSS the memory it owns at the end. The load average is recorded at each process's start.

Sides: "minidiff default" is the library's torch_dtype="auto" (the fast dtype, layout and linears: bf16 on a CPU
where bf16 is fast, so "minidiff bf16" is the same run there and is left out unless named); "minidiff CLI
default" and "minidiff CLI fp32" are what `minidiff generate` runs with --dtype auto and --dtype float32 (its
allocator setting first, device.keep_freed_memory; the linears on oneDNN where measured faster; the fast layout,
which fp32 leaves NCHW); "minidiff compiled" is the default plus
`pipe.unet.compile()`; compile time = step 1 - the median step. The compiled side's inductor cache
(TORCHINDUCTOR_CACHE_DIR) starts empty for each benchmark: its first process compiles cold, later ones (the
same shapes) read the cache. Ratios are against diffusers fp32, diffusers' default.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402 (the SD 1.5 configs and the builder of the random-weight files)

MAX_RSS_MB = 8000  # a child past this is killed (the machine's memory is shared)

CLI_ALLOCATOR = "from minidiff.device import keep_freed_memory; keep_freed_memory()"  # what the CLI does first
CLI_FAST = ("from minidiff.device import use_fast_layout, use_fast_linear; "  # the CLI's layout and linears,
            "[(use_fast_layout(m), use_fast_linear(m)) for m in p.modules()]")  # for any dtype

# side: (library, torch_dtype expression, what is done to the loaded pipeline `p`[, what runs before loading])
SIDES = {
    # as `minidiff generate` runs them: its allocator setting, "auto" (dtype, layout, linears) or --dtype float32
    "minidiff CLI default": ("minidiff", "'auto'", "", CLI_ALLOCATOR),
    "minidiff CLI fp32": ("minidiff", "torch.float32", CLI_FAST, CLI_ALLOCATOR),
    "minidiff CLI prepack": ("minidiff", "'auto'", "from minidiff.prepack import prepack_weights; "
                             "prepack_weights(p.unet)", CLI_ALLOCATOR),  # --prepack (the VAE decodes once)
    "minidiff CLI cpu kernel": ("minidiff", "'auto'", "", CLI_ALLOCATOR + "; from minidiff import kernels; "
                                "kernels.use('cpu')"),  # --kernels cpu (the C++ attention; built before the timing)
    "minidiff CLI fp32 cpu kernel": ("minidiff", "torch.float32", CLI_FAST, CLI_ALLOCATOR + "; from minidiff "
                                     "import kernels; kernels.use('cpu')"),  # --dtype float32 --kernels cpu
    "minidiff default": ("minidiff", "'auto'", ""),
    "minidiff fp32": ("minidiff", "torch.float32", ""),
    "minidiff bf16": ("minidiff", "torch.bfloat16", ""),
    "minidiff compiled": ("minidiff", "'auto'", "p.unet.compile()"),
    "diffusers fp32": ("diffusers", "torch.float32", ""),
    "diffusers bf16": ("diffusers", "torch.bfloat16", ""),
    # options, run when named with --sides
    "minidiff bf16 channels_last": ("minidiff", "torch.bfloat16",
                                    "p.unet.to(memory_format=torch.channels_last); p.vae.to(memory_format=torch.channels_last)"),
    "minidiff bf16 fused qkv": ("minidiff", "torch.bfloat16", "p.fuse_qkv_projections()"),
    "minidiff fp32 compiled": ("minidiff", "torch.float32", "p.unet.compile()"),
    "diffusers bf16 compiled": ("diffusers", "torch.bfloat16", "p.unet.compile()"),
}
DEFAULT_SIDES = ["minidiff default", "minidiff fp32", "minidiff compiled", "diffusers fp32", "diffusers bf16"]

RUNS = {  # name: (steps, guidance, scheduler class)
    "euler20": (20, 7.5, "EulerDiscreteScheduler"),
    "lcm4": (4, 1.0, "LCMScheduler"),
}
TITLES = {"euler20": "whole 512x512 image, 20 Euler steps, guidance 7.5 (UNet batch 2)",
          "lcm4": "whole 512x512 image, 4 LCM steps, guidance 1 (LCMScheduler, same UNet, batch 1)"}

CHILD = r"""
import json, os, resource, statistics, sys, time
import torch
torch.set_num_threads({threads})

def cpu():  # this process and its finished children (inductor's C++ compiler runs)
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key + ":")) / 1024

marks = []  # (what, wall, cpu)
def mark(what):
    marks.append((what, time.perf_counter(), cpu()))

out = dict(loadavg_start=os.getloadavg()[0], threads=torch.get_num_threads())
{before}
from {lib} import StableDiffusionPipeline, {scheduler} as S
mark("start")
p = StableDiffusionPipeline.from_pretrained({root!r}, torch_dtype={dtype}{extra})
mark("loaded")
p.scheduler = S.from_config(p.scheduler.config)
p.set_progress_bar_config(disable=True)
{option}
p.text_encoder.register_forward_hook(lambda *a: mark("text"))
def on_step(pipe, i, t, kw):
    mark("step")
    return kw
mark("call")
with torch.no_grad():
    img = p("a photo of a cat", num_inference_steps={steps}, guidance_scale={guidance}, output_type="np",
            generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step).images
mark("end")
import numpy as np
np.save({image!r}, np.asarray(img[0], dtype=np.float32))
at = {{}}
for what, w, c in marks:
    at.setdefault(what, []).append((w, c))
text_end = at["text"][-1]
steps = [at["text"][-1]] + at["step"]
step_w = [b[0] - a[0] for a, b in zip(steps, steps[1:])]
step_c = [b[1] - a[1] for a, b in zip(steps, steps[1:])]
d = lambda a, b, k: b[k] - a[k]
out.update(
    load=d(at["start"][0], at["loaded"][0], 0), load_cpu=d(at["start"][0], at["loaded"][0], 1),
    image=d(at["call"][0], at["end"][0], 0), image_cpu=d(at["call"][0], at["end"][0], 1),
    text=d(at["call"][0], text_end, 0), text_cpu=d(at["call"][0], text_end, 1),
    steps=step_w, steps_cpu=step_c,
    step=statistics.median(step_w[1:] or step_w), step_cpu=statistics.median(step_c[1:] or step_c),
    decode=d(at["step"][-1], at["end"][0], 0), decode_cpu=d(at["step"][-1], at["end"][0], 1),
    peak_rss=status("VmHWM"), anon_rss=status("RssAnon"), loadavg_end=os.getloadavg()[0],
    image_mean=float(img.mean()), image_std=float(img.std()))
out["first_step_extra"] = step_w[0] - out["step"]
print("RESULT", json.dumps(out))
"""


def watch(proc, limit_mb, killed):
    """Poll the child's RSS; kill it past `limit_mb` (the box is shared: one run must not take it all)."""
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
            if rss > limit_mb:
                killed.append(rss)
                proc.kill()
        except (OSError, StopIteration):
            pass
        time.sleep(0.5)


def run_child(code, env, limit_mb=MAX_RSS_MB):
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    killed = []
    t = threading.Thread(target=watch, args=(proc, limit_mb, killed), daemon=True)
    t.start()
    stdout, stderr = proc.communicate()
    if killed:
        raise RuntimeError(f"child killed at {killed[0]:.0f} MB RSS (limit {limit_mb} MB)")
    if proc.returncode:
        raise RuntimeError(f"child failed (rc {proc.returncode}):\n{stderr[-3000:]}")
    return json.loads(next(l for l in stdout.splitlines()[::-1] if l.startswith("RESULT ")).split(" ", 1)[1])


def measure(side, run, root, threads, cache_dir, image_dir):
    lib, dtype, option, *before = SIDES[side]
    steps, guidance, scheduler = RUNS[run]
    code = CHILD.format(threads=threads, lib=lib, before="".join(before), scheduler=scheduler, root=root, dtype=dtype,
                        extra=", safety_checker=None" if lib == "diffusers" else "", option=option,
                        steps=steps, guidance=guidance,
                        image=os.path.join(image_dir, f"{run}-{side.replace(' ', '_')}.npy"))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TORCHINDUCTOR_CACHE_DIR=cache_dir, TORCHINDUCTOR_COMPILE_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    return run_child(code, env)


def speed(a):
    root = a.root or os.path.join(a.cache, "sd15")
    if not a.root:
        bench.build_sd15(root)
    for dirpath, _, files in os.walk(root):  # the files into the page cache, once, for every side alike
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass
    sides = a.sides or [s for s in DEFAULT_SIDES]
    unknown = [s for s in sides + (a.lcm_sides or []) if s not in SIDES]
    if unknown:
        raise SystemExit(f"--sides {unknown}: not a side; the sides are {list(SIDES)}")
    cache_dir = os.path.join(a.cache, "inductor-cache")
    shutil.rmtree(cache_dir, ignore_errors=True)  # the first compiled process compiles cold
    image_dir = os.path.join(a.cache, "images")
    os.makedirs(image_dir, exist_ok=True)
    lcm_sides = a.lcm_sides or sides
    plan = []
    for rep in range(max(a.reps, a.lcm_reps)):
        def turn(names):  # each rep starts one side later
            return names[rep % len(names):] + names[:rep % len(names)]
        if rep < a.reps:
            plan += [("euler20", s, rep) for s in turn(sides)]
        if rep < a.lcm_reps:
            plan += [("lcm4", s, rep) for s in turn(lcm_sides)]
    print(f"machine: {bench.machine()}; {a.threads} threads; {len(plan)} processes", file=sys.stderr, flush=True)
    for run, side, rep in plan:
        try:
            r = measure(side, run, root, a.threads, cache_dir, image_dir)
        except RuntimeError as e:
            r = {"error": str(e)[-1500:]}
        r.update(side=side, run=run, rep=rep, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 machine=bench.machine())
        with open(a.log, "a") as f:
            f.write(json.dumps(r) + "\n")
        brief = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k not in ("steps", "steps_cpu", "machine")}
        print(f"  {run} | {side} | {brief}", file=sys.stderr, flush=True)
    table(a.log)


def table(*logs):
    """The markdown tables of one or more JSONL logs (medians over reps; ratios against diffusers fp32)."""
    rows = []
    for log in logs:
        with open(log) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    machine = next((r["machine"] for r in rows if "machine" in r), "?")
    loads = [r["loadavg_start"] for r in rows if "loadavg_start" in r]
    dates = sorted(r["date"] for r in rows if "date" in r)
    threads = sorted({r["threads"] for r in rows if "threads" in r})
    print(f"machine: {machine}; threads {threads}; {dates[0] if dates else ''} to {dates[-1] if dates else ''}; "
          f"load average at the processes' starts {min(loads, default=0):.1f}-{max(loads, default=0):.1f}\n")
    for run in RUNS:
        by = {}
        for r in rows:
            if r.get("run") == run:
                by.setdefault(r["side"], []).append(r)
        if not by:
            continue
        ok = {s: [r for r in rs if "error" not in r] for s, rs in by.items()}
        med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
               for s, rs in ok.items() if rs}
        ref = med.get("diffusers fp32")

        def ratio(s, k):
            return f"{med[s][k] / ref[k]:.2f}" if ref and ref.get(k) else "-"

        print(f"### {TITLES[run]}\n")
        print("| side | runs | load s | image s | / diffusers fp32 | image CPU s | / diffusers fp32 | "
              "peak RSS MB | anon RSS MB | load avg |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for s in by:
            if s not in med:
                print(f"| {s} | 0 | failed: {by[s][-1]['error'].splitlines()[-1][:200]} |||||||")
                continue
            m = med[s]
            print(f"| {s} | {len(ok[s])} | {m['load']:.1f} | {m['image']:.1f} | {ratio(s, 'image')} | {m['image_cpu']:.1f} | "
                  f"{ratio(s, 'image_cpu')} | {m['peak_rss']:.0f} | {m['anon_rss']:.0f} | {m['loadavg_start']:.1f} |")
        print("\n| side | UNet step s | / diffusers fp32 | step CPU s | / diffusers fp32 | VAE decode s | "
              "/ diffusers fp32 | decode CPU s | / diffusers fp32 | step 1 extra s (compile) |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for s, m in med.items():
            first = ", ".join(f"{r['first_step_extra']:.1f}" for r in ok[s])
            print(f"| {s} | {m['step']:.2f} | {ratio(s, 'step')} | {m['step_cpu']:.2f} | {ratio(s, 'step_cpu')} | "
                  f"{m['decode']:.1f} | {ratio(s, 'decode')} | {m['decode_cpu']:.1f} | {ratio(s, 'decode_cpu')} | {first} |")
        print()


def error(a):
    """Relative error (max |diff| / max |ref|, and RMS / RMS) of each variant's UNet step against fp32 eager."""
    import torch
    from minidiff import UNet2DConditionModel, ops, prepack
    torch.set_num_threads(a.threads)
    root = os.path.join(a.cache, "sd15")
    bench.build_sd15(root)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
    m = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    with torch.no_grad():
        ref = m(x, 500, c).sample
        variants = {"fp32 channels_last": (torch.float32, "cl"), "fp32 fused qkv": (torch.float32, "fused"),
                    "fp32 oneDNN linears (GEGLU inside the matmul)": (torch.float32, "onednn"),
                    "bf16": (torch.bfloat16, ""), "bf16 channels_last": (torch.bfloat16, "cl"),
                    "bf16 fused qkv": (torch.bfloat16, "fused"),
                    "bf16 channels_last oneDNN linears (the default)": (torch.bfloat16, "cl onednn"),
                    "bf16 channels_last oneDNN linears, GEGLU unfused": (torch.bfloat16, "cl onednn unfused")}
        from minidiff.kernels import cpu_attention
        if cpu_attention.missing() is None:  # the C++ attention kernel where it runs (kernels.use("cpu"))
            variants["bf16 default + CPU attention kernel"] = (torch.bfloat16, "cl onednn cpuattn")
        for name, (dtype, option) in variants.items():
            option = option.split()
            m.unfuse_qkv_projections()
            prepack.unpack_weights(m)
            layout = torch.channels_last if "cl" in option else torch.contiguous_format
            m.to(dtype=dtype, memory_format=layout)
            if "fused" in option:
                m.fuse_qkv_projections()
            if "onednn" in option:
                prepack.onednn_linears(m)
            # any geglu in the seam but the reference turns the fused GEGLU off (unet_blocks.GEGLU)
            ops.geglu = (lambda h: ops.ref_geglu(h)) if "unfused" in option else ops.ref_geglu
            ops.attention = cpu_attention.attention if "cpuattn" in option else ops.ref_attention
            xi = x.to(dtype, memory_format=layout)
            out = m(xi, 500, c.to(dtype)).sample.float()
            ops.geglu, ops.attention = ops.ref_geglu, ops.ref_attention
            d = out - ref
            print(f"| {name} | {d.abs().max() / ref.abs().max():.2e} | {d.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt():.2e} |",
                  flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["speed", "table", "error"])
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "minidiff-bench"))
    p.add_argument("--root", help="another pipeline folder instead of the SD 1.5 files (a quick dry run)")
    p.add_argument("--reps", type=int, default=1, help="alternating processes per side, 20 Euler steps")
    p.add_argument("--lcm-reps", type=int, default=2, help="alternating processes per side, 4 LCM steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every process (fixed)")
    p.add_argument("--sides", nargs="*", help=f"the sides to run (default {DEFAULT_SIDES}; all: {list(SIDES)})")
    p.add_argument("--lcm-sides", nargs="*", help="the sides of the LCM run, if not --sides (a side named twice runs "
                   "twice: 'minidiff compiled' twice measures a cold and a cached compile)")
    p.add_argument("--log", nargs="+", default=["cpu-bench.jsonl"], help="JSONL file(s): results are appended "
                   "to the first; 'table' reads them all")
    a = p.parse_args()
    if a.which == "table":
        table(*a.log)
    else:
        a.log = a.log[0]
        {"speed": speed, "error": error}[a.which](a)


if __name__ == "__main__":
    main()
