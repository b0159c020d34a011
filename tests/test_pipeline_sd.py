"""Whole Stable Diffusion pipelines: minidiff gives diffusers' image for the same seed (uint8, at most 1 apart)."""
import json
import os

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from minidiff import (DDIMScheduler, DiffusionPipeline, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                      StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)
from utils import SD15_SCHEDULER, assert_close, assert_same_image, build_sd, gen, record_latent_path


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """SD 1.x-style: conv projection, PNDM as SD 1.5's repo ships it."""
    folder = str(tmp_path_factory.mktemp("sd15"))
    ref = build_sd(folder)
    ours = StableDiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return folder, ref, ours


def test_text_to_image_matches_diffusers(sd):
    _, ref, ours = sd
    kw = dict(prompt=["a red fox in the snow", "an astronaut"], negative_prompt=["blurry", "low quality"],
              num_inference_steps=4, guidance_scale=6.0, height=64, width=48, num_images_per_prompt=2,
              output_type="np")
    a = ours(**kw, generator=gen(0)).images
    b = ref(**kw, generator=gen(0)).images
    assert a.shape == (4, 64, 48, 3)
    assert_same_image(a, b)


def test_pil_output_clip_skip_and_generator_list(sd):
    _, ref, ours = sd
    kw = dict(prompt="a house by a lake", num_inference_steps=3, height=32, width=32, clip_skip=1,
              num_images_per_prompt=2)
    a = ours(**kw, generator=[gen(1), gen(2)]).images
    b = ref(**kw, generator=[gen(1), gen(2)]).images
    assert isinstance(a[0], Image.Image) and a[0].size == (32, 32)
    assert_same_image(a, b)
    # clip_skip really changes the conditioning
    c = ours(**{**kw, "clip_skip": None}, generator=[gen(1), gen(2)], output_type="np").images
    assert np.abs(np.stack([np.asarray(i) for i in a]) / 255.0 - c).max() > 1e-3


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "ddim"])
def test_swapped_schedulers_match(sd, scheduler):
    _, ref, ours = sd
    ref_cls, our_cls = {"euler": (diffusers.EulerDiscreteScheduler, EulerDiscreteScheduler),
                        "euler_a": (diffusers.EulerAncestralDiscreteScheduler, EulerAncestralDiscreteScheduler),
                        "ddim": (diffusers.DDIMScheduler, DDIMScheduler)}[scheduler]
    ref = diffusers.StableDiffusionPipeline(**{**ref.components, "scheduler": ref_cls.from_config(ref.scheduler.config)})
    ref.set_progress_bar_config(disable=True)
    ours = StableDiffusionPipeline(**{**ours.components, "scheduler": our_cls.from_config(ours.scheduler.config)})
    ours.set_progress_bar_config(disable=True)
    kw = dict(prompt="a bowl of fruit", num_inference_steps=3, height=32, width=32, output_type="np")
    if scheduler == "ddim":
        kw["eta"] = 0.5
    assert_same_image(ours(**kw, generator=gen(3)).images, ref(**kw, generator=gen(3)).images)


def test_latent_and_pt_outputs_and_embeds(sd):
    _, ref, ours = sd
    kw = dict(num_inference_steps=2, height=32, width=32)
    a = ours("a cat", **kw, generator=gen(4), output_type="latent").images
    b = ref("a cat", **kw, generator=gen(4), output_type="latent").images
    assert_close(a, b, name="latents")
    cond, uncond = ours.encode_prompt("a cat", negative_prompt="a dog")
    ref_cond, ref_uncond = ref.encode_prompt("a cat", "cpu", 1, True, negative_prompt="a dog")
    assert_close(cond, ref_cond, name="prompt_embeds")
    assert_close(uncond, ref_uncond, name="negative_prompt_embeds")
    pt = ours(prompt_embeds=cond, negative_prompt_embeds=uncond, **kw, generator=gen(4), output_type="pt").images
    ref_pt = ref(prompt_embeds=ref_cond, negative_prompt_embeds=ref_uncond, **kw, generator=gen(4),
                 output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 32, 32)
    assert_same_image(pt.permute(0, 2, 3, 1).numpy(), ref_pt.permute(0, 2, 3, 1).numpy())


def test_img2img_matches_diffusers(sd):
    folder, ref, _ = sd
    ours = StableDiffusionImg2ImgPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    ref_i2i = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    ref_i2i.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))  # 40x48: resized to x8 already
    kw = dict(prompt="a painting", image=image, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
              num_images_per_prompt=2, output_type="np")
    assert_same_image(ours(**kw, generator=gen(5)).images, ref_i2i(**kw, generator=gen(5)).images)
    kw["num_images_per_prompt"] = 1
    assert_same_image(ours(**kw, generator=[gen(6)]).images, ref_i2i(**kw, generator=[gen(6)]).images)


def test_latents_and_pixels_go_through_the_vae(sd, monkeypatch):
    folder, _, ours = sd
    i2i = StableDiffusionImg2ImgPipeline(**ours.components)
    calls = record_latent_path(monkeypatch)
    kw = dict(num_inference_steps=2, output_type="np")
    ours("a cat", height=32, width=32, **kw, generator=gen(0))
    i2i("a cat", image=np.full((1, 32, 32, 3), 0.5, np.float32), strength=0.5, **kw, generator=[gen(1)])
    # diffusers' SD pipelines run the VAE in its own dtype: no upcast
    assert calls == [("latents_to_image", False), ("image_to_latents", False), ("latents_to_image", False)]


@pytest.mark.parametrize("variant", ["sd2", "segmind", "lcm"])
def test_model_family_variants(tmp_path, variant):
    """SD 2.x (linear projection, per-block heads, upcast attention, v-prediction, Euler), segmind
    (one layer per block, no mid block) and an LCM-distilled UNet (guidance embedding, no CFG batch)."""
    unet = {"sd2": dict(use_linear_projection=True, attention_head_dim=(2, 4), upcast_attention=True),
            "segmind": dict(layers_per_block=1, mid_block_type=None,
                            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
            "lcm": dict(time_cond_proj_dim=16)}[variant]
    sched = None
    if variant == "sd2":
        sched = diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER, prediction_type="v_prediction",
                                                             timestep_spacing="trailing")
    if variant == "lcm":
        sched = diffusers.LCMScheduler.from_config(SD15_SCHEDULER)
    ref = build_sd(str(tmp_path), unet=unet, scheduler=sched)
    ours = DiffusionPipeline.from_pretrained(str(tmp_path))
    assert type(ours) is StableDiffusionPipeline
    ours.set_progress_bar_config(disable=True)
    kw = dict(prompt="a lighthouse", num_inference_steps=4, height=32, width=32, output_type="np",
              guidance_scale=7.0, negative_prompt="fog")
    calls = []
    hook = ours.unet.register_forward_hook(lambda m, i, o: calls.append((i[0].shape[0], o[0].shape[0])))
    a = ours(**kw, generator=gen(7)).images
    hook.remove()
    assert_same_image(a, ref(**kw, generator=gen(7)).images)
    # one UNet pass per timestep, the latents given once; LCM UNets take the guidance as an embedding: no CFG
    # batch, else two rows out (guidance's halves)
    assert calls == [(1, 1 if variant == "lcm" else 2)] * len(ours.scheduler.timesteps)


def test_cpu_offload_gives_same_image(sd):
    folder, _, ours = sd
    kw = dict(prompt="a boat", num_inference_steps=2, height=32, width=32, output_type="np")
    a = ours(**kw, generator=gen(8)).images
    off = StableDiffusionPipeline.from_pretrained(folder)
    off.set_progress_bar_config(disable=True)
    off.enable_model_cpu_offload(device="cpu")
    np.testing.assert_array_equal(off(**kw, generator=gen(8)).images, a)


def test_bad_inputs_fail_before_work(sd):
    folder, _, ours = sd
    calls = []
    hook = ours.unet.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="height=31 must be a positive multiple of 2"):
        ours("x", height=31, width=32)
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        ours("x", num_inference_steps=0, height=32, width=32)
    with pytest.raises(ValueError, match="negative_prompt has 3 entries but prompt has 2"):
        ours(["a", "b"], negative_prompt=["x", "y", "z"], height=32, width=32)
    with pytest.raises(ValueError, match="3 generators were passed for a batch of 2"):
        ours("a", num_images_per_prompt=2, generator=[gen(), gen(), gen()], height=32, width=32)
    with pytest.raises(ValueError, match="output_type='jpg'"):
        ours("a", output_type="jpg", height=32, width=32)
    i2i = StableDiffusionImg2ImgPipeline(**ours.components)
    with pytest.raises(ValueError, match="mode 'RGBA'.*convert\\('RGB'\\)"):
        i2i("a", image=Image.new("RGBA", (32, 32)))
    with pytest.raises(ValueError, match="strength=1.5"):
        i2i("a", image=Image.new("RGB", (32, 32)), strength=1.5)
    hook.remove()
    assert calls == []


def test_from_pretrained_errors(tmp_path, sd):
    folder, _, _ = sd
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        StableDiffusionPipeline.from_pretrained(str(tmp_path))
    index = json.load(open(os.path.join(folder, "model_index.json")))
    index["scheduler"] = ["diffusers", "DPMSolverSDEScheduler"]  # (a scheduler minidiff does not have)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="DPMSolverSDEScheduler"):
        StableDiffusionPipeline.from_pretrained(str(bad))


def test_save_pretrained_roundtrip_loads_in_diffusers(sd, tmp_path):
    _, ref, ours = sd
    ours.save_pretrained(str(tmp_path / "saved"))
    again = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "saved"), safety_checker=None)
    again.set_progress_bar_config(disable=True)
    kw = dict(prompt="a tree", num_inference_steps=2, height=32, width=32, output_type="np")
    assert_same_image(again(**kw, generator=gen(9)).images, ref(**kw, generator=gen(9)).images, max_diff=0)
