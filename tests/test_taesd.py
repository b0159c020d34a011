"""AutoencoderTiny (TAESD) against diffusers' AutoencoderTiny on tiny seeded configs."""
import json

import pytest
import torch
from diffusers import AutoencoderTiny as RefAutoencoderTiny

from minidiff.models.taesd import AutoencoderTiny
from minidiff.models.vae import retrieve_latents
from utils import assert_close, seeded_

SMALL = dict(encoder_block_out_channels=[8] * 4, decoder_block_out_channels=[8] * 4)

VARIANTS = {
    "taesd_layout": {},
    "silu_bilinear_three_stages": dict(encoder_block_out_channels=[8] * 3, decoder_block_out_channels=[8] * 3,
                                       num_encoder_blocks=[1, 2, 1], num_decoder_blocks=[1, 2, 1], act_fn="silu",
                                       upsample_fn="bilinear", latent_channels=6, latent_magnitude=2.0,
                                       latent_shift=0.4),
}


def make_pair(tmp_path, **overrides):
    ref = seeded_(RefAutoencoderTiny(**{**SMALL, **overrides}), std=0.2).eval()
    ref.save_pretrained(tmp_path / "vae")
    return ref, AutoencoderTiny.from_pretrained(tmp_path / "vae")


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_diffusers(tmp_path, variant):
    ref, ours = make_pair(tmp_path, **VARIANTS[variant])
    down = 2 ** (len(ours.config.num_encoder_blocks) - 1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = ours.encode(x).latents
    assert latents.shape == (2, ours.config.latent_channels, 32 // down, 32 // down)
    assert_close(latents, ref.encode(x).latents, name="encode")
    (same,) = ours.encode(x, return_dict=False)
    assert torch.equal(same, latents)
    # latents beyond +-3 exercise the decoder's tanh soft clamp
    z = torch.randn(2, ours.config.latent_channels, 32 // down, 32 // down) * 4
    images = ours.decode(z).sample
    assert_close(images, ref.decode(z).sample, name="decode")
    assert_close(ours.decode(z, return_dict=False)[0], images, name="decode tuple")
    assert_close(ours(x).sample, ref(x).sample, name="forward (8-bit latents)")
    assert_close(ours.scale_latents(z), ref.scale_latents(z), name="scale_latents")
    assert_close(ours.unscale_latents(z), ref.unscale_latents(z), name="unscale_latents")


@torch.no_grad()
def test_slicing_and_tiling(tmp_path):
    ref, ours = make_pair(tmp_path)
    x, z = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 4, 4, 4)
    whole_latents, whole_images = ours.encode(x).latents, ours.decode(z).sample
    ours.enable_slicing()
    assert_close(ours.encode(x).latents, whole_latents, name="sliced encode")
    assert_close(ours.decode(z).sample, whole_images, name="sliced decode")
    ours.disable_slicing()

    # smaller tiles than the 512-pixel default (set the same way on both), on a model with one block per stage
    ref, ours = make_pair(tmp_path / "tiling", num_encoder_blocks=[1] * 4, num_decoder_blocks=[1] * 4)
    for m in (ref, ours):
        m.tile_sample_min_size, m.tile_latent_min_size = 96, 12
        m.enable_tiling()
    big_x, big_z = torch.rand(1, 3, 120, 120) * 2 - 1, torch.randn(1, 4, 15, 15)
    tiled_latents, tiled_images = ours.encode(big_x).latents, ours.decode(big_z).sample
    assert_close(tiled_latents, ref.encode(big_x).latents, name="tiled encode")
    assert_close(tiled_images, ref.decode(big_z).sample, name="tiled decode")
    ours.disable_tiling()
    assert not torch.allclose(ours.decode(big_z).sample, tiled_images, atol=1e-3)  # tiling really ran


@torch.no_grad()
def test_drop_in_for_pipelines(tmp_path):
    ref, ours = make_pair(tmp_path)
    # what pipelines read from vae.config
    assert list(ours.config.block_out_channels) == [8] * 4  # vae_scale_factor = 2 ** 3
    assert ours.config.scaling_factor == 1.0 and ours.config.shift_factor == 0.0
    assert ours.config.force_upcast is False and not ours.needs_upcast()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    # img2img: retrieve_latents takes .latents (deterministic, the generator is not used)
    assert torch.equal(retrieve_latents(ours.encode(x), torch.Generator().manual_seed(0)), ours.encode(x).latents)
    latents = torch.randn(1, 4, 4, 4)
    assert torch.equal(ours.latents_to_decoder_input(latents), latents)
    assert torch.equal(ours.encoder_output_to_latents(latents), latents)
    # a file asking for force_upcast is overridden, as diffusers does
    path = tmp_path / "vae" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "force_upcast": True, "scaling_factor": 2.0}))
    scaled = AutoencoderTiny.from_pretrained(tmp_path / "vae")
    assert scaled.config.force_upcast is False
    assert_close(scaled.latents_to_decoder_input(latents), latents / 2.0, name="scaling_factor")


@torch.no_grad()
def test_float16_load(tmp_path):
    ref, _ = make_pair(tmp_path)
    ours = AutoencoderTiny.from_pretrained(tmp_path / "vae", torch_dtype=torch.float16)
    assert ours.dtype == torch.float16 and all(p.dtype == torch.float16 for p in ours.parameters())
    z = torch.randn(1, 4, 4, 4)
    images = ours.decode(z.half()).sample
    assert images.dtype == torch.float16
    assert_close(images, ref.decode(z).sample, rel=2e-2, name="fp16 decode")


@pytest.mark.parametrize("changes, message", [
    (dict(num_encoder_blocks=[1, 3, 3]), "encoder_block_out_channels=.*one entry per num_encoder_blocks"),
    (dict(decoder_block_out_channels=[8, 8, 8, 16]), "decoder_block_out_channels=.*same width"),
    (dict(act_fn="tanh"), "act_fn='tanh'"),
    (dict(upsample_fn="area"), "upsample_fn='area'"),
    (dict(latent_channels=5), "wrong shapes"),
])
def test_config_errors(tmp_path, changes, message):
    make_pair(tmp_path)
    path = tmp_path / "vae" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(ValueError, match=message):
        AutoencoderTiny.from_pretrained(tmp_path / "vae")


def test_input_shape_errors(tmp_path):
    _, ours = make_pair(tmp_path)
    with pytest.raises(ValueError, match=r"x has shape \(1, 4, 32, 32\).*config.in_channels"):
        ours.encode(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"x has shape \(1, 3, 4, 4\).*config.latent_channels"):
        ours.decode(torch.randn(1, 3, 4, 4))
