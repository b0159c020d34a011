"""Attention slicing (diffusers' enable_attention_slicing) as one more attention through the ops seam.

The (batch x heads) attention maps are computed `slice_size` at a time, so the peak memory of the
scores is slice_size / (batch x heads) of the whole; the output is the same (each slice is the same
per-head attention). slice_size: an int (rows of batch x heads per slice), "auto" (half the heads:
two slices per sample, diffusers' default), "max" (one head at a time), None (off).

The seam is one module, so slicing is process-wide: every model's attention is sliced until
`disable_attention_slicing()` puts back what was there before.
"""
from minidiff import ops

_restore = None


def sliced_attention(slice_size="auto"):
    """An `ops.attention` replacement computing `slice_size` (batch x head) rows at a time."""
    if not (slice_size in ("auto", "max") or (isinstance(slice_size, int) and not isinstance(slice_size, bool)
                                              and slice_size > 0)):
        raise ValueError(f"attention slicing: slice_size={slice_size!r}; use a positive int, 'auto', 'max' or None")

    def attention(q, k, v, heads, mask=None, causal=False, upcast=False, classic=False):
        b, lq, c = q.shape
        lk, cv = k.shape[1], v.shape[-1]
        size = max(1, heads // 2) if slice_size == "auto" else 1 if slice_size == "max" else slice_size
        if size >= b * heads:
            return ops.ref_attention(q, k, v, heads, mask=mask, causal=causal, upcast=upcast, classic=classic)

        def fold(t, width):  # (B, L, heads * width) -> (B * heads, L, width): one head per row, heads=1
            return t.reshape(b, -1, heads, width).transpose(1, 2).reshape(b * heads, -1, width)
        q, k, v = fold(q, c // heads), fold(k, c // heads), fold(v, cv // heads)
        if mask is not None:  # broadcastable to (B, heads, Lq, Lk) -> (B * heads, 1, Lq, Lk)
            mask = mask.expand(b, heads, lq, lk).reshape(b * heads, 1, lq, lk)
        out = q.new_empty(b * heads, lq, cv // heads)
        for i in range(0, b * heads, size):
            part = slice(i, i + size)
            out[part] = ops.ref_attention(q[part], k[part], v[part], 1, mask=None if mask is None else mask[part],
                                          causal=causal, upcast=upcast, classic=classic)
        return out.reshape(b, heads, lq, cv // heads).transpose(1, 2).reshape(b, lq, cv)
    return attention


def enable_attention_slicing(slice_size="auto"):
    """Slice every attention (see the module doc); None turns it off."""
    global _restore
    if slice_size is None:
        return disable_attention_slicing()
    fn = sliced_attention(slice_size)  # checks slice_size before anything changes
    disable_attention_slicing()
    _restore = ops.use(attention=fn)


def disable_attention_slicing():
    """Back to the attention in use before slicing was enabled."""
    global _restore
    if _restore is not None:
        _restore.__exit__(None, None, None)
        _restore = None
