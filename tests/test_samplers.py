"""Issue 15's schedulers (Heun, DPM2, DPM2 a, LMS, DDPM, TCD) against diffusers 0.39: timesteps and sigmas for
each spacing and sigma schedule, every step of whole loops (a fixed fake model and a tiny seeded UNet), seeded
noise, config rules; then whole SD and SDXL pipelines, and the A1111 sampler names."""
import inspect

import diffusers
import numpy as np
import pytest
import torch

from minidiff import schedulers as ours
from minidiff.samplers import SAMPLERS, name_of, sampler_name, scheduler_for
from minidiff.schedulers.lms import lms_coefficient
from utils import assert_close

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SIGMA_NAMES = ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
               "LMSDiscreteScheduler"]
SIGMA_SCHEDULES = [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}]


def pair(name, **config):
    return getattr(ours, name)(**config), getattr(diffusers, name)(**config)


def fake_model(x, t):
    """A deterministic stand-in for the UNet: a smooth function of the sample and the timestep."""
    return torch.sin(1.3 * x + float(t) / 250.0) * 0.8 + 0.1 * x


def loop(sched, model=fake_model, seed=5, dtype=torch.float32, **step_kwargs):
    """A pipeline's loop from seeded noise (a generator goes to schedulers whose step takes one); returns the
    step outputs."""
    x = (torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma).to(dtype)
    if "generator" in inspect.signature(sched.step).parameters:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    outs = []
    for t in sched.timesteps:
        out = sched.step(model(sched.scale_model_input(x, t), t), t, x, **step_kwargs)
        outs.append(out)
        x = out[0]
    return outs


def same_schedule(a, b):
    assert a.timesteps.dtype == b.timesteps.dtype, (a.timesteps.dtype, b.timesteps.dtype)
    # (exact, but for the float64 timesteps of beta sigmas: minidiff's beta quantile is a bisection, scipy's
    # not, the same to ~1e-13)
    assert torch.allclose(a.timesteps, b.timesteps, rtol=0, atol=1e-9, equal_nan=True), (a.timesteps, b.timesteps)
    for name in ("sigmas", "sigmas_interpol", "sigmas_up", "sigmas_down"):
        if hasattr(b, name):
            assert torch.allclose(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True), name
    assert_close(torch.as_tensor(a.init_noise_sigma), torch.as_tensor(b.init_noise_sigma), rel=0)


def same_loop(a, b, rel=0.0, fields=(0, 1), **kw):
    """Every step's outputs within `rel` of scale (bit-exact by default: the same float operations as diffusers)."""
    outs_a, outs_b = loop(a, **kw), loop(b, **kw)
    assert len(outs_a) == len(outs_b) == len(b.timesteps) > 0
    for i, (oa, ob) in enumerate(zip(outs_a, outs_b)):
        for f in fields:
            assert_close(oa[f], ob[f], rel=rel, name=f"step {i} output {f}")
    return outs_a


# ---------------------------------------------------------------------------------------------
# The k-diffusion-style samplers: every spacing x every sigma schedule x prediction types


@pytest.mark.parametrize("schedule", SIGMA_SCHEDULES, ids=["plain", "karras", "exponential", "beta"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("name", SIGMA_NAMES)
def test_sigma_sampler_loops(name, spacing, schedule):
    prediction = "v_prediction" if spacing == "trailing" else "epsilon"
    a, b = pair(name, **SD, timestep_spacing=spacing, steps_offset=1, prediction_type=prediction, **schedule)
    same_schedule(a, b)  # before set_timesteps diffusers holds a full-length loop
    for s in (a, b):
        s.set_timesteps(7)
    same_schedule(a, b)
    # LMS's coefficients are a quadrature here and scipy's there: the same to ~1e-7
    same_loop(a, b, rel=1e-5 if name == "LMSDiscreteScheduler" else 0.0)


@pytest.mark.parametrize("variant", [dict(prediction_type="sample", name="HeunDiscreteScheduler"),
                                     dict(clip_sample=True, clip_sample_range=0.5, name="HeunDiscreteScheduler"),
                                     dict(prediction_type="sample", name="LMSDiscreteScheduler"),
                                     dict(beta_schedule="linear", name="KDPM2DiscreteScheduler"),
                                     dict(beta_schedule="squaredcos_cap_v2", name="HeunDiscreteScheduler"),
                                     dict(beta_schedule="exp", name="HeunDiscreteScheduler"),
                                     dict(beta_schedule="linear", name="KDPM2AncestralDiscreteScheduler")])
def test_sigma_sampler_variants(variant):
    variant = dict(variant)
    name = variant.pop("name")
    a, b = pair(name, **{**SD, **variant})
    for s in (a, b):
        s.set_timesteps(6)
    same_schedule(a, b)
    same_loop(a, b, rel=1e-5 if name == "LMSDiscreteScheduler" else 0.0)


def test_heun_custom_timesteps_and_two_calls_per_step():
    a, b = pair("HeunDiscreteScheduler", **SD)
    for s in (a, b):
        s.set_timesteps(timesteps=[999, 700, 420, 100])
    same_schedule(a, b)
    same_loop(a, b)
    # 4 steps: the first three take two model calls, the last (to sigma 0) one
    assert a.timesteps.tolist() == [999, 700, 700, 420, 420, 100, 100] and a.order == 2
    with pytest.raises(ValueError, match="custom `timesteps` cannot be used with use_karras_sigmas"):
        ours.HeunDiscreteScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[999, 500])


def test_ancestral_noise_comes_from_the_generator():
    a, b = pair("KDPM2AncestralDiscreteScheduler", **SD, use_karras_sigmas=True)
    for s in (a, b):
        s.set_timesteps(5)
    outs = same_loop(a, b, seed=11)
    a.set_timesteps(5)
    other = loop(a, seed=12)
    assert not torch.allclose(other[-1][0], outs[-1][0])
    # one generator per batch item draws (1, ...) per item, as diffusers
    for s in (a, b):
        s.set_timesteps(3)
    ys = []
    for s in (a, b):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
        for t in s.timesteps:
            y = s.step(fake_model(s.scale_model_input(y, t), t), t, y, generator=gens).prev_sample
        ys.append(y)
    assert torch.equal(*ys)


def test_lms_coefficients_match_scipy_within_1e6():
    worst = 0.0
    for config in ({}, {"use_karras_sigmas": True}):
        a, b = pair("LMSDiscreteScheduler", **SD, **config)
        for s in (a, b):
            s.set_timesteps(30)
        for i in range(30):
            for order in range(1, min(i + 1, 4) + 1):
                for j in range(order):
                    ref = b.get_lms_coefficient(order, i, j)
                    worst = max(worst, abs(lms_coefficient(a.sigmas, order, i, j) - ref) / max(1.0, abs(ref)))
    assert worst <= 1e-6, worst
    # the integral of the basis polynomials sums to the step length (they sum to 1)
    s = a.sigmas
    assert abs(sum(lms_coefficient(s, 4, 10, j) for j in range(4)) - float(s[11] - s[10])) < 1e-6
    for order in (1, 2, 4):  # LMS's step takes an order
        for s in (a, b):
            s.set_timesteps(8)
        same_loop(a, b, rel=1e-5, order=order)


def test_img2img_entry_mid_loop():
    """set_begin_index + add_noise, as the img2img pipelines use them (order 2: begin at 2 x t_start)."""
    for name in SIGMA_NAMES:
        a, b = pair(name, **SD, use_karras_sigmas=True)
        for s in (a, b):
            s.set_timesteps(6)
            s.set_begin_index(2 * s.order)
        x0 = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
        noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(2))
        xa = a.add_noise(x0, noise, a.timesteps[4:5].repeat(2))
        xb = b.add_noise(x0, noise, b.timesteps[4:5].repeat(2))
        assert torch.equal(xa, xb)
        outs = []
        for s, x in ((a, xa), (b, xb)):
            g = torch.Generator().manual_seed(3)
            kw = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}
            for t in s.timesteps[2 * s.order:]:
                x = s.step(fake_model(s.scale_model_input(x, t), t), t, x, **kw)[0]
            outs.append(x)
        assert_close(outs[0], outs[1], rel=1e-5 if name == "LMSDiscreteScheduler" else 0.0, name=name)


# ---------------------------------------------------------------------------------------------
# DDPM and TCD


@pytest.mark.parametrize("variant", [
    {}, dict(timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True),
    dict(timestep_spacing="linspace", clip_sample=False, prediction_type="sample"),
    dict(variance_type="fixed_large", steps_offset=1, clip_sample=False),
    dict(variance_type="fixed_small_log", beta_schedule="squaredcos_cap_v2"),
    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
])
def test_ddpm_loop(variant):
    a, b = pair("DDPMScheduler", **{**SD, **variant})
    for s in (a, b):
        s.set_timesteps(10)
    same_schedule(a, b)
    same_loop(a, b)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance(variance_type):
    """A UNet with twice the channels predicts the variance too (DeepFloyd IF's stage I, for one)."""
    def model(x, t):
        return torch.cat([fake_model(x, t), torch.tanh(x) if variance_type == "learned_range" else
                          0.01 * torch.sigmoid(x)], dim=1)
    a, b = pair("DDPMScheduler", **SD, variance_type=variance_type)
    for s in (a, b):
        s.set_timesteps(8)
    outs = same_loop(a, b, model=model)
    assert torch.isfinite(outs[-1][0]).all()


def test_ddpm_custom_timesteps_training_loop_and_errors():
    a, b = pair("DDPMScheduler", **SD)
    assert torch.equal(a.timesteps, b.timesteps) and a.timesteps.dtype == b.timesteps.dtype
    for s in (a, b):
        s.set_timesteps(timesteps=[900, 700, 321, 50, 3])
    same_schedule(a, b)
    same_loop(a, b)
    with pytest.raises(ValueError, match="descending"):
        a.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match="more than the 1000 training timesteps"):
        a.set_timesteps(1001)
    with pytest.raises(ValueError, match="variance_type='wide' is not supported"):
        ours.DDPMScheduler(variance_type="wide")
    # before set_timesteps, the previous timestep is t - 1 (training)
    c, d = pair("DDPMScheduler", **SD)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ya = c.step(fake_model(x, 500), 500, x, generator=torch.Generator().manual_seed(1)).prev_sample
    yb = d.step(fake_model(x, 500), 500, x, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.equal(ya, yb)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_tcd_loop(prediction, eta):
    a, b = pair("TCDScheduler", **SD, prediction_type=prediction)
    for s in (a, b):
        s.set_timesteps(4)
    same_schedule(a, b)
    outs = same_loop(a, b, eta=eta)
    assert type(outs[0]).__name__ == "TCDSchedulerOutput" and outs[0].pred_noised_sample is not None


def test_tcd_schedules_and_errors():
    for kw in (dict(num_inference_steps=4, strength=0.5), dict(num_inference_steps=6, original_inference_steps=20),
               dict(timesteps=[999, 759, 499, 259]), dict(timesteps=[999, 759, 499, 259], strength=0.5),
               dict(num_inference_steps=8)):
        a, b = pair("TCDScheduler", **SD)
        for s in (a, b):
            s.set_timesteps(**kw)
        same_schedule(a, b)
        same_loop(a, b)
    a = ours.TCDScheduler()
    with pytest.raises(ValueError, match="leaves 50 timesteps, fewer than num_inference_steps=60"):
        a.set_timesteps(60)
    a.set_timesteps(4)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"eta \(TCD's gamma\) = 1.5 must be in \[0, 1\]"):
        a.step(x, a.timesteps[0], x, eta=1.5)


@pytest.mark.parametrize("name", SIGMA_NAMES + ["DDPMScheduler", "TCDScheduler"])
def test_fp16_loops(name):
    """fp16 latents stay fp16 and take the same values as in diffusers (its dtype promotions, not ours)."""
    a, b = pair(name, **SD, **({"use_karras_sigmas": True} if name in SIGMA_NAMES else {}))
    for s in (a, b):
        s.set_timesteps(5)
    outs_a, outs_b = loop(a, dtype=torch.float16), loop(b, dtype=torch.float16)
    for oa, ob in zip(outs_a, outs_b):
        assert oa[0].dtype == ob[0].dtype == torch.float16
        assert_close(oa[0], ob[0], rel=1e-3 if name == "LMSDiscreteScheduler" else 0.0, name=name)


# ---------------------------------------------------------------------------------------------
# Config files, from_config, compatibles


NEW = SIGMA_NAMES + ["DDPMScheduler", "TCDScheduler"]


@pytest.mark.parametrize("name", NEW)
def test_from_any_other_config_like_diffusers(name, tmp_path):
    sd15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
            "clip_sample": False}
    sdxl = diffusers.EulerDiscreteScheduler(**SD, steps_offset=1, timestep_spacing="leading").config
    for config in (sd15, dict(sdxl), dict(diffusers.DPMSolverMultistepScheduler(**SD).config)):
        a = getattr(ours, name).from_config(config)
        b = getattr(diffusers, name).from_config(config)
        assert {k: v for k, v in a.config.items() if not k.startswith("_")} == \
            {k: v for k, v in b.config.items() if not k.startswith("_")}
        n = 4
        for s in (a, b):
            s.set_timesteps(n)
        same_schedule(a, b)
    # and from a repo folder's scheduler_config.json, which diffusers reads back the same
    a.save_pretrained(str(tmp_path))
    c = getattr(ours, name).from_pretrained(str(tmp_path))
    d = getattr(diffusers, name).from_pretrained(str(tmp_path))
    for s in (c, d):
        s.set_timesteps(4)
    same_schedule(c, d)


@pytest.mark.parametrize("schedule", SIGMA_SCHEDULES[1:], ids=["karras", "exponential", "beta"])
@pytest.mark.parametrize("name", SIGMA_NAMES)
def test_sigma_bounds_carried_from_an_euler_config(name, schedule):
    """diffusers reads sigma_min/sigma_max off the config wherever they came from: an Euler config's bounds
    set these schedulers' sigma schedules too (but LMS's Karras one)."""
    euler = dict(diffusers.EulerDiscreteScheduler(**SD, sigma_min=0.1, sigma_max=10.0).config)
    a = getattr(ours, name).from_config(euler, **schedule)
    b = getattr(diffusers, name).from_config(euler, **schedule)
    for s in (a, b):
        s.set_timesteps(5)
    same_schedule(a, b)
    assert (a.sigmas.max().item() == 10.0) == (name != "LMSDiscreteScheduler" or "use_karras_sigmas" not in schedule)


@pytest.mark.parametrize("name", NEW)
def test_compatibles_like_diffusers(name):
    a, b = getattr(ours, name)(), getattr(diffusers, name)()
    # diffusers lists the schedulers it has; minidiff the same names where it has them
    expected = {c.__name__ for c in b.compatibles} & set(ours.__all__)
    assert {c.__name__ for c in a.compatibles} == expected and type(a) in a.compatibles
    assert a.order == b.order and len(a) == len(b)


# ---------------------------------------------------------------------------------------------
# A tiny seeded UNet as the model


@pytest.fixture(scope="module")
def tiny_unet():
    from utils import SD_UNET
    from utils import seeded_
    unet = seeded_(diffusers.UNet2DConditionModel(**{**SD_UNET, "sample_size": 8}), 0, std=0.05).eval()
    cond = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(9))

    @torch.no_grad()
    def model(x, t):
        return unet(x, t, encoder_hidden_states=cond).sample
    return model


@pytest.mark.parametrize("name", NEW)
def test_loop_with_a_seeded_unet(name, tiny_unet):
    config = {**SD, "use_karras_sigmas": True} if name in SIGMA_NAMES else SD
    a, b = pair(name, **config)
    for s in (a, b):
        s.set_timesteps(4)
    same_loop(a, b, model=tiny_unet, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Sampler names (A1111 / ComfyUI)


def test_sampler_names():
    s = scheduler_for("DPM2 a Karras", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    assert type(s).__name__ == "KDPM2AncestralDiscreteScheduler" and s.config.use_karras_sigmas
    assert name_of(s) == "DPM2 a Karras" and name_of(ours.HeunDiscreteScheduler()) == "Heun"
    assert sampler_name("euler_ancestral") == "Euler a" and sampler_name("lms karras") == "LMS Karras"
    # where A1111 has no name the PNG says the class name, which reads back
    assert sampler_name("PNDMScheduler") == "PNDMScheduler"
    assert type(scheduler_for("PNDMScheduler", {})).__name__ == "PNDMScheduler"
    with pytest.raises(ValueError, match="unknown sampler 'Eulr'; known: Euler, Euler a, Heun"):
        sampler_name("Eulr")
    # every name the issue lists is known; each maps to the class diffusers' docs give
    for name in ("Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE Karras", "DPM++ SDE", "UniPC",
                 "Heun", "DPM2", "DPM2 a", "LMS", "DDIM", "DDPM", "LCM", "TCD"):
        assert sampler_name(name) == name
        class_name, keys = SAMPLERS[name]
        assert hasattr(diffusers, class_name)
        if hasattr(ours, class_name):  # built like diffusers builds it from the same config
            a = scheduler_for(name, dict(diffusers.PNDMScheduler(**SD).config))
            b = getattr(diffusers, class_name).from_config(diffusers.PNDMScheduler(**SD).config, **keys)
            assert {k: a.config[k] for k in keys} == {k: b.config[k] for k in keys}
