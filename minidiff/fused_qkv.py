"""Fused attention projections, diffusers' `fuse_qkv_projections()` / `unfuse_qkv_projections()`.

Fusing concatenates a self-attention's to_q, to_k and to_v weights into one (3C, C) matrix (a cross-attention's
to_k and to_v into one (2C, Ck)), so each attention runs one matmul where it ran three (two). The fused copies are
non-persistent buffers: state_dict, save_pretrained and the LoRA loader see the original layers, which stay as
they were, so unfusing (dropping the copies) is exact. A projection wrapped by a LoRA adapter computes unfused
(the adapters stay exact); fuse after the weights are final: after fuse_lora() or load_state_dict(), call
unfuse_qkv_projections() and fuse again, as in diffusers.
"""
import torch
import torch.nn.functional as F

from .prepack import OneDNNLinear, onednn_linear

NAMES = ("to_q", "to_k", "to_v")


def fusable(module):
    return all(isinstance(getattr(module, n, None), torch.nn.Module) for n in NAMES) and hasattr(module, "heads")


@torch.no_grad()
def fuse(module):
    """Add the fused weight (and bias) of `module`'s projections; cross-attention fuses to_k and to_v only."""
    layers = [getattr(module, n) for n in NAMES[1:]] if module.is_cross_attention else [getattr(module, n)
                                                                                      for n in NAMES]
    module.register_buffer("fused_weight", torch.cat([m.weight for m in layers]), persistent=False)
    bias = None if layers[0].bias is None else torch.cat([m.bias for m in layers])
    module.register_buffer("fused_bias", bias, persistent=False)


def unfuse(module):
    for name in ("fused_weight", "fused_bias"):
        if name in module._buffers:
            del module._buffers[name]


def project(module, x, context=None):
    """q, k, v of an attention module: one fused matmul where the module is fused (and no LoRA wraps its
    projections), else the three layers. context None = self-attention."""
    weight = module._buffers.get("fused_weight")
    if weight is not None and not any(getattr(getattr(module, n), "is_lora_layer", False) for n in NAMES):
        bias = module._buffers.get("fused_bias")
        # the fused matmul runs the way its layers did: oneDNN's where they are OneDNNLinear (minidiff/prepack.py)
        linear = onednn_linear if isinstance(module.to_k, OneDNNLinear) else F.linear
        if context is None and not module.is_cross_attention:
            return linear(x, weight, bias).chunk(3, dim=-1)
        if context is not None and module.is_cross_attention:
            k, v = linear(context, weight, bias).chunk(2, dim=-1)
            return module.to_q(x), k, v
    context = x if context is None else context
    return module.to_q(x), module.to_k(context), module.to_v(context)


def fuse_qkv_projections(model):
    """Fuse every attention of `model` (a UNet, a VAE); returns how many were fused."""
    found = [m for m in model.modules() if fusable(m)]
    for m in found:
        fuse(m)
    return len(found)


def unfuse_qkv_projections(model):
    for m in model.modules():
        if fusable(m):
            unfuse(m)
