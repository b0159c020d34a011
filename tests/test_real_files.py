"""The real files of the README's repos (tests/real_layouts): tiny seeded models written in the real form
(the real config.json with widths shrunk, legacy key names, variants for some folders only, old scheduler
configs), proven with diffusers itself, then loaded by minidiff: outputs equal diffusers' on the same folder."""
import json
import os
import warnings

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import minidiff
import real_layouts as real
from utils import assert_close, seeded_

UNETS = {repo: r["unet"] for repo, r in real.REPOS.items() if "unet" in r}


def write_model(model, folder, config, weight_name="diffusion_pytorch_model", variant=None, sd=None):
    """`model`'s weights and the given (real-form) config.json, as the Hub repo has them."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    sd = sd if sd is not None else model.state_dict()
    name = weight_name + (f".{variant}" if variant else "") + ".safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, name), metadata={"format": "pt"})


def _unet_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg["in_channels"], 8, 8, generator=g)
    ctx = torch.randn(2, 5, cfg["cross_attention_dim"], generator=g)
    kw = {}
    if cfg.get("addition_embed_type") == "text_time":
        ids = (cfg["projection_class_embeddings_input_dim"] - 32) // 8
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64, 6][:ids]] * 2)}
    if cfg.get("time_cond_proj_dim"):
        kw["timestep_cond"] = torch.randn(2, cfg["time_cond_proj_dim"], generator=g)
    return x, torch.tensor([999, 261]), ctx, kw


@pytest.mark.parametrize("repo", sorted(UNETS))
def test_unet_real_config_matches_diffusers(repo, tmp_path):
    """Every UNet config value the real files use (shrunk widths/depths only) builds the model diffusers builds."""
    cfg = real.shrink_unet(UNETS[repo])
    ref = seeded_(diffusers.UNet2DConditionModel.from_config(cfg), seed=1, std=0.05).eval()
    write_model(ref, tmp_path / "unet", cfg)
    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()  # the fixture, proven by diffusers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no real config key is unknown to minidiff
        ours = minidiff.UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    x, t, ctx, kw = _unet_inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, ctx, **kw).sample
        got = ours(x, t, ctx, **kw).sample
    assert_close(got, want, name=repo)


# ---- a whole SD / SDXL repo in its real form


def _text_encoder(real_cfg, folder, seed, projection=False):
    """A tiny CLIP text encoder saved as an old transformers wrote it: the real config.json (widths shrunk,
    the legacy eos_token_id 2 kept) and the `position_ids` buffer in the weights file."""
    import transformers
    cfg = {k: v for k, v in real_cfg.items() if not k.startswith("_")}
    cfg.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
    klass = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = seeded_(klass(transformers.CLIPTextConfig(**cfg)), seed, std=0.1).eval()
    sd = dict(model.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    write_model(model, folder, real_cfg | {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                                "num_hidden_layers", "projection_dim")},
                weight_name="model", sd=sd)


def _tokenizer(real_tok, folder):
    from utils import bpe, write_tokenizer
    vocab, merges = bpe()
    write_tokenizer(str(folder), vocab, merges, real_tok["special_tokens_map_pad_token"])


def build_real_repo(folder, repo, unet_repo=None, scheduler=None, variants=None):
    """A tiny copy of `repo` in its real form: real model_index.json, real configs with widths shrunk, the
    fp32 VAE with legacy attention names (fp16 variant with today's), variant files in the `variants`
    folders only ({variant: [folders]}; their weights differ, so that the choice shows)."""
    r = real.REPOS[repo]
    xl = "text_encoder_2" in r
    index = dict(r["model_index"])
    if scheduler:
        index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    unet_cfg = real.shrink_unet(real.REPOS[unet_repo or repo]["unet"], cross_attention_dim=64 if xl and "text_encoder" in r else 32)
    unet = seeded_(diffusers.UNet2DConditionModel.from_config(unet_cfg), 1, std=0.05).eval()
    write_model(unet, folder / "unet", unet_cfg)
    vae_cfg = real.shrink_vae(r["vae"])
    vae = seeded_(diffusers.AutoencoderKL.from_config(vae_cfg), 2, std=0.05).eval()
    write_model(vae, folder / "vae", vae_cfg, sd=real.legacy_vae_state_dict(vae.state_dict())
                if r.get("vae_fp32_keys") else None)
    for name, projection in (("text_encoder", xl and "tokenizer" not in r), ("text_encoder_2", True)):
        if name in r:
            _text_encoder(r[name], folder / name, seed=3 + (name == "text_encoder_2"), projection=projection)
    for name in ("tokenizer", "tokenizer_2"):
        if name in r:
            _tokenizer(r[name], folder / name)
    os.makedirs(folder / "scheduler")
    with open(folder / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(scheduler or r["scheduler"], f)
    for variant, folders in (variants or {}).items():
        for name in folders:
            model = {"unet": unet, "vae": vae}[name]
            other = seeded_(type(model).from_config(model.config), 7, std=0.05)
            sd = {k: v.half() if variant == "fp16" else v for k, v in other.state_dict().items()}
            write_model(other, folder / name, dict(json.load(open(folder / name / "config.json"))), variant=variant, sd=sd)
    return folder


def _diffusers_pipe(folder, cls=None, **kw):
    cls = cls or diffusers.DiffusionPipeline
    extra = {"safety_checker": None, "feature_extractor": None} if "safety_checker" in json.load(
        open(folder / "model_index.json")) else {}
    pipe = cls.from_pretrained(folder, **extra, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# minidiff's guided SD 1.x/2.x steps run the UNet's layers before the text once for both halves (another summation
# order: ~1e-7 relative there, 4e-6 at the UNet's output); at 64x64 pixels these shrunk four-level UNets normalise
# 1x1 maps in the mid block, which magnifies that ~100x, and guidance 7.5 and three steps more: measured 1.2e-4 to
# 4.8e-4 on SD 2.1 (0 when the latents are repeated, as diffusers does). A wrong weight or rule is off by far more.
GUIDED_IMAGE_REL = 1e-3


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("repo", ["stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1"])
def test_sd_repo_in_real_form_gives_diffusers_image(repo, tmp_path):
    """The README's first example, on a folder with the real files' forms: legacy VAE names, old text
    encoder files (position_ids, eos 2), the real scheduler config (PNDM / DDIM v-prediction)."""
    folder = build_real_repo(tmp_path, repo)
    ref = _diffusers_pipe(folder)
    ours = minidiff.DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of a cat", num_inference_steps=3, height=64, width=64, output_type="np")
    want = ref(**kw, generator=_gen()).images
    got = ours(**kw, generator=_gen()).images
    assert_close(got, want, rel=GUIDED_IMAGE_REL, name=repo)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_vae_legacy_attention_names_load_into_the_same_modules(variant, tmp_path):
    """SD 1.x/2.x fp32 VAE files say query/key/value/proj_attn, their fp16 variants to_q/to_k/to_v/to_out.0."""
    from minidiff.weights.load import read_header
    cfg = real.shrink_vae(real.REPOS["stabilityai/sd-vae-ft-mse"]["vae"])
    vae = seeded_(diffusers.AutoencoderKL.from_config(cfg), 2, std=0.05).eval()
    write_model(vae, tmp_path, cfg, sd=real.legacy_vae_state_dict(vae.state_dict()))
    write_model(vae, tmp_path, cfg, variant="fp16", sd={k: v.half() for k, v in vae.state_dict().items()})
    keys = read_header(str(tmp_path / f"diffusion_pytorch_model{'.fp16' if variant else ''}.safetensors"))
    assert any(k.endswith(".attentions.0.query.weight") for k in keys) == (variant is None)
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path, variant=variant, torch_dtype=torch.float32).eval()
    ours = minidiff.AutoencoderKL.from_pretrained(tmp_path, variant=variant, torch_dtype=torch.float32)
    z = torch.randn(1, 4, 4, 4, generator=_gen())
    with torch.no_grad():
        assert_close(ours.decode(z).sample, ref.decode(z).sample)
    assert ours.rename_key("decoder.mid_block.attentions.0.proj_attn.bias") == "decoder.mid_block.attentions.0.to_out.0.bias"
    assert ours.rename_key("decoder.up_blocks.0.resnets.0.conv1.weight") == "decoder.up_blocks.0.resnets.0.conv1.weight"


def test_variant_only_some_components_have_falls_back_per_component(tmp_path):
    """SD 1.5's non_ema exists for unet/ only: that one comes from the variant, the rest from the plain files,
    and minidiff names the components that fell back; the image equals diffusers'."""
    folder = build_real_repo(tmp_path, "stable-diffusion-v1-5/stable-diffusion-v1-5", variants={"non_ema": ["unet"]})
    ref = _diffusers_pipe(folder, variant="non_ema")
    with pytest.warns(UserWarning, match=r"variant='non_ema': text_encoder, vae have no non_ema files"):
        ours = minidiff.DiffusionPipeline.from_pretrained(folder, variant="non_ema")
    ours.set_progress_bar_config(disable=True)
    plain = minidiff.UNet2DConditionModel.from_pretrained(folder / "unet")
    assert not torch.equal(ours.unet.conv_in.weight, plain.conv_in.weight), "the variant file was not taken"
    # 128 x 128: at 64 x 64 this UNet's last level is 1 x 1, where GroupNorms over 2 values amplify rounding (an
    # AMD Zen 5 gave 1.8e-4 against diffusers there, 1.3e-5 here; the plain files' image differs by ~1)
    kw = dict(prompt="a cat", num_inference_steps=2, height=128, width=128, output_type="np")
    assert_close(ours(**kw, generator=_gen()).images, ref(**kw, generator=_gen()).images)
    with pytest.raises(ValueError, match="variant=fp32x`, but no such modeling files"):  # diffusers: ValueError too
        minidiff.DiffusionPipeline.from_pretrained(folder, variant="fp32x")


def test_old_scheduler_config_is_rewritten_as_diffusers_does(tmp_path):
    """steps_offset 0 and clip_sample true (configs of diffusers < 0.8): the SD pipeline sets 1 and false, with
    diffusers' FutureWarnings, and the image is diffusers'."""
    old = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.3.0", "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": True, "num_train_timesteps": 1000,
           "set_alpha_to_one": False, "steps_offset": 0, "trained_betas": None}
    folder = build_real_repo(tmp_path, "stable-diffusion-v1-5/stable-diffusion-v1-5", scheduler=old)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        ref = _diffusers_pipe(folder, cls=diffusers.StableDiffusionPipeline)
    with warnings.catch_warnings(record=True) as mine:
        warnings.simplefilter("always")
        ours = minidiff.StableDiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)

    def future(ws):
        import re
        return [re.sub(r"scheduler: .*? (is outdated|has not set)", r"scheduler: S \1", str(w.message), flags=re.S)
                for w in ws if issubclass(w.category, FutureWarning) and "scheduler" in str(w.message)]
    assert len(future(mine)) == 2 and future(mine) == future(theirs)
    assert ours.scheduler.config.steps_offset == 1 and ours.scheduler.config.clip_sample is False
    kw = dict(prompt="a cat", num_inference_steps=3, height=64, width=64, output_type="np")
    assert_close(ours(**kw, generator=_gen()).images, ref(**kw, generator=_gen()).images)


@pytest.mark.parametrize("repo,unet_repo", [("stable-diffusion-v1-5/stable-diffusion-v1-5", "SimianLuo/LCM_Dreamshaper_v7"),
                                            ("stabilityai/stable-diffusion-xl-base-1.0", "latent-consistency/lcm-sdxl")])
def test_lcm_custom_timesteps_in_sd_pipelines(repo, unet_repo, tmp_path):
    """diffusers' own LCM test: the SD / SDXL pipeline with an LCMScheduler and timesteps=[999, 499], no
    num_inference_steps."""
    folder = build_real_repo(tmp_path, repo, unet_repo=unet_repo)
    ref = _diffusers_pipe(folder)
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    ours = minidiff.DiffusionPipeline.from_pretrained(folder)
    ours.scheduler = minidiff.LCMScheduler.from_config(ours.scheduler.config)
    ours.set_progress_bar_config(disable=True)
    kw = dict(prompt="a cat", timesteps=[999, 499], guidance_scale=6.0, height=64, width=64, output_type="np")
    want = ref(**kw, generator=_gen()).images
    got = ours(**kw, generator=_gen()).images
    assert_close(got, want)


@pytest.mark.parametrize("repo,call", [
    ("stabilityai/stable-diffusion-xl-base-1.0", dict(num_inference_steps=3, guidance_scale=5.0)),
    ("stabilityai/stable-diffusion-xl-refiner-1.0", dict(num_inference_steps=4, strength=0.5, guidance_scale=5.0)),
    ("stabilityai/sdxl-turbo", dict(num_inference_steps=1, guidance_scale=0.0)),
    ("stabilityai/sd-turbo", dict(num_inference_steps=2, guidance_scale=0.0)),
    ("stabilityai/stable-diffusion-2-1-base", dict(num_inference_steps=3, guidance_scale=7.5))])
def test_more_repos_in_real_form_give_diffusers_images(repo, call, tmp_path):
    """SDXL base / refiner / Turbo, SD-Turbo and SD 2.1-base in their real forms (the refiner: image-to-image
    with the second encoder only and aesthetic-score time ids)."""
    folder = build_real_repo(tmp_path, repo)
    ref = _diffusers_pipe(folder)
    ours = minidiff.DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    assert type(ours).__name__ == type(ref).__name__
    kw = dict(prompt="a photo of a cat", output_type="np", **call)
    if "strength" in call:
        kw["image"] = torch.rand(1, 3, 64, 64, generator=_gen(5))
    else:
        kw.update(height=64, width=64)
    want = ref(**kw, generator=_gen()).images
    got = ours(**kw, generator=_gen()).images
    assert_close(got, want, rel=GUIDED_IMAGE_REL, name=repo)
    assert np.abs((np.asarray(got) * 255).round() - (np.asarray(want) * 255).round()).max() <= 1
