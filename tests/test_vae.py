"""AutoencoderKL against diffusers' AutoencoderKL on tiny seeded configs."""
import copy
import json

import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL

from minidiff.models.vae import (AutoencoderKL, DiagonalGaussianDistribution, check_finite, retrieve_latents)
from utils import assert_close, autoencoder_kl, seeded_

SMALL = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
             up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, latent_channels=4, sample_size=32,
             layers_per_block=1)

VARIANTS = {
    "default": {},
    "no_quant_convs": dict(use_quant_conv=False, use_post_quant_conv=False),
    "no_mid_attention": dict(mid_block_add_attention=False),
    "three_blocks_two_layers": dict(block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
                                    up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=2, act_fn="swish"),
}


def make_pair(tmp_path, **overrides):
    """(diffusers model, minidiff model loaded from the diffusers save)."""
    ref = seeded_(RefAutoencoderKL(**{**SMALL, **overrides}), std=0.2).eval()
    ref.save_pretrained(tmp_path / "vae")
    return ref, AutoencoderKL.from_pretrained(tmp_path / "vae")


@torch.no_grad()
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_diffusers(tmp_path, variant):
    ref, ours = make_pair(tmp_path, **VARIANTS[variant])
    down = 2 ** (len(ours.config.block_out_channels) - 1)
    x = torch.randn(2, 3, 32, 32)
    ref_post, our_post = ref.encode(x).latent_dist, ours.encode(x).latent_dist
    assert_close(our_post.mean, ref_post.mean, name="mean")
    assert_close(our_post.std, ref_post.std, name="std")
    assert_close(our_post.mode(), ref_post.mode(), name="mode")
    assert our_post.mean.shape == (2, 4, 32 // down, 32 // down)
    # same seed, same noise: draws happen on the CPU with the generator, as in diffusers
    assert_close(our_post.sample(torch.Generator().manual_seed(1)),
                 ref_post.sample(torch.Generator().manual_seed(1)), name="sample")

    z = torch.randn(2, 4, 32 // down, 32 // down)
    assert_close(ours.decode(z).sample, ref.decode(z).sample, name="decode")
    out = ours.decode(z, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    assert_close(out[0], ref.decode(z).sample, name="decode tuple")
    assert_close(ours(x).sample, ref(x).sample, name="forward")
    (posterior,) = ours.encode(x, return_dict=False)
    assert isinstance(posterior, DiagonalGaussianDistribution)


@torch.no_grad()
def test_sampling_follows_diffusers_generators(tmp_path):
    ref, ours = make_pair(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    ref_post, our_post = ref.encode(x).latent_dist, ours.encode(x).latent_dist
    # a list of generators: one per batch row
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]  # noqa: E731
    assert_close(our_post.sample(gens()), ref_post.sample(gens()), name="generator list")
    # one generator drawn twice continues its stream
    g_ref, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(2):
        assert_close(our_post.sample(g_ours), ref_post.sample(g_ref), name="second draw")
    assert_close(retrieve_latents(ours.encode(x), torch.Generator().manual_seed(2)),
                 ref_post.sample(torch.Generator().manual_seed(2)), name="retrieve_latents sample")
    assert torch.equal(retrieve_latents(ours.encode(x), sample_mode="argmax"), our_post.mean)
    # the draw is not the mean: a sampling bug that returned the mean would fail above, check it differs
    assert not torch.allclose(our_post.sample(torch.Generator().manual_seed(1)), our_post.mean)
    with pytest.raises(ValueError, match="2 generators was given for a batch of 3"):
        our_post.sample([torch.Generator(), torch.Generator()])


@torch.no_grad()
def test_slicing_and_tiling(tmp_path):
    ref, ours = make_pair(tmp_path)
    x, z = torch.randn(3, 3, 32, 32), torch.randn(3, 4, 16, 16)
    whole_mean, whole_images = ours.encode(x).latent_dist.mean, ours.decode(z).sample
    ours.enable_slicing()
    assert_close(ours.encode(x).latent_dist.mean, whole_mean, name="sliced encode")
    assert_close(ours.decode(z).sample, whole_images, name="sliced decode")
    ours.disable_slicing()

    # tiles of 32 pixels / 16 latents (sample_size), blended over their overlaps exactly as diffusers does
    ref.enable_tiling()
    ours.enable_tiling()
    big_x, big_z = torch.randn(1, 3, 48, 48), torch.randn(1, 4, 24, 24)
    tiled_mean, tiled_images = ours.encode(big_x).latent_dist.mean, ours.decode(big_z).sample
    assert_close(tiled_mean, ref.encode(big_x).latent_dist.mean, name="tiled encode")
    assert_close(tiled_images, ref.decode(big_z).sample, name="tiled decode")
    ours.disable_tiling()
    assert not torch.allclose(ours.decode(big_z).sample, tiled_images, atol=1e-3)  # tiling really ran


@torch.no_grad()
def test_latent_scaling_helpers(tmp_path):
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
    ref, ours = make_pair(tmp_path, latents_mean=mean, latents_std=std, scaling_factor=0.5)
    latents = torch.randn(2, 4, 16, 16)
    # SDXL pipelines' formula for a VAE with latents_mean/std
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    z = ours.latents_to_decoder_input(latents)
    assert_close(z, latents * s / 0.5 + m, name="latents_to_decoder_input (mean/std)")
    assert_close(ours.encoder_output_to_latents(z), latents, name="round trip (mean/std)")
    assert_close(ours.decode(z).sample, ref.decode(latents * s / 0.5 + m).sample, name="decode")

    _, shifted = make_pair(tmp_path / "shift", scaling_factor=1.5, shift_factor=0.25)
    assert_close(shifted.latents_to_decoder_input(latents), latents / 1.5 + 0.25, name="shift_factor")
    assert_close(shifted.encoder_output_to_latents(latents / 1.5 + 0.25), latents, name="round trip (shift)")
    _, plain = make_pair(tmp_path / "plain")
    assert_close(plain.latents_to_decoder_input(latents), latents / 0.18215, name="plain scaling")


@torch.no_grad()
def test_float16_load_and_check_finite(tmp_path):
    ref, _ = make_pair(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path / "vae", torch_dtype=torch.float16)
    assert ours.dtype == torch.float16 and all(p.dtype == torch.float16 for p in ours.parameters())
    assert ours.needs_upcast()  # force_upcast defaults to True
    z = torch.randn(1, 4, 16, 16)
    images = ours.decode(z.half()).sample
    assert images.dtype == torch.float16
    assert_close(images, ref.decode(z).sample, rel=2e-2, name="fp16 decode")
    assert check_finite(images) is images
    with pytest.raises(FloatingPointError, match="decode produced NaN.*float32 or use madebyollin/sdxl-vae-fp16-fix"):
        check_finite(torch.tensor([0.0, float("nan")]).half(), where="StableDiffusionXLPipeline")
    with pytest.raises(FloatingPointError, match="not float16"):  # a float32 NaN is not blamed on float16
        check_finite(torch.tensor([0.0, float("nan")]), where="StableDiffusionXLPipeline")
    with pytest.raises(FloatingPointError, match="produced inf"):
        check_finite(torch.tensor([float("inf")]))


@torch.no_grad()
def test_save_pretrained_round_trip(tmp_path):
    ref, ours = make_pair(tmp_path, use_post_quant_conv=False)
    ours.save_pretrained(tmp_path / "saved")
    again = RefAutoencoderKL.from_pretrained(tmp_path / "saved")  # diffusers reads minidiff's files
    z = torch.randn(1, 4, 16, 16)
    assert_close(again.decode(z).sample, ref.decode(z).sample, name="diffusers reload")
    assert_close(AutoencoderKL.from_pretrained(tmp_path / "saved").decode(z).sample, ref.decode(z).sample,
                 name="minidiff reload")


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    (dict(down_block_types=["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]), "down_block_types=.*DownEncoderBlock2D"),
    (dict(up_block_types=["UpDecoderBlock2D"]), "up_block_types=.*one entry per block_out_channels"),
    (dict(act_fn="tanh"), "act_fn='tanh'"),
    (dict(norm_num_groups=3), "norm_num_groups=3"),
    (dict(latents_mean=[0.0, 0.0]), "latents_mean"),
    (dict(latents_mean=[0.0] * 4, latents_std=[1.0] * 3), "latents_std=.*one value per latent channel"),
    (dict(block_out_channels=[8, 32]), "wrong shapes"),
])
def test_config_errors(tmp_path, changes, message):
    make_pair(tmp_path)
    _edit_config(tmp_path / "vae", **changes)
    with pytest.raises(ValueError, match=message):
        AutoencoderKL.from_pretrained(tmp_path / "vae")


def test_input_shape_errors(tmp_path):
    _, ours = make_pair(tmp_path)
    with pytest.raises(ValueError, match=r"x has shape \(1, 4, 32, 32\).*config.in_channels"):
        ours.encode(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"z has shape \(1, 3, 16, 16\).*config.latent_channels"):
        ours.decode(torch.randn(1, 3, 16, 16))


def test_latent_path_scales_upcasts_and_restores_the_dtype():
    vae, _ = autoencoder_kl()
    seeded_(vae)
    vae.config.scaling_factor, vae.config.shift_factor = 0.5, 0.25
    half = copy.deepcopy(vae).half()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gens = [torch.Generator().manual_seed(i) for i in (1, 2)]
    with torch.no_grad():
        # fp32 weights rounded to fp16 and back: what an upcast fp16 VAE computes with
        upcast = copy.deepcopy(half).float()
        z = torch.cat([upcast.encode(x[i:i + 1].half().float()).latent_dist.sample(torch.Generator().manual_seed(i + 1))
                       for i in range(2)])
        want = (z.half() - 0.25) * 0.5  # scaled in the images' dtype, as diffusers' SDXL img2img
        got = half.image_to_latents(x.half(), gens)
        assert half.dtype == torch.float16 and got.dtype == torch.float16 and torch.equal(got, want)
        images = half.latents_to_image(got)
        assert half.dtype == torch.float16 and images.dtype == torch.float32
        assert torch.equal(images, upcast.decode(got.float() / 0.5 + 0.25).sample)
        assert half.latents_to_image(got, upcast=False).dtype == torch.float16
