"""Issue 19: attention slicing through the ops seam gives the same output as whole attention."""
import pytest
import torch

import utils
from minidiff import attention_slicing, ops
from minidiff.pipelines.common import DiffusionPipeline


@pytest.mark.parametrize("slice_size", ["auto", "max", 3, 100])
@pytest.mark.parametrize("kind", ["plain", "bool mask", "float mask", "causal", "upcast", "classic"])
def test_sliced_attention_equals_whole(slice_size, kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 12, generator=g), torch.randn(2, 7, 12, generator=g), torch.randn(2, 7, 18, generator=g))
    kw = {"plain": {}, "upcast": {"upcast": True}, "classic": {"classic": True},
          "bool mask": {"mask": (torch.arange(7) < 5).view(1, 1, 1, 7).expand(2, 1, 5, 7)},
          "float mask": {"mask": torch.randn(2, 3, 5, 7, generator=g)}}.get(kind, {})
    if kind == "causal":
        k, v, kw = k[:, :5], v[:, :5], {"causal": True}
    ref = ops.ref_attention(q, k, v, 3, **kw)
    out = attention_slicing.sliced_attention(slice_size)(q, k, v, 3, **kw)
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_pipeline_switch_slices_every_model_and_undoes(monkeypatch):
    unet, run = utils.unet_sd()
    utils.seeded_(unet)
    with torch.no_grad():
        ref = run()
        calls = []
        inner = ops.ref_attention
        monkeypatch.setattr(ops, "ref_attention", lambda *a, **k: (calls.append(a[0].shape[0]), inner(*a, **k))[1])
        DiffusionPipeline.enable_attention_slicing(None, "max")
        try:
            out = run()
        finally:
            DiffusionPipeline.disable_attention_slicing(None)
        assert calls and set(calls) == {1}  # one (batch x head) row per call
        assert ops.attention is ops.REFERENCES["attention"]
    utils.assert_close(out, ref, rel=1e-5)
    with pytest.raises(ValueError, match="slice_size=0"):
        attention_slicing.enable_attention_slicing(0)
    assert ops.attention is ops.REFERENCES["attention"]
