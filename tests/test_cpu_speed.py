"""CPU speed paths against fp32 eager: the fast-dtype default (bf16 where the CPU has bf16 units), how the
CLI reports and records it, and that bf16 on the bundled model is the same picture as fp32."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff import StableDiffusionPipeline, UNet2DConditionModel, device
from minidiff.cli import main
from minidiff.assets import MODEL_DIR
from utils import build_sd


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(device, "bf16_is_faster", lambda: True)


@pytest.fixture
def plain_cpu(monkeypatch):
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "fma"}))


def test_fast_dtype_follows_the_cpu_flags_and_the_measurement(monkeypatch):
    probed = []
    for flags, faster, want in (({"avx512f", "avx512_bf16"}, True, torch.bfloat16),
                                ({"avx512f", "avx512_bf16"}, False, torch.float32),  # bf16 units, slower here
                                ({"amx_bf16", "amx_tile"}, False, torch.bfloat16),  # AMX: not measured
                                ({"avx512f", "avx2"}, True, torch.float32)):  # no bf16 units: not measured
        monkeypatch.setattr(device, "cpu_flags", lambda f=flags: frozenset(f))
        monkeypatch.setattr(device, "bf16_is_faster", lambda f=faster, fl=flags: probed.append(fl) or f)
        assert device.fast_dtype("cpu") == want
        assert device.resolve_dtype("auto", "cpu") == want
    assert all("avx512_bf16" in flags for flags in probed)
    assert device.resolve_dtype(None) is None  # nothing given: the library keeps diffusers' default
    assert device.resolve_dtype(torch.float16) == torch.float16  # the user's dtype always wins
    assert device.resolve_dtype("bf16") == device.resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="torch_dtype='half'.*'auto'"):
        device.resolve_dtype("half")
    assert device.latent_dtype(torch.bfloat16) == torch.float32
    assert device.latent_dtype(torch.float16) == torch.float16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cpu_speed_sd"))
    build_sd(path)
    return path


def channels_last(model):
    return model.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and model.conv_in.weight.shape[-1] > 1


def test_free_cores_leaves_the_busy_ones(monkeypatch):
    assert device.free_cores(cores=2, load=0.1) == 2      # an idle box: every core
    assert device.free_cores(cores=2, load=1.0) == 1      # one core busy: one thread, not two waiting on it
    assert device.free_cores(cores=2, load=7.9) == 1      # at least one
    assert device.free_cores(cores=16, load=3.2) == 13
    monkeypatch.setattr(device, "free_cores", lambda: 1)
    assert device.auto_threads() == 1


def test_cli_threads(folder, tmp_path, capsys, monkeypatch):
    """--threads N sets torch's threads (and is checked); by default the CLI prints the count it runs with."""
    before = torch.get_num_threads()
    try:
        main(["generate", "a red cube", "--model", folder, "--steps", "1", "--width", "32", "--height", "32",
              "--dtype", "float32", "--threads", "2", "--out", str(tmp_path / "a.png")])
        assert torch.get_num_threads() == 2 and "minidiff: threads 2\n" in capsys.readouterr().err
        monkeypatch.setattr(device, "free_cores", lambda: 1)
        main(["generate", "a red cube", "--model", folder, "--steps", "1", "--width", "32", "--height", "32",
              "--dtype", "float32", "--out", str(tmp_path / "b.png")])
        assert torch.get_num_threads() == 1 and "minidiff: threads 1 (auto" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit, match="--threads 0 must be >= 1"):
        main(["generate", "a red cube", "--model", folder, "--threads", "0"])


def test_auto_dtype_and_default(folder, bf16_cpu):
    plain = StableDiffusionPipeline.from_pretrained(folder)
    assert plain.unet.dtype == torch.float32 and not channels_last(plain.unet)  # diffusers' default
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype="auto")
    assert {m.dtype for m in pipe.modules()} == {torch.bfloat16}
    # and the fast layout: bf16 convolutions in NHWC (oneDNN reorders NCHW on every call)
    assert channels_last(pipe.unet) and channels_last(pipe.vae.decoder)
    assert not channels_last(StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).unet)
    assert channels_last(UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype="auto"))
    with pytest.raises(ValueError, match="torch_dtype='fast'"):
        StableDiffusionPipeline.from_pretrained(folder, torch_dtype="fast")


def laid_out_while_read(models):
    """Every convolution weight of `models` in channels_last, and the layout pass after loading copies nothing."""
    convs = [m.weight for model in models for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # 3x3 kernels: really NHWC (a 1x1 one is both)
    before = [w.data_ptr() for w in convs]
    assert all(device.use_fast_layout(m) for m in models)
    return [w.data_ptr() for w in convs] == before


def test_auto_lays_the_weights_out_while_reading_them(folder, bf16_cpu):
    """"auto" reads each convolution weight straight into channels_last (one copy, not a second pass over the
    loaded model: an SD 1.5 UNet's load 3.3-4.2 s -> 1.4-1.5 s on a Zen 4): the same values as bf16 loaded plainly,
    nothing left for the layout pass to copy; a pipeline and one model alike (single files: test_single_file.py)."""
    want = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype="auto")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype="auto")
    assert laid_out_while_read([pipe.unet, pipe.vae]) and laid_out_while_read([unet])
    for got, ref in ((pipe.unet, want.unet), (pipe.vae, want.vae), (unet, want.unet)):
        ref_sd = ref.state_dict()
        for k, t in got.state_dict().items():
            assert torch.equal(t, ref_sd[k]), k
    explicit = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.bfloat16,
                                                    memory_format=torch.channels_last)
    assert laid_out_while_read([explicit])
    linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    assert {type(m).__name__ for m in linears} == {"OneDNNLinear"}  # a model's "auto" is the pipeline's


def test_a_wrong_memory_format_is_refused_before_anything_is_read(tmp_path):
    missing = str(tmp_path / "nowhere")  # the argument is checked before the folder is looked at
    for load in (StableDiffusionPipeline.from_pretrained, StableDiffusionPipeline.from_single_file,
                 lambda p, **kw: UNet2DConditionModel.from_pretrained(p, subfolder="unet", **kw),
                 UNet2DConditionModel.from_single_file):
        for bad in ("channels_last", torch.channels_last_3d, torch.bfloat16):
            with pytest.raises(ValueError, match=r"memory_format=.* must be None .*torch\.channels_last"):
                load(missing, memory_format=bad)


def test_a_layout_change_leaves_nothing_on_the_files_mapped_pages(folder, tmp_path):
    """use_fast_layout on a bf16 VAE loaded as the file's dtype (its tensors the file's mapped pages) copies every
    tensor, not only the convolution weights, so that the mapping can go (else the pages read so far stay resident
    beside the copies); the values are the same."""
    from minidiff import AutoencoderKL
    AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.bfloat16).save_pretrained(tmp_path)
    vae = AutoencoderKL.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    want = {k: t.clone() for k, t in vae.state_dict().items()}
    before = {k: t.data_ptr() for k, t in vae.state_dict().items()}
    assert device.use_fast_layout(vae) and channels_last(vae.decoder)
    after = vae.state_dict()
    assert all(after[k].data_ptr() != p for k, p in before.items() if after[k].numel())
    assert all(torch.equal(after[k], t) for k, t in want.items())


def test_auto_on_a_cpu_without_bf16_units_is_fp32_as_loaded(folder, plain_cpu):
    """fp32 as loaded, the weights in NCHW (the file's mapped pages)."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype="auto")
    assert pipe.unet.dtype == torch.float32 and not channels_last(pipe.unet) and not channels_last(pipe.vae.decoder)


@pytest.mark.parametrize("kind", ["vae", "taesd"])
def test_an_fp32_decode_runs_in_nhwc_with_the_weights_untouched(folder, kind, monkeypatch, tmp_path):
    """An fp32 decode on a CPU hands its decoder the latents in channels_last (device.nhwc_decode: oneDNN's NHWC
    kernels), with no copy of the weights; the image comes back in NCHW and equals the NCHW decode and diffusers'
    to fp32 rounding."""
    import diffusers
    from minidiff import AutoencoderKL, AutoencoderTiny
    if kind == "vae":
        ours = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        theirs = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae")
    else:
        torch.manual_seed(0)
        theirs = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8),
                                           decoder_block_out_channels=(8, 8, 8, 8))
        theirs.save_pretrained(tmp_path)
        ours = AutoencoderTiny.from_pretrained(tmp_path)
    weights = {k: t.data_ptr() for k, t in ours.state_dict().items()}
    seen = []
    monkeypatch.setattr(ours.decoder, "forward", (lambda f: lambda x: seen.append(
        x.is_contiguous(memory_format=torch.channels_last)) or f(x))(ours.decoder.forward))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, ref = ours.decode(z).sample, theirs.decode(z).sample
    assert seen and all(seen) and out.is_contiguous()
    assert {k: t.data_ptr() for k, t in ours.state_dict().items()} == weights
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_bf16_channels_last_matches_fp32_eager(folder):
    """The default path on a bf16 CPU (bf16 weights, channels_last) against fp32 eager: the UNet's and the VAE
    decoder's outputs within bf16's rounding, and against bf16 in the default layout."""
    g = torch.Generator().manual_seed(0)
    ref = StableDiffusionPipeline.from_pretrained(folder)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, ref.unet.config.cross_attention_dim, generator=g)
    outs = {}
    with torch.no_grad():
        want = ref.unet(x, 10, ctx).sample, ref.vae.decode(x).sample
        for layout in ("nchw", "cl"):
            pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
            if layout == "cl":
                assert device.use_fast_layout(pipe.unet, "cpu") and device.use_fast_layout(pipe.vae, "cpu")
                assert channels_last(pipe.unet)
            outs[layout] = (pipe.unet(x.bfloat16(), 10, ctx.bfloat16()).sample.float(),
                            pipe.vae.decode(x.bfloat16()).sample.float())
    for got, ref_out in zip(outs["cl"], want):
        assert (got - ref_out).abs().max() <= 3e-2 * ref_out.abs().max(), (got - ref_out).abs().max()
    for cl, nchw in zip(outs["cl"], outs["nchw"]):
        assert (cl - nchw).abs().max() <= 2e-2 * nchw.abs().max()
    assert not device.use_fast_layout(ref.unet, "cpu")  # fp32: the layout stays


def test_cpu_bf16_attention_hands_sdpa_head_major_copies(monkeypatch):
    """Long bf16 self-attention on a CPU gives SDPA contiguous head-major q/k/v (its flash kernel is faster so);
    fp32, short key sequences and the upcast path keep the strided views. The output is the same bits."""
    from minidiff import ops
    import torch.nn.functional as F
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.shape[2], q.is_contiguous(), k.is_contiguous(), v.is_contiguous()))
        return sdpa(q, k, v, **kw)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, ops.HEAD_MAJOR_FROM, 4 * 8, generator=g) for _ in range(3))
    ctx = torch.randn(2, 77, 4 * 8, generator=g)
    want = sdpa(*(t.bfloat16().view(2, -1, 4, 8).transpose(1, 2) for t in (q, k, v)))
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    got = ops.ref_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=4)
    assert seen.pop() == (torch.bfloat16, ops.HEAD_MAJOR_FROM, True, True, True)
    assert torch.equal(got, want.transpose(1, 2).reshape(2, -1, 32))
    ops.ref_attention(q, k, v, heads=4)  # fp32
    ops.ref_attention(q.bfloat16(), ctx.bfloat16(), ctx.bfloat16(), heads=4)  # 77 keys
    ops.ref_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=4, upcast=True)
    assert [s[2:] for s in seen] == [(False, False, False)] * 3, seen


def test_the_bf16_measurement_runs_and_is_cached():
    device.bf16_is_faster.cache_clear()
    assert device.bf16_is_faster() in (True, False)
    assert device.bf16_is_faster.cache_info().currsize == 1
    assert device.bf16_is_faster.__wrapped__(margin=1e-9) is False  # no dtype is a billion times faster
    assert device.bf16_is_faster.__wrapped__(margin=1e9) is True


def test_keep_freed_memory_sets_glibcs_thresholds(monkeypatch):
    import ctypes
    import platform
    if platform.libc_ver()[0] != "glibc":
        assert device.keep_freed_memory() in (True, False)
        return
    calls = []
    real = ctypes.CDLL

    class Libc:  # records the calls, then makes them (so that a wrong parameter would fail on glibc)
        def __init__(self, name):
            self.lib = real(name)

        def mallopt(self, param, value):
            calls.append((param, value))
            return self.lib.mallopt(param, value)
    monkeypatch.setattr(ctypes, "CDLL", Libc)
    assert device.keep_freed_memory() is True
    assert calls == [(device.M_MMAP_THRESHOLD, 2 ** 27), (device.M_TRIM_THRESHOLD, 2 ** 27)]


def test_cli_prints_and_records_the_dtype(folder, tmp_path, capsys, bf16_cpu):
    out = tmp_path / "a.png"
    main(["generate", "a red cube", "--model", folder, "--steps", "2", "--width", "32", "--height", "32",
          "--sampler", "Euler", "--out", str(out)])
    err = capsys.readouterr().err
    assert "dtype bfloat16 (auto" in err and "layout channels_last" in err
    assert "malloc keeps freed memory" in err or __import__("platform").libc_ver()[0] != "glibc"
    assert "Dtype: bfloat16" in Image.open(out).text["parameters"]
    assert "Layout: channels_last" in Image.open(out).text["parameters"]
    # --from-png re-creates it in the PNG's dtype, even on a CPU whose default differs
    device.cpu_flags = lambda: frozenset({"avx2"})  # undone by the fixture's monkeypatch
    again = tmp_path / "b.png"
    main(["generate", "--from-png", str(out), "--out", str(again)])
    assert "dtype bfloat16\n" in capsys.readouterr().err
    assert (np.asarray(Image.open(again)) == np.asarray(Image.open(out))).all()
    fp32 = tmp_path / "c.png"
    main(["generate", "a red cube", "--model", folder, "--steps", "2", "--width", "32", "--height", "32",
          "--out", str(fp32)])
    err, params = capsys.readouterr().err, Image.open(fp32).text["parameters"]
    assert "dtype float32 (auto" in err and "layout channels_last" not in err  # an fp32 UNet keeps NCHW
    assert "Dtype: float32" in params and "Layout" not in params
    # an explicit --dtype bfloat16 gets the fast layout too (as every dtype gets oneDNN's linears)
    main(["generate", "a red cube", "--model", folder, "--steps", "2", "--width", "32", "--height", "32",
          "--dtype", "bfloat16", "--out", str(tmp_path / "d.png")])
    assert "layout channels_last" in capsys.readouterr().err
    assert "Layout: channels_last" in Image.open(tmp_path / "d.png").text["parameters"]


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def test_bf16_is_the_same_picture_on_the_bundled_model():
    """25 Euler steps of the trained bundled model: bf16 within 35 dB PSNR of fp32 (measured ~50 dB median over
    256 prompts, see bench/dtype_quality.py), with the latents kept fp32 between steps."""
    prompts = ["a red circle on a white background", "a small blue square in the top left corner"]
    seen = []

    def spy(pipe, i, t, kw):
        seen.append(kw["latents"].dtype)
        return kw

    images = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
        out = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=gens, output_type="np",
                   callback_on_step_end=spy).images
        images[dtype] = np.round(out * 255).astype(np.uint8)
    assert set(seen) == {torch.float32}
    assert images[torch.float32].std() > 10
    for a, b in zip(images[torch.bfloat16], images[torch.float32]):
        assert psnr(a, b) > 35, psnr(a, b)


def test_fused_qkv_projections_match_and_unfuse_exactly(folder):
    """diffusers' fuse_qkv_projections on minidiff's UNet and VAE: same output as unfused (fp32 rounding of one
    matmul vs three), nothing new in the state dict, unfuse back to bit-exact; LoRA layers compute unfused."""
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    unet, vae = pipe.unet, pipe.vae
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        before = unet(x, 10, ctx).sample
        dec = vae.decode(x).sample
        keys = set(unet.state_dict())
        pipe.fuse_qkv_projections()
        attn = unet.down_blocks[0].attentions[0].transformer_blocks[0]
        assert attn.attn1.fused_weight.shape[0] == 3 * attn.attn1.to_q.out_features  # self: q, k, v
        assert attn.attn2.fused_weight.shape[0] == 2 * attn.attn2.to_k.out_features  # cross: k, v
        assert set(unet.state_dict()) == keys
        torch.testing.assert_close(unet(x, 10, ctx).sample, before, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(vae.decode(x).sample, dec, atol=1e-5, rtol=1e-4)
        # the fused path really ran: a change to the fused copy changes the output
        attn.attn1.fused_weight.mul_(2)
        assert (unet(x, 10, ctx).sample - before).abs().max() > 1e-3
        pipe.unfuse_qkv_projections()
        assert "fused_weight" not in dict(attn.attn1.named_buffers())
        assert torch.equal(unet(x, 10, ctx).sample, before)


def test_channels_last_matches_eager(folder):
    """channels_last UNet and VAE (NHWC convolutions): the same image as the default layout."""
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red cube", num_inference_steps=3, width=32, height=32, output_type="np")
    ref = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
    for m in (pipe.unet, pipe.vae):
        m.to(memory_format=torch.channels_last)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    got = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
    assert np.abs(got - ref).max() < 1e-4 and ref.std() > 0.01


def test_cli_taesd_and_compile_flags(folder, tmp_path, monkeypatch):
    """--vae with a TAESD folder decodes with AutoencoderTiny (the library's image); --vae taesd names
    madebyollin/taesd (taesdxl for SDXL); --compile compiles the UNet."""
    import diffusers
    from minidiff import AutoencoderTiny, cli
    from utils import seeded_
    taesd = tmp_path / "taesd"
    seeded_(diffusers.AutoencoderTiny(encoder_block_out_channels=[8] * 4, decoder_block_out_channels=[8] * 4),
            std=0.2).eval().save_pretrained(taesd)
    out = tmp_path / "t.png"
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(type(self).__name__))
    main(["generate", "a red cube", "--model", folder, "--vae", str(taesd), "--steps", "2", "--width", "32",
          "--height", "32", "--dtype", "float32", "--compile", "--out", str(out)])
    assert compiled == ["UNet2DConditionModel"]
    pipe = StableDiffusionPipeline.from_pretrained(folder, vae=AutoencoderTiny.from_pretrained(taesd))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red cube", num_inference_steps=2, width=32, height=32, generator=torch.Generator().manual_seed(0),
               output_type="np").images[0]
    got = np.asarray(Image.open(out)).astype(int)
    assert np.abs(got - np.round(ref * 255)).max() <= 1
    asked = []
    monkeypatch.setattr(AutoencoderTiny, "from_pretrained", classmethod(lambda cls, path, **kw: asked.append(path)))
    cli.load_vae("taesd", None, torch.float32, "cpu")
    cli.load_vae("taesd", None, torch.float32, "cpu", xl=True)
    assert asked == ["madebyollin/taesd", "madebyollin/taesdxl"]


@pytest.mark.skipif(os.environ.get("MINIDIFF_COMPILE_TESTS") != "1",
                    reason="torch.compile takes minutes on a small CPU: MINIDIFF_COMPILE_TESTS=1 runs it")
def test_compiled_unet_matches_eager(folder):
    """Opt-in: the compiled UNet against eager (fp32)."""
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        ref = pipe.unet(x, 10, ctx).sample
        pipe.unet.compile()
        torch.testing.assert_close(pipe.unet(x, 10, ctx).sample, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(os.environ.get("MINIDIFF_COMPILE_TESTS") != "1",
                    reason="torch.compile takes minutes on a small CPU: MINIDIFF_COMPILE_TESTS=1 runs it")
def test_compiled_unet_lora_swapping(tmp_path):
    """Opt-in: LoRA load, set_adapters, a second adapter and unload on a compiled UNet: after each swap the
    compiled output equals the eager UNet's with the same adapters (a stale graph would not); how many new
    graphs each swap compiles is printed (README: "torch.compile and LoRA")."""
    from utils import build_lora_sd, peft, save, targets, unet_inputs
    folder = build_lora_sd(str(tmp_path / "sd"))
    eager, comp = StableDiffusionPipeline.from_pretrained(folder), StableDiffusionPipeline.from_pretrained(folder)
    names = [n for n in targets(eager.unet) if ".attn" in n]
    files = [save(peft(eager.unet, "unet", names, seed=s), str(tmp_path / f"{s}.safetensors")) for s in (1, 2)]
    comp.unet.compile()
    graphs = torch._dynamo.utils.counters["stats"]
    kw = unet_inputs(eager.unet)
    swaps = [("no LoRA", lambda p: None),
             ("load_lora_weights a", lambda p: p.load_lora_weights(files[0], adapter_name="a")),
             ("load_lora_weights b", lambda p: p.load_lora_weights(files[1], adapter_name="b")),
             ("set_adapters a, b", lambda p: p.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])),
             ("set_adapters a, b again, other weights", lambda p: p.set_adapters(["a", "b"], adapter_weights=[0.3, 0.8])),
             ("unload_lora_weights", lambda p: p.unload_lora_weights())]
    seen = []
    with torch.no_grad():
        base = eager.unet(**kw).sample
        for what, swap in swaps:
            swap(eager)
            swap(comp)
            before = graphs["unique_graphs"]
            want, got = eager.unet(**kw).sample, comp.unet(**kw).sample
            seen.append((what, graphs["unique_graphs"] - before))
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=what)
            if what.startswith(("load", "set")):
                assert (want - base).abs().max() > 1e-3, what  # the adapter changed the output
    print("new graphs compiled per swap:", seen)
