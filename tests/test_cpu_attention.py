"""The C++ attention kernel for AVX512_BF16 CPUs (kernels/cpu_attention.py), bf16 and fp32, against float64
attention on the same inputs (no further off than PyTorch's SDPA), against SDPA and diffusers' UNet through the seam, the calls
it leaves to SDPA, and the CLI's --kernels cpu. Runs where the CPU has the flags and a compiler and ninja are there
(the tests say which is missing otherwise); the error paths run everywhere."""
import numpy as np
import pytest
import torch
from PIL import Image

from minidiff import kernels, ops
from minidiff.cli import main
from minidiff.kernels import cpu_attention
from utils import build_sd, unet_inputs

REASON = cpu_attention.missing()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"the CPU attention kernel cannot run here: {REASON}")


def bf16(*shape, seed=0, scale=1.0, dtype=torch.bfloat16):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


# dtype: (floor of the relative error against float64, max |kernel - SDPA| over max |v|)
TOLERANCE = {torch.bfloat16: (1e-4, 0.05), torch.float32: (1e-7, 1e-5)}


def relative_error(out, ref):
    return ((out.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch, queries, keys, heads, width, scale", [
    (2, 1000, 1000, 8, 40, 2.0),   # SD 1.5's first level (fewer tokens), keys not a multiple of 16 or 256
    (1, 300, 77, 5, 64, 1.0),      # cross-attention over the text, SDXL's width
    (1, 33, 513, 2, 160, 3.0),     # SD 1.5's third level width, a query tile cut short
    (1, 5, 1, 3, 2, 1.0),          # one key: the output is v
    (1, 40, 64, 1, 256, 0.5),      # SDXL-refiner-like wide heads
    (1, 300, 300, 1, 512, 0.3),    # the widest head it takes: the VAE's mid-block attention
    (3, 17, 300, 4, 80, 8.0),      # sharp softmax (logits in the hundreds): the row max keeps it finite
])
def test_the_kernel_is_as_close_to_float64_as_sdpa(batch, queries, keys, heads, width, scale, dtype):
    kernels.cpu_attention.load()
    c, (floor, off) = heads * width, TOLERANCE[dtype]
    q, k = bf16(batch, queries, c, seed=1, scale=scale, dtype=dtype), bf16(batch, keys, c, seed=2, scale=scale, dtype=dtype)
    v = bf16(batch, keys, c, seed=3, dtype=dtype)
    ref = ops.ref_attention(q.double(), k.double(), v.double(), heads)
    sdpa = ops.ref_attention(q, k, v, heads)
    out = cpu_attention.attention(q, k, v, heads)
    assert out.shape == sdpa.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, ref) <= 1.25 * relative_error(sdpa, ref) + floor
    assert (out.float() - sdpa.float()).abs().max().item() <= off * v.float().abs().max().item()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_views_of_a_fused_projection_give_the_same_bits(dtype):
    """The projections' outputs go in as views (token stride 3C for a fused QKV): read in place, same result."""
    qkv = bf16(2, 200, 3 * 64, seed=4, scale=2.0, dtype=dtype)
    q, k, v = qkv.chunk(3, dim=-1)
    assert not q.is_contiguous()
    out = cpu_attention.attention(q, k, v, 4)
    assert torch.equal(out, cpu_attention.attention(q.contiguous(), k.contiguous(), v.contiguous(), 4))


@needs_kernel
@pytest.mark.parametrize("case", ["mask", "causal", "upcast", "classic", "fp16", "odd width", "too wide", "fp32 wide", "autograd"])
def test_calls_it_does_not_take_go_to_sdpa_unchanged(case, monkeypatch):
    kernel = cpu_attention.load()
    monkeypatch.setattr(cpu_attention, "load", lambda: pytest.fail(f"{case}: the kernel took the call"))
    heads, c = {"too wide": (1, 514), "fp32 wide": (1, 258), "odd width": (4, 20)}.get(case, (4, 32))
    q, k, v = bf16(1, 24, c, seed=5), bf16(1, 30, c, seed=6), bf16(1, 30, c, seed=7)
    kw = {"mask": {"mask": torch.rand(1, 1, 24, 30, generator=torch.Generator().manual_seed(0)) > 0.3},
          "causal": {"causal": True}, "upcast": {"upcast": True}, "classic": {"classic": True}}.get(case, {})
    if case == "fp32 wide":
        q, k, v = q.float(), k.float(), v.float()
    if case == "fp16":
        q, k, v = q.half(), k.half(), v.half()
    if case == "autograd":
        q.requires_grad_(True)
    out = cpu_attention.attention(q, k, v, heads, **kw)
    assert torch.equal(out, ops.ref_attention(q, k, v, heads, **kw))
    if case == "autograd":
        out.float().sum().backward()  # training keeps working: SDPA has the backward
        assert q.grad is not None
    assert kernel is not None


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cpu_attention_sd"))
    build_sd(path)
    return path


def step(unet, dtype):
    kw = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
          for k, v in unet_inputs(unet).items()}
    with torch.no_grad():
        return unet(**kw).sample.float()


@needs_kernel
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 3e-2), (torch.float32, 1e-4)])
def test_a_unet_through_the_seam_matches_sdpa_and_diffusers(folder, monkeypatch, dtype, tolerance):
    """kernels.use("cpu") routes every attention of a bf16 or fp32 UNet to the kernel (counted); the output is
    SDPA's and diffusers' to rounding; kernels.use("reference") puts SDPA back."""
    import diffusers
    from minidiff import UNet2DConditionModel
    ours = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    sdpa, ref = step(ours, dtype), step(theirs, dtype)
    kernel, calls = cpu_attention.load(), []
    monkeypatch.setattr(cpu_attention, "load", lambda: lambda *a: calls.append(a[0].shape) or kernel(*a))
    try:
        kernels.use("cpu")
        out = step(ours, dtype)
    finally:
        kernels.use("reference")
    assert ops.attention is ops.ref_attention
    attentions = sum(type(m).__name__ == "Attention" for m in ours.modules())
    assert attentions > 0 and len(calls) == attentions
    scale = ref.abs().max().item()
    assert (out - sdpa).abs().max().item() <= tolerance * scale
    assert (out - ref).abs().max().item() <= tolerance * scale


def test_without_the_cpu_flags_use_cpu_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(cpu_attention, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    cpu_attention.load.cache_clear()
    before = ops.attention
    try:
        with pytest.raises(RuntimeError, match=r"lacks avx512bw, avx512vl, avx512dq, avx512_bf16 \(/proc/cpuinfo\)"):
            kernels.use("cpu")
    finally:
        cpu_attention.load.cache_clear()
    assert ops.attention is before  # nothing changed


def test_without_ninja_or_a_compiler_use_cpu_says_so(monkeypatch):
    import torch.utils.cpp_extension
    monkeypatch.setattr(cpu_attention, "cpu_flags", lambda: frozenset(cpu_attention.FLAGS))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert "no C++ compiler: 'no-such-compiler-here'" in cpu_attention.missing()
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: False)
    assert cpu_attention.missing() == "ninja is missing (pip install ninja)"


def test_the_cli_refuses_kernels_cpu_before_any_work_where_it_cannot_run(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cpu_attention, "cpu_flags", lambda: frozenset())
    cpu_attention.load.cache_clear()
    out = tmp_path / "x.png"
    try:
        with pytest.raises(SystemExit, match="--kernels cpu: .*cannot run here: this CPU lacks"):
            main(["generate", "a red cube", "--model", folder, "--steps", "1", "--width", "32", "--height", "32",
                  "--kernels", "cpu", "--out", str(out)])
    finally:
        cpu_attention.load.cache_clear()
    assert not out.exists()


@needs_kernel
def test_cli_kernels_cpu_prints_records_replays_and_restores_the_seam(folder, tmp_path, capsys):
    out, again, plain = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    args = ["generate", "a red cube", "--model", folder, "--steps", "2", "--width", "32", "--height", "32",
            "--dtype", "bfloat16"]
    main(args + ["--kernels", "cpu", "--out", str(out)])
    assert "attention through the CPU kernel" in capsys.readouterr().err
    assert ops.attention is ops.ref_attention  # the seam is as it was after the image
    assert "Kernels: cpu" in Image.open(out).text["parameters"]
    main(["generate", "--from-png", str(out), "--out", str(again)])
    assert "attention through the CPU kernel" in capsys.readouterr().err
    main(args + ["--out", str(plain)])
    assert "Kernels" not in Image.open(plain).text["parameters"]
    a, b, c = (np.asarray(Image.open(p)).astype(int) for p in (out, again, plain))
    assert (a == b).all()
    assert np.abs(a - c).mean() <= 4  # SDPA's picture, to bf16 rounding (measured 2.1 of 255 on this tiny model)


@needs_kernel
def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load(capsys):
    """torch's build lock, left behind by a build killed midway (Ctrl-C), would make every later load wait forever."""
    import os
    import time
    import torch.utils.cpp_extension as ext
    folder = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or ext.get_default_build_root(),
                          f"{cpu_attention.NAME}-{torch.__version__}")
    cpu_attention.load()
    lock = os.path.join(folder, "lock")
    open(lock, "w").close()
    old = time.time() - cpu_attention.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu_attention.load.cache_clear()
    try:
        assert cpu_attention.load() is not None
    finally:
        cpu_attention.load.cache_clear()
    assert not os.path.exists(lock) and "left by a build that did not finish" in capsys.readouterr().err
