"""LoRA files in every supported format, loaded by diffusers (PEFT) and by minidiff into tiny SD 1.x and SDXL
pipelines: same UNet and text-encoder outputs, same images; adapters, fusing, unloading, errors."""
import json
import os

import pytest
import torch

from minidiff import lora
from tests.utils import (assert_close, assert_same_array, build_lora_sd, build_lora_sdxl, compare_models, images,
                         kohya, load_both, lora_effect, lora_pair, peft, ref_load, save, targets, unet_out)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

# ----------------------------------------------------------------------------- tiny pipelines (built by tests/utils.py)


@pytest.fixture(scope="module")
def sd_repo(tmp_path_factory):
    return build_lora_sd(str(tmp_path_factory.mktemp("sd")))


@pytest.fixture(scope="module")
def sdxl_repo(tmp_path_factory):
    return build_lora_sdxl(str(tmp_path_factory.mktemp("sdxl")))


# ----------------------------------------------------------------------------- formats vs diffusers

@pytest.mark.parametrize("alpha", [None, 2.0])
def test_kohya_sd1_every_layer(tmp_path, sd_repo, alpha):
    """kohya with diffusers module names on every Linear/Conv2d (LoCon convs included) and the text encoder."""
    ref, ours = load_both(sd_repo)
    sd = kohya(ref.unet, "lora_unet_", targets(ref.unet), alpha=alpha)
    sd.update(kohya(ref.text_encoder, "lora_te_", targets(ref.text_encoder), alpha=alpha, seed=1))
    path = save(sd, str(tmp_path / "kohya.safetensors"))
    counts = {"unet": len(targets(ref.unet)), "text_encoder": len(targets(ref.text_encoder))}
    ref_load(ref, path, adapter_name="style")
    report = ours.load_lora_weights(path, adapter_name="style")
    assert report.format == "kohya"
    assert report.modules == counts
    assert isinstance(ours.unet.down_blocks[0].resnets[0].conv1, lora.LoRAConv2d)
    assert lora_effect(ours, unet_out) > 0.05
    compare_models(ref, ours)
    assert_same_array(images(ours), images(ref))
    # cross_attention_kwargs={"scale": s} scales the UNet's and the text encoder's LoRA for the call
    assert_same_array(images(ours, cross_attention_kwargs={"scale": 0.5}),
                      images(ref, cross_attention_kwargs={"scale": 0.5}))


# SAI / LDM names of the tiny SDXL UNet (layers_per_block 2; Down, CrossAttnDown, CrossAttnDown), written by hand
SAI_NAMES = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    "input_blocks.2.0.emb_layers.1": "down_blocks.0.resnets.1.time_emb_proj",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks.4.1.proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks.5.1.transformer_blocks.0.attn2.to_k": "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.8.1.transformer_blocks.1.ff.net.0.proj":
        "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.0.proj",
    "middle_block.0.out_layers.3": "mid_block.resnets.0.conv2",
    "middle_block.1.transformer_blocks.1.attn2.to_out.0":
        "mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0",
    "middle_block.2.in_layers.2": "mid_block.resnets.1.conv1",
    "output_blocks.0.1.proj_out": "up_blocks.0.attentions.0.proj_out",
    "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.4.0.skip_connection": "up_blocks.1.resnets.1.conv_shortcut",
    "output_blocks.5.1.transformer_blocks.0.ff.net.2": "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2",
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.8.0.out_layers.3": "up_blocks.2.resnets.2.conv2",
    "out.2": "conv_out",
}


def test_kohya_sdxl_sai_names(tmp_path, sdxl_repo):
    """SDXL kohya files name the UNet's layers as the original SAI/LDM code does (input_blocks_4_1_...)."""
    ref, ours = load_both(sdxl_repo, xl=True)
    sd = kohya(ref.unet, "lora_unet_", list(SAI_NAMES.values()), alpha=8.0, file_names=list(SAI_NAMES))
    te = targets(ref.text_encoder)
    sd.update(kohya(ref.text_encoder, "lora_te1_", te, alpha=8.0, seed=1))
    sd.update(kohya(ref.text_encoder_2, "lora_te2_", targets(ref.text_encoder_2), alpha=8.0, seed=2))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    path = save(sd, str(tmp_path / "sai.safetensors"))
    counts = {"unet": len(SAI_NAMES), "text_encoder": len(te), "text_encoder_2": len(targets(ref.text_encoder_2))}
    ref_load(ref, path)
    report = ours.load_lora_weights(path)
    assert report.adapter_name == "default_0" and report.format == "kohya (SAI UNet names)"
    assert report.modules == counts
    assert lora_effect(ours, unet_out) > 0.05
    compare_models(ref, ours, ("text_encoder", "text_encoder_2"))
    assert_same_array(images(ours, guidance_scale=3.0), images(ref, guidance_scale=3.0))


def test_peft_with_metadata_and_text_encoders(tmp_path, sd_repo, sdxl_repo):
    """diffusers/PEFT keys, alphas from the file's lora_adapter_metadata (with an alpha_pattern)."""
    for repo, encoders in ((sd_repo, ("text_encoder",)), (sdxl_repo, ("text_encoder", "text_encoder_2"))):
        ref, ours = load_both(repo, xl=len(encoders) == 2)
        unet_names = [n for n in targets(ref.unet) if "attentions" in n or "resnets.0" in n]
        sd = peft(ref.unet, "unet", unet_names)
        metadata = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"proj_in": 2},
                    "unet.rank_pattern": {}, "unet.target_modules": unet_names}
        for i, name in enumerate(encoders):
            names = targets(getattr(ref, name))
            sd.update(peft(getattr(ref, name), name, names, seed=i + 1))
            metadata.update({f"{name}.r": 4, f"{name}.lora_alpha": 2 + i, f"{name}.rank_pattern": {},
                             f"{name}.alpha_pattern": {}, f"{name}.target_modules": names})
        path = save(sd, str(tmp_path / f"peft{len(encoders)}.safetensors"), metadata)
        ref_load(ref, path, adapter_name="p")
        report = ours.load_lora_weights(path, adapter_name="p")
        assert report.format == "diffusers/PEFT"
        proj_in = ours.unet.get_submodule("down_blocks.1.attentions.0.proj_in")
        assert proj_in.adapters["p"].scale == 0.5  # alpha_pattern: 2 / 4
        to_q = next(n for n in unet_names if n.endswith("attn1.to_q"))
        assert ours.unet.get_submodule(to_q).adapters["p"].scale == 2.0  # lora_alpha 8 / 4
        compare_models(ref, ours, encoders)


def test_old_diffusers_processor_form(tmp_path, sd_repo):
    """The older diffusers layout: attn1.processor.to_q_lora.down.weight, text encoder to_q_lora / lora_linear_layer."""
    ref, ours = load_both(sd_repo)
    g = torch.Generator().manual_seed(3)
    sd = {}
    for block in ("down_blocks.0.attentions.1", "mid_block.attentions.0", "up_blocks.2.attentions.0"):
        for attn in ("attn1", "attn2"):
            for proj, module in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
                path = f"{block}.transformer_blocks.0.{attn}"
                down, up = lora_pair(ref.unet.get_submodule(f"{path}.{module}"), 4, g)
                sd[f"unet.{path}.processor.{proj}_lora.down.weight"] = down
                sd[f"unet.{path}.processor.{proj}_lora.up.weight"] = up
    layer = "text_model.encoder.layers.1"
    for proj, module in (("to_q", "q_proj"), ("to_out", "out_proj")):
        down, up = lora_pair(ref.text_encoder.get_submodule(f"{layer}.self_attn.{module}"), 4, g)
        sd[f"text_encoder.{layer}.self_attn.{proj}_lora.down.weight"] = down
        sd[f"text_encoder.{layer}.self_attn.{proj}_lora.up.weight"] = up
    down, up = lora_pair(ref.text_encoder.get_submodule(f"{layer}.mlp.fc1"), 4, g)
    sd[f"text_encoder.{layer}.mlp.fc1.lora_linear_layer.down.weight"] = down
    sd[f"text_encoder.{layer}.mlp.fc1.lora_linear_layer.up.weight"] = up
    path = save(sd, str(tmp_path / "old.safetensors"))
    ref_load(ref, path)
    report = ours.load_lora_weights(path)
    assert report.modules == {"unet": 24, "text_encoder": 3}
    assert "old" in report.format
    assert lora_effect(ours, unet_out) > 2e-3  # 20 x the comparison tolerance
    compare_models(ref, ours)


# ----------------------------------------------------------------------------- adapters

@pytest.fixture(scope="module")
def two_files(tmp_path_factory, sd_repo):
    """An LCM-LoRA-like file (kohya, alpha 8, convs and attention) and a 'toy' style file (PEFT, with text encoder)."""
    folder = tmp_path_factory.mktemp("loras")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_repo)
    convs = [n for n in targets(ref.unet) if "resnets" in n or "samplers" in n]
    attn = [n for n in targets(ref.unet) if "attentions" in n]
    lcm = save(kohya(ref.unet, "lora_unet_", convs + attn, alpha=8.0, seed=10), str(folder / "lcm.safetensors"))
    sd = peft(ref.unet, "unet", attn[::2], seed=11)
    sd.update(peft(ref.text_encoder, "text_encoder", targets(ref.text_encoder), seed=12))
    toy = save(sd, str(folder / "toy.safetensors"))
    return lcm, toy


def test_two_adapters_with_weights(sd_repo, two_files):
    lcm, toy = two_files
    ref, ours = load_both(sd_repo)
    for pipe in (ref, ours):
        ref_load(pipe, lcm, adapter_name="lcm")
        ref_load(pipe, toy, adapter_name="toy")
    # as in diffusers, the adapter loaded last is the one in use
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["toy"]
    assert ours.get_list_adapters() == {"unet": ["lcm", "toy"], "text_encoder": ["toy"]}
    compare_models(ref, ours)
    for pipe in (ref, ours):
        pipe.set_adapters(["lcm", "toy"], adapter_weights=[1.0, 0.8])
    assert ours.get_active_adapters() == ["lcm", "toy"]
    compare_models(ref, ours)
    assert_same_array(images(ours), images(ref))
    # per-component weights
    for pipe in (ref, ours):
        pipe.set_adapters(["lcm", "toy"], adapter_weights=[0.5, {"unet": 0.3, "text_encoder": 1.5}])
    compare_models(ref, ours)
    # disabled: the base model's outputs
    base = diffusers.StableDiffusionPipeline.from_pretrained(sd_repo)
    ours.disable_lora()
    compare_models(base, ours)
    ours.enable_lora()
    compare_models(ref, ours)
    with pytest.raises(ValueError, match=r"adapters \['nope'\] are not loaded"):
        ours.set_adapters(["lcm", "nope"])
    with pytest.raises(ValueError, match="already loaded"):
        ours.load_lora_weights(toy, adapter_name="toy")


def test_fuse_unfuse_is_exact(sd_repo, two_files):
    lcm, toy = two_files
    ref, ours = load_both(sd_repo)
    for pipe in (ref, ours):
        ref_load(pipe, lcm, adapter_name="lcm")
        ref_load(pipe, toy, adapter_name="toy")
        pipe.set_adapters(["lcm", "toy"], adapter_weights=[1.0, 0.8])
    before = {c: {k: v.clone() for k, v in getattr(ours, c).state_dict().items()} for c in ("unet", "text_encoder")}
    unfused_unet = unet_out(ours)
    for pipe in (ref, ours):
        pipe.fuse_lora(lora_scale=0.7)
    assert ours.unet.get_submodule("down_blocks.0.resnets.0.conv1").fused == ["lcm"]
    compare_models(ref, ours)
    fused = unet_out(ours)
    assert (fused - unfused_unet).abs().max() > 1e-3  # lora_scale 0.7 changed something
    ours.unfuse_lora()
    for c, sd in before.items():
        now = getattr(ours, c).state_dict()
        assert now.keys() == sd.keys()
        bad = [k for k in sd if not torch.equal(now[k], sd[k])]
        assert not bad, f"{c}: unfusing did not restore {bad[:3]} exactly"
    assert torch.equal(unet_out(ours), unfused_unet)


def test_unload_restores_plain_modules(sd_repo, two_files):
    lcm, toy = two_files
    base = diffusers.StableDiffusionPipeline.from_pretrained(sd_repo)
    _, ours = load_both(sd_repo)
    keys = set(ours.unet.state_dict())
    ours.load_lora_weights(lcm, adapter_name="lcm")
    ours.load_lora_weights(toy, adapter_name="toy")
    assert set(ours.unet.state_dict()) == keys  # adapters stay out of the state dict: save_pretrained is unchanged
    ours.unload_lora_weights()
    assert not lora.lora_layers(ours.unet) and not lora.lora_layers(ours.text_encoder)
    assert type(ours.unet.down_blocks[0].resnets[0].conv1) is torch.nn.Conv2d
    assert type(ours.text_encoder.text_model.encoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert ours.get_list_adapters() == {}
    compare_models(base, ours)
    # delete_adapters removes one adapter, and the layers it alone used go back to plain modules
    ours.load_lora_weights(lcm, adapter_name="lcm")
    ours.load_lora_weights(toy, adapter_name="toy")
    ours.delete_adapters("toy")
    assert ours.get_list_adapters() == {"unet": ["lcm"]}
    assert type(ours.text_encoder.text_model.encoder.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_alpha_and_rank_per_layer(tmp_path, sd_repo):
    """kohya semantics layer by layer: scale alpha / rank, rank from the tensors, no alpha meaning scale 1."""
    _, ours = load_both(sd_repo)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    conv = "down_blocks.0.resnets.0.conv1"
    sd = kohya(ours.unet, "lora_unet_", [q], rank=2, alpha=3.0)
    sd.update(kohya(ours.unet, "lora_unet_", [conv], rank=5, seed=4))  # no alpha
    base_q = ours.unet.get_submodule(q)
    base_conv = ours.unet.get_submodule(conv)
    x = torch.randn(2, 5, base_q.in_features)
    y = torch.randn(1, base_conv.in_channels, 6, 6)
    with torch.no_grad():
        ref_q, ref_conv = base_q(x), base_conv(y)
    ours.load_lora_weights(sd)
    k = "lora_unet_" + q.replace(".", "_")
    down, up = sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"]
    kc = "lora_unet_" + conv.replace(".", "_")
    cdown, cup = sd[kc + ".lora_down.weight"], sd[kc + ".lora_up.weight"]
    with torch.no_grad():
        assert_close(ours.unet.get_submodule(q)(x), ref_q + 1.5 * x @ down.T @ up.T)
        lo = torch.nn.functional.conv2d(torch.nn.functional.conv2d(y, cdown, padding=1), cup)
        assert_close(ours.unet.get_submodule(conv)(y), ref_conv + lo)


# ----------------------------------------------------------------------------- files and errors

def test_unmatched_keys_are_an_error(tmp_path, sd_repo):
    _, ours = load_both(sd_repo)
    sd = kohya(ours.unet, "lora_unet_", ["down_blocks.0.resnets.0.conv1"])
    sd["lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight"] = torch.zeros(4, 16, 3, 3)
    sd["lora_unet_down_blocks_7_resnets_0_conv1.lora_up.weight"] = torch.zeros(16, 4, 1, 1)
    sd["text_encoder.text_model.encoder.layers.9.mlp.fc1.lora_A.weight"] = torch.zeros(4, 32)
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale"] = torch.zeros(1, 32)
    sd["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"] = torch.zeros(4, 16, 3, 3)  # the same layer again
    path = save(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)5 of 7 keys match no module(?=.*down_blocks_7_resnets_0_conv1)"
                                         r"(?=.*has no Linear/Conv2d text_model.encoder.layers.9.mlp.fc1)(?=.*DoRA)"
                                         r"(?=.*a second down for unet.down_blocks.0.resnets.0.conv1)"):
        ours.load_lora_weights(path)
    assert not lora.lora_layers(ours.unet)  # nothing was injected
    report = ours.load_lora_weights(path, allow_partial=True)
    assert report.modules == {"unet": 1, "text_encoder": 0}


def test_shapes_that_do_not_fit_are_an_error(tmp_path, sd_repo, sdxl_repo):
    """An SD 1.x LoRA on SDXL: its cross-attention keys exist in SDXL but project 32, not 64, features."""
    _, sd_pipe = load_both(sd_repo)
    _, xl = load_both(sdxl_repo, xl=True)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    sd = kohya(sd_pipe.unet, "lora_unet_", [name])
    with pytest.raises(ValueError, match=r"attn2_to_k.lora_down.weight \(and its pair\): down \(4, 32\), up \(32, 4\) "
                                         r"do not fit unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k "
                                         r"\(Linear 64 -> 32\), which needs down \(4, 64\)"):
        xl.load_lora_weights(sd)
    whole = kohya(sd_pipe.unet, "lora_unet_", targets(sd_pipe.unet))
    with pytest.raises(ValueError, match="match no module"):
        xl.load_lora_weights(whole)
    with pytest.raises(ValueError, match="do not fit"):
        xl.load_lora_weights(whole, allow_partial=True)


def test_files_folders_and_pickle(tmp_path, sd_repo):
    _, ours = load_both(sd_repo)
    sd = kohya(ours.unet, "lora_unet_", ["conv_in"])
    folder = tmp_path / "repo"
    folder.mkdir()
    save(sd, str(folder / lora.DEFAULT_WEIGHT_NAME))
    assert ours.load_lora_weights(str(folder), adapter_name="a").modules["unet"] == 1
    save(sd, str(folder / "other.safetensors"))
    assert ours.load_lora_weights(str(folder), weight_name="other.safetensors", adapter_name="b").modules["unet"] == 1
    os.remove(folder / lora.DEFAULT_WEIGHT_NAME)
    with pytest.raises(FileNotFoundError, match="pass weight_name"):
        save(sd, str(folder / "third.safetensors"))
        ours.load_lora_weights(str(folder))
    torch.save(sd, tmp_path / "lora.bin")
    with pytest.raises(ValueError, match="pickle"):
        ours.load_lora_weights(str(tmp_path / "lora.bin"))
    assert ours.load_lora_weights(str(tmp_path / "lora.bin"), adapter_name="c", allow_pickle=True).modules["unet"] == 1
    with pytest.raises(ValueError, match="adapter_name='x.y'"):
        ours.load_lora_weights(sd, adapter_name="x.y")


def test_peft_adapter_config_beside_the_file(tmp_path, sd_repo):
    """PEFT's own layout: adapter_model.safetensors (base_model.model.<module> keys) + adapter_config.json."""
    _, ours = load_both(sd_repo)
    names = ["mid_block.attentions.0.proj_in", "mid_block.attentions.0.proj_out"]
    sd = {f"base_model.model.{k.removeprefix('unet.')}": v for k, v in peft(ours.unet, "unet", names).items()}
    save(sd, str(tmp_path / "adapter_model.safetensors"))
    with open(tmp_path / "adapter_config.json", "w") as f:
        json.dump({"r": 4, "lora_alpha": 16, "use_rslora": True, "alpha_pattern": {"proj_out": 4}}, f)
    report = ours.load_lora_weights(str(tmp_path / "adapter_model.safetensors"))
    assert report.modules["unet"] == 2
    assert ours.unet.get_submodule(names[0]).adapters["default_0"].scale == 8.0  # 16 / sqrt(4)
    assert ours.unet.get_submodule(names[1]).adapters["default_0"].scale == 2.0
