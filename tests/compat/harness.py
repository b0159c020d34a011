"""Run a documented diffusers snippet twice: as written (diffusers), and with only its `from diffusers...`
imports changed to minidiff; then compare every image the two runs left behind.

Both runs get the same machine adaptations, written down here and nowhere else: a line calling
enable_xformers_memory_efficient_attention() is dropped (the snippets' own comment says to drop it without
xFormers), and without a GPU "cuda" reads "cpu", torch.float16 reads torch.float32 (half precision runs
about 20 times slower on a CPU, in both libraries) and a line calling enable_model_cpu_offload() is dropped
(diffusers refuses it without an accelerator, and so does minidiff). Hub repo ids resolve to the tiny
models of hub_repos.py through the offline cache.
"""
import ast
import os
import re

import numpy as np
import torch
from PIL import Image


def adapt(code, lib):
    dropped = ["enable_xformers_memory_efficient_attention"]
    if not torch.cuda.is_available():
        code = code.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32")
        dropped.append("enable_model_cpu_offload")
    code = "\n".join(line for line in code.splitlines() if not any(d in line for d in dropped))
    if lib == "minidiff":
        code = re.sub(r"^(\s*)from diffusers(\.|\s)", r"\1from minidiff\2", code, flags=re.M)
        code = re.sub(r"^(\s*)import diffusers\b", r"\1import minidiff as diffusers", code, flags=re.M)
    return code


def run(code, lib, workdir):
    """Execute the adapted snippet in `workdir` from a fixed global seed; returns its namespace (the values of
    bare expressions, which a notebook shows, are kept as `_1`, `_2`, ...)."""
    tree = ast.parse(adapt(code, lib))
    for i, stmt in enumerate(tree.body):
        if isinstance(stmt, ast.Expr) and not (isinstance(stmt.value, ast.Call)
                                               and getattr(stmt.value.func, "id", None) == "print"):
            tree.body[i] = ast.Assign(targets=[ast.Name(f"_{i}", ast.Store())], value=stmt.value)
    ast.fix_missing_locations(tree)
    cwd = os.getcwd()
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    torch.manual_seed(0)
    ns = {"__name__": "__snippet__"}
    try:
        exec(compile(tree, f"<snippet {lib}>", "exec"), ns)
    finally:
        os.chdir(cwd)
    return ns


def images_of(ns):
    """{name: uint8 array} for every PIL image, list of PIL images or pipeline output the snippet left."""
    out = {}
    for name, value in ns.items():
        if name.startswith("__"):
            continue
        if hasattr(value, "images") and not isinstance(value, type) and not hasattr(value, "unet"):
            value = value.images
        if isinstance(value, Image.Image):
            out[name] = np.asarray(value.convert("RGB"))
        elif isinstance(value, list) and value and all(isinstance(v, Image.Image) for v in value):
            out[name] = np.stack([np.asarray(v.convert("RGB")) for v in value])
    return out


def _plain(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    if isinstance(value, (list, tuple, set)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def compare(ref_ns, our_ns, max_diff=1):
    """Every image within `max_diff` (uint8), every plain value (numbers, strings, lists, dicts) equal."""
    for name, value in ref_ns.items():
        # (a None there is a call diffusers returns nothing from, where minidiff may return a report)
        if not name.startswith("__") and value is not None and _plain(value) and name in our_ns:
            assert our_ns[name] == value, f"{name}: minidiff {our_ns[name]!r} vs diffusers {value!r}"
    ref, ours = images_of(ref_ns), images_of(our_ns)
    assert ref, "the diffusers run left no image to compare"
    assert set(ref) <= set(ours), f"images missing on minidiff's side: {sorted(set(ref) - set(ours))}"
    for name, a in ref.items():
        b = ours[name]
        assert a.shape == b.shape, f"{name}: minidiff image {b.shape} vs diffusers {a.shape}"
        diff = int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())
        assert diff <= max_diff, f"{name}: pixels differ by up to {diff} (allowed {max_diff})"
        assert a.std() > 1, f"{name}: degenerate image, the comparison would prove nothing"
    return sorted(ref)
