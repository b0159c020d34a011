"""Schedulers against diffusers 0.39: timesteps, sigmas, every step of a full loop, seeded noise, config rules."""
import inspect
import json

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor as ref_randn_tensor

from minidiff import schedulers as ours
from minidiff.schedulers.common import randn_tensor
from tests.utils import assert_close, compare_loop, fake_unet, run_loop, start_sample

NAMES = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler", "PNDMScheduler", "LCMScheduler"]
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (written by diffusers 0.6: no timestep_spacing)
SD15_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}


def pair(name, **config):
    return getattr(ours, name)(**config), getattr(diffusers, name)(**config)


# ---------------------------------------------------------------------------------------------
# Full loops against diffusers


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_loop(spacing, prediction, offset, karras):
    a, b = pair("EulerDiscreteScheduler", **SD, timestep_spacing=spacing, prediction_type=prediction,
                steps_offset=offset, use_karras_sigmas=karras)
    for s in (a, b):
        s.set_timesteps(9)
    compare_loop(a, b, start_sample())


@pytest.mark.parametrize("variant", [
    dict(final_sigmas_type="sigma_min"), dict(prediction_type="sample"),
    dict(timestep_type="continuous", prediction_type="v_prediction"),
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=10.0),
    dict(beta_schedule="squaredcos_cap_v2"), dict(beta_schedule="linear"),
    dict(trained_betas=torch.linspace(0.001, 0.02, 1000).tolist()),
])
def test_euler_variants(variant):
    config = {**SD, **variant}
    a, b = pair("EulerDiscreteScheduler", **config)
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.sigmas, b.sigmas)  # before set_timesteps
    for s in (a, b):
        s.set_timesteps(7)
    compare_loop(a, b, start_sample())


def test_euler_custom_timesteps_sigmas_and_churn():
    a, b = pair("EulerDiscreteScheduler", **SD)
    for s in (a, b):
        s.set_timesteps(timesteps=[999, 800, 500, 260, 40])
    compare_loop(a, b, start_sample())
    for s in (a, b):
        s.set_timesteps(sigmas=[14.0, 6.0, 2.5, 0.9, 0.2, 0.0])
    compare_loop(a, b, start_sample())
    for s in (a, b):  # s_churn draws noise from the generator
        s.set_timesteps(8)
    compare_loop(a, b, start_sample(), seed=3, s_churn=1.0, s_tmin=0.5, s_tmax=20.0)


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_ancestral_loop(spacing, prediction, offset):
    a, b = pair("EulerAncestralDiscreteScheduler", **SD, timestep_spacing=spacing, prediction_type=prediction,
                steps_offset=offset)
    for s in (a, b):
        s.set_timesteps(8)
    outs = compare_loop(a, b, start_sample(), seed=7)
    # the noise really comes from the generator: another seed changes the result
    a.set_timesteps(8)
    other = run_loop(a, start_sample() * a.init_noise_sigma, seed=8)
    assert not torch.allclose(other[-1].prev_sample, outs[-1].prev_sample)


def test_euler_ancestral_rescaled_and_generator_list():
    a, b = pair("EulerAncestralDiscreteScheduler", **SD, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                prediction_type="v_prediction")
    for s in (a, b):
        s.set_timesteps(4)
    x = start_sample() * b.init_noise_sigma
    outs = []
    for s in (a, b):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]  # one generator per batch item
        y = x
        for t in s.timesteps:
            y = s.step(fake_unet(s.scale_model_input(y, t), t), t, y, generator=gens).prev_sample
        outs.append(y)
    assert_close(outs[0], outs[1], rel=0.0, name="generator list")


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_loop(spacing, prediction, offset, eta):
    a, b = pair("DDIMScheduler", **SD, timestep_spacing=spacing, prediction_type=prediction, steps_offset=offset,
                clip_sample=prediction == "sample", set_alpha_to_one=offset == 0)
    for s in (a, b):
        s.set_timesteps(10)
    compare_loop(a, b, start_sample(), eta=eta, seed=5 if eta else None)


def test_ddim_variants():
    a, b = pair("DDIMScheduler", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                prediction_type="v_prediction", clip_sample_range=0.5)
    for s in (a, b):
        s.set_timesteps(6)
    compare_loop(a, b, start_sample(), eta=0.5, use_clipped_model_output=True, seed=1)
    noise = start_sample(9)
    for s in (a, b):
        s.set_timesteps(6)
    compare_loop(a, b, start_sample(), eta=0.8, variance_noise=noise)


@pytest.mark.parametrize("skip_prk", [True, False])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_pndm_loop(spacing, prediction, offset, skip_prk):
    a, b = pair("PNDMScheduler", **SD, timestep_spacing=spacing, prediction_type=prediction, steps_offset=offset,
                skip_prk_steps=skip_prk, set_alpha_to_one=offset == 1)
    for s in (a, b):
        s.set_timesteps(10)
    compare_loop(a, b, start_sample(), fields=("prev_sample",))


def test_sd15_pndm_config(tmp_path):
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(SD15_PNDM))
    a = ours.PNDMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    b = diffusers.PNDMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert a.config.skip_prk_steps and a.config.steps_offset == 1 and a.config.timestep_spacing == "leading"
    for s in (a, b):
        s.set_timesteps(50)
    assert a.timesteps[:4].tolist() == [981, 961, 961, 941] and a.timesteps[-1] == 1 and len(a.timesteps) == 51
    compare_loop(a, b, start_sample(), fields=("prev_sample",))
    # the pipeline's usual swaps keep the same config rules as diffusers
    for name in NAMES:
        ea, eb = getattr(ours, name).from_config(a.config), getattr(diffusers, name).from_config(b.config)
        assert_same_config(ea.config, eb.config)
        for s in (ea, eb):
            s.set_timesteps(6)
        compare_loop(ea, eb, start_sample(), fields=("prev_sample",), seed=2)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("original", [50, 30])
def test_lcm_loop(prediction, original):
    a, b = pair("LCMScheduler", prediction_type=prediction, original_inference_steps=original,
                clip_sample=prediction == "sample")
    for s in (a, b):
        s.set_timesteps(4)
    compare_loop(a, b, start_sample(), fields=("prev_sample", "denoised"), seed=11)


def test_lcm_timesteps():
    s = ours.LCMScheduler()
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 759, 499, 259] and s.timesteps.dtype == torch.long
    ref = diffusers.LCMScheduler()
    for original in (50, 20, 8, 100):
        for n in range(1, 9):
            for strength in (1.0, 0.5):
                if n > int(original * strength):
                    with pytest.raises(ValueError, match="num_inference_steps"):
                        s.set_timesteps(n, original_inference_steps=original, strength=strength)
                    continue
                s.set_timesteps(n, original_inference_steps=original, strength=strength)
                ref.set_timesteps(n, original_inference_steps=original, strength=strength)
                assert torch.equal(s.timesteps, ref.timesteps), (n, original, strength)


def test_lcm_custom_timesteps_and_strength():
    a, b = pair("LCMScheduler")
    for s in (a, b):
        s.set_timesteps(timesteps=[999, 879, 599, 299, 99], strength=0.6)
    assert a.timesteps.tolist() == [599, 299, 99] and a.num_inference_steps == b.num_inference_steps == 5
    compare_loop(a, b, start_sample(), fields=("prev_sample", "denoised"), seed=4)
    for s in (a, b):  # img2img: strength cuts the distillation grid
        s.set_timesteps(4, strength=0.5)
    compare_loop(a, b, start_sample(), fields=("prev_sample", "denoised"), seed=4)
    with pytest.raises(ValueError, match="descending"):
        a.set_timesteps(timesteps=[99, 599])
    with pytest.raises(ValueError, match="exactly one"):
        a.set_timesteps()


def test_lcm_noise_on_every_step_but_the_last():
    s = ours.LCMScheduler()
    s.set_timesteps(3)
    g = torch.Generator().manual_seed(0)
    x = start_sample()
    for t in s.timesteps:
        x = s.step(fake_unet(x, t), t, x, generator=g).prev_sample
    expected = torch.Generator().manual_seed(0)
    torch.randn((2, 4, 8, 8), generator=expected)
    torch.randn((2, 4, 8, 8), generator=expected)
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=expected))


def test_fp16_steps():
    for name, extra in [("EulerDiscreteScheduler", {}), ("EulerAncestralDiscreteScheduler", {}),
                        ("LCMScheduler", {}), ("DDIMScheduler", {})]:
        a, b = pair(name, **SD, **extra)
        for s in (a, b):
            s.set_timesteps(5)
        x = start_sample(dtype=torch.float16)
        outs_a, outs_b = run_loop(a, x, seed=1), run_loop(b, x, seed=1)
        for oa, ob in zip(outs_a, outs_b):
            assert oa.prev_sample.dtype == ob.prev_sample.dtype == torch.float16
            assert torch.equal(oa.prev_sample, ob.prev_sample), name


# ---------------------------------------------------------------------------------------------
# img2img, the SDXL refiner hand-off, add_noise


@pytest.mark.parametrize("name", NAMES)
def test_img2img_strength(name):
    a, b = pair(name, **SD, steps_offset=1)
    image, noise = start_sample(1), start_sample(2)
    results = []
    for s in (a, b):
        s.set_timesteps(10)
        t_start = 10 - int(10 * 0.6)
        ts = s.timesteps[t_start * s.order:]
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(t_start * s.order)
        x = s.add_noise(image, noise, ts[:1].repeat(2))
        results.append((x, run_loop(s, x, timesteps=ts, seed=0)))
    assert_close(results[0][0], results[1][0], rel=0.0, name="add_noise")
    for oa, ob in zip(results[0][1], results[1][1]):
        assert_close(oa.prev_sample, ob.prev_sample, rel=0.0)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_refiner_denoising_start(name):
    a, b = pair(name, **SD, timestep_spacing="leading", steps_offset=1)
    results = []
    for s in (a, b):
        s.set_timesteps(20)
        cutoff = int(round(1000 - 0.8 * 1000))
        t_start = len(s.timesteps) - int((s.timesteps < cutoff).sum())
        s.set_begin_index(t_start)
        ts = s.timesteps[t_start:]
        x = s.add_noise(start_sample(1), start_sample(2), ts[:1].repeat(2))
        results.append(run_loop(s, x, timesteps=ts, seed=0))
    assert len(results[0]) == 4
    for oa, ob in zip(*results):
        assert_close(oa.prev_sample, ob.prev_sample, rel=0.0)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_by_timestep(name):
    a, b = pair(name, **SD)
    for s in (a, b):
        s.set_timesteps(10)
    ts = b.timesteps[[0, 6]]
    assert_close(a.add_noise(start_sample(1), start_sample(2), ts), b.add_noise(start_sample(1), start_sample(2), ts),
                 rel=0.0)


# ---------------------------------------------------------------------------------------------
# Config plumbing


def assert_same_config(ours_config, ref_config):
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    assert public(ours_config) == public(ref_config)
    assert sorted(ours_config["_use_default_values"]) == sorted(ref_config.get("_use_default_values", []))


def test_from_config_rules_like_diffusers():
    sdxl = {**SD, "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
            "interpolation_type": "linear", "use_karras_sigmas": False, "prediction_type": "epsilon",
            "clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True}
    a, b = ours.EulerDiscreteScheduler.from_config(sdxl), diffusers.EulerDiscreteScheduler.from_config(sdxl)
    assert_same_config(a.config, b.config)
    for name in NAMES:  # Euler config -> every other scheduler and back
        ca, cb = getattr(ours, name).from_config(a.config), getattr(diffusers, name).from_config(b.config)
        assert_same_config(ca.config, cb.config)
        back_a = ours.EulerDiscreteScheduler.from_config(ca.config)
        back_b = diffusers.EulerDiscreteScheduler.from_config(cb.config)
        assert_same_config(back_a.config, back_b.config)
    # a dict works as a config; keyword overrides win; a defaulted key merged into the dict is dropped, as in diffusers
    lcm_a = ours.LCMScheduler.from_config({**a.config, "original_inference_steps": 20}, timestep_scaling=5.0)
    lcm_b = diffusers.LCMScheduler.from_config({**b.config, "original_inference_steps": 20}, timestep_scaling=5.0)
    assert_same_config(lcm_a.config, lcm_b.config)
    assert lcm_a.config.timestep_scaling == 5.0 and lcm_a.config["original_inference_steps"] == 20
    merged = {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
    ea = ours.EulerAncestralDiscreteScheduler.from_config({**lcm_a.config, **merged})
    eb = diffusers.EulerAncestralDiscreteScheduler.from_config({**lcm_b.config, **merged})
    assert_same_config(ea.config, eb.config)
    # timestep_spacing was set explicitly (SDXL dict) so the merge applies; rescale_betas_zero_snr was defaulted,
    # so diffusers drops the merged value: use keyword overrides
    assert ea.config.timestep_spacing == "trailing" and ea.config.rescale_betas_zero_snr is False


def test_save_pretrained_round_trip(tmp_path):
    a = ours.EulerDiscreteScheduler(**SD, timestep_spacing="trailing", use_karras_sigmas=True)
    a.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "EulerDiscreteScheduler" and "_use_default_values" not in saved
    b = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path / "ours")
    b.save_pretrained(tmp_path / "ref")
    c = ours.EulerDiscreteScheduler.from_pretrained(tmp_path / "ref")
    assert_same_config(c.config, b.config)
    for s in (b, c):
        s.set_timesteps(5)
    compare_loop(c, b, start_sample())
    # a config file written for another scheduler: its keys are carried, not refused
    d = ours.LCMScheduler.from_pretrained(tmp_path / "ours", original_inference_steps=25)
    assert d.config.original_inference_steps == 25 and d.config.use_karras_sigmas is True


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="interpolation_type='cubic' is not supported"):
        ours.EulerDiscreteScheduler(interpolation_type="cubic")
    with pytest.raises(ValueError, match="use_karras_sigmas=True and use_exponential_sigmas=True: choose at most one"):
        ours.EulerDiscreteScheduler.from_config({"use_exponential_sigmas": True, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="prediction_type='sample' is not supported"):
        ours.EulerAncestralDiscreteScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="timestep_spacing='even'"):
        ours.DDIMScheduler(timestep_spacing="even")
    with pytest.raises(ValueError, match="beta_schedule='cosine'"):
        ours.PNDMScheduler(beta_schedule="cosine")
    with pytest.raises(ValueError, match=r"unknown config keys \['use_karras_sigmas'\]"):
        ours.DDIMScheduler(use_karras_sigmas=True)
    with pytest.raises(ValueError, match=r"unknown arguments \['timestep_spacin'\]"):
        ours.EulerDiscreteScheduler.from_config({}, timestep_spacin="trailing")
    with pytest.raises(TypeError, match="expects a dict"):
        ours.EulerDiscreteScheduler.from_config("some/repo")
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"prediction_type": "x0"}))
    with pytest.raises(ValueError, match=r"scheduler_config.json: prediction_type='x0'"):
        ours.DDIMScheduler.from_pretrained(tmp_path)
    e = ours.EulerDiscreteScheduler()
    e.set_timesteps(4)
    with pytest.raises(ValueError, match="looks like a loop index"):
        e.step(torch.zeros(1), 0, torch.zeros(1))
    with pytest.raises(ValueError, match="not in the scheduler's timesteps"):
        e.scale_model_input(torch.zeros(1), torch.tensor(5.5))
    with pytest.raises(ValueError, match="call set_timesteps first"):
        ours.DDIMScheduler().step(torch.zeros(1), 10, torch.zeros(1))


@pytest.mark.parametrize("name", NAMES)
def test_shared_plumbing_per_scheduler(name, tmp_path):
    """The config plumbing and checks shared in common.py name the scheduler they serve and round-trip its file."""
    cls = getattr(ours, name)
    with pytest.raises(ValueError, match=rf"{name}\(\.\.\.\): unknown config keys \['not_a_key'\]"):
        cls(not_a_key=1)
    with pytest.raises(ValueError, match=rf"{name}\.from_config: unknown arguments \['not_a_key'\]"):
        cls.from_config({}, not_a_key=1)
    with pytest.raises(ValueError, match=rf"{name}\(\.\.\.\): prediction_type='x0' is not supported"):
        cls(prediction_type="x0")
    a = cls(**SD, prediction_type="v_prediction", timestep_spacing="trailing")
    a.save_pretrained(tmp_path)
    b, ref = cls.from_pretrained(tmp_path), getattr(diffusers, name).from_pretrained(tmp_path)
    assert b.config.prediction_type == "v_prediction" and b.config.timestep_spacing == "trailing"
    assert_same_config(b.config, ref.config)
    assert len(b) == len(ref) == 1000 and not hasattr(cls, "config_class")  # pipelines: config_class = weights
    if name.startswith("Euler"):
        b.set_timesteps(4)
        with pytest.raises(ValueError, match=rf"{name}\.step: timestep=3 looks like a loop index"):
            b.step(torch.zeros(1), 3, torch.zeros(1))


def test_sdxl_facts():
    s = ours.EulerDiscreteScheduler(**SD, timestep_spacing="leading", steps_offset=1)
    s.set_timesteps(30)
    assert s.timesteps[:2].tolist() == [958.0, 925.0] and s.timesteps[-2:].tolist() == [34.0, 1.0]
    assert_close(s.init_noise_sigma, (s.sigmas.max() ** 2 + 1) ** 0.5)
    turbo = ours.EulerAncestralDiscreteScheduler(**SD, timestep_spacing="trailing")
    turbo.set_timesteps(1)
    assert turbo.timesteps.tolist() == [999.0] and turbo.init_noise_sigma == turbo.sigmas.max()


# ---------------------------------------------------------------------------------------------
# Noise


def test_randn_tensor_like_diffusers():
    shape = (3, 4, 5, 5)
    for dtype in (torch.float32, torch.float16):
        a = randn_tensor(shape, torch.Generator().manual_seed(1), "cpu", dtype)
        b = ref_randn_tensor(shape, generator=torch.Generator().manual_seed(1), device=torch.device("cpu"), dtype=dtype)
        assert a.dtype == dtype and torch.equal(a, b)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]
    assert torch.equal(randn_tensor(shape, gens()), ref_randn_tensor(shape, generator=gens()))
    one = lambda: [torch.Generator().manual_seed(5)]
    assert torch.equal(randn_tensor(shape, one()), ref_randn_tensor(shape, generator=one()))
    torch.manual_seed(3)
    a = randn_tensor(shape)
    torch.manual_seed(3)
    assert torch.equal(a, ref_randn_tensor(shape))
    with pytest.raises(ValueError, match="2 generators was given for a batch of 3"):
        randn_tensor(shape, gens()[:2])


@pytest.mark.parametrize("name", NAMES)
def test_step_returns(name):
    """return_dict=False gives diffusers' tuple; the output object has diffusers' field names."""
    s, ref = pair(name, **SD, _class_name="ignored")
    assert s.config["num_train_timesteps"] == s.config.num_train_timesteps == len(s) == 1000
    x = start_sample()
    results = []
    for sched, return_dict in [(s, False), (ref, False), (s, True)]:
        sched.set_timesteps(5)
        t = sched.timesteps[0]
        takes_generator = "generator" in inspect.signature(sched.step).parameters
        g = {"generator": torch.Generator().manual_seed(0)} if takes_generator else {}
        results.append(sched.step(fake_unet(x, t), t, x, return_dict=return_dict, **g))
    plain, ref_plain, out = results
    assert type(plain) is tuple and len(plain) == len(ref_plain)
    for ours_field, ref_field in zip(plain, ref_plain):
        assert torch.equal(ours_field, ref_field)
    names = {"LCMScheduler": ("prev_sample", "denoised"), "PNDMScheduler": ("prev_sample",)}
    for i, field in enumerate(names.get(name, ("prev_sample", "pred_original_sample"))):
        assert torch.equal(getattr(out, field), plain[i])
