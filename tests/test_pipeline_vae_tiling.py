"""Issue 19: pipeline-level enable_vae_tiling / enable_vae_slicing with a TAESD vae (AutoencoderTiny) give the
image diffusers' pipeline gives with its AutoencoderTiny tiled the same way (small tiles, so a 192x192 image
is decoded in overlapping, blended tiles)."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny as RefTiny
from diffusers import StableDiffusionPipeline as RefPipeline

from minidiff import AutoencoderTiny, StableDiffusionPipeline
from utils import assert_close, build_lora_sd, gen, seeded_

KW = dict(prompt="a boat", num_inference_steps=2, height=192, width=192, output_type="np")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    folder = build_lora_sd(str(tmp_path_factory.mktemp("sd")))
    seeded_(RefTiny(encoder_block_out_channels=[8] * 4, decoder_block_out_channels=[8] * 4,
                    num_encoder_blocks=[1] * 4, num_decoder_blocks=[1] * 4), std=0.2).save_pretrained(folder + "/taesd")
    return folder


def test_pipeline_vae_tiling_with_taesd_matches_diffusers(repo):
    ref = RefPipeline.from_pretrained(repo, vae=RefTiny.from_pretrained(repo + "/taesd"), safety_checker=None)
    ours = StableDiffusionPipeline.from_pretrained(repo, vae=AutoencoderTiny.from_pretrained(repo + "/taesd"))
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
        p.vae.tile_sample_min_size, p.vae.tile_latent_min_size = 96, 12  # 12-latent tiles: 2 x 2 and more here
    plain = ours(**KW, generator=gen(1)).images
    for p in (ref, ours):
        p.enable_vae_tiling()
        p.enable_vae_slicing()
    assert ours.vae.use_tiling and ours.vae.use_slicing
    tiled = ours(**KW, generator=gen(1)).images
    latents = ours(**dict(KW, output_type="latent"), generator=gen(1)).images
    ref_latents = ref(**dict(KW, output_type="latent"), generator=torch.Generator().manual_seed(1)).images
    # the denoising loops agree to fp32 rounding (minidiff runs the UNet's layers before the text once for both
    # halves of guidance: another summation order); this random TAESD, whose values reach ~1000 before the clamp,
    # magnifies that past 1e-4 in a few pixels, so diffusers' tiled decode is compared on minidiff's latents
    assert_close(latents, ref_latents, rel=1e-5, name="latents")
    with torch.no_grad():
        decoded = ref.vae.decode(latents / ref.vae.config.scaling_factor).sample
    want = ref.image_processor.postprocess(decoded, output_type="np")
    # images in [0, 1]; fp32 on both sides, minidiff's decode in NHWC (device.nhwc_decode: another summation order,
    # which this TAESD's large values magnify to ~3e-4 in a few pixels; a quarter of one uint8 level allowed)
    assert np.abs(tiled - want).max() <= 1e-3
    assert np.abs(tiled - plain).max() > 1e-3  # tiling really ran (tiles and blends differ from one decode)
    ours.disable_vae_tiling()
    ours.disable_vae_slicing()
    np.testing.assert_array_equal(ours(**KW, generator=gen(1)).images, plain)
