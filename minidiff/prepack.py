"""Convolution weights prepacked for oneDNN on a CPU: reordered once into the blocked layout its kernel reads.

PyTorch's CPU convolution hands oneDNN the weight in PyTorch's layout (OIHW, or OHWI in channels_last), and oneDNN
reorders it into its blocked layout on every call: for the 1280-channel convolutions of an SD 1.5 UNet at 8x8 and
16x16 latents that reorder is as long as the convolution itself (a 59 MB weight per call), and an fp32 step spends
~1 s of its ~9 s in reorders (ONEDNN_VERBOSE, docs/cpu_profile.md). Prepacked, each Conv2d keeps the reordered
copy and calls oneDNN's convolution on it (torch.ops.mkldnn._convolution_pointwise, what inductor's `freezing`
emits), so the reorder happens once per input shape. The copy is kept beside the weight, which stays the module's
Parameter (state_dict, LoRA, `.to()` unchanged); a weight changed in place (fuse_lora, load_state_dict) or replaced
is repacked at its next call (the cache is keyed on the tensor's version counter and storage). The cost: one more
copy of every convolution weight (SD 1.5 UNet fp32: +2.3 GB). Output as the plain convolution's up to summation
order (fp32: max |diff| ~3e-5 on unit-scale maps; bitwise in channels_last), in channels_last layout.

    from minidiff.prepack import prepack_weights, unpack_weights
    prepack_weights(*pipe.modules())            # every model of a pipeline; CLI --prepack
"""
import torch
import torch.nn as nn

DTYPES = (torch.float32, torch.bfloat16)


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d whose forward reads a oneDNN-packed copy of its weight, where oneDNN can take the call."""
    is_prepacked = True  # a LoRA may land on it (its LoRAConv2d takes the weight and the plain path)

    def packable(self, x):
        return (x.device.type == "cpu" and x.dtype in DTYPES and self.weight.dtype == x.dtype
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))

    def forward(self, x):
        if not self.packable(x):
            return super().forward(x)
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        key = (tuple(x.shape), x.dtype, channels_last, self.weight._version, self.weight.data_ptr())
        if self._packed_key != key:
            self._packed = None  # the old copy goes before the new one is made (peak memory)
            weight = self.weight.detach()
            weight = weight.contiguous(memory_format=torch.channels_last) if channels_last else weight.contiguous()
            self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), *args, list(x.shape))
            self._packed_key = key
        return torch.ops.mkldnn._convolution_pointwise(x, self._packed, self.bias, *args, "none", [], "")


def available():
    """oneDNN is built into this torch (the x86 and Arm CPU wheels have it)."""
    return torch.backends.mkldnn.is_available()


def prepack_weights(*models):
    """Every plain nn.Conv2d of `models` becomes a PackedConv2d (in place; LoRA layers keep their own path).
    Returns how many; raises where this torch has no oneDNN."""
    if not available():
        raise RuntimeError("prepack_weights: this torch build has no oneDNN (torch.backends.mkldnn.is_available() "
                           "is False); the plain convolutions are all there is")
    count = 0
    for model in models:
        for module in model.modules():
            if type(module) is nn.Conv2d:
                module.__class__ = PackedConv2d
                module._packed_key, module._packed = None, None
                count += 1
    return count


def unpack_weights(*models):
    """Undo prepack_weights: plain nn.Conv2d again, the packed copies freed. Returns how many."""
    count = 0
    for model in models:
        for module in model.modules():
            if type(module) is PackedConv2d:
                del module._packed_key, module._packed
                module.__class__ = nn.Conv2d
                count += 1
    return count
