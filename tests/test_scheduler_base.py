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
