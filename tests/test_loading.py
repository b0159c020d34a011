"""Loading checkpoints: Hub repo ids through huggingface_hub's cache (offline), variants, shards, and the
errors for missing, corrupt, mismatched and pickle files."""
import json
import os
import shutil

import diffusers
import pytest
import torch
from safetensors.torch import save_file

import huggingface_hub
from minidiff import AutoencoderKL, StableDiffusionPipeline
from utils import SD_VAE, assert_close, build_sd, seeded_


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    ref = seeded_(diffusers.AutoencoderKL(**SD_VAE), 0).eval()
    ref.save_pretrained(folder)
    ref.to(torch.float16).save_pretrained(folder, variant="fp16")
    return str(folder), seeded_(diffusers.AutoencoderKL(**SD_VAE), 0).eval()


def fake_hub_cache(cache, repo_id, src):
    """Lay `src` out as huggingface_hub's cache stores a downloaded snapshot of `repo_id`."""
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo_dir, "snapshots", "0" * 40)
    shutil.copytree(src, snap)
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write("0" * 40)


def test_repo_id_offline_fetches_only_what_the_model_needs(tmp_path, monkeypatch):
    folder = tmp_path / "pipe"
    ref = build_sd(str(folder))
    shutil.rmtree(folder / "_tok")
    cache = tmp_path / "cache"
    fake_hub_cache(str(cache), "someone/tiny-sd", str(folder))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    asked = []

    def spy(repo_id, filename, subfolder=None, **kw):
        asked.append(f"{subfolder + '/' if subfolder else ''}{filename}")
        return huggingface_hub.file_download.hf_hub_download(repo_id, filename, subfolder=subfolder, **kw)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    pipe = StableDiffusionPipeline.from_pretrained("someone/tiny-sd")
    got = {f for f in asked if os.path.basename(f) in
           ("diffusion_pytorch_model.safetensors", "model.safetensors", "config.json")}
    assert got == {"unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                   "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                   "text_encoder/model.safetensors"}
    assert not [f for f in asked if f.endswith((".bin", ".ckpt"))]
    x = torch.randn(1, 4, 8, 8)
    assert_close(pipe.vae.decode(x).sample, ref.vae.decode(x).sample, name="vae via repo id")


def test_variant_dtype_and_device(vae_folder):
    folder, ref = vae_folder
    vae = AutoencoderKL.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32, device="cpu")
    assert vae.dtype == torch.float32 and vae.device.type == "cpu"
    half = AutoencoderKL.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    z = torch.randn(1, 4, 8, 8)
    assert_close(vae.decode(z).sample, ref.to(torch.float16).float().decode(z).sample, name="fp16 variant")
    with pytest.raises(FileNotFoundError, match="variant='bf16'"):
        AutoencoderKL.from_pretrained(folder, variant="bf16")


def test_sharded_checkpoint(tmp_path, vae_folder):
    _, ref = vae_folder
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert os.path.exists(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    z = torch.randn(1, 4, 8, 8)
    assert_close(AutoencoderKL.from_pretrained(str(tmp_path)).decode(z).sample, ref.decode(z).sample, name="shards")


def test_no_random_init_while_loading(vae_folder, monkeypatch):
    """The model is built on the meta device: no initialiser touches real memory (that would be wasted work)."""
    folder, _ = vae_folder

    def guard(real):
        def init(tensor, *a, **k):
            assert tensor.is_meta, f"an initialiser ran on a real {tuple(tensor.shape)} tensor"
            return real(tensor, *a, **k)
        return init

    for name in ("kaiming_uniform_", "uniform_", "normal_", "xavier_uniform_", "zeros_", "ones_"):
        monkeypatch.setattr(torch.nn.init, name, guard(getattr(torch.nn.init, name)))
    vae = AutoencoderKL.from_pretrained(folder)
    assert not any(p.is_meta for p in vae.parameters())


def test_errors_name_the_file(tmp_path, vae_folder):
    folder, _ = vae_folder
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoencoderKL.from_pretrained(str(tmp_path))
    # truncated file
    bad = tmp_path / "truncated"
    shutil.copytree(folder, bad)
    weights = bad / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors.*(truncated|corrupt)"):
        AutoencoderKL.from_pretrained(str(bad))
    # keys from another model
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(other / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="missing keys.*decoder"):
        AutoencoderKL.from_pretrained(str(other))
    # a config that does not parse
    (other / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        AutoencoderKL.from_pretrained(str(other))


def test_pickle_refused_unless_asked(tmp_path, vae_folder):
    folder, ref = vae_folder
    pkl = tmp_path / "pickled"
    pkl.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), pkl / "config.json")
    torch.save(ref.state_dict(), pkl / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle file.*allow_pickle=True"):
        AutoencoderKL.from_pretrained(str(pkl))
    vae = AutoencoderKL.from_pretrained(str(pkl), allow_pickle=True)
    z = torch.randn(1, 4, 8, 8)
    assert_close(vae.decode(z).sample, ref.decode(z).sample, name="pickle")
    # weights_only=True: a pickle carrying arbitrary objects is refused even when pickles are allowed
    torch.save({"x": Exploit()}, pkl / "diffusion_pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        AutoencoderKL.from_pretrained(str(pkl), allow_pickle=True)


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_unsupported_config_value_is_an_error(tmp_path, vae_folder):
    folder, _ = vae_folder
    shutil.copytree(folder, tmp_path / "v", dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    cfg["act_fn"] = "elu"
    (tmp_path / "v" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json.*act_fn"):
        AutoencoderKL.from_pretrained(str(tmp_path / "v"))
