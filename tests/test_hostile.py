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
