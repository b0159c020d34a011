"""Hostile and broken input (issue 14): each promise checked directly, then the seeded fuzz suite (tests/fuzz.py)
run in subprocesses with a memory limit and a timeout."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from minidiff import AutoencoderKL
from minidiff.errors import FileFormatError, PickleRefusedError, UnsafePathError
from minidiff.models.vae import AutoencoderKLConfig
from minidiff.weights.load import load_model
from minidiff.weights.safe import file_kind, read_safetensors_header

TINY_VAE = AutoencoderKLConfig(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    AutoencoderKL(TINY_VAE).save_pretrained(str(folder))
    return folder


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/minidiff-pwned",))


@pytest.mark.parametrize("name", ["x.pkl", "x.PT", "x", "x.safetensors", "diffusion_pytorch_model.safetensors"])
def test_pickle_decided_by_content_not_name(tmp_path, vae_dir, name):
    sd = AutoencoderKL.from_pretrained(str(vae_dir)).state_dict()
    path = tmp_path / name
    torch.save(sd, path)
    assert file_kind(path) == "zip"
    with pytest.raises(PickleRefusedError, match=f"{name}.*allow_pickle=True"):
        load_model(AutoencoderKL, str(path), config=TINY_VAE)
    load_model(AutoencoderKL, str(path), config=TINY_VAE, allow_pickle=True)  # opted in: read, weights only
    torch.save({"x": Exploit()}, path, _use_new_zipfile_serialization=False)
    assert file_kind(path) == "pickle"
    with pytest.raises(FileFormatError, match="weights_only"):
        load_model(AutoencoderKL, str(path), config=TINY_VAE, allow_pickle=True)
    assert not os.path.exists("/tmp/minidiff-pwned")


def test_unknown_content_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(FileFormatError, match="model.safetensors.*neither a safetensors"):
        load_model(AutoencoderKL, str(path), config=TINY_VAE)


def _index(folder, weight_map):
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(weight_map))


@pytest.mark.parametrize("shard", ["../x.safetensors", "/etc/passwd", "a/../../x.safetensors", "..\\x.safetensors",
                                   "C:x.safetensors", ""])
def test_index_paths_stay_in_the_folder(tmp_path, vae_dir, shard):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text((vae_dir / "config.json").read_text())
    _index(folder, {"weight_map": {"decoder.conv_in.weight": shard}})
    with pytest.raises(FileFormatError, match="index.json"):
        AutoencoderKL.from_pretrained(str(folder))


def test_symlink_out_of_the_folder_is_refused(tmp_path, vae_dir):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text((vae_dir / "config.json").read_text())
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(vae_dir / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UnsafePathError, match="outside the repo folder"):
        AutoencoderKL.from_pretrained(str(folder))


@pytest.mark.parametrize("index", [[], {"weight_map": []}, {"weight_map": {}}, {"weight_map": {"a": 5}}, {"x": 1}])
def test_malformed_index(tmp_path, vae_dir, index):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text((vae_dir / "config.json").read_text())
    _index(folder, index)
    with pytest.raises(FileFormatError, match="index.json"):
        AutoencoderKL.from_pretrained(str(folder))


def test_model_index_component_cannot_leave(tmp_path):
    from minidiff import StableDiffusionPipeline
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                          "../x/unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(UnsafePathError, match=r"\.\./x/unet"):
        StableDiffusionPipeline.from_pretrained(str(tmp_path))


def _raw_safetensors(path, header_text, data=b""):
    raw = header_text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_safetensors_duplicate_key_refused(tmp_path):
    path = tmp_path / "dup.safetensors"
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    _raw_safetensors(path, '{"a":' + entry + ',"a":' + entry + '}', bytes(4))
    with pytest.raises(FileFormatError, match="dup.safetensors.*'a' twice"):
        read_safetensors_header(path)


@pytest.mark.parametrize("header,data,why", [
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', 4, "needs 8 bytes"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 2, "not a range"),
    ('{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}', 4, "unknown dtype"),
    ('{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', 4, "shape"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
     8, "starts at byte"),
    ('[1]', 0, "not a JSON object"), ('{"a": NaN}', 0, "NaN"), ('{"__metadata__":{"a":1}}', 0, "strings"),
])
def test_safetensors_header_checks(tmp_path, header, data, why):
    path = tmp_path / "bad.safetensors"
    _raw_safetensors(path, header, bytes(data))
    with pytest.raises(FileFormatError, match=why):
        read_safetensors_header(path)


def test_valid_header_matches_safetensors(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(5, dtype=torch.float16), "c": torch.zeros(0)}, str(path),
              metadata={"format": "pt"})
    h = read_safetensors_header(path)
    assert h.tensors == {"a": ((2, 3), "F32"), "b": ((5,), "F16"), "c": ((0,), "F32")}
    assert h.metadata == {"format": "pt"}


# ----------------------------------------------------------------------------- a tiny pipeline (minidiff only)

import shutil  # noqa: E402
import time  # noqa: E402

import fuzz  # noqa: E402
from minidiff import StableDiffusionPipeline  # noqa: E402
from minidiff.errors import (ArgumentError, ConfigError, LoRAFileError, NonFiniteError, OutputFileError,  # noqa: E402
                             TokenizerFileError, TooLargeError)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return fuzz.build_fixtures(str(tmp_path_factory.mktemp("fx")))


@pytest.fixture
def pipe(fx):
    p = StableDiffusionPipeline.from_pretrained(os.path.join(fx, "sd"))
    p.set_progress_bar_config(disable=True)
    return p


def _copy(fx, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(fx, dst)
    return dst


@pytest.mark.parametrize("kw,match", [
    (dict(height=0), "height=0"), (dict(width=-16), "width=-16"), (dict(height=16.0), "height=16.0"),
    (dict(guidance_scale=float("nan")), "guidance_scale=nan"), (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(generator=5), "generator="), (dict(prompt=[]), "prompt=\\[\\]"), (dict(negative_prompt=5), "negative_prompt"),
    (dict(clip_skip=100), "clip_skip=100"), (dict(num_inference_steps=10 ** 9), "num_inference_steps"),
    (dict(num_inference_steps=True), "num_inference_steps"), (dict(prompt="\udcff"), "prompt is not valid Unicode"),
    (dict(eta=float("nan")), "eta"), (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), "latents holds NaN"),
    (dict(cross_attention_kwargs={"scale": float("nan")}), "scale"), (dict(callback_on_step_end=5), "callback"),
])
def test_arguments_refused_before_any_step(pipe, kw, match):
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    args = dict(prompt="a b", num_inference_steps=1, output_type="latent", **{})
    args.update(kw)
    with pytest.raises(ArgumentError, match=match):
        pipe(**args)
    hook.remove()
    assert calls == []


def test_sizes_that_cannot_fit_are_refused_with_an_estimate(pipe):
    with pytest.raises(TooLargeError, match="GiB"):
        pipe("a", width=65536, height=65536, num_inference_steps=1)
    with pytest.raises(TooLargeError, match="latent positions"):
        pipe("a", width=16, height=1 << 17, num_inference_steps=1)


def test_non_finite_stops_at_the_step_with_the_cause(pipe):
    with torch.no_grad():
        pipe.unet.conv_in.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"UNet2DConditionModel: the latents became NaN at denoising step 1 of "
                                             r"2; likely cause: non-finite weights: UNet2DConditionModel.conv_in.weight"):
        pipe("a", num_inference_steps=2)


def test_non_finite_cause_is_not_float16_in_float32(pipe):
    bad = lambda p, i, t, d: {"latents": d["latents"] * float("inf")}  # noqa: E731
    with pytest.raises(NonFiniteError, match="step 1 of 2.*callback") as e:
        pipe("a", num_inference_steps=2, callback_on_step_end=bad)
    assert "float16" not in str(e.value)


def test_non_finite_float16_names_overflow(fx):
    half = StableDiffusionPipeline.from_pretrained(os.path.join(fx, "sd"), torch_dtype=torch.float16)
    half.set_progress_bar_config(disable=True)
    bad = lambda p, i, t, d: {"latents": d["latents"] * 1e5}  # noqa: E731  (overflows float16, not float32)
    with pytest.raises(NonFiniteError, match="float16 overflow"):
        half("a", num_inference_steps=2, callback_on_step_end=bad)


def test_decoder_nan_is_never_returned(pipe):
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="decode produced NaN.*vae|AutoencoderKL.*decoder.conv_out.bias"):
        pipe("a", num_inference_steps=1, output_type="np")


# ----------------------------------------------------------------------------- output files

def test_output_never_replaces_a_file_that_appeared(tmp_path):
    from minidiff.output_file import write_new_file
    out = tmp_path / "img.png"

    def write(f):
        f.write(b"new image")
        out.write_bytes(b"precious")  # another process wins the race

    with pytest.raises(OutputFileError, match="appeared while"):
        write_new_file(str(out), write)
    assert out.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["img.png"]  # no temporary file left


def test_interrupted_write_leaves_nothing(tmp_path):
    from minidiff.output_file import write_new_file
    out = tmp_path / "img.png"

    def write(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_new_file(str(out), write)
    assert os.listdir(tmp_path) == []
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        write_new_file(str(out), write, overwrite=True)
    assert out.read_bytes() == b"old"  # replaced only when complete
    write_new_file(str(out), lambda f: f.write(b"new"), overwrite=True)
    assert out.read_bytes() == b"new"


@pytest.mark.parametrize("args,match", [
    (["--guidance", "nan"], "--guidance nan"), (["--seed", str(2 ** 64)], "--seed"), (["--device", "bogus"], "bogus"),
    (["--steps", "1000000000"], "--steps"), (["--width", "65536", "--height", "65536"], "GiB"),
    (["--out", "{tmp}"], "is a folder"), (["--negative", "\udcff"], "not valid Unicode"),
    (["--model", "{unknown}"], "FluxPipeline"), (["--model", "{prior}"], "cannot run"), (["--lcm"], "--lora"),
])
def test_cli_refuses_before_loading(fx, tmp_path, monkeypatch, args, match):
    from minidiff import cli
    from minidiff.pipelines import common
    monkeypatch.setattr(common.DiffusionPipeline, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("loaded before refusing")))
    for name, cls in (("unknown", "FluxPipeline"), ("prior", "WuerstchenPriorPipeline")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    args = [a.replace("{tmp}", str(tmp_path)).replace("{unknown}", str(tmp_path / "unknown"))
            .replace("{prior}", str(tmp_path / "prior")) for a in args]
    if "--model" not in args:
        args += ["--model", os.path.join(fx, "sd")]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "o.png")]
    with pytest.raises(SystemExit, match="minidiff: .*" + match):
        cli.main(["generate", "a house"] + args)


def test_cli_pickle_lora_needs_allow_pickle(fx, tmp_path):
    from safetensors.torch import load_file

    from minidiff import cli
    lora = tmp_path / "lora.safetensors"
    torch.save(load_file(os.path.join(fx, "lora.safetensors")), lora)
    base = ["generate", "a", "--model", os.path.join(fx, "sd"), "--steps", "1", "--lora", str(lora),
            "--prompt-syntax", "plain"]  # A1111 windows are 77 tokens; the tiny text encoder has 16 positions
    with pytest.raises(SystemExit, match="minidiff: .*lora.safetensors is a pickle.*--allow-pickle"):
        cli.main(base + ["--out", str(tmp_path / "a.png")])
    assert not (tmp_path / "a.png").exists()
    cli.main(base + ["--allow-pickle", "--out", str(tmp_path / "b.png")])
    assert (tmp_path / "b.png").stat().st_size > 0


# ----------------------------------------------------------------------------- LoRA

def test_adapter_loaded_after_fuse_applies(fx, pipe):
    from safetensors.torch import load_file
    sd = load_file(os.path.join(fx, "lora.safetensors"))
    other = {k: v * 3 for k, v in sd.items()}
    kw = dict(prompt="a b", num_inference_steps=1, output_type="latent")
    pipe.load_lora_weights(sd, adapter_name="a")
    pipe.load_lora_weights(other, adapter_name="b")
    pipe.set_adapters(["a", "b"])
    both = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    pipe.delete_adapters(["b"])
    pipe.fuse_lora()
    pipe.load_lora_weights(other, adapter_name="b")  # loaded after fusing "a": applies on the fused layers
    after = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(after, both, rtol=1e-4, atol=1e-5)


def _lora_variant(fx, tmp_path, edit=None, meta=None):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(os.path.join(fx, "lora.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    if edit:
        edit(sd)
    if meta:
        flat = json.loads(metadata["lora_adapter_metadata"])
        flat.update(meta)
        metadata["lora_adapter_metadata"] = json.dumps(flat)
    path = tmp_path / "variant.safetensors"
    save_file(sd, str(path), metadata=metadata)
    return str(path)


Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("edit,meta,match", [
    (lambda sd: sd.update({f"{Q}.lora_A.weight": torch.zeros(0, 8), f"{Q}.lora_B.weight": torch.zeros(8, 0)}), None,
     "rank 0"),
    (lambda sd: sd.update({f"{Q}.alpha": torch.ones(3)}), None, "alpha must be a single number"),
    (lambda sd: sd.update({f"{Q}.lora_A.weight": torch.tensor(1.0)}), None, "matrix or a convolution"),
    (lambda sd: sd.pop(f"{Q}.lora_A.weight"), None, "lora_B.weight: down weight missing"),
    (None, {"unet.alpha_pattern": {"(a+)+$": 4}}, "repetition inside a repetition"),
    (None, {"unet.alpha_pattern": {"[": 4}}, "not a valid regular expression"),
    (None, {"unet.lora_alpha": "x"}, "lora_alpha='x'"),
])
def test_lora_file_errors(fx, tmp_path, pipe, edit, meta, match):
    path = _lora_variant(fx, tmp_path, edit, meta)
    start = time.perf_counter()
    with pytest.raises(LoRAFileError, match=match):
        pipe.load_lora_weights(path)
    assert time.perf_counter() - start < 5


def test_lora_huge_header_refused_before_reading(fx, tmp_path, pipe):
    path = tmp_path / "huge.safetensors"
    fuzz._write(shutil.copy(os.path.join(fx, "lora.safetensors"), path) and str(path),
                fuzz._lora_tensors(str(path), {"kind": "many_keys", "which": 0}))
    with pytest.raises(FileFormatError, match="huge.safetensors.*more than the 200000 allowed"):
        pipe.load_lora_weights(str(path))


def test_alpha_pattern_is_applied(fx, pipe):
    from minidiff.lora import lora_layers
    pipe.load_lora_weights(os.path.join(fx, "lora.safetensors"), adapter_name="p")
    scales = {n: m.adapters["p"].scale for n, m in pipe.unet.named_modules() if m in lora_layers(pipe.unet)}
    assert sorted(scales.values()) == [1.0, 2.0]  # alpha 2 / rank 2, and the pattern's alpha 4 on attn2.to_k


# ----------------------------------------------------------------------------- configs, JSON, tokenizer files

def _set(path, **values):
    cfg = json.loads(path.read_text())
    cfg.update(values)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("component,values,match", [
    ("unet", dict(layers_per_block=1000000), "layers_per_block=1000000 is out of range"),
    ("unet", dict(upcast_attention="false"), "upcast_attention='false' must be true or false"),
    ("scheduler", dict(beta_end=float("inf")), "beta_end=inf must be a finite number"),
    ("unet", dict(norm_num_groups=0), "norm_num_groups"),
    ("unet", dict(block_out_channels="32"), "block_out_channels='32' must be a list"),
    ("scheduler", dict(num_train_timesteps=1e10), "num_train_timesteps"),
    ("vae", dict(scaling_factor="0.18"), "scaling_factor"),
    ("text_encoder", dict(num_hidden_layers=-1), "num_hidden_layers=-1"),
])
def test_config_checked_before_building(fx, tmp_path, component, values, match):
    root = _copy(fx, tmp_path)
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    _set(root / "sd" / component / name, **values)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        StableDiffusionPipeline.from_pretrained(str(root / "sd"))
    assert time.perf_counter() - start < 5


def test_config_against_the_weights_header(fx, tmp_path):
    root = _copy(fx, tmp_path)
    _set(root / "sd" / "unet" / "config.json", layers_per_block=60, transformer_layers_per_block=200)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="more than .* parameter tensors.*does not belong"):
        StableDiffusionPipeline.from_pretrained(str(root / "sd"))
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("text,match", [
    ('{"a": NaN}', "NaN is not a JSON value"), ('{"a": 1e999}', "not a finite float"), ("[" * 100000, "nested|deep"),
    ('{"a": ' + "[" * 80 + "]" * 80 + "}", "nested more than"), ("\ufeff{}", None),
])
def test_read_json_is_strict_and_bounded(tmp_path, text, match):
    from minidiff.weights.safe import read_json_file
    path = tmp_path / "x.json"
    path.write_text(text, encoding="utf-8")
    if match is None:
        assert read_json_file(path) == {}
        return
    with pytest.raises(FileFormatError, match=match):
        read_json_file(path)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(FileFormatError, match="x.json.*not UTF-8"):
        read_json_file(path)
    path.write_bytes(b" " * 100)
    with pytest.raises(FileFormatError, match="more than the 10 bytes"):
        read_json_file(path, max_bytes=10)


@pytest.mark.parametrize("name,content,match", [
    ("vocab.json", "[1, 2]", "vocab.json: the vocabulary must be"),
    ("vocab.json", '{"a": "x"}', "vocab.json: token 'a' has id 'x'"),
    ("vocab.json", "{bad", "vocab.json is not valid JSON"),
    ("merges.txt", "#version: 0.2\na b c\n", "merges.txt: merge 1"),
    ("merges.txt", b"\xff\xfe", "merges.txt is not UTF-8"),
    ("tokenizer_config.json", '{"model_max_length": 0}', "model_max_length=0"),
    ("tokenizer_config.json", '{"bos_token": 5}', "bos_token=5"),
])
def test_tokenizer_files_name_the_file(fx, tmp_path, name, content, match):
    root = _copy(fx, tmp_path)
    path = root / "sd" / "tokenizer" / name
    if name == "tokenizer_config.json":  # one field edited
        _set(path, **json.loads(content))
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TokenizerFileError, match=match):
        StableDiffusionPipeline.from_pretrained(str(root / "sd"))


def test_token_ids_beyond_the_text_encoder(fx, tmp_path):
    root = _copy(fx, tmp_path)
    vocab_path = root / "sd" / "tokenizer" / "vocab.json"
    vocab = json.loads(vocab_path.read_text())
    vocab["zz</w>"] = 5000
    vocab_path.write_text(json.dumps(vocab))
    with pytest.raises(TokenizerFileError, match="'zz</w>' has id 5000, beyond the text encoder's vocabulary of"):
        StableDiffusionPipeline.from_pretrained(str(root / "sd"))


# ----------------------------------------------------------------------------- the fuzz suite

FUZZ_CASES = int(os.environ.get("MINIDIFF_FUZZ_CASES", "180"))


def test_fuzz_suite(fx):
    """Seeded hostile inputs of every class, in subprocesses with a memory limit and a timeout (tests/fuzz.py):
    each ends in a clean documented error before any denoising step, or in a correct result."""
    cases = fuzz.generate_cases(FUZZ_CASES, 0, fx)
    results = fuzz.run_cases(cases, fx, batch=FUZZ_CASES // 2 + 1, timeout=240)
    bad = {i: r for i, r in results.items() if r[0] not in ("ok", "clean")}
    assert len(results) == len(cases)
    assert not bad, "\n".join(f"{cases[i]['cls'] if i >= 0 else ''} {r[0]}: {r[1][:300]}" for i, r in bad.items())
    clean = sum(r[0] == "clean" for r in results.values())
    assert clean > len(cases) // 2  # the generator mostly makes inputs that must be refused
