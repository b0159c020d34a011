"""A seeded fuzz suite of hostile inputs (issue 14): `python -m tests.fuzz --cases 5000 [--seed 1]`.

Each case is one hostile input of one class of failure: a truncated, bit-flipped or field-edited copy of a
valid file of a tiny seeded pipeline (safetensors headers, configs, shard indexes, model_index.json, tokenizer
files, LoRA files), or an argument value at or past a bound (pipeline call, CLI). Cases run in batches in
subprocesses with a memory limit (RLIMIT_DATA: safetensors maps whole files) and a timeout; each case ends in

  ok     no error (the input was harmless, e.g. a flipped bit inside tensor data, or a value at a bound), or
  clean  one of minidiff's documented errors (minidiff.errors, FileNotFoundError; for the CLI a "minidiff: ..."
         exit or argparse's usage error), whose message names the file, key or argument, raised before any
         denoising step (for a non-finite run: at the step, as promised);
and anything else (a raw exception, a late error, a hang, a crash, an overwritten file) is a failure.
tests/test_hostile.py runs 180 cases (MINIDIFF_FUZZ_CASES=N for more); the command line runs as many as asked.
"""
import argparse
import json
import math
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MEMORY_LIMIT = 3 << 30  # bytes of data segment per worker (torch's import alone maps ~1-2 GB)
CASE_SECONDS = 20


# ----------------------------------------------------------------------------- the fixture (minidiff only)

def build_fixtures(root):
    """A tiny seeded SD pipeline (CLIP tokenizer with a byte-level vocabulary), a LoRA file for it, and a
    sharded copy of its VAE, written in the Hub layout under `root`."""
    import torch
    from safetensors.torch import save_file

    from minidiff import (AutoencoderKL, CLIPTextModel, CLIPTokenizer, EulerDiscreteScheduler, StableDiffusionPipeline,
                          UNet2DConditionModel)
    from minidiff.models.clip import CLIPTextConfig
    from minidiff.models.unet import UNet2DConditionConfig
    from minidiff.models.vae import AutoencoderKLConfig
    from minidiff.tokenizer import BYTE_TO_CHAR

    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNet2DConditionConfig(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=16,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    vae = AutoencoderKL(AutoencoderKLConfig(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4,
                                            down_block_types=("DownEncoderBlock2D",) * 2,
                                            up_block_types=("UpDecoderBlock2D",) * 2))
    chars = [BYTE_TO_CHAR[b] for b in range(256)]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    vocab.update({"ab</w>": len(vocab), "cd": len(vocab) + 1})
    merges = [("a", "b</w>"), ("c", "d")]
    tok = CLIPTokenizer(vocab, merges, model_max_length=16)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, projection_dim=16,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                      bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]))
    for m in (unet, vae, te):
        for p in m.parameters():
            p.data.normal_(0, 0.05)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=EulerDiscreteScheduler())
    sd = os.path.join(root, "sd")
    pipe.save_pretrained(sd)
    # a PEFT-form LoRA on two UNet attention projections and one text-encoder layer, with an alpha pattern
    lora = {}
    for path, (i, o) in {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8),
                         "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (16, 8)}.items():
        lora[f"unet.{path}.lora_A.weight"] = torch.randn(2, i) * 0.1
        lora[f"unet.{path}.lora_B.weight"] = torch.randn(o, 2) * 0.1
    lora["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(2, 16) * 0.1
    lora["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(16, 2) * 0.1
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(
        {"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": {"attn2.to_k": 4}, "text_encoder.r": 2,
         "text_encoder.lora_alpha": 2})}
    save_file(lora, os.path.join(root, "lora.safetensors"), metadata=meta)
    # the VAE again as two shards with an index
    shards = os.path.join(root, "sharded")
    os.makedirs(shards)
    shutil.copy(os.path.join(sd, "vae", "config.json"), shards)
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    keys = sorted(state)
    half = {"a.safetensors": keys[:len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in half.items():
        save_file({k: state[k] for k in ks}, os.path.join(shards, name))
    with open(os.path.join(shards, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, ks in half.items() for k in ks}}, f)
    return root


# ----------------------------------------------------------------------------- hostile values

HOSTILE_JSON = [None, "false", "true", "0", -1, 0, 1, 10 ** 10, 1e10, 10 ** 30, 0.5, -1e300, [], {}, [[]],
                "x" * 5000, [1] * 5000, {"a": {"b": {"c": [1]}}}, True, False]
RAW_JSON_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000, "[" * 100000, '"\\ud800"']
SAFETENSORS_FIELDS = {"dtype": ["F33", "", None, 5, "U8", "F16", "BOOL"],
                      "shape": [[], [-1], [2 ** 62, 2 ** 62], [1.5], "3", None, [0], [1] * 9, [3, 3, 3, 3, 3]],
                      "data_offsets": [[0], [5, 3], [0, 2 ** 63], [-4, 0], None, [0, 0], ["0", "4"]]}
SHARD_NAMES = ["../x.safetensors", "/etc/passwd", "..", "a/../../b.safetensors", "\\..\\x", "C:\\x", "", 5, None,
               "nonexistent.safetensors", "b.safetensors/../../../etc/passwd", "./a.safetensors", "\0"]
COMPONENT_NAMES = ["../x/unet", "/etc", "unet/../../x", "..", "a\\..\\b", ""]


def _header_span(data):
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    return n


class Cases:
    """The seeded generator: each method returns cases of one class (a dict the worker knows how to run)."""

    def __init__(self, rng, fixtures):
        self.rng, self.fx = rng, fixtures

    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    # 1 and 9: weights files, by content
    def weights_file(self):
        r = self.rng
        target = self.pick(["sd/unet/diffusion_pytorch_model.safetensors", "sd/vae/diffusion_pytorch_model.safetensors",
                            "sd/text_encoder/model.safetensors", "sharded/a.safetensors"])
        path = os.path.join(self.fx, target)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
        how = self.pick(["truncate", "flip_header", "flip_any", "field", "duplicate", "pickle", "junk", "length"])
        if how == "truncate":
            m = {"op": "truncate", "at": r.choice([0, 3, 8, 9, n // 2, n + 7, n + 8, size - 1, r.randrange(size)])}
        elif how == "flip_header":
            m = {"op": "flip", "bit": r.randrange(8 * (n + 8))}
        elif how == "flip_any":
            m = {"op": "flip", "bit": r.randrange(8 * size)}
        elif how == "field":
            field = self.pick(list(SAFETENSORS_FIELDS))
            m = {"op": "st_field", "field": field, "value": self.pick(SAFETENSORS_FIELDS[field]), "which": r.randrange(50)}
        elif how == "duplicate":
            m = {"op": "st_duplicate", "which": r.randrange(50)}
        elif how == "pickle":
            m = {"op": "pickle", "legacy": r.random() < 0.5, "exploit": r.random() < 0.5}
        elif how == "junk":
            m = {"op": "replace", "bytes": self.pick(["", "PK\x03\x04garbage", "\x80\x04garbage", "{}", "GIF89a"])}
        else:
            m = {"op": "st_length", "value": self.pick([0, 1, 2 ** 64 - 1, 2 ** 40, n + 1, n - 1, size])}
        action = "load_vae_sharded" if target.startswith("sharded") else "load_pipe"
        allow = action == "load_pipe" and m["op"] == "pickle" and r.random() < 0.3
        return dict(cls="1/9 weights file", target=target, mutation=m, action=action, allow_pickle=allow,
                    names=[os.path.basename(target), "allow_pickle"], may_succeed=m["op"] in ("flip",) or allow)

    # 2: paths named by files
    def paths(self):
        r = self.rng
        if r.random() < 0.6:
            index = "sharded/diffusion_pytorch_model.safetensors.index.json"
            how = self.pick(["shard", "shape", "json", "truncate"])
            if how == "shard":
                m = {"op": "json_set", "path": ["weight_map", "decoder.conv_in.weight"], "value": self.pick(SHARD_NAMES)}
            elif how == "shape":
                m = {"op": "json_replace", "value": self.pick([[], {"weight_map": []}, {"weight_map": {}}, 5,
                                                               {"weight_map": {"a": {"b": 1}}}, {"weight_map": None}])}
            elif how == "json":
                m = {"op": "raw_token", "token": self.pick(RAW_JSON_TOKENS)}
            else:
                m = {"op": "truncate", "at": r.randrange(200)}
            return dict(cls="2 paths", target=index, mutation=m, action="load_vae_sharded",
                        names=["index.json", "weight_map", "nonexistent"], may_succeed=False)
        name = self.pick(COMPONENT_NAMES)
        return dict(cls="2 paths", target="sd/model_index.json",
                    mutation={"op": "json_set", "path": [name], "value": ["diffusers", "UNet2DConditionModel"]},
                    action="load_pipe", names=["model_index.json", name or "''"], may_succeed=False)

    # 7: configs
    def config(self):
        r = self.rng
        target = self.pick(["sd/unet/config.json", "sd/vae/config.json", "sd/text_encoder/config.json",
                            "sd/scheduler/scheduler_config.json"])
        with open(os.path.join(self.fx, target)) as f:
            cfg = json.load(f)
        key = self.pick(sorted(k for k in cfg if not k.startswith("_")))
        how = self.pick(["value", "value", "value", "raw", "truncate", "encoding", "size"])
        if how == "value":
            m = {"op": "json_set", "path": [key], "value": self.pick(HOSTILE_JSON)}
        elif how == "raw":
            m = {"op": "raw_token", "key": key, "token": self.pick(RAW_JSON_TOKENS)}
        elif how == "truncate":
            m = {"op": "truncate", "at": r.randrange(max(os.path.getsize(os.path.join(self.fx, target)), 1))}
        elif how == "encoding":
            m = {"op": "replace", "bytes": self.pick(["\xff\xfe{}", "{\"a\": \"\\x\"}", "\x00" * 10])}
        else:
            m = {"op": "json_set", "path": [key], "value": "a" * (17 << 20)}
        return dict(cls="7 config", target=target, mutation=m, action="load_pipe",
                    names=[os.path.basename(target), key], may_succeed=how == "value")

    # 8: tokenizer files
    def tokenizer(self):
        r = self.rng
        target = self.pick(["sd/tokenizer/vocab.json", "sd/tokenizer/merges.txt", "sd/tokenizer/tokenizer_config.json"])
        if target.endswith("vocab.json"):
            m = self.pick([{"op": "json_replace", "value": self.pick([[], 5, "x", {"a": "b"}, {"a": -1}, {"a": 1.5},
                                                                       {"a": 10 ** 9}, {"a": None}])},
                           {"op": "json_set", "path": ["<|endoftext|>"], "value": self.pick([10 ** 6, 600, -5, "x"])},
                           {"op": "truncate", "at": r.randrange(3000)}, {"op": "flip", "bit": r.randrange(8 * 3000)}])
        elif target.endswith("merges.txt"):
            m = self.pick([{"op": "replace", "bytes": self.pick(["", "#version: 0.2\na", "#version: 0.2\na b c\n",
                                                                 "\xff\xfe", "#version: 0.2\n" + "a b\n" * 3])},
                           {"op": "truncate", "at": r.randrange(20)}])
        else:
            m = {"op": "json_set", "path": [self.pick(["model_max_length", "bos_token", "eos_token", "pad_token",
                                                       "added_tokens_decoder", "padding_side"])],
                 "value": self.pick([0, -1, 10 ** 30, 1e300, "x", None, [], {"5": {"content": 3}}, 17, 1.5])}
        return dict(cls="8 tokenizer", target=target, mutation=m, action="load_pipe_and_encode",
                    names=[os.path.basename(target), "tokenizer", "vocab", "model_max_length"],
                    may_succeed=m["op"] in ("flip", "json_set", "replace") or target.endswith("merges.txt"))

    # 6: LoRA files
    def lora(self):
        r = self.rng
        how = self.pick(["truncate", "flip_header", "field", "duplicate", "rank0", "alpha", "zero_d", "pattern",
                         "many_keys", "meta", "pickle"])
        if how == "truncate":
            m = {"op": "truncate", "at": r.randrange(os.path.getsize(os.path.join(self.fx, "lora.safetensors")))}
        elif how == "flip_header":
            m = {"op": "flip", "bit": r.randrange(8 * 600)}
        elif how == "field":
            field = self.pick(list(SAFETENSORS_FIELDS))
            m = {"op": "st_field", "field": field, "value": self.pick(SAFETENSORS_FIELDS[field]), "which": r.randrange(9)}
        elif how == "duplicate":
            m = {"op": "st_duplicate", "which": r.randrange(9)}
        elif how in ("rank0", "alpha", "zero_d", "many_keys"):
            m = {"op": "lora_tensors", "kind": how, "which": r.randrange(3)}
        elif how == "pattern":
            m = {"op": "lora_meta", "key": "unet.alpha_pattern",
                 "value": {self.pick(["(a+)+$", "(.*a){20}", "((a|a)*)*b", "x" * 300, "[", "(?P<x>a)(?P=x)",
                                      "attn1.to_q", ".*", "(?=a)b"]): self.pick([4, "x", None, float("nan")])}}
        elif how == "meta":
            m = {"op": "lora_meta", "key": self.pick(["unet.lora_alpha", "unet.r", "unet.use_rslora", "unet.use_dora"]),
                 "value": self.pick([0, -1, "x", None, [], 1e30, True, "false"])}
        else:
            m = {"op": "pickle", "legacy": r.random() < 0.5, "exploit": True}
        return dict(cls="6 lora", target="lora.safetensors", mutation=m, action="load_lora",
                    names=["lora.safetensors", "alpha", "rank", "alpha_pattern", "lora_alpha"],
                    may_succeed=how in ("flip_header", "meta", "pattern", "alpha") or m.get("op") == "flip")

    # 5 and 3: pipeline call arguments (values at and past each bound)
    CALL_VALUES = {
        "height": [0, -16, 7, 15, 16.0, "16", True, None, 16, 1 << 17, (1 << 17) + 2, 1 << 30, 2 ** 70],
        "width": [0, -16, 9, 16.5, None, 16, 32, 65536, float("nan")],
        "num_inference_steps": [0, -1, 1, 2, 1.5, "2", None, 10 ** 9, 10001, True, float("inf")],
        "guidance_scale": [float("nan"), float("inf"), -float("inf"), "7", None, 0, 1, 7.5, 1e308, True, [1]],
        "generator": [5, "x", [], [5], object(), None],
        "prompt": [[], 5, None, ["a", 5], "\udcff", "a" * 10000, ["a", "b"], b"bytes", ""],
        "negative_prompt": [5, [5], "\ud800", ["a", "b", "c"], "", None],
        "clip_skip": [100, -1, 0, 1, 2, 1.0, "1"],
        "num_images_per_prompt": [0, -1, 1.0, 5000, "2", 2],
        "output_type": ["jpg", None, 5, "latent", "np"],
        "eta": [float("nan"), -1, 2, "0"],
        "guidance_rescale": [float("nan"), -0.1, 1.5, 0.5],
        "latents": ["nan", 5, "tensor_nan", "tensor_wrong_shape"],
        "cross_attention_kwargs": [5, {"scale": float("nan")}, {"scale": "x"}, {"scale": 0.5}],
        "callback_on_step_end": [5, "x"],
        "timesteps": [[float("nan")], "x", [5, "a"]],
    }

    def call(self):
        name = self.pick(sorted(self.CALL_VALUES))
        value = self.pick(self.CALL_VALUES[name])
        return dict(cls="5 arguments", action="call", arg=name, value=_encode(value),
                    names=[name, name.replace("_", " ")], may_succeed=True)

    # 3: non-finite runs
    def nonfinite(self):
        where = self.pick(["unet", "vae", "text_encoder", "latents", "guidance", "lora_scale", "callback"])
        dtype = self.pick(["float32", "float16"] if where in ("unet", "vae") else ["float32"])
        return dict(cls="3 non-finite", action="nonfinite", where=where, dtype=dtype, names=["NaN", "inf", "finite"],
                    may_succeed=where in ("guidance", "lora_scale"))

    # 4 and 5: the CLI
    CLI_ARGS = [["--guidance", "nan"], ["--guidance", "inf"], ["--guidance", "-inf"], ["--seed", "1e23"],
                ["--seed", "-1"], ["--seed", str(2 ** 64)], ["--device", "bogus"], ["--device", "cuda:7"],
                ["--device", ""], ["--steps", "1e9"], ["--steps", "1000000000"], ["--steps", "0"], ["--width", "65536"],
                ["--width", "0"], ["--width", "12"], ["--height", "-8"], ["--width", "65536", "--height", "65536"],
                ["--dtype", "float64"], ["--out", "{dir}"], ["--out", "{dir}/x.jpg"], ["--out", "{existing}"],
                ["--out", "{dir}/file.png/x.png"], ["--out", "/proc/x.png"], ["--model", "{nomodel}"],
                ["--model", "{wuerstchen}"], ["--model", "{unknownclass}"], ["--model", "nope"], ["--lcm"],
                ["--lora", "/nonexistent/x.safetensors"], ["--lora", "{picklelora}"], ["--negative", "\udcff"],
                ["--variant", "fp99"], ["--steps", "1", "--overwrite", "--out", "{existing}"]]

    def cli(self):
        args = self.pick(self.CLI_ARGS)
        prompt = self.pick(["a house", "\udcff\udcfe", ""])
        return dict(cls="4/5 cli", action="cli", args=args, prompt=prompt, names=["minidiff:", "usage"],
                    may_succeed=True)

    def generate(self, n):
        makers = [self.weights_file, self.paths, self.config, self.tokenizer, self.lora, self.call, self.call,
                  self.nonfinite, self.cli]
        cases = []
        for i in range(n):
            case = makers[i % len(makers)]()
            case["id"] = i
            cases.append(case)
        return cases


def _encode(v):
    """Argument values as JSON (the worker rebuilds objects, tensors and odd strings)."""
    if isinstance(v, float) and not math.isfinite(v):
        return {"float": repr(v)}
    if isinstance(v, str):
        return {"str": v.encode("utf-8", "surrogatepass").hex()}
    if isinstance(v, bytes):
        return {"bytes": v.hex()}
    if isinstance(v, list):
        return {"list": [_encode(x) for x in v]}
    if isinstance(v, dict):
        return {"dict": {k: _encode(x) for k, x in v.items()}}
    if v is None or isinstance(v, (bool, int, float)):
        return {"json": v}
    return {"object": type(v).__name__}


def _decode(e):
    (kind, v), = e.items()
    if kind == "float":
        return float(v)
    if kind == "str":
        return bytes.fromhex(v).decode("utf-8", "surrogatepass")
    if kind == "bytes":
        return bytes.fromhex(v)
    if kind == "list":
        return [_decode(x) for x in v]
    if kind == "dict":
        return {k: _decode(x) for k, x in v.items()}
    if kind == "json":
        return v
    return object()


# ----------------------------------------------------------------------------- the worker (in a subprocess)

def _mutate(path, m):
    """Write the mutated file at `path` (a fresh file: the hard-linked original is never touched)."""
    with open(path, "rb") as f:
        data = f.read()
    op = m["op"]
    if op == "truncate":
        data = data[:m["at"]]
    elif op == "flip":
        bit = m["bit"] % max(8 * len(data), 1)
        if data:
            b = bytearray(data)
            b[bit // 8] ^= 1 << (bit % 8)
            data = bytes(b)
    elif op == "replace":
        data = m["bytes"].encode("latin-1")
    elif op in ("st_field", "st_duplicate", "st_length"):
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        keys = sorted(k for k in header if k != "__metadata__")
        key = keys[m.get("which", 0) % len(keys)]
        if op == "st_field":
            header[key][m["field"]] = m["value"]
            raw = json.dumps(header).encode()
        elif op == "st_duplicate":
            raw = json.dumps(header).encode()
            entry = json.dumps({key: header[key]})[1:-1]
            raw = raw[:-1] + b", " + entry.encode() + b"}"
        else:
            raw = data[8:8 + n]
            data = struct.pack("<Q", m["value"]) + raw + data[8 + n:]
            return _write(path, data)
        data = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    elif op in ("json_set", "json_replace"):
        obj = json.loads(data)
        if op == "json_replace":
            obj = m["value"]
        else:
            target = obj
            for k in m["path"][:-1]:
                target = target.setdefault(k, {}) if isinstance(target, dict) else target
            target[m["path"][-1]] = m["value"]
        data = json.dumps(obj).encode()
    elif op == "raw_token":
        obj = json.loads(data)
        key = m.get("key") or next(iter(obj))
        obj[key] = "__TOKEN__"
        data = json.dumps(obj).replace('"__TOKEN__"', m["token"]).encode("utf-8", "surrogatepass")
    elif op == "pickle":
        import torch
        from safetensors.torch import load_file
        sd = load_file(path)
        if m.get("exploit"):
            sd["x"] = _Exploit()
        os.unlink(path)
        torch.save(sd, path, _use_new_zipfile_serialization=not m.get("legacy"))
        return
    elif op == "lora_tensors":
        data = _lora_tensors(path, m)
    elif op == "lora_meta":
        data = _lora_meta(path, m)
    _write(path, data)


def _write(path, data):
    os.unlink(path)
    with open(path, "wb") as f:
        f.write(data)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {tempfile.gettempdir()}/minidiff-fuzz-pwned",))


def _lora_tensors(path, m):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(path, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    keys = sorted(k for k in sd if "lora_A" in k)
    a = keys[m["which"] % len(keys)]
    b = a.replace("lora_A", "lora_B")
    kind = m["kind"]
    if kind == "rank0":
        sd[a], sd[b] = sd[a][:0], sd[b][:, :0]
    elif kind == "alpha":
        sd[a.replace(".lora_A.weight", ".alpha")] = torch.ones(3)
    elif kind == "zero_d":
        sd[a] = torch.tensor(1.0)
    else:  # many keys, more than the header bound allows: written as raw header text (fast)
        data = save(sd, metadata=meta)
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        extra = ",".join(f'"unet.x{i}.lora_A.weight":{{"dtype":"F32","shape":[0],"data_offsets":[{end},{end}]}}'
                         for i in range(210_000))
        raw = json.dumps(header)[:-1].encode() + b"," + extra.encode() + b"}"
        return struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    return save(sd, metadata=meta)


def _lora_meta(path, m):
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(path, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    flat = json.loads(meta["lora_adapter_metadata"])
    flat[m["key"]] = m["value"]
    meta["lora_adapter_metadata"] = json.dumps(flat)
    return save(sd, metadata=meta)


class _Worker:
    def __init__(self, fixtures, scratch):
        import torch
        self.torch = torch
        self.fx, self.scratch = fixtures, scratch
        self._pipe = None

    def pipe(self):
        from minidiff import StableDiffusionPipeline
        if self._pipe is None:
            self._pipe = StableDiffusionPipeline.from_pretrained(os.path.join(self.fx, "sd"))
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def copy(self, case):
        """A hard-linked copy of the fixtures with the case's file mutated."""
        dst = os.path.join(self.scratch, f"case{case['id']}")
        shutil.copytree(self.fx, dst, copy_function=os.link)
        if "target" in case:
            _mutate(os.path.join(dst, case["target"]), case["mutation"])
        return dst

    def run(self, case):
        from minidiff import StableDiffusionPipeline
        from minidiff.models.vae import AutoencoderKL
        action = case["action"]
        steps = []  # denoising steps that ran before an error
        if action in ("load_pipe", "load_vae_sharded", "load_pipe_and_encode", "load_lora"):
            folder = self.copy(case)
            try:
                if action == "load_pipe":
                    StableDiffusionPipeline.from_pretrained(os.path.join(folder, "sd"),
                                                            allow_pickle=case.get("allow_pickle", False))
                elif action == "load_vae_sharded":
                    AutoencoderKL.from_pretrained(os.path.join(folder, "sharded"))
                elif action == "load_pipe_and_encode":
                    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(folder, "sd"))
                    pipe.set_progress_bar_config(disable=True)
                    pipe("a b c d " * 10, num_inference_steps=1, output_type="latent")
                else:
                    pipe = self.pipe()
                    try:
                        pipe.load_lora_weights(os.path.join(folder, "lora.safetensors"), adapter_name="fuzz")
                    finally:
                        pipe.unload_lora_weights()
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            return steps
        if action == "call":
            return self.call(case)
        if action == "nonfinite":
            return self.nonfinite(case)
        if action == "cli":
            return self.cli(case)
        raise AssertionError(action)

    def _hooked(self, pipe, steps):
        return pipe.unet.register_forward_hook(lambda *a: steps.append(1))

    def call(self, case):
        torch = self.torch
        pipe, steps = self.pipe(), []
        kw = dict(prompt="a b", num_inference_steps=1, output_type="latent")
        value = _decode(case["value"])
        if case["arg"] == "latents" and value == "tensor_nan":
            value = torch.full((1, 4, 8, 8), float("nan"))
        elif case["arg"] == "latents" and value == "tensor_wrong_shape":
            value = torch.zeros(1, 3, 8, 8)
        kw[case["arg"]] = value
        if case["arg"] == "negative_prompt" and isinstance(value, list):
            kw["prompt"] = ["a", "b"]
        hook = self._hooked(pipe, steps)
        try:
            out = pipe(**kw).images
            if isinstance(out, torch.Tensor):
                assert torch.isfinite(out).all(), "a non-finite result was returned"
        finally:
            hook.remove()
        return steps

    def nonfinite(self, case):
        torch = self.torch
        from minidiff import StableDiffusionPipeline
        dtype = getattr(torch, case["dtype"])
        pipe = StableDiffusionPipeline.from_pretrained(os.path.join(self.fx, "sd"), torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        where, kw = case["where"], dict(prompt="a", num_inference_steps=2)
        with torch.no_grad():
            if where in ("unet", "vae", "text_encoder"):
                name = {"unet": "conv_in.weight", "vae": "decoder.conv_in.weight",
                        "text_encoder": "text_model.final_layer_norm.weight"}[where]
                getattr(pipe, where).get_parameter(name).fill_(float("nan"))
            elif where == "latents":
                kw["callback_on_step_end"] = lambda p, i, t, d: {"latents": d["latents"] * float("inf")}
            elif where == "guidance":
                kw["guidance_scale"] = 1e38
            elif where == "lora_scale":
                pipe.load_lora_weights(os.path.join(self.fx, "lora.safetensors"), adapter_name="big")
                pipe.set_adapters("big", 1e35)
            else:
                kw["callback_on_step_end"] = lambda p, i, t, d: {"latents": d["latents"] * float("nan")}
        try:
            out = pipe(**kw, output_type=self.pick_output(case)).images
            arr = out if isinstance(out, torch.Tensor) else torch.as_tensor(__import__("numpy").asarray(out[0]))
            assert torch.isfinite(torch.as_tensor(arr).float()).all(), "a non-finite image was returned"
        except Exception as e:
            msg = str(e)
            if where in ("unet", "vae", "text_encoder") and where != "vae" and "step" not in msg:
                raise AssertionError(f"not stopped at a step: {msg}") from e
            if "float16" in msg and dtype != torch.float16:
                raise AssertionError(f"blames float16 in a {dtype} run: {msg}") from e
            raise
        return []

    @staticmethod
    def pick_output(case):
        return "np"

    def cli(self, case):
        from minidiff import cli
        from minidiff.pipelines import common
        folder = os.path.join(self.scratch, f"cli{case['id']}")
        os.makedirs(folder)
        existing = os.path.join(folder, "existing.png")
        with open(existing, "wb") as f:
            f.write(b"precious")
        unknown = os.path.join(folder, "unknownclass")
        os.makedirs(unknown)
        with open(os.path.join(unknown, "model_index.json"), "w") as f:
            json.dump({"_class_name": "FluxPipeline"}, f)
        wuerstchen = os.path.join(folder, "wuerstchen")
        os.makedirs(wuerstchen)
        with open(os.path.join(wuerstchen, "model_index.json"), "w") as f:
            json.dump({"_class_name": "WuerstchenPriorPipeline"}, f)
        picklelora = os.path.join(folder, "lora.safetensors")
        _write_pickle_copy(os.path.join(self.fx, "lora.safetensors"), picklelora)
        subs = {"{dir}": folder, "{existing}": existing, "{nomodel}": os.path.join(folder, "nothing"),
                "{unknownclass}": unknown, "{wuerstchen}": wuerstchen, "{picklelora}": picklelora}
        args = []
        for a in case["args"]:
            for k, v in subs.items():
                a = a.replace(k, v)
            args.append(a)
        if "--model" not in args:
            args += ["--model", os.path.join(self.fx, "sd")]
        if "--out" not in args:
            args += ["--out", os.path.join(folder, "out.png")]
        args += ["--steps", "1"] if "--steps" not in args else []
        args += ["--prompt-syntax", "plain"]  # A1111 windows are 77 tokens; the tiny text encoder has 16 positions
        argv = ["generate", _decode({"str": case["prompt"].encode("utf-8", "surrogatepass").hex()})] + args
        loads = []
        original = common.DiffusionPipeline.from_pretrained.__func__

        def counting(cls, *a, **k):
            loads.append(1)
            return original(cls, *a, **k)
        common.DiffusionPipeline.from_pretrained = classmethod(counting)
        devnull = open(os.devnull, "w")
        saved = sys.stdout, sys.stderr
        try:
            sys.stdout = sys.stderr = devnull
            cli.main(argv)
        except SystemExit as e:
            sys.stdout, sys.stderr = saved
            msg = str(e.code)
            if e.code == 2:  # argparse's usage error
                raise _CleanExit("usage: " + msg) from None
            if not msg.startswith("minidiff:"):
                raise AssertionError(f"raw exit {msg!r}") from None
            late = loads and any(k in " ".join(case["args"]) for k in ("nan", "inf", "bogus", "1e9", "65536", "{dir}",
                                                                       "x.jpg", "{existing}", "-1", "cuda:7"))
            with open(existing, "rb") as f:
                kept = f.read() == b"precious"
            if not kept and "--overwrite" not in args:
                raise AssertionError("an existing file was replaced") from None
            if late:
                raise AssertionError(f"refused only after loading: {msg}") from None
            raise _CleanExit(msg) from None
        finally:
            sys.stdout, sys.stderr = saved
            common.DiffusionPipeline.from_pretrained = classmethod(original)
            devnull.close()
        with open(existing, "rb") as f:
            if f.read() != b"precious" and "--overwrite" not in args:
                raise AssertionError("an existing file was replaced")
        return []


class _CleanExit(Exception):
    pass


def _write_pickle_copy(src, dst):
    import torch
    from safetensors.torch import load_file
    torch.save(load_file(src), dst)


def _outcome(case, error, steps):
    from minidiff.errors import MinidiffError
    if error is None:
        return ("ok", "") if case.get("may_succeed") else ("unexpected-success", "the hostile input was accepted")
    msg = f"{type(error).__name__}: {error}"
    if isinstance(error, _CleanExit):
        return "clean", str(error)[:300]
    if isinstance(error, AssertionError):
        return "wrong", msg[:600]
    if not isinstance(error, (MinidiffError, FileNotFoundError)):
        return "raw", msg[:600]
    if steps and case["action"] != "nonfinite":
        return "late", f"after {len(steps)} denoising steps: {msg[:500]}"
    low = msg.lower()
    names = [v for n in case["names"] for v in (n, repr(n)[1:-1])]
    if not any(n.lower() in low for n in names):
        return "unnamed", msg[:600]
    return "clean", msg[:300]


def worker_main(fixtures, scratch):
    """Read cases (JSON lines) from stdin, write one JSON result line per case to stdout."""
    import signal
    import warnings
    warnings.simplefilter("ignore")
    w = _Worker(fixtures, scratch)

    def alarm(*_):
        raise TimeoutError(f"case ran over {CASE_SECONDS} s")
    signal.signal(signal.SIGALRM, alarm)
    for line in sys.stdin:
        case = json.loads(line)
        print(json.dumps({"start": case["id"]}), flush=True)
        steps, error = [], None
        signal.alarm(CASE_SECONDS)
        try:
            steps = w.run(case) or []
        except BaseException as e:  # noqa: BLE001 - everything is judged, SystemExit included
            error = e
        finally:
            signal.alarm(0)
        if isinstance(error, TimeoutError) and "ran over" in str(error):
            outcome, detail = "hang", str(error)
        else:
            outcome, detail = _outcome(case, error, steps)
        print(json.dumps({"id": case["id"], "outcome": outcome, "detail": detail}), flush=True)
    if os.path.exists(os.path.join(tempfile.gettempdir(), "minidiff-fuzz-pwned")):
        print(json.dumps({"id": -1, "outcome": "EXECUTED", "detail": "a pickle payload ran"}), flush=True)


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_cases(cases, fixtures, batch=150, timeout=300):
    """Run `cases` in subprocess batches; a batch that dies (memory, hang) reports the case it was on and
    goes on with the rest in a fresh subprocess. Returns {id: (outcome, detail)}."""
    results, todo = {}, list(cases)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    while todo:
        chunk, todo = todo[:batch], todo[batch:]
        with tempfile.TemporaryDirectory() as scratch:
            proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz", "--worker", fixtures, scratch], cwd=ROOT,
                                    env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, preexec_fn=_limit_memory)
            try:
                out, err = proc.communicate("".join(json.dumps(c) + "\n" for c in chunk), timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            started = None
            for line in out.splitlines():
                r = json.loads(line)
                if "start" in r:
                    started = r["start"]
                    continue
                results[r["id"]] = (r["outcome"], r["detail"])
                started = None
            if started is not None:  # the worker died on this case
                results[started] = ("crash", f"worker exited {proc.returncode}: {err[-500:]}")
            done = set(results)
            rest = [c for c in chunk if c["id"] not in done]
            if rest and started is None and proc.returncode:
                results[rest[0]["id"]] = ("crash", f"worker exited {proc.returncode}: {err[-500:]}")
                rest = rest[1:]
            todo = rest + todo
    return results


def generate_cases(n, seed, fixtures):
    return Cases(random.Random(seed), fixtures).generate(n)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--worker", nargs=2, metavar=("FIXTURES", "SCRATCH"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker_main(*a.worker)
    start = time.time()
    with tempfile.TemporaryDirectory() as root:
        build_fixtures(root)
        cases = generate_cases(a.cases, a.seed, root)
        results = run_cases(cases, root, batch=a.batch)
    bad = {i: r for i, r in results.items() if r[0] not in ("ok", "clean")}
    by_cls = {}
    for c in cases:
        by_cls.setdefault(c["cls"], []).append(results.get(c["id"], ("missing", ""))[0])
    for cls, outs in sorted(by_cls.items()):
        print(f"{cls:22s} {len(outs):5d} cases: " + ", ".join(f"{o} {outs.count(o)}" for o in sorted(set(outs))))
    for i, (outcome, detail) in sorted(bad.items()):
        case = next(c for c in cases if c["id"] == i) if i >= 0 else {}
        print(f"FAIL {outcome}: {json.dumps({k: v for k, v in case.items() if k != 'names'})[:300]}\n    {detail}")
    print(f"{len(cases)} cases, {len(bad)} failures, {time.time() - start:.0f} s (seed {a.seed})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
