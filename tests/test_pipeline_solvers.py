"""The DPM-Solver family in whole pipelines (issue 15): SD and SDXL give diffusers' image (uint8 within 1) with
each solver swapped in by `from_config`, and every step over a loop with a tiny seeded UNet matches (fp32, 1e-5
of scale); img2img enters the solvers mid-way as diffusers does."""
import diffusers
import pytest
import torch

import minidiff
from minidiff import (StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                      StableDiffusionXLPipeline)
from utils import assert_close, assert_same_image, build_sd, build_sdxl, gen

# The A1111 names these configs stand for, as diffusers' scheduler docs map them.
SOLVERS = {
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True,
                                                                 algorithm_type="sde-dpmsolver++")),
    "DPM++ 3M (heun, exponential)": ("DPMSolverMultistepScheduler", dict(solver_order=3, solver_type="heun",
                                                                         use_exponential_sigmas=True)),
    "DPM++ SDE (singlestep)": ("DPMSolverSinglestepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    "DPM++ 2S": ("DPMSolverSinglestepScheduler", dict(use_karras_sigmas=True)),
    "UniPC": ("UniPCMultistepScheduler", dict()),
    "UniPC bh1 3rd order": ("UniPCMultistepScheduler", dict(solver_type="bh1", solver_order=3, disable_corrector=[0],
                                                          final_sigmas_type="sigma_min")),  # (zero: NaN in diffusers)
    "DEIS": ("DEISMultistepScheduler", dict()),
}


def swapped(pipe, lib, name, overrides):
    cls = getattr(lib, name)
    new = type(pipe)(**{**pipe.components, "scheduler": cls.from_config(pipe.scheduler.config, **overrides)})
    new.set_progress_bar_config(disable=True)
    return new


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd"))
    ref = build_sd(folder)
    ours = StableDiffusionPipeline.from_pretrained(folder)
    return folder, ref, ours


@pytest.mark.parametrize("sampler", list(SOLVERS))
def test_sd_pipeline_with_each_solver(sd, sampler):
    _, ref, ours = sd
    name, overrides = SOLVERS[sampler]
    a, b = swapped(ours, minidiff, name, overrides), swapped(ref, diffusers, name, overrides)
    kw = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=5, guidance_scale=5.0,
              height=32, width=32, output_type="np")
    assert_same_image(a(**kw, generator=gen(4)).images, b(**kw, generator=gen(4)).images)


def test_sd_img2img_with_solvers(sd):
    folder, ref, _ = sd
    ours = StableDiffusionImg2ImgPipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    image = torch.rand(1, 3, 32, 32, generator=gen(7))
    for name, overrides in (SOLVERS["DPM++ 2M SDE Karras"], SOLVERS["UniPC"]):
        a, b = swapped(ours, minidiff, name, overrides), swapped(ref, diffusers, name, overrides)
        kw = dict(prompt="a lighthouse", image=image, strength=0.6, num_inference_steps=6, output_type="np")
        assert_same_image(a(**kw, generator=gen(5)).images, b(**kw, generator=gen(5)).images)


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "DPM++ 2M SDE Karras", "UniPC", "DEIS", "DPM++ 2S"])
def test_every_step_with_a_seeded_unet(sd, sampler):
    """The loop a pipeline runs, with the tiny seeded UNet as the model: each step's sample matches diffusers'."""
    _, ref, ours = sd
    name, overrides = SOLVERS[sampler]
    a = getattr(minidiff, name).from_config(ours.scheduler.config, **overrides)
    b = getattr(diffusers, name).from_config(ref.scheduler.config, **overrides)
    cond = torch.randn(1, 77, 32, generator=gen(1))
    x_a = x_b = torch.randn(1, 4, 8, 8, generator=gen(2))
    ga, gb = gen(3), gen(3)
    for s in (a, b):
        s.set_timesteps(8)
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)
    with torch.no_grad():
        for i, t in enumerate(a.timesteps):
            eps_a = ours.unet(a.scale_model_input(x_a, t), t, encoder_hidden_states=cond).sample
            eps_b = ref.unet(b.scale_model_input(x_b, t), t, encoder_hidden_states=cond).sample
            extra_a = {"generator": ga} if "SDE" in sampler else {}
            extra_b = {"generator": gb} if "SDE" in sampler else {}
            x_a = a.step(eps_a, t, x_a, **extra_a).prev_sample
            x_b = b.step(eps_b, t, x_b, **extra_b).prev_sample
            assert_close(x_a, x_b, rel=1e-5, name=f"{sampler} step {i}")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sdxl"))
    ref = build_sdxl(folder)
    ours = StableDiffusionXLPipeline.from_pretrained(folder)
    return folder, ref, ours


@pytest.mark.parametrize("sampler", ["DPM++ 2M Karras", "DPM++ 2M SDE Karras", "UniPC", "DEIS", "DPM++ 2S"])
def test_sdxl_pipeline_with_solvers(sdxl, sampler):
    _, ref, ours = sdxl
    name, overrides = SOLVERS[sampler]
    a, b = swapped(ours, minidiff, name, overrides), swapped(ref, diffusers, name, overrides)
    kw = dict(prompt="a castle", num_inference_steps=4, guidance_scale=4.0, height=32, width=32, output_type="np")
    assert_same_image(a(**kw, generator=gen(6)).images, b(**kw, generator=gen(6)).images)


def test_sdxl_base_to_refiner_with_dpm_solver(sdxl, tmp_path):
    """denoising_end / denoising_start hand-off with DPM++ 2M Karras on both sides (the refiner enters mid-way)."""
    _, ref_base, base = sdxl
    ref_refiner = build_sdxl(str(tmp_path), refiner=True, seed=5)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tmp_path))
    name, overrides = SOLVERS["DPM++ 2M Karras"]
    base, ref_base = swapped(base, minidiff, name, overrides), swapped(ref_base, diffusers, name, overrides)
    for pipe, lib in ((refiner, minidiff), (ref_refiner, diffusers)):  # (keeps requires_aesthetics_score)
        pipe.scheduler = getattr(lib, name).from_config(pipe.scheduler.config, **overrides)
        pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a lion", num_inference_steps=8, height=32, width=32)
    latents = base(**kw, denoising_end=0.7, output_type="latent", generator=gen(3)).images
    ref_latents = ref_base(**kw, denoising_end=0.7, output_type="latent", generator=gen(3)).images
    assert_close(latents, ref_latents, name="base latents")
    kw2 = dict(prompt="a lion", num_inference_steps=8, denoising_start=0.7, output_type="np")
    assert_same_image(refiner(image=latents, **kw2, generator=gen(4)).images,
                      ref_refiner(image=ref_latents, **kw2, generator=gen(4)).images)
