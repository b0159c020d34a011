"""The ops seam: every attention, norm, gated activation and LoRA-adapted layer of every model computes here.

Models call these late-bound (`ops.attention(...)`, never `from minidiff.ops import attention`), so
swapping an implementation reaches every call:

    from minidiff import ops
    ops.use(group_norm=my_fused_group_norm)   # every model now uses it
    ops.reset()                               # back to the plain PyTorch references

`ops.use(...)` also works as a context manager (`with ops.use(attention=f): ...`), restoring what was
there before. A replacement takes the reference's arguments and returns what it returns; the
references below are the definition (and what the Triton kernels in `minidiff.kernels` are tested
against). Models build their norms from the two layers at the bottom, `ops.GroupNorm` and `ops.LayerNorm`:
torch's classes with the same parameter names (so checkpoint keys do not change) that compute here.
While `geglu` is the reference, a GEGLU whose projection is oneDNN's CPU matmul computes that same reference
inside the matmul (minidiff.prepack.onednn_geglu); any other geglu put here takes every call.
"""
import contextlib
import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- the references

HEAD_MAJOR_FROM = 1024  # key tokens from which CPU bf16 attention copies q/k/v head-major (below: no gain)


def ref_attention(q, k, v, heads, mask=None, causal=False, upcast=False, classic=False):
    """Multi-head scaled dot-product attention on (batch, tokens, channels) tensors.

    q: (B, Lq, C), k: (B, Lk, C), v: (B, Lk, Cv) -> (B, Lq, Cv). `mask` is a boolean (True = attend)
    or additive float mask broadcastable to (B, heads, Lq, Lk). `upcast` computes in fp32, as
    SD 2.x's `upcast_attention` asks, since fp16 scores overflow there. `classic`: the same math as
    baddbmm -> softmax -> bmm, diffusers' AttnProcessor, which its Würstchen prior sets; SDPA rounds
    differently, and the prior's output (x - a) / |1 - b| amplifies that over a 30-step loop.
    """
    if classic:
        return _classic_attention(q, k, v, heads, mask)
    b, lq, c = q.shape
    cv = v.shape[-1]
    q = q.view(b, lq, heads, c // heads).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, c // heads).transpose(1, 2)
    v = v.view(b, v.shape[1], heads, cv // heads).transpose(1, 2)
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[2] >= HEAD_MAJOR_FROM:
        # PyTorch's CPU flash kernel reads bf16 q/k/v faster laid out head by head than as strided views of
        # the projections (SD 1.5's 4096-token self-attention 0.90x, a whole UNet step 0.96x on Zen 4; the
        # same bits). The copies are a few MB; fp32 and short key sequences gain nothing, so they stay views.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    return out.transpose(1, 2).reshape(b, lq, cv).to(dtype)


def _classic_attention(q, k, v, heads, mask=None):
    """diffusers' AttnProcessor: heads folded into the batch, scores = baddbmm(q, k^T, alpha=1/sqrt(d))."""
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    b, lq, c = q.shape
    d, dv = c // heads, v.shape[-1] // heads

    def fold(t, width):  # (B, L, heads * width) -> (B * heads, L, width)
        return t.reshape(b, -1, heads, width).permute(0, 2, 1, 3).reshape(b * heads, -1, width)
    q, k, v = fold(q, d), fold(k, d), fold(v, dv)
    if mask is None:
        scores = torch.baddbmm(torch.empty(q.shape[0], lq, k.shape[1], dtype=q.dtype, device=q.device), q,
                               k.transpose(-1, -2), beta=0, alpha=d ** -0.5)
    else:
        bias = mask.expand(b, heads, lq, k.shape[1]).reshape(b * heads, lq, k.shape[1]).to(q.dtype)
        scores = torch.baddbmm(bias, q, k.transpose(-1, -2), beta=1, alpha=d ** -0.5)
    out = torch.bmm(scores.softmax(dim=-1), v)
    return out.reshape(b, heads, lq, dv).permute(0, 2, 1, 3).reshape(b, lq, heads * dv)


def ref_group_norm(x, num_groups, weight, bias, eps, silu=False):
    """GroupNorm over (B, C, ...) with an optional SiLU after it (the pair every resnet block runs)."""
    x = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(x) if silu else x


def ref_layer_norm(x, weight, bias, eps, dim=-1):
    """LayerNorm over the last dim (dim=-1), or over the channels of a (B, C, H, W) map (dim=1).
    weight and bias may be None (affine-free)."""
    if dim == 1:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], weight, bias, eps).permute(0, 3, 1, 2)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def ref_geglu(h):
    """Gated GELU (Shazeer 2020) on a projection h = (..., 2d): value * gelu(gate), the exact (erf) GELU."""
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)


def ref_lora_linear(x, weight, bias, loras):
    """x W^T + b + sum_i s_i ((x A_i^T) B_i^T + c_i); loras: (down A, up B, up_bias c or None, scale s) per adapter."""
    out = F.linear(x, weight, bias)
    for down, up, up_bias, scale in loras:
        out = out + F.linear(F.linear(x, down), up, up_bias) * scale
    return out


def ref_lora_conv2d(x, weight, bias, stride, padding, dilation, loras):
    """conv2d(x, W) + sum_i s_i conv1x1(conv(x, A_i), B_i) (LoCon: the down conv has the base's kernel)."""
    out = F.conv2d(x, weight, bias, stride, padding, dilation)
    for down, up, up_bias, scale in loras:
        out = out + F.conv2d(F.conv2d(x, down, None, stride, padding, dilation), up, up_bias) * scale
    return out


def ref_lut_weight(packed, lut, nbits, shape):
    """A palettised weight (minidiff.compress): unpack the n-bit indices, gather each weight from its group's LUT."""
    from minidiff.compress import depalettise, unpack  # the packing format lives beside the palettiser
    return depalettise(unpack(packed, nbits, math.prod(shape)).reshape(shape), lut)


REFERENCES = {"attention": ref_attention, "group_norm": ref_group_norm, "layer_norm": ref_layer_norm,
              "geglu": ref_geglu, "lora_linear": ref_lora_linear, "lora_conv2d": ref_lora_conv2d,
              "lut_weight": ref_lut_weight}

# ----------------------------------------------------------------------------- the seam

attention = ref_attention
group_norm = ref_group_norm
layer_norm = ref_layer_norm
geglu = ref_geglu
lora_linear = ref_lora_linear
lora_conv2d = ref_lora_conv2d
lut_weight = ref_lut_weight


def current():
    """The implementation in use for each op, by name."""
    return {name: globals()[name] for name in REFERENCES}


def use(**impls):
    """Replace ops by name (`ops.use(group_norm=fn)`); returns a context manager that puts back what was there.

    An unknown name is an error naming the ops there are; None restores that op's reference."""
    unknown = sorted(set(impls) - set(REFERENCES))
    if unknown:
        raise ValueError(f"ops.use: unknown op(s) {unknown}; the ops are {sorted(REFERENCES)}")
    before = current()
    for name, fn in impls.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"ops.use: {name}= must be a function, got {type(fn).__name__}")
        globals()[name] = REFERENCES[name] if fn is None else fn
    return _Restore(before)


def reset():
    """Every op back to its plain PyTorch reference."""
    globals().update(REFERENCES)


class _Restore(contextlib.AbstractContextManager):
    def __init__(self, before):
        self.before = before

    def __exit__(self, *exc):
        globals().update(self.before)
        return False


# ----------------------------------------------------------------------------- the layers models build with

class GroupNorm(torch.nn.GroupNorm):
    """nn.GroupNorm (same parameter names, so the same state-dict keys) computing through `group_norm`.

    `norm(x, silu=True)` is the GroupNorm-then-SiLU pair of every resnet block, one op for a kernel to fuse."""

    def forward(self, x, silu=False):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu)


class LayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm (same parameter names; affine or not) computing through `layer_norm`.

    dim=-1 normalises the last dim of (..., C); dim=1 the channels of a (B, C, H, W) map."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, dim=-1):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine)
        self.dim = dim

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps, dim=self.dim)
