"""The ops seam: every attention, norm, GEGLU and LoRA-adapted layer of every model computes in minidiff/ops.py.

Each op is replaced by a counting wrapper and torch's F.scaled_dot_product_attention, F.layer_norm and
F.group_norm by functions that raise unless called from inside one of those wrappers; then every model
runs, and the counts must equal the number of layers of each kind (each runs once per forward).
"""
import collections

import pytest
import torch
import torch.nn.functional as F

from minidiff import lora, ops
from minidiff.models import clip, unet, vae, wuerstchen_common
from minidiff.models.paella_vq import PaellaVQModel, PaellaVQModelConfig
from minidiff.models.taesd import AutoencoderTiny, AutoencoderTinyConfig
from minidiff.models.wuerstchen_diffnext import WuerstchenDiffNeXt, WuerstchenDiffNeXtConfig
from minidiff.models.wuerstchen_prior import WuerstchenPrior, WuerstchenPriorConfig
from tests.utils import seeded_

GUARDED = ("scaled_dot_product_attention", "layer_norm", "group_norm")


@pytest.fixture
def seam(monkeypatch):
    """Counts of each op's calls (and of group_norm's silu=True calls), with torch's kernels guarded."""
    counts, depth = collections.Counter(), [0]
    real = {name: getattr(F, name) for name in GUARDED}

    def guarded(name):
        def fn(*args, **kwargs):
            if not depth[0]:
                raise AssertionError(f"F.{name} was called outside minidiff.ops")
            return real[name](*args, **kwargs)
        return fn

    def counting(name, ref):
        def fn(*args, **kwargs):
            counts[name] += 1
            counts["group_norm+silu"] += name == "group_norm" and kwargs.get("silu", False)
            depth[0] += 1
            try:
                return ref(*args, **kwargs)
            finally:
                depth[0] -= 1
        return fn

    for name in GUARDED:
        monkeypatch.setattr(F, name, guarded(name))
    with ops.use(**{name: counting(name, ref) for name, ref in ops.REFERENCES.items()}):
        yield counts
    assert ops.current() == ops.REFERENCES


def n(model, *classes):
    return sum(isinstance(m, classes) for m in model.modules())


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


ATTENTION = (unet.Attention, vae.SpatialSelfAttention, clip.CLIPAttention, wuerstchen_common.Attention)
MODELS = [unet_sd, unet_sdxl, autoencoder_kl, autoencoder_tiny, clip_text, clip_text_projection, wuerstchen_prior,
          wuerstchen_diffnext, paella_vq]


@pytest.mark.parametrize("build", MODELS, ids=[b.__name__ for b in MODELS])
def test_every_op_of_every_model_goes_through_the_seam(seam, build):
    model, run = build()
    seeded_(model)
    with torch.no_grad():
        out = run()
    assert torch.isfinite(out).all()
    resnets = n(model, unet.ResnetBlock2D, vae.ResnetBlock2D)
    want = {"attention": n(model, *ATTENTION), "group_norm": n(model, ops.GroupNorm),
            # every resnet's two norms and the final norm(s) run as one GroupNorm-then-SiLU op
            "group_norm+silu": 2 * resnets + n(model, unet.UNet2DConditionModel, vae.Encoder, vae.Decoder),
            "layer_norm": n(model, ops.LayerNorm), "geglu": n(model, unet.GEGLU)}
    assert {k: seam[k] for k in want} == want
    # no torch norm that bypasses the seam is left in the model (TAESD has none at all: convs and ReLUs)
    plain = [type(m).__name__ for m in model.modules() if type(m) in (torch.nn.GroupNorm, torch.nn.LayerNorm)]
    assert plain == []
    if build is not autoencoder_tiny:
        assert seam["attention"] + seam["group_norm"] + seam["layer_norm"] > 0


def test_lora_layers_go_through_the_seam(seam):
    model, run = unet_sd()
    seeded_(model)
    g = torch.Generator().manual_seed(2)
    state = {}
    for path in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1",
                 "up_blocks.1.attentions.0.proj_out"):
        layer = model.get_submodule(path)
        key = "lora_unet_" + path.replace(".", "_")
        down_shape = (4, *layer.weight.shape[1:])
        up_shape = (layer.weight.shape[0], 4) + (1, 1) * (layer.weight.ndim == 4)
        state[key + ".lora_down.weight"] = torch.randn(down_shape, generator=g) * 0.1
        state[key + ".lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.1
    lora.load_lora_weights(model, state, adapter_name="a", verbose=False)
    with torch.no_grad():
        run()
    assert (seam["lora_linear"], seam["lora_conv2d"]) == (1, 2)  # proj_out is a 1x1 conv in SD 1.x


def test_swapping_an_op_is_two_lines_and_reset_restores_it():
    model, run = autoencoder_kl()
    seeded_(model)
    with torch.no_grad():
        before = run()
        ops.use(group_norm=lambda x, groups, weight, bias, eps, silu=False: ops.ref_group_norm(
            x, groups, weight, bias, eps, silu) * 0)
        zeroed = run()
        ops.reset()
        after = run()
        with ops.use(attention=lambda q, k, v, heads, **kw: torch.zeros_like(v)):
            no_attention = run()
    assert not torch.equal(zeroed, before) and not torch.equal(no_attention, before)
    assert torch.equal(after, before) and torch.equal(run(), before)
    assert ops.current() == ops.REFERENCES
    with pytest.raises(ValueError, match="unknown op.*group_norm"):
        ops.use(groupnorm=F.group_norm)
    assert ops.current() == ops.REFERENCES
