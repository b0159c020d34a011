"""The one model shell (minidiff.models.base.Model) and the one output convention (ModelOutput)."""
import dataclasses
import json

import pytest
import torch

import minidiff
from minidiff.models.base import Model, ModelOutput
from tests import utils as builders

MODEL_CLASSES = [minidiff.UNet2DConditionModel, minidiff.AutoencoderKL, minidiff.AutoencoderTiny, minidiff.CLIPTextModel,
                 minidiff.CLIPTextModelWithProjection, minidiff.WuerstchenPrior, minidiff.WuerstchenDiffNeXt,
                 minidiff.PaellaVQModel]


def test_every_model_with_weights_is_a_model_and_writes_nothing_of_its_own():
    for cls in MODEL_CLASSES:
        assert issubclass(cls, Model), cls
        for name in ("from_pretrained", "save_pretrained", "dtype", "device"):
            assert name not in vars(cls), f"{cls.__name__} defines its own {name}"


@pytest.mark.parametrize("build", [builders.autoencoder_kl, builders.clip_text_projection, builders.wuerstchen_prior],
                         ids=lambda b: b.__name__)
def test_save_load_round_trip_through_the_shell(tmp_path, build):
    model, run = build()
    builders.seeded_(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, torch_dtype=torch.float16)
    as_json = lambda cfg: json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples come back as lists
    assert as_json(loaded.config) == as_json(model.config) and loaded.dtype == torch.float16 and loaded.device.type == "cpu"
    assert all(torch.equal(a.half(), b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", type(model).weight_names[0] + ".safetensors"]
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["_class_name"] == type(model).__name__
    if isinstance(model, minidiff.CLIPTextModelWithProjection):  # what transformers needs to read it back
        assert written["architectures"] == ["CLIPTextModelWithProjection"]
        assert written["model_type"] == "clip_text_model"


def test_outputs_read_by_attribute_index_name_and_unpacking():
    unet, _ = builders.unet_sd()
    vae, _ = builders.autoencoder_kl()
    tiny, _ = builders.autoencoder_tiny()
    x = builders.rand(1, 3, 32, 32).tanh()
    with torch.no_grad():
        outputs = [("sample", unet(builders.rand(1, 4, 16, 16), 3, builders.rand(1, 7, 32))),
                   ("latent_dist", vae.encode(x)), ("sample", vae.decode(vae.encode(x).latent_dist.mode())),
                   ("latents", tiny.encode(x)), ("sample", tiny.decode(tiny.encode(x).latents))]
    for field, out in outputs:
        assert isinstance(out, ModelOutput)
        value = getattr(out, field)
        (unpacked,) = out
        assert out[0] is value and out[field] is value and unpacked is value and out.to_tuple() == (value,)
        assert len(out) == 1


def test_unset_fields_are_skipped_by_index_as_in_diffusers():
    model, _ = builders.clip_text()
    with torch.no_grad():
        out = model(builders.IDS)
        tup = model(builders.IDS, return_dict=False)
    assert out.hidden_states is None and len(out) == 2
    assert out[1] is out.pooler_output and all(torch.equal(a, b) for a, b in zip(out.to_tuple(), tup))
