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
from tests.utils import (autoencoder_kl, autoencoder_tiny, clip_text, clip_text_projection, paella_vq, seeded_, unet_sd,
                         unet_sdxl, wuerstchen_diffnext, wuerstchen_prior)

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
