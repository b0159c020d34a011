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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cin, cout, size, stride", [(32, 64, 8, 1), (64, 48, 16, 2), (320, 320, 8, 1)])
def test_channels_last_packed_convolutions_are_the_plain_ones_bit_for_bit(dtype, cin, cout, size, stride):
    """The weight is reordered once, straight from the dense OHWI tensor the plain call reads: the same oneDNN
    convolution on the same blocked weight, so the same bits (what the docstring claims for channels_last)."""
    g = torch.Generator().manual_seed(cin)
    conv = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1).to(dtype).to(memory_format=torch.channels_last)
    packed = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1).to(dtype).to(memory_format=torch.channels_last)
    packed.load_state_dict(conv.state_dict())
    prepack.prepack_weights(packed)
    x = torch.randn(2, cin, size, size, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = packed(x)
        assert packed._packed is not None and packed._packed.is_mkldnn
        assert torch.equal(out, conv(x))


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


def test_cli_prepack_prints_records_and_replays(folder, tmp_path, capsys, monkeypatch):
    out, again, plain = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    args = ["generate", "a red cube", "--model", folder, "--steps", "2", "--width", "32", "--height", "32",
            "--dtype", "float32"]
    packed, pack = [], prepack.prepack_weights
    monkeypatch.setattr(prepack, "prepack_weights", lambda *models: packed.extend(models) or pack(*models))
    main(args + ["--prepack", "--out", str(out)])
    assert "convolution weights prepacked" in capsys.readouterr().err
    assert [type(m).__name__ for m in packed] == ["CLIPTextModel", "UNet2DConditionModel"]  # not the VAE (decodes once)
    assert "Prepacked: yes" in Image.open(out).text["parameters"]
    main(["generate", "--from-png", str(out), "--out", str(again)])
    assert "prepacked" in capsys.readouterr().err
    main(args + ["--out", str(plain)])
    assert "Prepacked" not in Image.open(plain).text["parameters"]
    a, b, c = (np.asarray(Image.open(p)).astype(int) for p in (out, again, plain))
    assert (a == b).all()
    assert np.abs(a - c).max() <= 1  # fp32: only the summation order differs


# ----------------------------------------------------------------------------- oneDNN linears (no copy)

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_onednn_linear_matches_nn_linear(dtype, tol):
    g = torch.Generator().manual_seed(0)
    plain = torch.nn.Linear(64, 96).to(dtype)
    layer = torch.nn.Linear(64, 96).to(dtype)
    layer.load_state_dict(plain.state_dict())
    no_bias = torch.nn.Linear(64, 32, bias=False).to(dtype)
    assert prepack.onednn_linears(layer, no_bias) == 2
    assert type(layer) is prepack.OneDNNLinear and list(layer.state_dict()) == ["weight", "bias"]
    inputs = [torch.randn(5, 64, generator=g), torch.randn(2, 7, 64, generator=g),
              torch.randn(2, 64, 7, generator=g).transpose(1, 2)]  # 2-D, 3-D, a strided view
    with torch.no_grad():
        for x in inputs:
            x = x.to(dtype)
            ref, out = F.linear(x, plain.weight, plain.bias), layer(x)
            assert out.shape == ref.shape and out.dtype == dtype
            assert (out.float() - ref.float()).abs().max().item() <= tol * ref.float().abs().max().item()
            assert torch.allclose(no_bias(x).float(), F.linear(x, no_bias.weight).float(), atol=tol * 10)
        one = torch.randn(64, generator=g).to(dtype)  # 1-D: the plain path
        assert torch.equal(layer(one), F.linear(one, plain.weight, plain.bias))
    assert prepack.unpack_weights(layer) == 0 and type(layer) is torch.nn.Linear


def test_onednn_linear_falls_back_for_autograd_fp64_and_a_strided_weight():
    layer = torch.nn.Linear(8, 4)
    prepack.onednn_linears(layer)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()  # training: the plain linear, whose backward exists
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(layer.double()(x.double()), F.linear(x.double(), layer.weight, layer.bias))
        layer.float()
        layer.weight = torch.nn.Parameter(torch.randn(8, 4).t())  # not contiguous
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("faster", [True, False])
def test_auto_routes_linears_through_onednn_where_it_measures_faster(folder, faster, monkeypatch):
    from minidiff import device
    monkeypatch.setattr(device, "onednn_linear_is_faster", lambda dtype: faster)
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)  # "auto" = fp32 here
    plain = StableDiffusionPipeline.from_pretrained(folder)
    auto = StableDiffusionPipeline.from_pretrained(folder, torch_dtype="auto")
    kinds = {type(m) for model in auto.modules() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == ({prepack.OneDNNLinear} if faster else {torch.nn.Linear})
    assert list(auto.unet.state_dict()) == list(plain.unet.state_dict())
    ref, out = step(plain.unet), step(auto.unet)
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    ids = plain.tokenizer(["a red cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(auto.text_encoder(ids)[0], plain.text_encoder(ids)[0], atol=1e-5)


def test_the_probe_measures_fp32_and_says_yes_for_bf16():
    from minidiff import device
    assert device.onednn_linear_is_faster(torch.bfloat16) is True
    assert device.onednn_linear_is_faster(torch.float64) is False
    assert isinstance(device.onednn_linear_is_faster(torch.float32), bool)  # measured: the answer is the machine's
    assert device.use_fast_linear(torch.nn.Conv2d(2, 2, 1)) == 0  # no linear layers: nothing to do


def test_lora_on_onednn_linears_loads_unloads_and_compresses_as_on_plain_ones(tmp_path):
    """A LoRA on the attention linears of a OneDNNLinear UNet gives the plain pipeline's output; unloading gives the
    oneDNN layers back; the compressors and the LoRA trainer see the same layers."""
    from minidiff import compress
    from minidiff.distill import lcm_lora
    folder = build_lora_sd(str(tmp_path / "sd"))
    plain, fast = (StableDiffusionPipeline.from_pretrained(folder) for _ in range(2))
    layers = prepack.onednn_linears(*fast.modules())
    assert layers > 0
    assert compress.palettisable(fast.unet, 0) == compress.palettisable(plain.unet, 0)
    assert lcm_lora.target_names(fast.unet) == lcm_lora.target_names(plain.unet)
    names = [n for n in targets(plain.unet) if isinstance(plain.unet.get_submodule(n), torch.nn.Linear)][:4]
    save(kohya(plain.unet, "lora_unet_", names, alpha=4.0), str(tmp_path / "lora.safetensors"))
    for pipe in (plain, fast):
        pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    assert torch.allclose(step(fast.unet), step(plain.unet), atol=1e-5)
    fast.unload_lora_weights()
    plain.unload_lora_weights()
    assert all(type(fast.unet.get_submodule(n)) is prepack.OneDNNLinear for n in names)
    assert all(type(plain.unet.get_submodule(n)) is torch.nn.Linear for n in names)
    assert torch.allclose(step(fast.unet), step(plain.unet), atol=1e-5)


def test_fused_lora_and_fused_qkv_run_onednns_matmul_where_their_layers_did(tmp_path, monkeypatch):
    """A LoRA layer whose adapters are all fused (fuse_lora, the LCM-LoRA speed path) and a fused QKV projection run
    the matmul of the layers they replace: oneDNN's on a OneDNNLinear UNet (counted), with the plain pipeline's
    output; an unfused adapter still goes through the ops seam (where kernels plug in)."""
    from minidiff import fused_qkv, lora_layers
    calls = []

    def counted(x, weight, bias=None):
        calls.append(tuple(weight.shape))
        return prepack.onednn_linear(x, weight, bias)
    monkeypatch.setattr(lora_layers, "onednn_linear", counted)
    monkeypatch.setattr(fused_qkv, "onednn_linear", counted)
    folder = build_lora_sd(str(tmp_path / "sd"))
    plain, fast = (StableDiffusionPipeline.from_pretrained(folder) for _ in range(2))
    prepack.onednn_linears(*fast.modules())
    names = [n for n in targets(plain.unet) if isinstance(plain.unet.get_submodule(n), torch.nn.Linear)][:4]
    save(kohya(plain.unet, "lora_unet_", names, alpha=4.0), str(tmp_path / "lora.safetensors"))
    for pipe in (plain, fast):
        pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    assert torch.allclose(step(fast.unet), step(plain.unet), atol=1e-5) and not calls  # unfused: the seam's op
    for pipe in (plain, fast):
        pipe.fuse_lora()
    assert torch.allclose(step(fast.unet), step(plain.unet), atol=1e-5)
    assert len(calls) == len(names)  # each fused LoRA layer once, through oneDNN
    for pipe in (plain, fast):
        pipe.unload_lora_weights()
        pipe.fuse_qkv_projections()
    calls.clear()
    assert torch.allclose(step(fast.unet), step(plain.unet), atol=1e-5)
    fused = [m for m in fast.unet.modules() if "fused_weight" in m._buffers]
    assert fused and len(calls) == len(fused)  # one fused projection per attention, through oneDNN
    calls.clear()
    step(plain.unet)
    assert not calls  # plain nn.Linear layers: the fused matmul is F.linear, as they are


def test_cli_routes_linears_and_says_so(folder, tmp_path, capsys, monkeypatch):
    from minidiff import device
    monkeypatch.setattr(device, "onednn_linear_is_faster", lambda dtype: True)
    out, plain = tmp_path / "a.png", tmp_path / "b.png"
    args = ["generate", "a red cube", "--model", folder, "--steps", "2", "--width", "32", "--height", "32",
            "--dtype", "float32"]
    main(args + ["--out", str(out)])
    assert "linear layers on oneDNN's matmul" in capsys.readouterr().err
    monkeypatch.setattr(device, "onednn_linear_is_faster", lambda dtype: False)
    main(args + ["--out", str(plain)])
    assert "oneDNN" not in capsys.readouterr().err
    a, b = (np.asarray(Image.open(p)).astype(int) for p in (out, plain))
    assert np.abs(a - b).max() <= 1  # fp32: only the summation order differs


def test_prepacked_and_onednn_layers_compile_in_one_graph():
    """torch.compile (fullgraph) over PackedConv2d and OneDNNLinear: inductor lowers oneDNN's linear only for frozen
    weights, so under compile both layers are the plain ones, and the compiled output is the eager one's (a small
    model: the whole UNet's compile is the opt-in test_cpu_speed.py::test_compiled_unet_matches_eager)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Flatten(2), torch.nn.Linear(36, 24),
                                torch.nn.GELU(), torch.nn.Linear(24, 8))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = model(x)
        prepack.prepack_weights(model)
        assert {type(m) for m in model} >= {prepack.PackedConv2d, prepack.OneDNNLinear}
        out = torch.compile(model, fullgraph=True)(x)
    assert torch.allclose(out, ref, atol=1e-5)


# ----------------------------------------------------------------------------- GEGLU inside oneDNN's matmul

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_geglu_runs_its_gelu_and_product_inside_onednns_matmul(dtype, bias, monkeypatch):
    """A GEGLU whose projection is a OneDNNLinear computes value * gelu(gate) in the matmul's epilogues
    (prepack.onednn_geglu, counted): against the definition in float64, fp32 to summation order and bf16 no
    further off than the plain path's rounding (its GELU sees the unrounded sum); 2-D, 3-D and strided inputs."""
    from minidiff import ops
    from minidiff.models.unet_blocks import GEGLU
    calls = []
    fused = prepack.onednn_geglu
    monkeypatch.setattr(prepack, "onednn_geglu", lambda x, w, b=None: calls.append(w.shape) or fused(x, w, b))
    g = torch.Generator().manual_seed(0)
    plain = GEGLU(48, 40)
    if not bias:
        plain.proj = torch.nn.Linear(48, 80, bias=False)
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    plain = plain.to(dtype)
    layer = GEGLU(48, 40).to(dtype)
    layer.proj = torch.nn.Linear(48, 80, bias=bias).to(dtype)
    layer.load_state_dict(plain.state_dict())
    prepack.onednn_linears(layer)
    w = plain.proj.weight.double()
    b = None if plain.proj.bias is None else plain.proj.bias.double()
    inputs = [torch.randn(6, 48, generator=g), torch.randn(2, 9, 48, generator=g),
              torch.randn(2, 48, 9, generator=g).transpose(1, 2)]
    with torch.no_grad():
        for x in inputs:
            x = x.to(dtype)
            ref = ops.ref_geglu(F.linear(x.double(), w, b))
            out, base = layer(x), plain(x)
            assert out.shape == ref.shape and out.dtype == dtype
            err, base_err = ((o.double() - ref).abs().max().item() / ref.abs().max().item() for o in (out, base))
            assert err <= (1e-6 if dtype == torch.float32 else 1.5 * base_err + 1e-3), (err, base_err)
    assert calls == [(80, 48)] * len(inputs)


def test_geglu_leaves_its_matmul_to_the_seam_autograd_and_unfused_loras(monkeypatch):
    """The fused GEGLU is the reference op computed another way: a kernel put in the seam (ops.use) takes every call;
    a forward hook on the projection, training (autograd) and an unfused LoRA on it take the plain path; a fused
    LoRA keeps the fusion."""
    from minidiff import lora, ops
    from minidiff.models.unet_blocks import GEGLU
    calls = []
    fused = prepack.onednn_geglu
    monkeypatch.setattr(prepack, "onednn_geglu", lambda x, w, b=None: calls.append(w.shape) or fused(x, w, b))
    torch.manual_seed(0)
    plain = GEGLU(16, 8)
    layer = GEGLU(16, 8)
    layer.load_state_dict(plain.state_dict())
    prepack.onednn_linears(layer)
    x = torch.randn(3, 16)
    seen = []
    with torch.no_grad(), ops.use(geglu=lambda h: seen.append(h.shape) or ops.ref_geglu(h)):
        assert torch.allclose(layer(x), plain(x), atol=1e-6)
    assert seen == [(3, 16)] * 2 and not calls  # both layers' calls reached the seam's op
    seen = []
    hook = layer.proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        assert torch.allclose(layer(x), plain(x), atol=1e-6)
    hook.remove()
    assert seen == [(3, 16)] and not calls  # a hook on the projection: the plain call, which runs it
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    assert xg.grad is not None and layer.proj.weight.grad is not None and not calls
    for model in (plain, layer):
        state = {"lora_unet_proj.lora_down.weight": torch.full((2, 16), 0.1),
                 "lora_unet_proj.lora_up.weight": torch.full((16, 2), 0.1)}
        lora.load_lora_weights(model, state, adapter_name="a", verbose=False)
    with torch.no_grad():
        assert torch.allclose(layer(x), plain(x), atol=1e-5) and not calls  # unfused: the seam's lora_linear
        for model in (plain, layer):
            lora.fuse_lora(model)
        assert torch.allclose(layer(x), plain(x), atol=1e-5) and calls == [(16, 16)]


def test_a_fused_geglu_compiles_in_one_graph():
    """Under torch.compile (fullgraph) the GEGLU of a OneDNNLinear projection is the plain one (oneDNN's ops are not
    traced), with no graph break, and gives the eager fused output."""
    from minidiff.models.unet_blocks import FeedForward
    torch.manual_seed(0)
    model = FeedForward(32).eval()
    prepack.onednn_linears(model)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, fullgraph=True)(x)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_a_onednn_unet_with_fused_geglus_matches_diffusers(folder, dtype, tol, monkeypatch):
    """The whole UNet with every linear on oneDNN (its GEGLUs fused, counted) against diffusers' UNet on the same
    file: fp32 to summation order, bf16 to its rounding (diffusers' own bf16 rounds after the projection)."""
    import diffusers
    calls = []
    fused = prepack.onednn_geglu
    monkeypatch.setattr(prepack, "onednn_geglu", lambda x, w, b=None: calls.append(w.shape) or fused(x, w, b))
    from minidiff import UNet2DConditionModel
    ours = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    prepack.onednn_linears(ours)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    ref, out = step(theirs, dtype), step(ours, dtype)
    assert calls and len(calls) == sum(type(m).__name__ == "GEGLU" for m in ours.modules())
    assert (out - ref).abs().max().item() <= tol * ref.abs().max().item()
