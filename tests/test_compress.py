"""Mixed-bit palettisation (minidiff.compress): k-means LUTs, packing, Palettised layers, recipes in Apple's
format, save/load, the analysis, the Triton LUT kernel and the CLI.

No library does this for PyTorch, so the references are the definitions: Lloyd's fixed point for k-means,
coremltools' LINEAR int8 formula (written again here in numpy), and Apple's recipe rule.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from minidiff import UNet2DConditionModel, compress, ops
from minidiff.compress import NBITS

BUNDLED = compress.BUNDLED
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def unet():
    return UNet2DConditionModel.from_pretrained(BUNDLED, subfolder="unet")


def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 8, 8, 8, generator=g), torch.tensor([900, 250]), torch.randn(2, 77, 64, generator=g))


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("numel", [1, 7, 8, 13, 4096 + 3])
def test_pack_round_trip(nbits, numel):
    idx = torch.randint(0, 2 ** nbits, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.uint8)
    packed = compress.pack(idx, nbits)
    assert packed.dtype == torch.uint8 and packed.numel() == compress.packed_size(numel, nbits)
    assert torch.equal(compress.unpack(packed, nbits, numel), idx)


def test_pack_layout_is_msb_first():
    # 3 six-bit indices 0b000001, 0b111111, 0b100000 -> bits 000001 111111 100000 (+ 6 zero bits)
    packed = compress.pack(torch.tensor([1, 63, 32], dtype=torch.uint8), 6)
    assert packed.tolist() == [0b00000111, 0b11111000, 0b00000000]


@pytest.mark.parametrize("nbits", NBITS)
def test_palettise_values_are_the_lut(nbits):
    w = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(nbits))
    idx, lut = compress.palettise(w, nbits, group_size=4)
    assert idx.shape == w.shape and idx.dtype == torch.uint8 and int(idx.max()) < 2 ** nbits
    assert lut.shape == (2, 2 ** nbits) and lut.dtype == torch.float16
    back = compress.depalettise(idx, lut)
    for g in range(2):  # every weight of a group is a value of that group's LUT, exactly
        assert set(back[4 * g:4 * g + 4].flatten().tolist()) <= set(lut[g].tolist())
    # each weight took its nearest LUT value
    rows = w.reshape(2, -1).float()
    nearest = (rows[:, :, None] - lut.float()[:, None, :]).abs().min(-1).values
    assert torch.allclose((rows - back.reshape(2, -1).float()).abs(), nearest)


def test_kmeans_is_a_lloyd_fixed_point():
    x = torch.randn(3000, generator=torch.Generator().manual_seed(1))  # smaller than the sample: fit on all
    c = compress.kmeans_1d(x, 16, iters=100)
    idx = compress.assign(x, c)
    for j in range(16):
        members = x[idx == j]
        if members.numel():
            assert abs(members.mean().item() - c[j].item()) < 1e-5
    assert torch.all(c[1:] >= c[:-1])


def test_kmeans_exact_when_few_distinct_values():
    x = torch.tensor([0.5, -1.0, 2.0, 0.5, 2.0] * 10)
    idx, lut = compress.palettise(x.view(5, 10), 2)
    assert torch.equal(compress.depalettise(idx, lut).float(), x.view(5, 10))


def test_palettise_refuses_bad_arguments():
    with pytest.raises(ValueError, match="nbits=3"):
        compress.palettise(torch.randn(4, 4), 3)
    with pytest.raises(ValueError, match="group_size=3"):
        compress.palettise(torch.randn(4, 4), 4, group_size=3)


def test_linear_8bit_is_coremltools_linear_int8():
    w = torch.randn(5, 40, generator=torch.Generator().manual_seed(2)) * torch.arange(1, 6)[:, None]
    v = w.numpy().astype(np.float64)
    lo = np.minimum(v.min(1, keepdims=True), 0)
    hi = np.maximum(v.max(1, keepdims=True), 0)
    zero = np.clip(np.round((-128 * hi - 127 * lo) / (hi - lo)), -128, 127)
    q = np.clip(np.round(v * 255 / (hi - lo)) + zero, -128, 127)
    expected = (q - zero) * (hi - lo) / 255
    assert np.allclose(compress.linear_8bit(w).numpy(), expected, atol=1e-5)


def test_8bit_layer_output_close_to_original():
    layer = nn.Linear(256, 128)
    torch.nn.init.normal_(layer.weight, std=0.05)
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(3))
    ref = layer(x)
    model = nn.Sequential(layer)
    compress.apply_recipe(model, {"0": 8})
    assert isinstance(model[0], compress.Palettised)
    out = model(x)
    assert compress.psnr(ref, out) > 40  # 256 k-means levels on a Gaussian: about 45 dB measured
    assert (out - ref).abs().max() / ref.abs().max() < 0.02


def test_conv_layers_and_groups(unet):
    conv = unet.conv_in
    x = torch.randn(1, conv.in_channels, 8, 8)
    ref = conv(x)
    model = nn.Sequential(conv)
    with torch.no_grad():
        stats = compress.apply_recipe(model, {"0": 6}, group_size=conv.out_channels // 4)
        out = model(x)
    assert model[0].weight_lut.shape == (4, 64) and stats["nbits"] == 6
    assert compress.psnr(ref, out) > 30


def hand_written_apple_file(tmp_path, unet):
    """A pre-analysis file in the form Apple's mixed_bit_compression_pre_analysis.py writes (only the keys
    its apply step reads: model_version and recipes {key: {module path: bits}})."""
    names = [n for n, _ in compress.palettisable(unet, 20_000)]
    recipe = {n: [2, 4, 6, 8, 16][i % 5] for i, n in enumerate(names)}
    data = {"model_version": "minidiff/shapes-sd", "baselines": {"recipe_5.00_bit_mixedpalette": 50.0},
            "recipes": {"recipe_5.00_bit_mixedpalette": recipe, "recipe_2.00_bit_mixedpalette": {n: 2 for n in names}}}
    path = tmp_path / "recipes.json"
    path.write_text(json.dumps(data))
    return path, recipe


def test_apple_recipe_file_apply_save_load(tmp_path, unet):
    path, recipe = hand_written_apple_file(tmp_path, unet)
    with pytest.raises(ValueError, match="recipe_2.00_bit_mixedpalette"):  # two recipes: one must be chosen
        compress.read_recipe(path)
    assert compress.read_recipe(path, "recipe_5.00_bit_mixedpalette") == recipe
    model = UNet2DConditionModel.from_pretrained(BUNDLED, subfolder="unet")
    x, t, c = unet_inputs()
    with torch.no_grad():
        ref = model(x, t, c).sample
        compress.apply_recipe(model, recipe)
        out = model(x, t, c).sample
    palettised = {n: m.nbits for n, m in model.named_modules() if isinstance(m, compress.Palettised)}
    assert palettised == {n: b for n, b in recipe.items() if b != 16}
    assert 20 < compress.psnr(ref, out) < 200

    folder = tmp_path / "unet"
    compress.save_palettised(model, folder, recipe)
    file = folder / "diffusion_pytorch_model.safetensors"
    # the size on disk is the compressed size: packed indices + float16 LUTs + the rest in float16
    expected = 0
    for n, m in model.named_modules():
        if isinstance(m, compress.Palettised):
            expected += m.weight_packed.numel() + m.weight_lut.numel() * 2
    expected += 2 * sum(p.numel() for k, p in model.state_dict().items() if "weight_packed" not in k and
                        "weight_lut" not in k)
    size = os.path.getsize(file)
    assert expected <= size < expected + 64 * 1024  # + the JSON header
    assert size < 0.6 * os.path.getsize(os.path.join(BUNDLED, "unet", "diffusion_pytorch_model.safetensors"))

    loaded = UNet2DConditionModel.from_pretrained(folder)
    with torch.no_grad():
        again = loaded(x, t, c).sample
        assert torch.equal(again, out)
        compress.dequantise(loaded)
        assert not any(isinstance(m, compress.Palettised) for m in loaded.modules())
        assert torch.allclose(loaded(x, t, c).sample, out, atol=1e-5)


def test_bad_recipes_are_clear_errors(unet):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"unknown layer.*down_blocks\.9\.nope"):
        compress.apply_recipe(model, {"down_blocks.9.nope": 4})
    with pytest.raises(ValueError, match=r"bits outside.*0: 3"):
        compress.apply_recipe(model, {"0": 3})
    with pytest.raises(ValueError, match=r"0: '4'"):
        compress.apply_recipe(model, {"0": "4"})
    with pytest.raises(ValueError, match=r"0: True"):
        compress.apply_recipe(model, {"0": True})
    with pytest.raises(ValueError, match="JSON object"):
        compress.apply_recipe(model, [("0", 4)])
    assert isinstance(model[0], nn.Linear)  # nothing was changed by a refused recipe


def test_build_recipe_follows_apples_rule():
    sizes = {"a": 100, "b": 300}
    cumulative = {"2": {"a": [40.0, 42.0], "b": [20.0, 22.0]}, "8": {"a": [70.0, 70.0], "b": [60.0, 60.0]}}
    recipe, stats = compress.build_recipe(cumulative, sizes, 30.0)
    assert recipe == {"a": 2, "b": 8} and stats["nbits"] == (2 * 100 + 8 * 300) / 400
    assert compress.build_recipe(cumulative, sizes, 65.0)[0] == {"a": 8, "b": 16}
    recipe, stats = compress.recipe_for_bits(cumulative, sizes, 7.0)
    assert recipe == {"a": 2, "b": 8} and stats["nbits"] <= 7.0


def test_analyse_writes_apples_format_and_resumes(tmp_path):
    from minidiff import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(BUNDLED)
    calls = []
    original_call = type(pipe).__call__

    class Counting(type(pipe)):
        def __call__(self, *a, **k):
            calls.append(1)
            return original_call(self, *a, **k)

    pipe.__class__ = Counting
    out = str(tmp_path / "analysis.json")
    kwargs = dict(prompts=["a red circle on a blue background"], nbits=(2, 8), min_size=140_000,
                  targets=(5.0,), progress=False, num_inference_steps=1, guidance_scale=5.0)
    res = compress.analyse(pipe, out, **kwargs)
    n = len(res["sizes"])
    assert n >= 3
    assert set(res) >= {"single_layer", "cumulative", "baselines", "recipes"}
    for b in ("2", "8"):
        assert set(res["single_layer"][b]) == set(res["sizes"]) | {"metadata"}
        assert res["cumulative"][b]["metadata"]["candidates"] == compress.descending_psnr_order(res["single_layer"][b])
        # 8-bit costs less signal than 2-bit, layer by layer
    assert all(res["single_layer"]["8"][k][0] > res["single_layer"]["2"][k][0] for k in res["sizes"])
    assert res["baselines"]["linear_8bit"] < res["baselines"]["original"]
    (key, recipe), = res["recipes"].items()
    assert key.startswith("recipe_") and key.endswith("_bit_mixedpalette") and set(recipe) == set(res["sizes"])
    assert json.load(open(out)) == json.loads(json.dumps(res))
    first = len(calls)
    assert first == 1 + 2 * 2 * n + 2 + 1  # reference, single + cumulative per bit width, baselines, recipe

    calls.clear()
    again = compress.analyse(pipe, out, **kwargs)  # resumed: only the reference and the summaries run again
    assert len(calls) == 1 + 2 + 1 and again["single_layer"] == res["single_layer"]
    with pytest.raises(ValueError, match="other settings"):
        compress.analyse(pipe, out, **{**kwargs, "seed": 1})


def test_triton_lut_kernel_matches_reference():
    pytest.importorskip("triton")  # an optional dependency: the [triton] extra; CI installs it
    code = """
import torch
from minidiff import compress, ops
from minidiff.kernels.lut import lut_weight
for nbits in compress.NBITS:
    for shape, groups in [((6, 7, 3, 3), 3), ((33, 5), 1), ((1,), 1), ((64, 129), 64)]:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(nbits))
        idx, lut = compress.palettise(w, nbits, group_size=shape[0] // groups)
        packed = compress.pack(idx, nbits)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            ref = ops.ref_lut_weight(packed, lut.to(dtype), nbits, shape)
            assert torch.equal(lut_weight(packed, lut.to(dtype), nbits, shape), ref), (nbits, shape, dtype)
# through the seam: a palettised layer computes the same with the kernel plugged in
layer = torch.nn.Sequential(torch.nn.Conv2d(5, 12, 3, padding=1))
compress.apply_recipe(layer, {"0": 6}, group_size=4)
x = torch.randn(2, 5, 9, 7)
with torch.no_grad():
    ref = layer(x)
    with ops.use(lut_weight=lut_weight):
        assert torch.equal(layer(x), ref)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_lut_weight_goes_through_the_seam(unet):
    model = nn.Sequential(nn.Linear(64, 32))
    compress.apply_recipe(model, {"0": 4})
    seen = []
    with ops.use(lut_weight=lambda *a: (seen.append(a[2]), ops.ref_lut_weight(*a))[1]):
        model(torch.randn(2, 64))
    assert seen == [4]


def test_cli_apply_then_generate(tmp_path, unet):
    path, _ = hand_written_apple_file(tmp_path, unet)
    folder = tmp_path / "small"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = lambda *args: subprocess.run([sys.executable, "-m", "minidiff", *args], env=env, capture_output=True,
                                       text=True, timeout=300)
    r = run("compress", "apply", "--recipe", str(path), "--selected-recipe", "recipe_5.00_bit_mixedpalette",
            "--out", str(folder))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bits on average" in r.stdout and (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (folder / "model_index.json").exists() and (folder / "vae").is_dir()
    r = run("compress", "apply", "--recipe", str(path), "--out", str(folder))  # exists: refused, nothing touched
    assert r.returncode != 0 and "exists" in r.stderr
    png = tmp_path / "x.png"
    r = run("generate", "a red circle on a blue background", "--model", str(folder), "--out", str(png), "--steps", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert png.exists()
