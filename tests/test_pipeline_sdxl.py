"""Whole SDXL pipelines (base, refiner hand-off, img2img, Turbo, TAESD as the VAE) against diffusers."""
import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from minidiff import (AutoencoderTiny, EulerAncestralDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                      StableDiffusionXLPipeline)
from utils import assert_close, assert_same_image, build_sdxl, gen, record_latent_path, seeded_


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sdxl"))
    ref = build_sdxl(folder)
    ours = StableDiffusionXLPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return folder, ref, ours


def test_text_to_image_matches_diffusers(sdxl):
    _, ref, ours = sdxl
    kw = dict(prompt=["a castle on a hill", "a bird"], prompt_2=["oil painting", "watercolor"], negative_prompt=["blurry", "dark"],
              num_inference_steps=4, guidance_scale=6.0, height=48, width=32, num_images_per_prompt=2,
              original_size=(64, 64), crops_coords_top_left=(4, 8), target_size=(48, 32), guidance_rescale=0.5,
              output_type="np")
    a = ours(**kw, generator=gen(0)).images
    assert a.shape == (4, 48, 32, 3)
    assert_same_image(a, ref(**kw, generator=gen(0)).images)
    # Negative micro-conditioning: diffusers 0.39's text-to-image pipeline repeats the [negative, positive]
    # time-id pair per image, which mismatches the [uncond..., cond...] batch when more than one image
    # is made. minidiff pairs them correctly; with one image both agree.
    kw.update(prompt="a castle", prompt_2=None, negative_prompt=None, num_images_per_prompt=1,
              negative_original_size=(32, 32), negative_crops_coords_top_left=(2, 2), negative_target_size=(48, 32))
    assert_same_image(ours(**kw, generator=gen(0)).images, ref(**kw, generator=gen(0)).images)


def test_zeroed_negative_and_clip_skip(sdxl):
    _, ref, ours = sdxl
    kw = dict(prompt="a bridge", num_inference_steps=3, height=32, width=32, clip_skip=1)
    assert_same_image(ours(**kw, generator=gen(1)).images, ref(**kw, generator=gen(1)).images)


def test_encode_prompt_and_generation_without_text_encoders(sdxl):
    folder, ref, ours = sdxl
    mine = ours.encode_prompt("a red car", negative_prompt="a blue car")
    theirs = ref.encode_prompt("a red car", device="cpu", negative_prompt="a blue car")
    for name, a, b in zip(["prompt_embeds", "negative_prompt_embeds", "pooled", "negative_pooled"], mine, theirs):
        assert_close(a, b, name=name)
    # the text encoders can be freed: a pipeline built without them generates from the embeddings
    bare = StableDiffusionXLPipeline.from_pretrained(folder, text_encoder=None, text_encoder_2=None,
                                                     tokenizer=None, tokenizer_2=None)
    bare.set_progress_bar_config(disable=True)
    cond, uncond, pooled, neg_pooled = mine
    kw = dict(num_inference_steps=3, height=32, width=32, output_type="np")
    a = bare(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
             negative_pooled_prompt_embeds=neg_pooled, **kw, generator=gen(2)).images
    b = ref("a red car", negative_prompt="a blue car", **kw, generator=gen(2)).images
    assert_same_image(a, b)
    with pytest.raises(ValueError, match="no text encoders"):
        bare("a prompt", height=32, width=32)


def test_base_to_refiner_handoff(sdxl, tmp_path):
    """Base denoises to 80% and hands latents to a refiner-style img2img (second encoder, aesthetic score)."""
    _, ref_base, base = sdxl
    ref_refiner = build_sdxl(str(tmp_path), refiner=True, seed=5)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tmp_path))
    refiner.set_progress_bar_config(disable=True)
    assert refiner.requires_aesthetics_score and refiner.text_encoder is None
    kw = dict(prompt="a lion", num_inference_steps=6, height=32, width=32)
    latents = base(**kw, denoising_end=0.8, output_type="latent", generator=gen(3)).images
    ref_latents = ref_base(**kw, denoising_end=0.8, output_type="latent", generator=gen(3)).images
    assert_close(latents, ref_latents, name="base latents")
    kw2 = dict(prompt="a lion", num_inference_steps=6, denoising_start=0.8, aesthetic_score=7.0,
               negative_aesthetic_score=2.0, negative_prompt="ugly", output_type="np")
    assert_same_image(refiner(image=latents, **kw2, generator=gen(4)).images,
                      ref_refiner(image=ref_latents, **kw2, generator=gen(4)).images)


def test_img2img_from_an_image(sdxl):
    folder, ref, _ = sdxl
    ours = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    ref_i2i = diffusers.StableDiffusionXLImg2ImgPipeline(**ref.components)
    ref_i2i.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    kw = dict(prompt="a mountain", image=image, strength=0.7, num_inference_steps=5, guidance_scale=4.0,
              output_type="np")
    assert_same_image(ours(**kw, generator=gen(6)).images, ref_i2i(**kw, generator=gen(6)).images)


def test_latents_and_pixels_go_through_the_vae(sdxl, monkeypatch):
    _, _, ours = sdxl
    i2i = StableDiffusionXLImg2ImgPipeline(**ours.components)
    calls = record_latent_path(monkeypatch)
    kw = dict(num_inference_steps=2, output_type="np")
    ours("a cat", height=32, width=32, **kw, generator=gen(0))
    i2i("a cat", image=np.full((1, 32, 32, 3), 0.5, np.float32), strength=0.5, **kw, generator=gen(1))
    # SDXL's pipelines upcast a force_upcast VAE (the latents_to_image / image_to_latents rule)
    assert calls == [("latents_to_image", True), ("image_to_latents", True), ("latents_to_image", True)]


def test_turbo_one_step_no_guidance(sdxl):
    """sdxl-turbo: EulerAncestral with trailing spacing, 1 step, guidance 0: one UNet pass, batch 1."""
    _, ref, ours = sdxl
    config = {**ours.scheduler.config}
    turbo = StableDiffusionXLPipeline(**{**ours.components, "scheduler": EulerAncestralDiscreteScheduler.from_config(
        config, timestep_spacing="trailing")})
    turbo.set_progress_bar_config(disable=True)
    ref_turbo = diffusers.StableDiffusionXLPipeline(**{**ref.components, "scheduler": (
        diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing"))})
    ref_turbo.set_progress_bar_config(disable=True)
    calls = []
    hook = turbo.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    kw = dict(prompt="a cinematic shot of a raccoon", num_inference_steps=1, guidance_scale=0.0, height=32,
              width=32, output_type="np")
    a = turbo(**kw, generator=gen(7)).images
    hook.remove()
    assert calls == [1]
    assert_same_image(a, ref_turbo(**kw, generator=gen(7)).images)


def test_tiny_autoencoder_as_the_vae(sdxl, tmp_path):
    _, ref, ours = sdxl
    taesd = seeded_(diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                              num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)), 9, std=0.1)
    taesd.save_pretrained(str(tmp_path / "taesd"))
    tiny = StableDiffusionXLPipeline(**{**ours.components, "vae": AutoencoderTiny.from_pretrained(str(tmp_path / "taesd"))})
    tiny.set_progress_bar_config(disable=True)
    ref_tiny = diffusers.StableDiffusionXLPipeline(**{**ref.components, "vae": taesd.eval()})
    ref_tiny.set_progress_bar_config(disable=True)
    kw = dict(prompt="a forest", num_inference_steps=3, height=32, width=32, output_type="np")
    assert_same_image(tiny(**kw, generator=gen(8)).images, ref_tiny(**kw, generator=gen(8)).images)


def test_fp16_vae_is_upcast_and_nan_is_reported(sdxl):
    folder, _, ours = sdxl
    kw = dict(prompt="a lake", num_inference_steps=2, height=32, width=32, output_type="np")
    ref_image = ours(**kw, generator=gen(9)).images
    half = StableDiffusionXLPipeline.from_pretrained(folder)
    half.set_progress_bar_config(disable=True)
    half.vae.to(torch.float16)  # force_upcast is set in the VAE's config: decoding must run in fp32
    a = half(**kw, generator=gen(9)).images
    assert half.vae.dtype == torch.float16  # put back after decoding
    np.testing.assert_allclose(a, ref_image, atol=1 / 255)
    with torch.no_grad():
        half.vae.post_quant_conv.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        half(**kw, generator=gen(9))


def test_bad_inputs(sdxl):
    _, _, ours = sdxl
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=torch.zeros(1, 77, 64), height=32, width=32)
    with pytest.raises(ValueError, match="denoising_end=1.5"):
        ours("a", denoising_end=1.5, height=32, width=32, num_inference_steps=2)
    with pytest.raises(ValueError, match="width=21 must be a positive multiple"):
        ours("a", height=32, width=21)
