"""Tiny diffusers pipelines with seeded random weights, saved in the Hub layout, for the pipeline tests.

The tokenizers use the real CLIP BPE vocabulary (from open-clip-torch), so the text encoders have the
real vocab size with a tiny width.
"""
import os

import diffusers
import numpy as np
import torch
import transformers

from test_tokenizer import clip_bpe_files, write_tokenizer
from utils import seeded_

_BPE = None


def bpe():
    global _BPE
    if _BPE is None:
        _BPE = clip_bpe_files()
    return _BPE


def text_encoder(hidden=32, projection=False, act="quick_gelu", eos=2, layers=3, seed=0):
    cfg = transformers.CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=4, max_position_embeddings=77, vocab_size=49408,
                                      hidden_act=act, projection_dim=hidden, bos_token_id=49406, eos_token_id=eos,
                                      pad_token_id=1)
    model = transformers.CLIPTextModelWithProjection(cfg) if projection else transformers.CLIPTextModel(cfg)
    return seeded_(model, seed, std=0.1).eval()


def tokenizer_folder(folder, pad="<|endoftext|>"):
    vocab, merges = bpe()
    write_tokenizer(folder, vocab, merges, pad)
    return transformers.CLIPTokenizer.from_pretrained(folder)


SD_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
               norm_num_groups=8)
SD_VAE = dict(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def build_sd(folder, unet=None, scheduler=None, vae=None, seed=0, te_kwargs=None):
    """Save a tiny diffusers StableDiffusionPipeline at `folder`; returns the diffusers pipeline."""
    os.makedirs(folder, exist_ok=True)
    unet_model = seeded_(diffusers.UNet2DConditionModel(**{**SD_UNET, **(unet or {})}), seed, std=0.05).eval()
    vae_model = seeded_(diffusers.AutoencoderKL(**{**SD_VAE, **(vae or {})}), seed + 1, std=0.05).eval()
    sched = scheduler or diffusers.PNDMScheduler.from_config(SD15_SCHEDULER)
    tok = tokenizer_folder(os.path.join(folder, "_tok"))
    pipe = diffusers.StableDiffusionPipeline(vae=vae_model, text_encoder=text_encoder(**(te_kwargs or {})),
                                             tokenizer=tok, unet=unet_model, scheduler=sched, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    # the reference is read back from disk, as minidiff's is (the saved scheduler config lists every key)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SDXL_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                 cross_attention_dim=64, norm_num_groups=8)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                      prediction_type="epsilon", use_karras_sigmas=False)


def build_sdxl(folder, unet=None, scheduler=None, seed=0, refiner=False, force_zeros=True):
    """Save a tiny diffusers SDXL pipeline (two encoders 32 + 32 wide, pooled 32) at `folder`.

    refiner=True: second encoder only, aesthetic-score time ids (5 ids), the img2img class."""
    os.makedirs(folder, exist_ok=True)
    cfg = {**SDXL_UNET, **(unet or {})}
    if refiner:
        cfg.update(cross_attention_dim=32, projection_class_embeddings_input_dim=8 * 5 + 32)
    unet_model = seeded_(diffusers.UNet2DConditionModel(**cfg), seed, std=0.05).eval()
    vae_model = seeded_(diffusers.AutoencoderKL(**SD_VAE, force_upcast=True, scaling_factor=0.13025), seed + 1,
                        std=0.05).eval()
    sched = scheduler or diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER)
    te2 = text_encoder(projection=True, act="gelu", eos=2, seed=seed + 3)
    tok2 = tokenizer_folder(os.path.join(folder, "_tok2"), pad="!")
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae_model, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tok2, unet=unet_model,
            scheduler=sched, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    else:
        te1 = text_encoder(seed=seed + 2)
        tok1 = tokenizer_folder(os.path.join(folder, "_tok1"))
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae_model, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=unet_model,
            scheduler=sched, force_zeros_for_empty_prompt=force_zeros)
    pipe.save_pretrained(folder)
    pipe = type(pipe).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def assert_same_image(ours, ref, max_diff=1):
    """uint8 pixels (as PIL or [0, 1] arrays) differ by at most `max_diff`."""
    a = np.stack([np.asarray(i) for i in ours]) if isinstance(ours, list) else np.round(np.asarray(ours) * 255)
    b = np.stack([np.asarray(i) for i in ref]) if isinstance(ref, list) else np.round(np.asarray(ref) * 255)
    assert a.shape == b.shape, f"image shape {a.shape} vs diffusers {b.shape}"
    diff = np.abs(a.astype(np.int32) - b.astype(np.int32)).max()
    assert diff <= max_diff, f"pixels differ by up to {diff} (allowed {max_diff})"
    assert a.std() > 1, "degenerate image: the comparison would prove nothing"
