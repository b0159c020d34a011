"""Issue 18 (memory): a file loaded in another dtype is read tensor by tensor (pread into a buffer, then cast), so
its pages are never mapped into the process; a file loaded in its own dtype stays memory-mapped. Same values as
casting safetensors' own tensors. (Peak RSS is measured in bench/memory.py.)"""
import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from minidiff.errors import FileFormatError
from minidiff.weights import load


@pytest.fixture()
def weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).half(), "empty": torch.zeros(0, 4),
          "ids": torch.arange(6).reshape(2, 3), "c": torch.randn(2, 2, 2, generator=g).bfloat16()}
    path = str(tmp_path / "w.safetensors")
    save_file(sd, path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cast_on_read_equals_casting_the_mapped_tensors(weights, dtype):
    ref = load_file(weights)
    got = {k: t for _, k, t in load._iter_tensors([weights], False, cast=(dtype, "cpu", None))}
    assert got.keys() == ref.keys()
    for k, t in ref.items():
        want = t.to(dtype) if t.is_floating_point() else t
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k


def test_only_same_dtype_tensors_are_mapped(weights, monkeypatch):
    opened = []
    real = safetensors.safe_open

    def spy(path, **kw):
        opened.append(path)
        return real(path, **kw)
    monkeypatch.setattr(safetensors, "safe_open", spy)
    # bf16 target: "c" is bf16 in the file (mapped) and "ids" is not floating (mapped); the rest read and cast
    list(load._iter_tensors([weights], False, cast=(torch.bfloat16, "cpu", None)))
    assert opened == [weights]
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("mapped a file that is all cast"))
    save_file({"x": torch.ones(4, 4).half(), "y": torch.ones(3).half()}, weights)
    out = {k: t for _, k, t in load._iter_tensors([weights], False, cast=(torch.float32, "cpu", None))}
    assert out["x"].dtype == torch.float32 and out["x"].untyped_storage().nbytes() == 64  # its own memory


def test_short_file_is_a_format_error(weights):
    header = load.read_safetensors_header(weights)
    header.offsets["a"] = (0, 10 ** 6)  # as if the file ended before the tensor's bytes
    with open(weights, "rb") as f, pytest.raises(FileFormatError, match="'a' ends past the end of the file"):
        load._read_cast(f, header, "a", (torch.float16, "cpu", None))


def test_memory_format_on_read_is_one_copy_of_every_4d_tensor(tmp_path):
    """torch_dtype="auto" on a CPU with bf16 loads the convolutions' weights in channels_last: laid out while being
    cast (one copy), also where the file already holds bf16 (then read, not mapped) and where a 1x1 kernel is
    channels_last already (its own memory, not the read buffer the next tensor overwrites)."""
    g = torch.Generator().manual_seed(0)
    sd = {"conv3": torch.randn(4, 3, 3, 3, generator=g), "conv1": torch.randn(5, 4, 1, 1, generator=g).bfloat16(),
          "conv3_bf16": torch.randn(2, 4, 3, 3, generator=g).bfloat16(), "lin": torch.randn(3, 4, generator=g),
          "bias": torch.randn(4, generator=g).bfloat16()}
    path = str(tmp_path / "w.safetensors")
    save_file(sd, path)
    got = {k: t for _, k, t in load._iter_tensors([path], False, cast=(torch.bfloat16, "cpu", torch.channels_last))}
    for k, t in sd.items():
        assert torch.equal(got[k], t.bfloat16()), k
        if t.dim() == 4:
            assert got[k].is_contiguous(memory_format=torch.channels_last), k
            assert got[k].is_contiguous() == (t.shape[2:] == (1, 1)), k  # a 1x1 kernel is both
    assert len({got[k].untyped_storage().data_ptr() for k in sd}) == len(sd)  # no tensor shares the buffer
