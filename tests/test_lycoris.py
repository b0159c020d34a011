"""LyCORIS adapters (LoHa, LoKr, full differences) through load_lora_weights: each layer against peft's LoHa and
LoKr layers given the same factors, whole models against weights patched with peft's delta functions, kohya
names for SD 1.x and SDXL (UNet and text encoders), adapters, weights, fuse and unload, and loud errors."""
import copy

import pytest
import torch
import torch.nn as nn
from peft.tuners.loha import LoHaConfig
from peft.tuners.loha import layer as peft_loha
from peft.tuners.lokr import LoKrConfig
from peft.tuners.lokr import layer as peft_lokr

from minidiff import StableDiffusionPipeline, StableDiffusionXLPipeline
from minidiff.lora import load_lora_weights
from minidiff.weights.lora_formats import kohya_table, sai_name, sai_prefixes
from utils import assert_close, build_lora_sd, build_lora_sdxl, targets, text_out, unet_out


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 24)
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.point = nn.Conv2d(8, 12, 1)


def peft_layer(kind, base, r, alpha, **config):
    cfg_cls, mod = (LoHaConfig, peft_loha) if kind == "loha" else (LoKrConfig, peft_lokr)
    cls = mod.Linear if isinstance(base, nn.Linear) else mod.Conv2d
    torch.manual_seed(1)
    layer = cls(copy.deepcopy(base), "default", config=cfg_cls(r=r, alpha=alpha, init_weights=False, **config),
                r=r, alpha=alpha)
    return layer.eval()


def factors_of(layer):
    """The peft layer's factors under LyCORIS' key names."""
    return {name: getattr(layer, name)["default"].detach().clone() for name in layer.adapter_layer_names
            if "default" in getattr(layer, name)}


CASES = [  # (kind, layer, r, alpha, peft config)
    ("loha", "lin", 4, 2.0, {}),
    ("loha", "conv", 3, 6.0, {}),  # flattened kernel factors
    ("loha", "conv", 3, 6.0, {"use_effective_conv2d": True}),  # hada_t1 / hada_t2 (Tucker)
    ("loha", "point", 2, 1.0, {}),
    ("lokr", "lin", 2, 4.0, {}),  # lokr_w1 full, lokr_w2_a/b
    ("lokr", "lin", 1, 3.0, {"decompose_both": True, "decompose_factor": 4}),  # lokr_w1_a/b too
    ("lokr", "lin", 16, 16.0, {}),  # both full: scale 1 (alpha = r so that peft agrees)
    ("lokr", "conv", 1, 2.0, {}),  # 2-d w2_a w2_b of a flattened kernel
    ("lokr", "conv", 1, 3.0, {"use_effective_conv2d": True}),  # lokr_t2
    ("lokr", "conv", 2, 2.0, {}),  # lokr_w1 and a 4-d lokr_w2, both full: scale 1
]


@pytest.mark.parametrize("kind,name,r,alpha,config", CASES)
def test_layer_matches_peft(kind, name, r, alpha, config):
    model = Tiny()
    ref = peft_layer(kind, getattr(model, name), r, alpha, **config)
    f = factors_of(ref)
    assert f, "peft made no factors"
    if "effective" in str(config) and kind == "lokr":
        assert "lokr_t2" in f
    key = f"lora_unet_{name}"
    sd = {f"{key}.{k}": v for k, v in f.items()}
    sd[f"{key}.alpha"] = torch.tensor(alpha)
    load_lora_weights({"unet": model}, sd, adapter_name="ly", verbose=False)
    x = torch.randn(2, 16) if name == "lin" else torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        want = ref(x)
        assert (want - ref.get_base_layer()(x)).abs().max() > 1e-3, "the adapter changes nothing"
        assert_close(getattr(model, name)(x), want, name=f"{kind} {name} {config}")
        layer = getattr(model, name)
        layer.fuse(["ly"])
        assert_close(layer(x), want, name="fused")


def loha(module, rank, g, tucker=False):
    w = module.weight
    out, flat_in = w.shape[0], w[0].numel()
    if tucker:
        k = w.shape[2:]
        return {"hada_t1": torch.randn(rank, rank, *k, generator=g) * 0.3,
                "hada_w1_a": torch.randn(rank, out, generator=g) * 0.3,
                "hada_w1_b": torch.randn(rank, w.shape[1], generator=g) * 0.3,
                "hada_t2": torch.randn(rank, rank, *k, generator=g) * 0.3,
                "hada_w2_a": torch.randn(rank, out, generator=g) * 0.3,
                "hada_w2_b": torch.randn(rank, w.shape[1], generator=g) * 0.3}
    return {"hada_w1_a": torch.randn(out, rank, generator=g) * 0.3, "hada_w1_b": torch.randn(rank, flat_in, generator=g) * 0.3,
            "hada_w2_a": torch.randn(out, rank, generator=g) * 0.3, "hada_w2_b": torch.randn(rank, flat_in, generator=g) * 0.3}


def lokr(module, rank, g):
    """w1 full (2 x 2 when the sizes allow), w2 = w2_a w2_b over the flattened kernel."""
    w = module.weight
    out, cin, k = w.shape[0], w.shape[1], w[0, 0].numel()
    a, b = (2 if out % 2 == 0 else 1), (2 if cin % 2 == 0 else 1)
    return {"lokr_w1": torch.randn(a, b, generator=g) * 0.5,
            "lokr_w2_a": torch.randn(out // a, rank, generator=g) * 0.3,
            "lokr_w2_b": torch.randn(rank, cin // b * k, generator=g) * 0.3}


def peft_delta(f, alpha):
    """The reference delta from peft's own functions (LyCORIS' definitions)."""
    if "hada_t1" in f:
        s = torch.tensor(alpha / f["hada_w1_b"].shape[0])
        return peft_loha.make_weight_cp(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"], f["hada_t2"], f["hada_w2_a"],
                                        f["hada_w2_b"], scale=s)
    if "hada_w1_a" in f:
        s = torch.tensor(alpha / f["hada_w1_b"].shape[0])
        return peft_loha.make_weight(f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"], scale=s)
    if "diff" in f:
        return f["diff"]
    return peft_lokr.make_kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"], alpha / f["lokr_w2_b"].shape[0])


def lycoris_file(model, prefixes, kinds, alpha, seed, file_name=None):
    """A kohya-named LyCORIS state dict over every Linear/Conv2d of `model`, and {module path: factors}."""
    g = torch.Generator().manual_seed(seed)
    sd, by_path = {}, {}
    for i, name in enumerate(targets(model)):
        m = model.get_submodule(name)
        kind = kinds[i % len(kinds)]
        if kind == "loha_t":
            f = loha(m, 2, g, tucker=isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
        elif kind == "loha":
            f = loha(m, 2, g)
        elif kind == "lokr":
            f = lokr(m, 2, g)
        else:
            f = {"diff": torch.randn(m.weight.shape, generator=g) * 0.02}
            if m.bias is not None:
                f["diff_b"] = torch.randn(m.bias.shape, generator=g) * 0.02
        key = prefixes + (file_name(name) if file_name else name).replace(".", "_")
        sd.update({f"{key}.{k}": v for k, v in f.items()})
        sd[f"{key}.alpha"] = torch.tensor(alpha)
        by_path[name] = f
    return sd, by_path


@torch.no_grad()
def patch(model, by_path, alpha, weight=1.0):
    for name, f in by_path.items():
        m = model.get_submodule(name)
        m.weight += peft_delta(f, alpha).reshape(m.weight.shape) * weight
        if "diff_b" in f:
            m.bias += f["diff_b"] * weight


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_lora_sd(str(tmp_path_factory.mktemp("sd_lycoris")))


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return build_lora_sdxl(str(tmp_path_factory.mktemp("sdxl_lycoris")))


def test_sd1_every_layer_unet_and_text_encoder(sd_folder):
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    ref = StableDiffusionPipeline.from_pretrained(sd_folder)
    base = unet_out(pipe)
    unet_sd, unet_f = lycoris_file(pipe.unet, "lora_unet_", ["loha_t", "lokr", "full", "loha"], 1.5, 0)
    te_sd, te_f = lycoris_file(pipe.text_encoder, "lora_te_", ["lokr", "loha", "full"], 1.0, 1)
    report = pipe.load_lora_weights({**unet_sd, **te_sd}, adapter_name="ly")
    assert report.modules == {"unet": len(unet_f), "text_encoder": len(te_f)}  # every key landed
    assert "LyCORIS" in report.format
    patch(ref.unet, unet_f, 1.5)
    patch(ref.text_encoder, te_f, 1.0)
    assert (unet_out(pipe) - base).abs().max() > 1e-3
    assert_close(unet_out(pipe), unet_out(ref), name="unet with LyCORIS")
    for a, b in zip(text_out(pipe.text_encoder), text_out(ref.text_encoder)):
        assert_close(a, b, name="text encoder with LyCORIS")
    # weights and fusing, as for a LoRA
    unfused = unet_out(pipe)
    pipe.fuse_lora()
    assert_close(unet_out(pipe), unfused, name="fused")
    pipe.unfuse_lora()
    pipe.set_adapters("ly", 0.5)
    half = StableDiffusionPipeline.from_pretrained(sd_folder)
    patch(half.unet, unet_f, 1.5, weight=0.5)
    assert_close(unet_out(pipe), unet_out(half), name="adapter weight 0.5")
    pipe.unload_lora_weights()
    assert_close(unet_out(pipe), base, name="unloaded")


def test_sdxl_sai_names_and_both_text_encoders(sdxl_folder):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    prefixes = sai_prefixes(pipe.unet)
    sd, unet_f = lycoris_file(pipe.unet, "lora_unet_", ["lokr", "loha_t", "full"], 4.0, 2,
                              file_name=lambda n: sai_name(n, prefixes) or n)
    assert any("input_blocks" in k for k in sd)
    te1, te1_f = lycoris_file(pipe.text_encoder, "lora_te1_", ["loha"], 2.0, 3)
    te2, te2_f = lycoris_file(pipe.text_encoder_2, "lora_te2_", ["lokr"], 2.0, 4)
    report = pipe.load_lora_weights({**sd, **te1, **te2})
    assert report.modules == {"unet": len(unet_f), "text_encoder": len(te1_f), "text_encoder_2": len(te2_f)}
    patch(ref.unet, unet_f, 4.0)
    patch(ref.text_encoder, te1_f, 2.0)
    patch(ref.text_encoder_2, te2_f, 2.0)
    assert_close(unet_out(pipe), unet_out(ref), name="SDXL unet with LyCORIS")
    for enc in ("text_encoder", "text_encoder_2"):
        for a, b in zip(text_out(getattr(pipe, enc)), text_out(getattr(ref, enc))):
            assert_close(a, b, name=enc)
    unfused = unet_out(pipe)
    pipe.fuse_lora()
    assert_close(unet_out(pipe), unfused, name="SDXL fused")


def test_every_key_lands_or_is_an_error():
    model = Tiny()
    g = torch.Generator().manual_seed(0)
    good = {f"lora_unet_lin.{k}": v for k, v in loha(model.lin, 2, g).items()}
    with pytest.raises(ValueError, match=r"hada_w2_b missing"):
        load_lora_weights({"unet": model}, {k: v for k, v in good.items() if not k.endswith("w2_b")})
    with pytest.raises(ValueError, match=r"unknown kohya suffix 'hada_w3'"):
        load_lora_weights({"unet": model}, {**good, "lora_unet_lin.hada_w3": torch.zeros(1)})
    wrong = {f"lora_unet_conv.{k}": v for k, v in loha(model.lin, 2, g).items()}  # Linear factors on a Conv2d
    with pytest.raises(ValueError, match=r"lora_unet_conv\.hada_w1_a \(LyCORIS loha\).*delta of shape \(24, 16\)"):
        load_lora_weights({"unet": model}, wrong)
    mixed = {**good, "lora_unet_lin.lokr_w1": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"more than one LyCORIS kind"):
        load_lora_weights({"unet": model}, mixed)
    no_bias = nn.Module()
    no_bias.lin = nn.Linear(16, 24, bias=False)
    with pytest.raises(ValueError, match=r"diff_b \(24,\) does not fit the bias None"):
        load_lora_weights({"unet": no_bias}, {"lora_unet_lin.diff": torch.zeros(24, 16),
                                              "lora_unet_lin.diff_b": torch.zeros(24)})
    assert kohya_table({"unet": model})["lora_unet_lin"] == ("unet", "lin")


def test_lora_and_lycoris_adapters_together():
    model = Tiny()
    base = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    f = loha(model.lin, 2, g)
    down, up = torch.randn(3, 16, generator=g) * 0.2, torch.randn(24, 3, generator=g) * 0.2
    load_lora_weights({"unet": model}, {f"lora_unet_lin.{k}": v for k, v in f.items()}, adapter_name="loha",
                      verbose=False)
    load_lora_weights({"unet": model}, {"lora_unet_lin.lora_down.weight": down, "lora_unet_lin.lora_up.weight": up},
                      adapter_name="lora", verbose=False)
    from minidiff.lora import set_adapters
    set_adapters({"unet": model}, ["loha", "lora"], [0.5, 2.0])
    x = torch.randn(4, 16)
    with torch.no_grad():
        want = base.lin(x) + 0.5 * x @ peft_delta(f, 2.0).T + 2.0 * (x @ down.T) @ up.T  # no alpha: scale 1
        assert_close(model.lin(x), want, name="LoHa + LoRA")
