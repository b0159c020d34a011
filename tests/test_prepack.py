"""Prepacked convolution weights (minidiff/prepack.py) against the plain convolutions: the same output (fp32 to
summation order, bf16 to its rounding), followed weight changes, LoRA, autograd, the CLI's --prepack."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minidiff import StableDiffusionPipeline, prepack
from minidiff.cli import main
from utils import build_lora_sd, build_sd, kohya, save, targets, unet_inputs

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this torch build has no oneDNN")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("prepack_sd"))
    build_sd(path)
    return path


def step(unet, dtype=torch.float32, channels_last=False):
    kw = unet_inputs(unet)
    kw = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v for k, v in kw.items()}
    if channels_last:
        kw["sample"] = kw["sample"].to(memory_format=torch.channels_last)
    with torch.no_grad():
        return unet(**kw).sample.float()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_prepacked_unet_and_vae_match_the_plain_ones(folder, dtype, tol, channels_last):
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    ref = step(pipe.unet, dtype, channels_last)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        ref_image = pipe.vae.decode(z).sample.float()
    keys = list(pipe.unet.state_dict())
    convs = sum(type(m) is torch.nn.Conv2d for model in (pipe.unet, pipe.vae) for m in model.modules())
    assert prepack.prepack_weights(pipe.unet, pipe.vae) == convs > 0
    out = step(pipe.unet, dtype, channels_last)
    assert isinstance(pipe.unet.conv_in._packed, torch.Tensor) and pipe.unet.conv_in._packed.is_mkldnn
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= tol * scale
    with torch.no_grad():
        image = pipe.vae.decode(z).sample.float()
    assert (image - ref_image).abs().max().item() <= tol * ref_image.abs().max().item()
    assert list(pipe.unet.state_dict()) == keys  # the Parameters stay: saving, LoRA, .to() see no change
    assert prepack.unpack_weights(pipe.unet, pipe.vae) == convs
    assert all(type(m) is not prepack.PackedConv2d for m in pipe.unet.modules())
    assert torch.equal(step(pipe.unet, dtype, channels_last), ref)  # back to the very same computation


def test_a_weight_changed_in_place_or_replaced_is_repacked():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    prepack.prepack_weights(conv)
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        first = conv(x)
        conv.weight.mul_(2.0)  # what fuse_lora and load_state_dict do: in place
        assert torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-5)
        assert not torch.allclose(conv(x), first, atol=1e-3)
        conv.weight = torch.nn.Parameter(torch.randn_like(conv.weight))  # a new tensor
        assert torch.allclose(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4)
        y = torch.randn(1, 8, 5, 7)  # another input shape: packed again for it
        assert torch.allclose(conv(y), F.conv2d(y, conv.weight, conv.bias, padding=1), atol=1e-4)


def test_autograd_and_other_dtypes_take_the_plain_convolution():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    prepack.prepack_weights(conv)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    out = conv(x)  # training: oneDNN's packed op has no backward, so the plain one runs
    out.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None and conv._packed is None
    with torch.no_grad():
        assert torch.equal(conv.double()(x.double()), F.conv2d(x.double(), conv.weight, conv.bias, padding=1))
    assert conv._packed is None


def test_lora_on_a_prepacked_unet(tmp_path):
    """A LoRA loaded after prepacking replaces the convolutions it targets with its own layers; the rest stay
    packed; the output is the plain pipeline's with the same LoRA."""
    folder = build_lora_sd(str(tmp_path / "sd"))
    plain, packed = (StableDiffusionPipeline.from_pretrained(folder) for _ in range(2))
    prepack.prepack_weights(*packed.modules())
    names = [n for n in targets(plain.unet) if isinstance(plain.unet.get_submodule(n), torch.nn.Conv2d)][:3]
    path = save(kohya(plain.unet, "lora_unet_", names, alpha=4.0), str(tmp_path / "lora.safetensors"))
    for pipe in (plain, packed):
        pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    assert any(type(m) is prepack.PackedConv2d for m in packed.unet.modules())
    assert torch.allclose(step(packed.unet), step(plain.unet), atol=1e-5)
    packed.fuse_lora()
    plain.fuse_lora()
    assert torch.allclose(step(packed.unet), step(plain.unet), atol=1e-5)
    assert path


def test_cli_prepack_prints_records_and_replays(folder, tmp_path, capsys):
    out, again, plain = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    args = ["generate", "a red cube", "--model", folder, "--steps", "2", "--width", "32", "--height", "32",
            "--dtype", "float32"]
    main(args + ["--prepack", "--out", str(out)])
    assert "convolution weights prepacked" in capsys.readouterr().err
    assert "Prepacked: yes" in Image.open(out).text["parameters"]
    main(["generate", "--from-png", str(out), "--out", str(again)])
    assert "prepacked" in capsys.readouterr().err
    main(args + ["--out", str(plain)])
    assert "Prepacked" not in Image.open(plain).text["parameters"]
    a, b, c = (np.asarray(Image.open(p)).astype(int) for p in (out, again, plain))
    assert (a == b).all()
    assert np.abs(a - c).max() <= 1  # fp32: only the summation order differs
