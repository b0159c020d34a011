"""oneDNN's own calls for the CPU's convolutions and linears: convolution weights prepacked (reordered once into
the blocked layout its kernel reads; opt-in, a second copy) and linears on oneDNN's matmul (no copy; what
torch_dtype="auto" and the CLI do where it measures faster: device.use_fast_linear).

PyTorch's CPU convolution hands oneDNN the weight in PyTorch's layout (OIHW, or OHWI in channels_last), and oneDNN
reorders it into its blocked layout on every call: for the 1280-channel convolutions of an SD 1.5 UNet at 8x8 and
16x16 latents that reorder is as long as the convolution itself (a 59 MB weight per call), and an fp32 step spends
~1 s of its ~9 s in reorders (ONEDNN_VERBOSE, docs/cpu_profile.md). Prepacked, each Conv2d keeps the reordered
copy and calls oneDNN's convolution on it (torch.ops.mkldnn._convolution_pointwise, what inductor's `freezing`
emits), so the reorder happens once per input shape. The copy is kept beside the weight, which stays the module's
Parameter (state_dict, LoRA, `.to()` unchanged); a weight changed in place (fuse_lora, load_state_dict) or replaced
is repacked at its next call (the cache is keyed on the tensor's version counter and storage). The cost: one more
copy of every convolution weight (SD 1.5 UNet fp32: +2.3 GB), and the packing in the first call (bf16:
~0.2-0.5 s for the SD 1.5 UNet on a Zen 4). Output as the plain convolution's up to summation
order (fp32: max |diff| ~3e-5 on unit-scale maps; bitwise in channels_last), in channels_last layout.

    from minidiff.prepack import onednn_linears, prepack_weights, unpack_weights
    prepack_weights(pipe.unet)                  # its convolutions packed, linears on oneDNN; CLI --prepack
                                                # (not the VAE: it decodes once per image, the packing is all cost)
    onednn_linears(*pipe.modules())             # the linears alone (no memory cost)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

DTYPES = (torch.float32, torch.bfloat16)
# under torch.compile the layers are the plain ones (dynamo folds this call); torch < 2.3 has no such function
compiling = getattr(torch.compiler, "is_compiling", None) or (lambda: False)


def onednn_can_take(x, weight):
    """What both layers' oneDNN calls need: CPU tensors of one dtype it takes, no autograd (the ops have no
    backward), not under torch.compile."""
    return (not compiling() and x.device.type == "cpu" and x.dtype in DTYPES and weight.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d whose forward reads a oneDNN-packed copy of its weight, where oneDNN can take the call."""
    is_prepacked = True  # a LoRA may land on it (its LoRAConv2d takes the weight and the plain path)
    _packed_key = _packed = None  # until the first call packs (class defaults: a layer made by class swap has none)

    def packable(self, x):
        return onednn_can_take(x, self.weight) and self.padding_mode == "zeros" and not isinstance(self.padding, str)

    def forward(self, x):
        if not self.packable(x):
            return super().forward(x)
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        key = (tuple(x.shape), x.dtype, channels_last, self.weight._version, self.weight.data_ptr())
        if self._packed_key != key:
            self._packed = None  # the old copy goes before the new one is made (peak memory)
            weight = self.weight.detach()
            # reordered straight from the layout the plain call reads (OHWI for an NHWC input), not through
            # to_mkldnn()'s extra copy: 2-5x faster (SD 1.5's 59 MB bf16 weights: 21 ms against 98 ms on a Zen 4)
            weight = weight.contiguous(memory_format=torch.channels_last) if channels_last else weight.contiguous()
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(weight, *args, list(x.shape))
            self._packed_key = key
        return torch.ops.mkldnn._convolution_pointwise(x, self._packed, self.bias, *args, "none", [], "")


class OneDNNLinear(nn.Linear):
    """nn.Linear computed by oneDNN's matmul with the bias fused in (torch.ops.mkldnn._linear_pointwise, what
    inductor emits), reading the Parameter as it is: no copy, no memory cost. PyTorch's own CPU linear sends fp32 to
    MKL's sgemm, which runs at about half oneDNN's speed on AMD CPUs (Zen 5: an SD 1.5 UNet's linears 0.45x the
    time), and in bf16 (oneDNN there too) first copies the bias into the output for the matmul to add to. Same
    result: bf16 bitwise, fp32 to summation order (~1e-6 relative). Where oneDNN cannot take the call (autograd,
    other dtypes or devices; under torch.compile, whose inductor takes this op only for frozen weights) it is the
    plain nn.Linear."""
    is_prepacked = True  # a layer LoRA and the compressors take as a plain nn.Linear

    def forward(self, x):
        return onednn_linear(x, self.weight, self.bias)

    def onednn_weights(self):
        """(weight, bias) of the oneDNN matmul this layer is (what a GEGLU fuses its activation into)."""
        return self.weight, self.bias


def onednn_matmul_can_take(x, weight, bias=None):
    return (onednn_can_take(x, weight) and x.dim() >= 2 and weight.is_contiguous()
            and (bias is None or bias.dtype == x.dtype))


def onednn_linear(x, weight, bias=None):
    """F.linear through oneDNN's matmul where it can take the call (OneDNNLinear's forward; also what a fused QKV
    projection and a LoRA layer with no adapter left unfused run where their layers were OneDNNLinear)."""
    if onednn_matmul_can_take(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def fusable_weights(layer):
    """(weight, bias) where `layer` is oneDNN's matmul and nothing else, so that the op after it may run inside the
    matmul (onednn_geglu): a OneDNNLinear, or a LoRA layer whose adapters are all fused; None otherwise, and for a
    layer with forward hooks (the fused call would skip them)."""
    weights = getattr(layer, "onednn_weights", None)
    if weights is None or layer._forward_hooks or layer._forward_pre_hooks:
        return None
    return weights()


def onednn_geglu(x, weight, bias=None):
    """ops.ref_geglu(F.linear(x, weight, bias)) with the gate's GELU and the product inside oneDNN's matmuls: the
    gate's rows of W with GELU applied to the matmul's fp32 result, then the value's rows with the product by the
    gate as the matmul's last step. The same work in the matmuls (each takes half of W's rows: views, no copy), and
    no separate passes over the (tokens, 2 x width) projection: SD 1.5's first-level feed-forward in 0.60x the time
    in bf16 and 0.75-0.87x in fp32 on a Zen 4. The GELU sees the unrounded sum, so bf16 comes out a little closer
    to fp32 than the plain path does; fp32 equals it to summation order. Where oneDNN cannot take the call, the
    plain path."""
    if not onednn_matmul_can_take(x, weight, bias):
        return ops.ref_geglu(F.linear(x, weight, bias))
    d = weight.shape[0] // 2  # [value; gate], as ops.ref_geglu chunks the projection
    value_bias, gate_bias = (None, None) if bias is None else (bias[:d], bias[d:])
    gate = torch.ops.mkldnn._linear_pointwise(x, weight[d:], gate_bias, "gelu", [], "none")  # "none": erf GELU
    return torch.ops.mkldnn._linear_pointwise.binary(x, gate, weight[:d], value_bias, "mul")


def is_plain_layer(module):
    """A plain nn.Linear / nn.Conv2d, or one of this file's (the same layer, computed another way): what the
    compressors and the LoRA trainer select."""
    return type(module) in (nn.Linear, nn.Conv2d) or getattr(type(module), "is_prepacked", False)


def available():
    """oneDNN is built into this torch (the x86 and Arm CPU wheels have it)."""
    return torch.backends.mkldnn.is_available()


def swap(models, plain, fast):
    """Every module of exactly class `plain` in `models` becomes a `fast` one (a class swap: same Parameters,
    nothing copied). Returns how many."""
    count = 0
    for model in models:
        for module in model.modules():
            if type(module) is plain:
                module.__class__ = fast
                count += 1
    return count


def check_available(what):
    if not available():
        raise RuntimeError(f"{what}: this torch build has no oneDNN (torch.backends.mkldnn.is_available() "
                           "is False); the plain layers are all there is")


def onednn_linears(*models):
    """Every plain nn.Linear of `models` becomes a OneDNNLinear (in place, no copy). Returns how many; raises
    where this torch has no oneDNN. torch_dtype="auto" and the CLI do it where it measures faster
    (minidiff.device.use_fast_linear)."""
    check_available("onednn_linears")
    return swap(models, nn.Linear, OneDNNLinear)


def prepack_weights(*models):
    """Every plain nn.Conv2d of `models` becomes a PackedConv2d (in place; LoRA layers keep their own path), and
    every plain nn.Linear a OneDNNLinear (onednn_linears). Returns how many convolutions; raises where this torch
    has no oneDNN."""
    check_available("prepack_weights")
    onednn_linears(*models)
    return swap(models, nn.Conv2d, PackedConv2d)


def unpack_weights(*models):
    """Undo prepack_weights and onednn_linears: plain nn.Conv2d and nn.Linear again, the packed copies freed.
    Returns how many convolutions."""
    for model in models:
        for module in model.modules():
            module.__dict__.pop("_packed_key", None), module.__dict__.pop("_packed", None)
    swap(models, OneDNNLinear, nn.Linear)
    return swap(models, PackedConv2d, nn.Conv2d)
