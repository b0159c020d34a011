"""Single-file checkpoints (LDM / SGM layout) against diffusers' from_single_file.

Each family: a tiny seeded diffusers pipeline is written as one file by the converter below (the tests' own
code, written from diffusers' module names outwards, independent of minidiff's rules), the file is proven by
loading it with diffusers' own from_single_file (config= the saved folder, no Hub) and getting the original
weights back, and only then minidiff loads it (by default with no config: family, configs and tokenizers
from the file and the package) and must give the same model outputs and the same images.
"""
import json
import logging
import os

import diffusers
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

import minidiff
from minidiff.weights import single_file as sf
from utils import assert_close, assert_same_image, bpe, gen, seeded_, tokenizer_folder

# ---- the converter: diffusers / transformers keys -> the original single-file keys --------------------


def _copy(sd, out, src, dst):
    """Every key under `src.` to `dst.`, removed from sd."""
    for k in [k for k in sd if k.startswith(src + ".")]:
        out[dst + k[len(src):]] = sd.pop(k)


RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(sd, out, src, dst):
    for a, b in RESNET_TO_LDM.items():
        _copy(sd, out, f"{src}.{a}", f"{dst}.{b}")


def unet_to_ldm(unet_sd, cfg):
    """diffusers UNet2DConditionModel state dict -> `model.diffusion_model.` keys (openaimodel.py's numbering)."""
    sd, out = dict(unet_sd), {}
    for a, b in (("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
                 ("time_embedding.linear_2", "time_embed.2"), ("add_embedding.linear_1", "label_emb.0.0"),
                 ("add_embedding.linear_2", "label_emb.0.2"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")):
        _copy(sd, out, a, b)
    layers = cfg["layers_per_block"]
    n = 1
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(layers):
            _resnet(sd, out, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0")
            _copy(sd, out, f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1")
            n += 1
        if i < len(cfg["down_block_types"]) - 1:
            _copy(sd, out, f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op")
            n += 1
    _resnet(sd, out, "mid_block.resnets.0", "middle_block.0")
    _copy(sd, out, "mid_block.attentions.0", "middle_block.1")
    _resnet(sd, out, "mid_block.resnets.1", "middle_block.2")
    n = 0
    for i, kind in enumerate(cfg["up_block_types"]):
        for j in range(layers + 1):
            _resnet(sd, out, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0")
            attn = f"up_blocks.{i}.attentions.{j}.norm.weight" in sd
            _copy(sd, out, f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1")
            if j == layers:
                _copy(sd, out, f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{n}.{2 if attn else 1}.conv")
            n += 1
    assert not sd, f"converter left UNet keys: {sorted(sd)[:5]}"
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def vae_to_ldm(vae_sd, prefix="first_stage_model."):
    """diffusers AutoencoderKL -> ldm's autoencoder keys (decoder levels counted from the lowest resolution)."""
    sd, out = dict(vae_sd), {}
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    for side in ("encoder", "decoder"):
        for a, b in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out"),
                     ("mid_block.resnets.0", "mid.block_1"), ("mid_block.resnets.1", "mid.block_2"),
                     ("mid_block.attentions.0.group_norm", "mid.attn_1.norm")):
            _copy(sd, out, f"{side}.{a}", f"{side}.{b}")
        for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            src = f"{side}.mid_block.attentions.0.{a}"
            out[f"{side}.mid.attn_1.{b}.weight"] = sd.pop(src + ".weight")[:, :, None, None]  # a 1x1 conv
            out[f"{side}.mid.attn_1.{b}.bias"] = sd.pop(src + ".bias")
        for i in range(n):
            level, blocks = (i, "down") if side == "encoder" else (n - 1 - i, "up")
            for j in range(4):
                for k in [k for k in sd if k.startswith(f"{side}.{blocks}_blocks.{i}.resnets.{j}.")]:
                    rest = k.split(f"resnets.{j}.")[1].replace("conv_shortcut", "nin_shortcut")
                    out[f"{side}.{blocks}.{level}.block.{j}.{rest}"] = sd.pop(k)
            sampler = "downsample" if side == "encoder" else "upsample"
            _copy(sd, out, f"{side}.{blocks}_blocks.{i}.{sampler}rs.0.conv", f"{side}.{blocks}.{level}.{sampler}.conv")
    for k in ("quant_conv", "post_quant_conv"):
        _copy(sd, out, k, k)
    assert not sd, f"converter left VAE keys: {sorted(sd)[:5]}"
    return {prefix + k: v for k, v in out.items()}


def clip_to_openclip(te_sd, prefix, extra_layer=None):
    """transformers' CLIP text model -> OpenCLIP's keys (fused in_proj, text_projection as x @ P)."""
    sd, out = dict(te_sd), {}
    out["token_embedding.weight"] = sd.pop("text_model.embeddings.token_embedding.weight")
    out["positional_embedding"] = sd.pop("text_model.embeddings.position_embedding.weight")
    out["ln_final.weight"] = sd.pop("text_model.final_layer_norm.weight")
    out["ln_final.bias"] = sd.pop("text_model.final_layer_norm.bias")
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers."))
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + "attn.in_proj_" + kind] = torch.cat([sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{b}.{kind}"] = sd.pop(f"{src}{a}.{kind}")
    if extra_layer is not None:  # SD 2.x files carry a last layer the pipeline never reads
        g = torch.Generator().manual_seed(7)
        for k in [k for k in out if k.startswith("transformer.resblocks.0.")]:
            out[k.replace("resblocks.0.", f"resblocks.{layers}.")] = torch.randn(out[k].shape, generator=g)
    sd.pop("text_model.embeddings.position_ids", None)
    assert not sd, f"converter left text keys: {sorted(sd)[:5]}"
    return {prefix + k: v for k, v in out.items()}


def pipeline_to_ldm(pipe, family):
    """A whole diffusers pipeline as one LDM (SD) / SGM (SDXL) state dict."""
    out = unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config))
    out.update(vae_to_ldm(pipe.vae.state_dict()))
    te = {k: v for k, v in pipe.text_encoder.state_dict().items()} if pipe.text_encoder is not None else None
    if family == "sd1":
        out.update({"cond_stage_model.transformer." + k: v for k, v in te.items()})
    elif family == "sd2":
        out.update(clip_to_openclip(te, "cond_stage_model.model.", extra_layer=True))
        out["cond_stage_model.model.text_projection"] = torch.randn(te["text_model.final_layer_norm.weight"].shape[0], 64)
    elif family == "sdxl":
        out.update({"conditioner.embedders.0.transformer." + k: v for k, v in te.items()})
        out.update(clip_to_openclip(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    else:
        out.update(clip_to_openclip(pipe.text_encoder_2.state_dict(), "conditioner.embedders.0.model."))
    return {k: v.contiguous() for k, v in out.items()}


# ---- tiny seeded pipelines with the families' head rules (SD 1.x: 8 heads; else heads of 64 channels) ---------
def clip_te(hidden, layers=2, act="quick_gelu", projection=None, seed=0):
    cfg = transformers.CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=hidden // 64, max_position_embeddings=77, vocab_size=49408,
                                      hidden_act=act, projection_dim=projection or hidden, bos_token_id=0,
                                      eos_token_id=2, pad_token_id=1)
    model = transformers.CLIPTextModelWithProjection(cfg) if projection else transformers.CLIPTextModel(cfg)
    return seeded_(model, seed, std=0.1).eval()


def tiny_vae(seed, scaling_factor=0.18215):
    return seeded_(diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                           scaling_factor=scaling_factor), seed, std=0.05).eval()


FAMILY_SCHEDULERS = {f: sf.FAMILIES[f]["scheduler"] for f in ("sd1", "sdxl", "sdxl_refiner")}
FAMILY_SCHEDULERS["sd2"] = sf.FAMILIES["sd2"]["v_prediction"]["scheduler"]


def build(family, folder, seed=0, heads=None):
    os.makedirs(folder, exist_ok=True)
    sched_name, sched_cfg = FAMILY_SCHEDULERS[family]
    sched = getattr(diffusers, sched_name).from_config(sched_cfg)
    if family in ("sd1", "sd2"):
        sd2 = family == "sd2"
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(64, 128) if sd2 else (32, 64), layers_per_block=2, sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128 if sd2 else 64, attention_head_dim=(1, 2) if sd2 else (heads or 8),
            use_linear_projection=sd2)
        pipe = diffusers.StableDiffusionPipeline(
            vae=tiny_vae(seed + 1), text_encoder=clip_te(128 if sd2 else 64, act="gelu" if sd2 else "quick_gelu",
                                                         seed=seed + 2),
            tokenizer=tokenizer_folder(os.path.join(folder, "_tok"), pad="!" if sd2 else "<|endoftext|>"),
            unet=seeded_(unet, seed, std=0.05).eval(), scheduler=sched, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    else:
        refiner = family == "sdxl_refiner"
        te2 = clip_te(128, act="gelu", projection=128, seed=seed + 3)
        tok2 = tokenizer_folder(os.path.join(folder, "_tok2"), pad="!")
        kinds = (("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")) \
            if refiner else (("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D"))
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(64, 128, 128) if refiner else (64, 128), layers_per_block=2, sample_size=8,
            down_block_types=kinds[0], up_block_types=kinds[1], attention_head_dim=(1, 2, 2) if refiner else (1, 2),
            transformer_layers_per_block=2 if refiner else (1, 2), use_linear_projection=True,
            cross_attention_dim=128 if refiner else 192, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=128 + (5 if refiner else 6) * 8)
        unet, vae = seeded_(unet, seed, std=0.05).eval(), tiny_vae(seed + 1, 0.13025)
        if refiner:
            pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
                vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tok2, unet=unet,
                scheduler=sched, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
        else:
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=vae, text_encoder=clip_te(64, seed=seed + 2), text_encoder_2=te2,
                tokenizer=tokenizer_folder(os.path.join(folder, "_tok1")), tokenizer_2=tok2, unet=unet, scheduler=sched)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


DIFFUSERS_CLASS = {"sd1": diffusers.StableDiffusionPipeline, "sd2": diffusers.StableDiffusionPipeline,
                   "sdxl": diffusers.StableDiffusionXLPipeline, "sdxl_refiner": diffusers.StableDiffusionXLImg2ImgPipeline}
OURS_CLASS = {"sd1": minidiff.StableDiffusionPipeline, "sd2": minidiff.StableDiffusionPipeline,
              "sdxl": minidiff.StableDiffusionXLPipeline, "sdxl_refiner": minidiff.StableDiffusionXLImg2ImgPipeline}


def write_file(pipe, family, path, dtype=None, extra=None):
    sd = pipeline_to_ldm(pipe, family)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    sd.update(extra or {})
    save_file(sd, path)
    return path


def prove(pipe, family, path, folder):
    """diffusers' own from_single_file (config= the saved folder) gets every original weight back."""
    ref = DIFFUSERS_CLASS[family].from_single_file(path, config=folder, local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        original = getattr(pipe, name, None)
        if original is None:
            continue
        got = getattr(ref, name).state_dict()
        for k, v in original.state_dict().items():
            if k.endswith("position_ids"):
                continue
            assert torch.equal(got[k], v), f"fixture wrong: diffusers reads {name}.{k} differently"
    ref.set_progress_bar_config(disable=True)
    return ref


_CACHE = {}


@pytest.fixture(scope="module")
def family_file(tmp_path_factory):
    def get(family):
        if family not in _CACHE:
            folder = str(tmp_path_factory.mktemp(family))
            pipe = build(family, folder)
            path = write_file(pipe, family, os.path.join(folder, "model.safetensors"))
            _CACHE[family] = (pipe, prove(pipe, family, path, folder), path, folder)
        return _CACHE[family]
    return get


# ---- model outputs and images ----------------------------------------------------------------------------
def compare_models(ours, ref):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ids = torch.randint(0, 49408, (2, 77), generator=g)
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(ref, name, None) is None:
                continue
            o, r = getattr(ours, name)(ids, output_hidden_states=True), getattr(ref, name)(ids, output_hidden_states=True)
            assert_close(o.hidden_states[-2], r.hidden_states[-2], name=f"{name} penultimate")
            assert_close(o[0], r[0], name=f"{name} first output")
        image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        assert_close(ours.vae.encode(image).latent_dist.mean, ref.vae.encode(image).latent_dist.mean, name="vae encode")
        z = torch.randn(1, 4, 8, 8, generator=g)
        assert_close(ours.vae.decode(z).sample, ref.vae.decode(z).sample, name="vae decode")
        cfg = ref.unet.config
        ctx = torch.randn(2, 7, cfg.cross_attention_dim, generator=g)
        added = None
        if cfg.addition_embed_type == "text_time":
            ids_n = (cfg.projection_class_embeddings_input_dim - 128) // cfg.addition_time_embed_dim
            added = {"text_embeds": torch.randn(2, 128, generator=g), "time_ids": torch.rand(2, ids_n, generator=g) * 64}
        x = torch.randn(2, 4, 8, 8, generator=g)
        assert_close(ours.unet(x, 500, ctx, added_cond_kwargs=added).sample,
                     ref.unet(x, 500, ctx, added_cond_kwargs=added).sample, name="unet")


def images(pipe, family, **kw):
    args = dict(prompt="a red cube on a table", num_inference_steps=3, generator=gen(0), output_type="np", **kw)
    if family == "sdxl_refiner":
        args.update(image=np.random.RandomState(0).rand(1, 16, 16, 3).astype(np.float32), strength=0.7)
    else:
        args.update(height=16, width=16, guidance_scale=5.0)
    return pipe(**args).images


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_family_matches_diffusers(family, family_file, caplog):
    pipe, ref, path, folder = family_file(family)
    with caplog.at_level(logging.INFO, logger="minidiff"):
        ours = OURS_CLASS[family].from_single_file(path)  # no config: family, configs, tokenizers from the package
    ours.set_progress_bar_config(disable=True)
    compare_models(ours, ref)
    assert type(ours.scheduler).__name__ == type(ref.scheduler).__name__
    assert ours.scheduler.config["prediction_type"] == ref.scheduler.config["prediction_type"]
    assert_same_image(images(ours, family), images(ref, family))
    report = ours.single_file_report
    assert f"family {sf.FAMILIES[family]['name']}" in str(report)
    if family == "sd2":
        # the 24th OpenCLIP layer and the text projection are in the file but read by nothing
        assert report.skipped["text_encoder tensors the pipeline never reads"] == 13
        assert "v-prediction, diffusers' rule" in caplog.text


def test_config_folder_override(family_file):
    """config= a diffusers folder: configs, tokenizers, scheduler from there, weights from the file."""
    pipe, ref, path, folder = family_file("sdxl")
    ours = minidiff.StableDiffusionXLPipeline.from_single_file(path, config=folder)
    ours.set_progress_bar_config(disable=True)
    assert ours.unet.config.sample_size == 8
    assert_same_image(images(ours, "sdxl"), images(ref, "sdxl"))


def test_ema_buffers_and_leftovers_are_skipped_and_counted(family_file, tmp_path):
    pipe, ref, _, folder = family_file("sd1")
    sd = pipeline_to_ldm(pipe, "sd1")
    extra = {"model_ema." + k[len("model.diffusion_model."):].replace(".", ""): v + 1.0
             for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    extra.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000),
                  "alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000), "logvar": torch.zeros(1000),
                  "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    path = write_file(pipe, "sd1", str(tmp_path / "ema.safetensors"), extra=extra)
    ref_ema = diffusers.StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True)
    ours = minidiff.StableDiffusionPipeline.from_single_file(path)
    compare_models(ours, ref_ema)
    compare_models(ours, pipe)  # the EMA copies (all +1) are not what was loaded, as in diffusers by default
    skipped = ours.single_file_report.skipped
    assert skipped["EMA copy (model_ema.*)"] == len(pipe.unet.state_dict()) + 2
    assert skipped["LDM schedule buffer"] == 3 and skipped["position ids"] == 1


def test_fp16_file_loads_at_the_requested_dtype(family_file, tmp_path):
    pipe, _, _, _ = family_file("sd1")
    path = write_file(pipe, "sd1", str(tmp_path / "fp16.safetensors"), dtype=torch.float16)
    half = minidiff.UNet2DConditionModel.from_single_file(path, torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(half.state_dict()[k], v.half()), k
    full = minidiff.StableDiffusionPipeline.from_single_file(path)  # default: float32, the fp16 values upcast
    assert full.unet.dtype == torch.float32 and full.text_encoder.dtype == torch.float32
    for k, v in pipe.text_encoder.state_dict().items():
        if not k.endswith("position_ids"):
            assert torch.equal(full.text_encoder.state_dict()[k], v.half().float()), k
    bf16 = write_file(pipe, "sd1", str(tmp_path / "bf16.safetensors"), dtype=torch.bfloat16)
    te = minidiff.CLIPTextModel.from_single_file(bf16, torch_dtype=torch.float16)
    assert te.dtype == torch.float16
    w = "text_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(te.state_dict()[w], pipe.text_encoder.state_dict()[w].bfloat16().half())


def test_auto_lays_the_weights_out_while_reading_them(family_file, monkeypatch):
    """torch_dtype="auto" on a CPU with bf16: the file's convolution weights read straight into channels_last (one
    copy), the same values as a bf16 load (test_cpu_speed.py checks diffusers folders the same way)."""
    from minidiff import device
    from test_cpu_speed import laid_out_while_read
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(device, "bf16_is_faster", lambda: True)
    pipe, _, path, _ = family_file("sd1")
    got = minidiff.StableDiffusionPipeline.from_single_file(path, torch_dtype="auto")
    vae = minidiff.AutoencoderKL.from_single_file(path, torch_dtype="auto")
    assert laid_out_while_read([got.unet, got.vae]) and laid_out_while_read([vae])
    for name, ours in (("unet", got.unet), ("vae", got.vae), ("vae", vae)):
        for k, v in getattr(pipe, name).state_dict().items():
            assert torch.equal(ours.state_dict()[k], v.bfloat16()), (name, k)


def test_vae_only_file(family_file, tmp_path):
    pipe, _, _, folder = family_file("sd1")
    path = str(tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors")
    save_file({k: v.contiguous() for k, v in vae_to_ldm(pipe.vae.state_dict(), prefix="").items()}, path)
    ref = diffusers.AutoencoderKL.from_single_file(path, config=os.path.join(folder, "vae"), local_files_only=True)
    ours = minidiff.AutoencoderKL.from_single_file(path)
    assert ours.config.scaling_factor == 0.18215
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert_close(ours.decode(z).sample, ref.decode(z).sample, name="vae-only decode")
        assert_close(ours.decode(z).sample, pipe.vae.decode(z).sample, name="vae-only decode vs original")
    # the same VAE out of a whole checkpoint, the other models counted as not asked for
    _, _, whole, _ = family_file("sd1")
    vae = minidiff.AutoencoderKL.from_single_file(whole)
    assert vae.single_file_report.skipped["unet (not asked for)"] == len(pipe.unet.state_dict())


def test_unknown_key_is_listed(family_file, tmp_path):
    pipe, _, _, _ = family_file("sd1")
    path = write_file(pipe, "sd1", str(tmp_path / "extra.safetensors"),
                      extra={"model.diffusion_model.input_blocks.1.1.mystery.weight": torch.zeros(3),
                             "lora_te_text_model_encoder.alpha": torch.tensor(1.0)})
    with pytest.raises(ValueError) as e:
        minidiff.StableDiffusionPipeline.from_single_file(path)
    assert "lora_te_text_model_encoder.alpha" in str(e.value)
    path = write_file(pipe, "sd1", str(tmp_path / "extra2.safetensors"),
                      extra={"model.diffusion_model.input_blocks.1.1.mystery.weight": torch.zeros(3)})
    with pytest.raises(ValueError) as e:
        minidiff.StableDiffusionPipeline.from_single_file(path)
    assert "model.diffusion_model.input_blocks.1.1.mystery.weight" in str(e.value)
    path = write_file(pipe, "sd1", str(tmp_path / "extra3.safetensors"),
                      extra={"model.diffusion_model.mystery.weight": torch.zeros(3),
                             "first_stage_model.encoder.mystery": torch.zeros(3),
                             "cond_stage_model.transformer.mystery": torch.zeros(3)})
    for cls in (minidiff.UNet2DConditionModel, minidiff.AutoencoderKL, minidiff.CLIPTextModel):
        with pytest.raises(ValueError, match="mystery"):
            cls.from_single_file(path)


def test_truncated_file_and_pickles(family_file, tmp_path):
    _, _, path, _ = family_file("sd1")
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        minidiff.StableDiffusionPipeline.from_single_file(str(cut))
    # .ckpt: refused by default; with allow_pickle read by torch.load(weights_only=True), Lightning wrapper unpacked
    pipe, _, _, _ = family_file("sd2")
    ckpt = str(tmp_path / "v2-1_512-ema-pruned.ckpt")
    torch.save({"state_dict": pipeline_to_ldm(pipe, "sd2"), "global_step": 875000, "epoch": 3}, ckpt)
    with pytest.raises(ValueError, match="allow_pickle"):
        minidiff.StableDiffusionPipeline.from_single_file(ckpt)
    ours = minidiff.StableDiffusionPipeline.from_single_file(ckpt, allow_pickle=True)
    assert ours.scheduler.config["prediction_type"] == "epsilon"  # global_step 875000: the 512-base run
    assert ours.single_file_report.skipped["optimizer leftover"] == 2
    forced = minidiff.StableDiffusionPipeline.from_single_file(ckpt, allow_pickle=True, prediction_type="v_prediction")
    assert forced.scheduler.config["prediction_type"] == "v_prediction"


def test_wrong_pipeline_class(family_file):
    _, _, path, _ = family_file("sdxl")
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
        minidiff.StableDiffusionPipeline.from_single_file(path)


# the form of the CompVis v1-inference.yaml (num_heads changed to 4 for the tiny model)
V1_YAML = """model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_trainable: false   # Note: different from the one we trained before
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    scheduler_config: # 10000 warmup steps
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [ 10000 ]
        cycle_lengths: [ 10000000000000 ] # incredibly large number to prevent corner cases
        f_start: [ 1.e-6 ]
        f_max: [ 1. ]

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        attention_resolutions: [ 4, 2, 1 ]
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 4
        use_spatial_transformer: True
        context_dim: 768
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          ch_mult:
          - 1
          - 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""

# the form of Stability's sd_xl_base.yaml (SGM: lists of mappings, denoiser scaling)
SGM_YAML = """model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True

    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000

        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.VScaling
    network_config:
      params:
        adm_in_channels: 2816
        num_classes: sequential
        attention_resolutions: [4, 2]
        num_head_channels: 64
        transformer_depth: [1, 2, 10]
        spatial_transformer_attn_type: softmax-xformers

    conditioner_config:
      params:
        emb_models:
          # crossattn cond
          - is_trainable: False
            input_key: txt
            params:
              layer: hidden
              layer_idx: 11

          - is_trainable: False
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: ViT-bigG-14
              legacy: False
"""


def test_small_yaml_reader_reads_what_pyyaml_reads():
    import yaml
    for text in (V1_YAML, SGM_YAML):
        assert sf.parse_small_yaml(text) == yaml.safe_load(text)
    assert sf.choose_prediction_type("sdxl", None, original=sf.parse_small_yaml(SGM_YAML))[0] == "v_prediction"
    for bad in ("a: &anchor 1\nb: *anchor\n", "a:\n  b: 1\n    c: 2\n", "a: {b: 1}\n"):
        with pytest.raises(ValueError, match="pyyaml"):
            sf.parse_small_yaml(bad)


def test_original_config_yaml(tmp_path, monkeypatch):
    """original_config= the LDM yaml: what tensors cannot tell (heads here) comes from it, read by the small
    reader when pyyaml is not installed."""
    pipe = build("sd1", str(tmp_path / "m"), heads=4)
    path = write_file(pipe, "sd1", str(tmp_path / "heads4.safetensors"))
    yaml_path = tmp_path / "v1-inference.yaml"
    yaml_path.write_text(V1_YAML)
    import builtins
    real_import = builtins.__import__

    def no_yaml(name, *args, **kwargs):
        if name == "yaml":
            raise ImportError("no module named yaml")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_yaml)
    ours = minidiff.UNet2DConditionModel.from_single_file(path, original_config=str(yaml_path))
    assert ours.config.attention_head_dim == 4
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 64, generator=g)
    with torch.no_grad():
        assert_close(ours(x, 10, ctx).sample, pipe.unet(x, 10, ctx).sample, name="unet with yaml heads")
    whole = minidiff.StableDiffusionPipeline.from_single_file(path, original_config=str(yaml_path))
    assert whole.unet.config.attention_head_dim == 4 and whole.vae.config.scaling_factor == 0.18215
    assert whole.scheduler.config["beta_end"] == 0.012


def test_shipped_tokenizer_is_clips():
    tok = sf.clip_tokenizer("<|endoftext|>")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    vocab, merges = bpe()
    assert tok.vocab == vocab and [" ".join(m) for m in tok.merges] == merges
    assert sf.clip_tokenizer("!").pad_token_id == 0


def _meta_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_real_sizes_infer_the_real_configs(family):
    """Shapes of a real-size file (the family's config built on meta, written by the converter): the config
    inferred from them is the family's, key for key (no data: headers only)."""
    from minidiff.weights.config import config_from_dict
    fam = sf.FAMILIES[family]
    unet_cfg = dict(fam["unet"], **fam.get("v_prediction", {}).get("unet", {}))
    with torch.device("meta"):
        unet = minidiff.UNet2DConditionModel(config_from_dict(minidiff.UNet2DConditionModel.config_class, unet_cfg))
        vae = minidiff.AutoencoderKL(config_from_dict(minidiff.AutoencoderKL.config_class, fam["vae"]))
        sd = unet_to_ldm(unet.state_dict(), unet_cfg)
        sd.update(vae_to_ldm(vae.state_dict()))
        encoders = {}
        for name, cls in (("text_encoder", minidiff.CLIPTextModel), ("text_encoder_2", minidiff.CLIPTextModelWithProjection)):
            if name in fam:
                encoders[name] = cls(config_from_dict(cls.config_class, fam[name]))
        if family == "sd1":
            sd.update({"cond_stage_model.transformer." + k: v for k, v in encoders["text_encoder"].state_dict().items()})
        elif family == "sd2":
            openclip = clip_to_openclip(encoders["text_encoder"].state_dict(), "cond_stage_model.model.")
            sd.update(openclip)
            for k, v in openclip.items():  # the 24th layer, which SD 2.x files carry
                if ".resblocks.22." in k:
                    sd[k.replace(".resblocks.22.", ".resblocks.23.")] = v
            sd["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024)
        else:
            if "text_encoder" in encoders:
                sd.update({"conditioner.embedders.0.transformer." + k: v
                           for k, v in encoders["text_encoder"].state_dict().items()})
            sd.update(clip_to_openclip(encoders["text_encoder_2"].state_dict(),
                                       "conditioner.embedders.1.model." if family == "sdxl" else "conditioner.embedders.0.model."))

    class Header(sf.SingleFile):
        def __init__(self, shapes):
            self.path, self.shapes, self.global_step = "header", shapes, None

    f = Header({k: tuple(v.shape) for k, v in sd.items()})
    assert sf.detect_family(f) == family
    pred = "v_prediction" if family == "sd2" else "epsilon"
    inferred = dict(sf.infer_unet_config(f.under(sf.UNET), family), **fam.get(pred, {}).get("unet", {}))
    if "time_ids" in fam:
        pooled = f.shapes[[p for p, _ in sf._parts(f).values() if "embedders" in p and "model." in p][0] + "text_projection"][1]
        inferred["addition_time_embed_dim"] = (inferred["projection_class_embeddings_input_dim"] - pooled) // fam["time_ids"]
    for k, v in unet_cfg.items():
        got = inferred.get(k)
        assert (list(got) if isinstance(got, tuple) else got) == v, f"{family} unet {k}: inferred {got}, real {v}"
    inferred_vae = sf.infer_vae_config(f.under(sf.VAE), family)
    for k, v in fam["vae"].items():
        assert inferred_vae[k] == v, f"{family} vae {k}"
    for name, enc in encoders.items():
        prefix, kind = sf._parts(f)[name]
        got = sf.infer_clip_config(f.under(prefix), fam[name], kind == "openclip", drop_last=family == "sd2")
        assert got == fam[name] or {k: got[k] for k in fam[name] if k != "projection_dim"} == \
            {k: v for k, v in fam[name].items() if k != "projection_dim"}, f"{family} {name}: {got}"


def test_cli_model_file_and_vae_file(family_file, tmp_path):
    from minidiff.cli import main
    pipe, _, path, _ = family_file("sd1")
    vae_path = str(tmp_path / "vae.safetensors")
    save_file({k: v.contiguous() for k, v in vae_to_ldm(pipe.vae.state_dict(), prefix="").items()}, vae_path)
    out = str(tmp_path / "out.png")
    main(["generate", "a red cube", "--model", path, "--vae", vae_path, "--steps", "2", "--width", "16",
          "--height", "16", "--dtype", "float32", "--out", out])
    ours = minidiff.StableDiffusionPipeline.from_single_file(path)
    ours.set_progress_bar_config(disable=True)
    want = ours("a red cube", num_inference_steps=2, guidance_scale=7.5, width=16, height=16, generator=gen(0)).images
    from PIL import Image
    assert_same_image([Image.open(out).convert("RGB")], want)


def test_turbo_lcm_merged_and_img2img_files(family_file):
    """Turbo-style and LCM-merged files are the base architectures (nothing in the tensors marks them): they load
    as their family, and run with the scheduler their model card names, as in diffusers."""
    _, ref, path, _ = family_file("sdxl")
    ours = minidiff.StableDiffusionXLPipeline.from_single_file(path)
    for p, lib in ((ours, minidiff), (ref, diffusers)):
        p.scheduler = lib.EulerAncestralDiscreteScheduler.from_config(p.scheduler.config, timestep_spacing="trailing")
        p.set_progress_bar_config(disable=True)
    turbo = dict(prompt="a cat", num_inference_steps=1, guidance_scale=0.0, height=16, width=16, output_type="np")
    assert_same_image(ours(**turbo, generator=gen(3)).images, ref(**turbo, generator=gen(3)).images)

    _, ref, path, folder = family_file("sd1")
    ours = minidiff.StableDiffusionPipeline.from_single_file(path)
    ours.scheduler = minidiff.LCMScheduler.from_config(sf.FAMILIES["sd1"]["scheduler"][1])
    ref.scheduler = diffusers.LCMScheduler.from_config(sf.FAMILIES["sd1"]["scheduler"][1])
    ours.set_progress_bar_config(disable=True)
    lcm = dict(prompt="a cat", num_inference_steps=4, guidance_scale=1.0, height=16, width=16, output_type="np")
    assert_same_image(ours(**lcm, generator=gen(4)).images, ref(**lcm, generator=gen(4)).images)

    ours = minidiff.StableDiffusionImg2ImgPipeline.from_single_file(path)
    theirs = diffusers.StableDiffusionImg2ImgPipeline.from_single_file(path, config=folder, local_files_only=True)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    image = np.random.RandomState(1).rand(1, 16, 16, 3).astype(np.float32)
    i2i = dict(prompt="a cat", image=image, strength=0.6, num_inference_steps=4, output_type="np")
    assert_same_image(ours(**i2i, generator=gen(5)).images, theirs(**i2i, generator=gen(5)).images)


def test_hub_addresses_resolve_through_the_cache(family_file, monkeypatch):
    import huggingface_hub
    _, _, path, _ = family_file("sd1")
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename, revision=None: calls.append((repo, filename, revision)) or path)
    for address in ("https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/blob/main/v1-5-pruned-emaonly.safetensors",
                    "stable-diffusion-v1-5/stable-diffusion-v1-5/v1-5-pruned-emaonly.safetensors"):
        assert sf.resolve_single_file(address) == path
    assert calls == [("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors", "main"),
                     ("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors", None)]
    with pytest.raises(FileNotFoundError, match="no such file"):
        minidiff.StableDiffusionPipeline.from_single_file("/nowhere/model.safetensors")


def test_model_classes_and_generic_entry(family_file):
    pipe, _, path, folder = family_file("sdxl")
    assert type(minidiff.DiffusionPipeline.from_single_file(path)) is minidiff.StableDiffusionXLPipeline
    te2 = minidiff.CLIPTextModelWithProjection.from_single_file(path)
    te1 = minidiff.CLIPTextModel.from_single_file(path)
    unet = minidiff.UNet2DConditionModel.from_single_file(path, config=folder, subfolder="unet")
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(te2(ids).text_embeds, pipe.text_encoder_2(ids).text_embeds, name="bigG projection (transposed)")
        assert_close(te1(ids)[0], pipe.text_encoder(ids)[0], name="CLIP-L")
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    _, _, refiner, _ = family_file("sdxl_refiner")
    with pytest.raises(ValueError, match="has no text_encoder "):
        minidiff.CLIPTextModel.from_single_file(refiner)


def test_old_text_encoder_keys_without_text_model(family_file, tmp_path):
    """Files from transformers < 4.x name the SD 1.x text encoder without `text_model.`: the same weights."""
    pipe, _, _, _ = family_file("sd1")
    sd = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
          for k, v in pipeline_to_ldm(pipe, "sd1").items()}
    path = str(tmp_path / "old.safetensors")
    save_file(sd, path)
    te = minidiff.CLIPTextModel.from_single_file(path)
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(te(ids)[0], pipe.text_encoder(ids)[0], name="old-key text encoder")
