"""LCM: LatentConsistencyModelPipeline with an LCM-distilled UNet (time_cond_proj_dim), and SD + an LCM-LoRA with
the LCMScheduler swapped in, against diffusers on tiny seeded pipelines. (The scheduler's timesteps and steps
are tested in test_schedulers.py.)"""
import numpy as np
import pytest
import torch

from minidiff.pipelines.lcm import LatentConsistencyModelPipeline
from minidiff.schedulers import EulerDiscreteScheduler, LCMScheduler
from tests.utils import (assert_close, assert_same_array, build_lora_sd, images, kohya, load_both, ref_load, save,
                         targets, unet_out)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def lcm_repo(tmp_path_factory):
    """A tiny LCM-distilled SD 1.x pipeline: guidance embedding of width 8 added to the time embedding."""
    return build_lora_sd(str(tmp_path_factory.mktemp("lcm")), scheduler=diffusers.LCMScheduler(),
                    pipeline_class=diffusers.LatentConsistencyModelPipeline, time_cond_proj_dim=8)


def load_lcm(repo):
    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(repo)
    ours = LatentConsistencyModelPipeline.from_pretrained(repo)
    ref.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    return ref, ours


def count_unet_calls(pipe):
    """Count the UNet's forward passes and the text rows of each (an instance attribute shadowing the method);
    the latents may come once for guidance's two halves (UNet2DConditionModel.forward)."""
    calls = []
    forward = pipe.unet.forward

    def counting(*args, **kwargs):
        calls.append(args[2].shape[0] if len(args) > 2 else kwargs["encoder_hidden_states"].shape[0])
        return forward(*args, **kwargs)

    pipe.unet.forward = counting
    return calls


@pytest.mark.parametrize("kw", [
    dict(num_inference_steps=4),  # guidance 8.5: diffusers' default
    dict(num_inference_steps=2, original_inference_steps=10, guidance_scale=3.0, num_images_per_prompt=2),
    dict(timesteps=[999, 639, 259], guidance_scale=1.0, prompt=["a cat", "photo"]),
])
def test_lcm_pipeline_matches_diffusers(lcm_repo, kw):
    ref, ours = load_lcm(lcm_repo)
    assert isinstance(ours.scheduler, LCMScheduler)
    calls = count_unet_calls(ours)
    kw = {"num_inference_steps": None, **kw} if "timesteps" in kw else kw
    assert_same_array(images(ours, **kw), images(ref, **kw))
    steps = len(kw["timesteps"]) if "timesteps" in kw else kw.get("num_inference_steps", 3)  # images() runs 3
    batch = kw.get("num_images_per_prompt", 1) * (len(kw["prompt"]) if "prompt" in kw else 1)
    assert calls == [batch] * steps  # one UNet pass per step: the guidance is an embedding, not a second batch


def test_lcm_latents_and_guidance_matter(lcm_repo):
    """The decoded sample is the scheduler's denoised one, and the guidance embedding changes it."""
    ref, ours = load_lcm(lcm_repo)
    kw = dict(output_type="latent", num_inference_steps=3)
    ours_latents = images(ours, **kw, guidance_scale=6.0)
    assert_close(ours_latents, images(ref, **kw, guidance_scale=6.0), name="denoised latents")
    assert np.abs(ours_latents - images(ours, **kw, guidance_scale=2.0)).max() > 1e-3


def test_lcm_pipeline_needs_an_lcm_scheduler(lcm_repo):
    _, ours = load_lcm(lcm_repo)
    ours.scheduler = EulerDiscreteScheduler.from_config(ours.scheduler.config)
    with pytest.raises(ValueError, match="needs an LCMScheduler"):
        ours("a cat", num_inference_steps=2)


@pytest.fixture(scope="module")
def sd_lcm_lora(tmp_path_factory):
    """A plain SD 1.x pipeline and an LCM-LoRA-shaped file: kohya keys with diffusers names, alpha 8, rank 4, on
    the attention projections, resnet convolutions, shortcuts, samplers and time_emb_proj."""
    folder = tmp_path_factory.mktemp("sd_for_lcm")
    repo = build_lora_sd(str(folder / "sd"))
    unet = diffusers.UNet2DConditionModel.from_pretrained(repo, subfolder="unet")
    names = [n for n in targets(unet) if "attentions" in n or "resnets" in n or "samplers" in n]
    path = save(kohya(unet, "lora_unet_", names, alpha=8.0, seed=21), str(folder / "lcm_lora.safetensors"))
    return repo, path


@pytest.mark.parametrize("guidance_scale, negative_prompt", [(1.0, None), (1.5, "blurry, ugly")])
def test_lcm_lora_on_stable_diffusion(sd_lcm_lora, guidance_scale, negative_prompt):
    repo, path = sd_lcm_lora
    ref, ours = load_both(repo)
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    ours.scheduler = LCMScheduler.from_config(ours.scheduler.config)
    for pipe in (ref, ours):
        ref_load(pipe, path, adapter_name="lcm")
    assert_close(unet_out(ours), unet_out(ref), name="unet with LCM-LoRA")
    calls = count_unet_calls(ours)
    kw = dict(num_inference_steps=4, guidance_scale=guidance_scale, negative_prompt=negative_prompt)
    assert_same_array(images(ours, **kw), images(ref, **kw))
    # guidance 1: one UNet pass per step on the prompt alone; above 1: one batched [negative, prompt] pass per step
    assert calls == [1 if guidance_scale <= 1 else 2] * 4
