"""Shared test helpers: tolerances stated once, and small seeded models built with minidiff alone."""
import inspect

import torch

from minidiff.models import clip, unet, vae
from minidiff.models.paella_vq import PaellaVQModel, PaellaVQModelConfig
from minidiff.models.taesd import AutoencoderTiny, AutoencoderTinyConfig
from minidiff.models.wuerstchen_diffnext import WuerstchenDiffNeXt, WuerstchenDiffNeXtConfig
from minidiff.models.wuerstchen_prior import WuerstchenPrior, WuerstchenPriorConfig


def assert_close(ours, ref, rel=1e-4, name="output"):
    """Max abs error within `rel` of the reference's scale (max |ref|), the project's fp32 tolerance."""
    ours, ref = torch.as_tensor(ours).float(), torch.as_tensor(ref).float()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    scale = ref.abs().max().clamp_min(1e-12)
    err = (ours - ref).abs().max()
    assert err <= rel * scale, f"{name}: max abs error {err.item():.3g} > {rel} x scale {scale.item():.3g}"


def seeded_(module, seed=0, std=0.05):
    """Fill every parameter with seeded random values (diffusers' inits leave many at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # norm scales around 1, everything else around 0
            base = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * std + base)
    return module


# ---- small models of every kind, built by minidiff alone: `model, run = unet_sd()`; run() is one forward


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SDXL = dict(UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=[2, 4], use_linear_projection=True, transformer_layers_per_block=[1, 2],
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
CLIP = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16)
IDS = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(0))


def unet_sd():
    m = unet.UNet2DConditionModel(unet.UNet2DConditionConfig(**UNET))
    return m, lambda: m(rand(2, 4, 16, 16), 10, rand(2, 7, 32)).sample


def unet_sdxl():
    m = unet.UNet2DConditionModel(unet.UNet2DConditionConfig(**SDXL))
    extra = {"text_embeds": rand(2, 32), "time_ids": rand(2, 6).abs() * 100}
    return m, lambda: m(rand(2, 4, 16, 16), torch.tensor([10, 500]), rand(2, 7, 32), added_cond_kwargs=extra).sample


def autoencoder_kl():
    m = vae.AutoencoderKL(vae.AutoencoderKLConfig(block_out_channels=(16, 32), norm_num_groups=8,
                                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                                  up_block_types=("UpDecoderBlock2D",) * 2))
    return m, lambda: m(rand(1, 3, 32, 32).tanh()).sample


def autoencoder_tiny():
    m = AutoencoderTiny(AutoencoderTinyConfig(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4))
    return m, lambda: m(rand(1, 3, 32, 32).tanh()).sample


def clip_text():
    m = clip.CLIPTextModel(clip.CLIPTextConfig(**CLIP))
    return m, lambda: m(IDS).last_hidden_state  # causal attention, no mask


def clip_text_projection():
    m = clip.CLIPTextModelWithProjection(clip.CLIPTextConfig(**CLIP, hidden_act="gelu"))
    return m, lambda: m(IDS, attention_mask=(torch.arange(9) < 7).long().expand(2, 9)).text_embeds  # padding mask


def wuerstchen_prior():
    m = WuerstchenPrior(WuerstchenPriorConfig(c_in=4, c=32, c_cond=16, c_r=8, depth=2, nhead=4))
    return m, lambda: m(rand(2, 4, 6, 6), rand(2).sigmoid(), rand(2, 5, 16))


def wuerstchen_diffnext():
    m = WuerstchenDiffNeXt(WuerstchenDiffNeXtConfig(c_cond=16, c_hidden=[16, 32], nhead=[-1, 4], blocks=[1, 1],
                                                    level_config=["CT", "CTA"], inject_effnet=[False, True],
                                                    effnet_embd=4, clip_embd=16, c_r=8))
    return m, lambda: m(rand(2, 4, 16, 16), rand(2).sigmoid(), rand(2, 4, 6, 6), rand(2, 5, 16))


def paella_vq():
    m = PaellaVQModel(PaellaVQModelConfig(embed_dim=32, bottleneck_blocks=2, num_vq_embeddings=16))
    return m, lambda: m(rand(1, 3, 32, 32).sigmoid()).sample


def record_latent_path(monkeypatch):
    """Record each call of the VAE's way between latents and pixels (name, upcast); AutoencoderKL.encode or
    .decode called from anywhere else fails the test."""
    from minidiff.models.vae import Autoencoder, AutoencoderKL
    calls, depth = [], [0]

    def recorded(name):
        real = getattr(Autoencoder, name)

        def fn(self, *args, upcast=True, **kwargs):
            calls.append((name, upcast))
            depth[0] += 1
            try:
                return real(self, *args, upcast=upcast, **kwargs)
            finally:
                depth[0] -= 1
        return fn

    def guarded(name):
        real = getattr(AutoencoderKL, name)

        def fn(self, *args, **kwargs):
            assert depth[0], f"AutoencoderKL.{name} was called outside image_to_latents / latents_to_image"
            return real(self, *args, **kwargs)
        return fn

    for name in ("image_to_latents", "latents_to_image"):
        monkeypatch.setattr(Autoencoder, name, recorded(name))
    for name in ("encode", "decode"):
        monkeypatch.setattr(AutoencoderKL, name, guarded(name))
    return calls


# ---------------------------------------------------------------------------------------------
# Schedulers: a fake model and a pipeline's loop, run on minidiff's and diffusers' schedulers side by side


def fake_unet(x, t):
    """A deterministic stand-in for the UNet: a smooth function of the sample and the timestep."""
    return torch.sin(1.3 * x + float(t) / 250.0) * 0.8 + 0.1 * x


def start_sample(seed=0, dtype=torch.float32):
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed)).to(dtype)


def run_loop(sched, x, timesteps=None, seed=None, **step_kwargs):
    """A pipeline's loop (a generator goes to schedulers whose step takes one); returns the step outputs."""
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    g = torch.Generator().manual_seed(seed) if seed is not None and takes_generator else None
    outs = []
    for t in (sched.timesteps if timesteps is None else timesteps):
        eps = fake_unet(sched.scale_model_input(x, t), t)
        kw = dict(step_kwargs, **({"generator": g} if g is not None else {}))
        out = sched.step(eps, t, x, **kw)
        outs.append(out)
        x = out.prev_sample
    return outs


def compare_loop(a, b, x, fields=("prev_sample", "pred_original_sample"), rel=0.0, **kw):
    """Same timesteps (values and dtype) and the same output at every step: bit-exact by default, since the
    schedulers do the same float operations as diffusers."""
    assert a.timesteps.dtype == b.timesteps.dtype, (a.timesteps.dtype, b.timesteps.dtype)
    assert torch.equal(a.timesteps, b.timesteps), (a.timesteps, b.timesteps)
    if hasattr(b, "sigmas"):
        assert torch.equal(a.sigmas, b.sigmas), (a.sigmas, b.sigmas)
    assert_close(torch.as_tensor(a.init_noise_sigma), torch.as_tensor(b.init_noise_sigma), name="init_noise_sigma")
    x = x * b.init_noise_sigma
    outs_a, outs_b = run_loop(a, x, **kw), run_loop(b, x, **kw)
    assert len(outs_a) == len(outs_b) > 0
    for i, (oa, ob) in enumerate(zip(outs_a, outs_b)):
        for f in fields:
            assert_close(getattr(oa, f), getattr(ob, f), rel=rel, name=f"step {i} {f}")
    return outs_a
