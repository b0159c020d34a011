"""LoRA (Hu et al. 2021, "Low-Rank Adaptation"): adapters for the UNet and the text encoders.

A LoRA file holds, for some Linear/Conv2d layers of a model, two small matrices: `down` (A, rank x in)
and `up` (B, out x rank), and often an `alpha`. The adapted layer computes

    y = W x + b + sum over active adapters a of  weight_a * (alpha_a / rank_a) * B_a (A_a x)

Here that is an explicit injection: each targeted nn.Linear / nn.Conv2d is replaced by a `LoRALinear` /
`LoRAConv2d` that holds the base layer's own `weight` and `bias` Parameters under the same names (so the
model's state-dict keys do not change) plus the adapters, kept as non-persistent buffers (so
`save_pretrained` still writes the plain model). Adapters switch and reweight without touching W;
`fuse_lora` adds them into W for speed and keeps a copy of W so that `unfuse_lora` restores it exactly.

This file holds those layers and the per-call scale (`scaled`, `call_scale`: what a pipeline's __call__
uses); loading files and managing named adapters (load_lora_weights, set_adapters, fuse/unfuse, unload)
is minidiff/lora.py.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn

from . import ops
from .prepack import OneDNNLinear, onednn_linear
from .weights import lycoris


class LoRAAdapter(nn.Module):
    """One adapter on one layer: down (A), up (B), optional up bias, and alpha / rank.

    Buffers, not parameters, and non-persistent: they follow `.to()` but stay out of the state dict.
    """

    def __init__(self, down, up, up_bias, scale):
        super().__init__()
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("up_bias", up_bias, persistent=False)
        self.scale = scale  # alpha / rank, fixed by the file
        self.rank = down.shape[0]


class LyCORISAdapter(nn.Module):
    """A LyCORIS adapter (LoHa, LoKr, full difference) on one layer: its factors, and the delta weight they
    make (weights/lycoris.py). Not a down/up pair: the layer adds scale x delta to its weight for the call."""

    def __init__(self, kind, factors, scale):
        super().__init__()
        self.kind, self.names, self.scale = kind, [n for n in factors if n != "diff_b"], scale
        for n in self.names:
            self.register_buffer(n, factors[n], persistent=False)
        self.register_buffer("up_bias", factors.get("diff_b"), persistent=False)  # the bias difference

    def delta(self):
        return lycoris.delta(self.kind, {n: getattr(self, n) for n in self.names})


class LoRALayer(nn.Module):
    """What LoRALinear and LoRAConv2d share: the adapters, which are active and with what weight,
    enable/disable, the per-call scale, fusing."""

    is_lora_layer = True  # how weights.lora_formats.is_target knows a wrapped layer without importing this file

    def __init__(self, base):
        super().__init__()
        # the base layer's own Parameters under their own names: `weight` and `bias` keep their state-dict keys
        self.weight = base.weight
        self.bias = base.bias
        # what unloading gives back: a prepacked / oneDNN layer (minidiff/prepack.py) stays one
        self.base_class = type(base) if getattr(type(base), "is_prepacked", False) else None
        self.adapters = nn.ModuleDict()
        self.adapter_weights = {}  # name -> weight from set_adapters (1.0 when loaded)
        self.active = []  # adapters of this layer in use, in the order set_adapters named them
        self.active_names = []  # all the adapters set_adapters named (some may not touch this layer)
        self.enabled = True
        self.call_scale = 1.0  # cross_attention_kwargs["scale"] during one pipeline call
        self.fused = []  # adapters added into `weight`
        self.unfused = None  # (weight, bias) as they were before fusing, on the CPU

    def active_loras(self):
        """(down, up, up_bias, scale) of each adapter in use, the form the ops seam's lora_* ops take. Adapters
        fused into W are left out; one loaded after fuse_lora still applies, as in diffusers."""
        if not self.enabled:
            return []
        loras = []
        for name in self.active:
            if name in self.fused:  # already inside W
                continue
            a = self.adapters[name]
            if isinstance(a, LoRAAdapter):
                loras.append((a.down, a.up, a.up_bias, a.scale * self.adapter_weights[name] * self.call_scale))
        return loras

    def adapted_weight(self):
        """(weight, bias) with the active LyCORIS deltas added, scaled: what the layer computes with this call."""
        weight, bias = self.weight, self.bias
        if not self.enabled:
            return weight, bias
        for name in self.active:
            a = self.adapters[name]
            if isinstance(a, LyCORISAdapter) and name not in self.fused:
                s = a.scale * self.adapter_weights[name] * self.call_scale
                weight = weight + a.delta().reshape(weight.shape) * s
                if a.up_bias is not None:
                    bias = bias + a.up_bias * s
        return weight, bias

    def delta_weight(self, a):
        """B A (or a LyCORIS delta) as a weight of this layer's shape, in fp32."""
        if isinstance(a, LyCORISAdapter):
            return a.delta().float().reshape(self.weight.shape)
        return (a.up.float().flatten(1) @ a.down.float().flatten(1)).reshape(self.weight.shape)

    @torch.no_grad()
    def fuse(self, names, lora_scale=1.0):
        names = [n for n in names if n in self.adapters and n not in self.fused]
        if not names:
            return
        if self.unfused is None:
            self.unfused = (self.weight.detach().to("cpu", copy=True),
                            None if self.bias is None else self.bias.detach().to("cpu", copy=True))
        weight = self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        for n in names:
            a = self.adapters[n]
            s = a.scale * self.adapter_weights[n] * lora_scale
            weight += self.delta_weight(a) * s
            if a.up_bias is not None:
                bias += a.up_bias.float() * s
        self.weight.copy_(weight)
        if bias is not None:
            self.bias.copy_(bias)
        self.fused += names

    @torch.no_grad()
    def unfuse(self):
        if self.unfused is None:
            return
        weight, bias = self.unfused
        self.weight.copy_(weight)
        if bias is not None:
            self.bias.copy_(bias)
        self.unfused, self.fused = None, []


class LoRALinear(LoRALayer):
    def __init__(self, base):
        super().__init__(base)
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x):
        loras = self.active_loras()
        if not loras and self.base_class is OneDNNLinear:  # all fused (fuse_lora) or off: the base layer's matmul
            return onednn_linear(x, *self.adapted_weight())
        return ops.lora_linear(x, *self.adapted_weight(), loras)

    def onednn_weights(self):
        """(weight, bias) where this layer is the base's oneDNN matmul alone (every adapter fused, or none on),
        else None (what a GEGLU fuses its activation into: an LCM-LoRA fused into the feed-forward keeps it)."""
        if self.base_class is OneDNNLinear and not self.active_loras():
            return self.adapted_weight()
        return None

    def expected_shapes(self, rank):
        return (rank, self.in_features), (self.out_features, rank)

    def plain(self):
        with torch.device("meta"):
            m = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        m.__class__ = self.base_class or type(m)
        m.weight, m.bias = self.weight, self.bias
        return m

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, adapters={list(self.adapters)}"


class LoRAConv2d(LoRALayer):
    """The down convolution has the base layer's kernel, stride and padding; the up one is 1 x 1 (LoCon)."""

    def __init__(self, base):
        super().__init__(base)
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError(f"LoRA on a Conv2d with groups={base.groups}, padding_mode={base.padding_mode!r} "
                             "is not supported")
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (base.kernel_size, base.stride, base.padding,
                                                                      base.dilation)

    def forward(self, x):
        weight, bias = self.adapted_weight()
        return ops.lora_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.active_loras())

    def expected_shapes(self, rank):
        return (rank, self.in_channels, *self.kernel_size), (self.out_channels, rank, 1, 1)

    def plain(self):
        with torch.device("meta"):
            m = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, bias=self.bias is not None)
        m.__class__ = self.base_class or type(m)
        m.weight, m.bias = self.weight, self.bias
        return m

    def extra_repr(self):
        return (f"{self.in_channels} -> {self.out_channels}, kernel {tuple(self.kernel_size)}, "
                f"adapters={list(self.adapters)}")


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALayer)]


def describe(module):
    if isinstance(module, (nn.Linear, LoRALinear)):
        return f"Linear {module.in_features} -> {module.out_features}"
    return f"Conv2d {module.in_channels} -> {module.out_channels}, kernel {tuple(module.kernel_size)}"


def expected_shapes(module, rank):
    if isinstance(module, LoRALayer):
        return module.expected_shapes(rank)
    if isinstance(module, nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)


@contextmanager
def scaled(modules, scale):
    """Multiply every LoRA of `modules` by `scale` inside the block: `cross_attention_kwargs={"scale": s}`."""
    if scale is None or scale == 1:
        yield
        return
    modules = [m for m in (modules if isinstance(modules, (list, tuple)) else [modules]) if m is not None]
    layers = [layer for m in modules for layer in lora_layers(m)]
    for layer in layers:
        layer.call_scale = scale
    try:
        yield
    finally:
        for layer in layers:
            layer.call_scale = 1.0


def call_scale(cross_attention_kwargs):
    """The LoRA scale a pipeline call asks for with cross_attention_kwargs={"scale": s} (None: unscaled)."""
    return (cross_attention_kwargs or {}).get("scale")
