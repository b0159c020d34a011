"""Issue 19: pipeline-level enable_vae_tiling / enable_vae_slicing with a TAESD vae (AutoencoderTiny) give the
image diffusers' pipeline gives with its AutoencoderTiny tiled the same way (small tiles, so a 192x192 image
is decoded in overlapping, blended tiles)."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny as RefTiny
from diffusers import StableDiffusionPipeline as RefPipeline

from minidiff import AutoencoderTiny, StableDiffusionPipeline
from utils import build_lora_sd, gen, seeded_

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
    want = ref(**KW, generator=torch.Generator().manual_seed(1)).images
    assert np.abs(tiled - want).max() <= 1e-4  # images in [0, 1]; fp32 on both sides
    assert np.abs(tiled - plain).max() > 1e-3  # tiling really ran (tiles and blends differ from one decode)
    ours.disable_vae_tiling()
    ours.disable_vae_slicing()
    np.testing.assert_array_equal(ours(**KW, generator=gen(1)).images, plain)
