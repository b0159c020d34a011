"""The one scheduler base (issue 11): diffusers' config rules for keys a class does not have, outputs,
save/load, compatibles; every scheduler against diffusers on the same config dicts."""
import json

import diffusers
import pytest
import torch

from minidiff import schedulers as ours
from tests.utils import compare_loop, start_sample

NAMES = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler", "PNDMScheduler", "LCMScheduler"]
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def public(config):
    return {k: v for k, v in config.items() if k != "_use_default_values"}


@pytest.mark.parametrize("name", NAMES)
def test_key_the_class_lacks_is_carried_and_ignored(name):
    """SD 2.x-style configs carry rescale_betas_zero_snr: PNDM has no such key in diffusers and must ignore it
    (applying it gave NaN: sqrt(1 - a) / ... with a_T = 0)."""
    config = {**SD, "_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
              "prediction_type": "v_prediction", "clip_sample": False, "use_karras_sigmas": False,
              "not_a_diffusers_key": 3}
    a, b = getattr(ours, name).from_config(config), getattr(diffusers, name).from_config(config)
    assert public(a.config) == public(b.config)  # carried keys and _class_name too, as diffusers keeps them
    assert a.config["_class_name"] == name and a.config.not_a_diffusers_key == 3
    for s in (a, b):
        s.set_timesteps(6)
    outs = compare_loop(a, b, start_sample(), fields=("prev_sample",), seed=1)
    assert torch.isfinite(outs[-1].prev_sample).all()


def test_outputs_by_attribute_index_key_and_tuple():
    s = ours.EulerDiscreteScheduler(**SD)
    s.set_timesteps(3)
    x = start_sample()
    out = s.step(x, s.timesteps[0], x)
    prev, x0 = out  # unpacking
    assert out[0] is out.prev_sample is out["prev_sample"] is prev and out[1] is x0 is out.pred_original_sample
    assert out[-1] is x0 and len(out) == 2 and out.to_tuple() == (prev, x0) and out.keys() == ["prev_sample",
                                                                                                "pred_original_sample"]
    p = ours.PNDMScheduler(**SD, skip_prk_steps=True)
    p.set_timesteps(3)
    out = p.step(x, p.timesteps[0], x)
    assert len(out) == 1 and out.pred_original_sample is None  # as diffusers' BaseOutput: None fields are not indexed
    with pytest.raises(IndexError):
        out[1]


@pytest.mark.parametrize("name", NAMES + ["DDPMWuerstchenScheduler"])
def test_config_file_round_trip_like_diffusers(name, tmp_path):
    cls, ref_cls = getattr(ours, name), getattr(diffusers, name)
    kw = {} if name == "DDPMWuerstchenScheduler" else dict(SD, timestep_spacing="trailing")
    a = cls(**kw)
    a.save_config(tmp_path / "scheduler")
    text = (tmp_path / "scheduler" / "scheduler_config.json").read_text()
    ref_cls(**kw).save_config(tmp_path / "ref")
    assert json.loads(text) == json.loads((tmp_path / "ref" / "scheduler_config.json").read_text())
    b = cls.from_pretrained(tmp_path, subfolder="scheduler")
    ref = ref_cls.from_pretrained(tmp_path, subfolder="scheduler")
    assert public(b.config) == public(ref.config)  # _class_name and _diffusers_version come along, as in diffusers
    assert b.config["_class_name"] == name and bool(b)


def test_compatibles():
    names = lambda s: sorted(c.__name__ for c in s.compatibles)
    built = set(ours.__all__)
    for name in NAMES + ["DDPMWuerstchenScheduler"]:
        ref = sorted(c.__name__ for c in getattr(diffusers, name)().compatibles if c.__name__ in built)
        assert names(getattr(ours, name)()) == ref, name
    assert "DDIMScheduler" in names(ours.EulerDiscreteScheduler()) and names(ours.LCMScheduler()) == ["LCMScheduler"]


# ---------------------------------------------------------------------------------------------
# Issue 13: the scheduler surface diffusers' snippets and tests use


@pytest.mark.parametrize("variant", [
    dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True), dict(interpolation_type="log_linear"),
    dict(use_beta_sigmas=True, sigma_min=0.1, sigma_max=8.0, final_sigmas_type="sigma_min"),
    dict(use_exponential_sigmas=True, timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(interpolation_type="log_linear", use_karras_sigmas=True, final_sigmas_type="sigma_min"),
])
def test_euler_sigma_schedules(variant):
    a = ours.EulerDiscreteScheduler(**SD, **variant)
    b = diffusers.EulerDiscreteScheduler(**SD, **variant)
    for s in (a, b):
        s.set_timesteps(8)
    # the beta quantiles are computed without scipy: equal to scipy's within float64 rounding
    exact = not variant.get("use_beta_sigmas")
    assert a.num_inference_steps == b.num_inference_steps and len(a.sigmas) == len(b.sigmas)
    if not exact:
        assert torch.allclose(a.sigmas, b.sigmas, rtol=1e-6, atol=0) and torch.allclose(a.timesteps, b.timesteps,
                                                                                       rtol=1e-6, atol=1e-5)
        a.sigmas, a.timesteps = b.sigmas.clone(), b.timesteps.clone()  # then every step must match exactly
    compare_loop(a, b, start_sample())


@pytest.mark.parametrize("name", ["DDIMScheduler", "LCMScheduler"])
def test_thresholding(name):
    kw = dict(SD, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    a, b = getattr(ours, name)(**kw), getattr(diffusers, name)(**kw)
    for s in (a, b):
        s.set_timesteps(4)
    x = start_sample() * 3  # pixel-like values beyond [-1, 1], so the threshold acts
    fields = ("prev_sample", "pred_original_sample") if name == "DDIMScheduler" else ("prev_sample", "denoised")
    outs = compare_loop(a, b, x, fields=fields, seed=0)
    x0 = outs[0].pred_original_sample if name == "DDIMScheduler" else None
    if x0 is not None:  # thresholded to [-1, 1] after dividing by s
        assert x0.abs().max() <= 1.0 + 1e-6


def test_pndm_public_prk_and_plms_steps():
    a, b = ours.PNDMScheduler(**SD), diffusers.PNDMScheduler(**SD)
    for s in (a, b):
        s.set_timesteps(10)
    x = start_sample()
    xa = xb = x
    for i, t in enumerate(a.timesteps):  # as diffusers' own PNDM test: prk steps, then plms steps, called directly
        method = "step_prk" if i < len(a.prk_timesteps) else "step_plms"
        eps = torch.sin(xa) * 0.5
        xa = getattr(a, method)(eps, t, xa).prev_sample
        xb = getattr(b, method)(torch.sin(xb) * 0.5, t, xb).prev_sample
        assert torch.equal(xa, xb), (i, method)
    assert a.step_plms(x, a.timesteps[-1], x, return_dict=False)[0].shape == x.shape


def test_lcm_previous_timestep():
    a, b = ours.LCMScheduler(**SD), diffusers.LCMScheduler(**SD)
    for s in (a, b):
        s.set_timesteps(4)
    for t in a.timesteps:
        assert int(a.previous_timestep(t)) == int(b.previous_timestep(t))
    assert int(a.previous_timestep(a.timesteps[-1])) == -1
    for s in (a, b):
        s.set_timesteps(timesteps=[999, 759, 499, 259])
    assert [int(a.previous_timestep(t)) for t in a.timesteps] == [int(b.previous_timestep(t)) for t in b.timesteps]
    assert int(ours.LCMScheduler().previous_timestep(torch.tensor(500))) == 499  # before set_timesteps


def test_config_values_as_attributes_are_deprecated_but_work():
    s = ours.DDIMScheduler(**SD)
    with pytest.warns(FutureWarning, match="use scheduler.config.beta_schedule"):
        assert s.beta_schedule == "scaled_linear"
    with pytest.raises(AttributeError, match="no attribute 'not_there'"):
        s.not_there
    assert not hasattr(s, "sigmas")
