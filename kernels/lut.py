"""LUT dequantisation of a palettised weight (minidiff.compress) in one Triton pass.

Each program reads BLOCK weights' n-bit indices straight from the packed bit stream (most significant bit
first; an index spans at most two bytes since n <= 8), and gathers each weight from its group's LUT.
The reference is minidiff.ops.ref_lut_weight (unpack, then gather); tests run both under TRITON_INTERPRET=1.
"""
import math
import os

import torch
import triton
import triton.language as tl

from minidiff import ops


@triton.jit
def _lut_weight_kernel(packed_ptr, lut_ptr, out_ptr, numel, nbytes, group_numel,
                       NBITS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < numel
    bit = i * NBITS
    byte = bit // 8
    hi = tl.load(packed_ptr + byte, mask=inside, other=0).to(tl.int32)
    lo = tl.load(packed_ptr + byte + 1, mask=inside & (byte + 1 < nbytes), other=0).to(tl.int32)
    index = (((hi << 8) | lo) >> (16 - NBITS - bit % 8)) & ((1 << NBITS) - 1)
    group = i // group_numel
    value = tl.load(lut_ptr + group * (1 << NBITS) + index, mask=inside)
    tl.store(out_ptr + i, value, mask=inside)


def lut_weight(packed, lut, nbits, shape, block=1024):
    """Same contract as minidiff.ops.ref_lut_weight: (packed uint8 stream, lut (groups, 2^n), n, weight shape).

    Plug it in with `ops.use(lut_weight=lut_weight)`. CPU tensors take the reference, unless Triton's
    interpreter is on (TRITON_INTERPRET=1), which is how the tests run the kernel without a GPU."""
    if not packed.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return ops.ref_lut_weight(packed, lut, nbits, shape)
    numel = math.prod(shape)
    lut = lut.contiguous()
    out = torch.empty(numel, dtype=lut.dtype, device=lut.device)
    _lut_weight_kernel[(triton.cdiv(numel, block),)](packed.contiguous(), lut, out, numel, packed.numel(),
                                                     numel // lut.shape[0], NBITS=nbits, BLOCK=block)
    return out.view(shape)
