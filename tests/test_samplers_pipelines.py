"""Issue 15's schedulers inside whole SD and SDXL pipelines: the same image as diffusers (uint8 within 1),
second-order schedulers calling the UNet twice per step, img2img strength and the SDXL hand-off with them,
and callbacks and the progress bar counting as diffusers' do (the multistep solvers: test_pipeline_solvers.py)."""
import diffusers
import numpy as np
import pytest
from PIL import Image

from minidiff import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline
from minidiff import StableDiffusionXLPipeline, schedulers
from utils import assert_close, assert_same_image, build_sd, build_sdxl, gen

NEW = ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler",
       "DDPMScheduler", "TCDScheduler"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd_samplers"))
    ref = build_sd(folder)
    return folder, ref


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sdxl_samplers"))
    ref = build_sdxl(folder)
    return folder, ref


def swapped(ours_cls, ref_cls, folder, ref, name, **keys):
    """minidiff's and diffusers' pipeline of the same folder, each with scheduler `name` made from_config of the
    repo's own scheduler config."""
    ours = ours_cls.from_pretrained(folder)
    ours.scheduler = getattr(schedulers, name).from_config(ours.scheduler.config, **keys)
    ref = ref_cls(**{**ref.components, "scheduler": getattr(diffusers, name).from_config(ref.scheduler.config, **keys)})
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


def counting():
    calls = []

    def callback(pipe, i, t, kwargs):
        calls.append((i, float(t)))
        return kwargs
    return calls, callback


@pytest.mark.parametrize("name, keys", [(n, {"use_karras_sigmas": True} if n.startswith("KDPM2") else {}) for n in NEW])
def test_sd_text_to_image(sd, name, keys):
    folder, ref = sd
    ours, ref = swapped(StableDiffusionPipeline, diffusers.StableDiffusionPipeline, folder, ref, name, **keys)
    kw = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, height=32,
              width=32, output_type="np", eta=0.3 if name == "TCDScheduler" else 0.0)
    (calls_a, cb_a), (calls_b, cb_b) = counting(), counting()
    a = ours(**kw, generator=gen(1), callback_on_step_end=cb_a).images
    b = ref(**kw, generator=gen(1), callback_on_step_end=cb_b).images
    assert_same_image(a, b)
    # one callback per UNet call, with the same (index, timestep): 2 per step for the second-order ones
    assert calls_a == calls_b and len(calls_a) == (5 if ours.scheduler.order == 2 else 3)


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler",
                                  "DDPMScheduler"])
def test_sd_img2img_strength(sd, name):
    folder, ref = sd
    ours, ref = swapped(StableDiffusionImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline, folder, ref, name)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8))
    kw = dict(prompt="a painting", image=image, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
              output_type="np")
    assert_same_image(ours(**kw, generator=gen(5)).images, ref(**kw, generator=gen(5)).images)


@pytest.mark.parametrize("name, keys", [(n, {}) for n in NEW])
def test_sdxl_text_to_image(sdxl, name, keys):
    folder, ref = sdxl
    ours, ref = swapped(StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline, folder, ref, name, **keys)
    kw = dict(prompt="a castle", num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="np",
              eta=0.3 if name == "TCDScheduler" else 0.0)
    assert_same_image(ours(**kw, generator=gen(2)).images, ref(**kw, generator=gen(2)).images)


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_sdxl_hand_off_with_two_calls_per_step(sdxl, name):
    """denoising_end on the base, denoising_start on img2img: a second-order step is never split."""
    folder, ref = sdxl
    base, ref_base = swapped(StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline, folder, ref, name)
    i2i, ref_i2i = swapped(StableDiffusionXLImg2ImgPipeline, diffusers.StableDiffusionXLImg2ImgPipeline, folder, ref,
                           name)
    kw = dict(prompt="a lion", num_inference_steps=6, height=32, width=32)
    latents = base(**kw, denoising_end=0.7, output_type="latent", generator=gen(3)).images
    ref_latents = ref_base(**kw, denoising_end=0.7, output_type="latent", generator=gen(3)).images
    assert_close(latents, ref_latents, rel=1e-5, name="base latents")
    (calls_a, cb_a), (calls_b, cb_b) = counting(), counting()
    kw2 = dict(prompt="a lion", num_inference_steps=6, denoising_start=0.7, output_type="np")
    a = i2i(image=latents, **kw2, generator=gen(4), callback_on_step_end=cb_a).images
    b = ref_i2i(image=ref_latents, **kw2, generator=gen(4), callback_on_step_end=cb_b).images
    assert_same_image(a, b)
    assert calls_a == calls_b and len(calls_a) % 2 == 1  # whole steps: 2 calls each, 1 for the last


def test_progress_bar_counts_steps_not_calls(sd, capsys):
    folder, _ = sd
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = schedulers.HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe(prompt="x", num_inference_steps=4, height=32, width=32, output_type="latent", generator=gen(0))
    shown = capsys.readouterr().err.split("\r")
    assert shown[-1].rstrip().split("|")[-1].split()[0] == "4/4"  # 7 UNet calls, 4 steps, as diffusers' bar
    assert len([s for s in shown if "/4 [" in s]) == 4


def test_cli_sampler_names(sd, tmp_path):
    from minidiff.cli import main
    folder, _ = sd
    out = tmp_path / "a.png"
    main(["generate", "a boat", "--model", folder, "--steps", "3", "--width", "32", "--height", "32", "--seed", "4",
          "--sampler", "dpm2 a karras", "--dtype", "float32", "--out", str(out)])
    image = Image.open(out)
    assert "Sampler: DPM2 a Karras," in image.text["parameters"]
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = schedulers.KDPM2AncestralDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                            use_karras_sigmas=True)
    ref = pipe("a boat", num_inference_steps=3, guidance_scale=7.5, width=32, height=32, generator=gen(4)).images
    assert_same_image([image.convert("RGB")], ref)
    # without --sampler the model's own scheduler is named as A1111 names it (SD 1.5's PNDM has none: its class)
    main(["generate", "a boat", "--model", folder, "--steps", "2", "--width", "32", "--height", "32",
          "--out", str(tmp_path / "b.png")])
    assert "Sampler: PNDMScheduler," in Image.open(tmp_path / "b.png").text["parameters"]
    with pytest.raises(SystemExit, match="unknown sampler 'Euler b'; known: Euler, Euler a, Heun, DPM2"):
        main(["generate", "x", "--model", folder, "--sampler", "Euler b", "--out", str(tmp_path / "c.png")])
    assert not (tmp_path / "c.png").exists()
