"""Issue 19: the Triton kernels equal their references (run under Triton's interpreter on CPU tensors),
and every model compiles with torch.compile(fullgraph=True): no graph break, eager == compiled."""
import os
import subprocess
import sys

import pytest
import torch

import utils
from minidiff import kernels, lora, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The kernel checks run in one subprocess: TRITON_INTERPRET=1 must be set before triton is imported.
# Tolerances: max |kernel - fp32 reference| <= TOL[dtype] x max |reference|. The kernels compute in fp32
# and round once; the references round at each step in fp16/bf16, hence a few ulps of the dtype.
KERNEL_CHECKS = r"""
import os
import torch
DEVICE = os.environ.get("KERNEL_TEST_DEVICE", "cpu")  # cpu: interpreted; cuda: native (bench/gpu.sh)
from minidiff import kernels, ops
from minidiff.kernels.group_norm import group_norm
from minidiff.kernels.layer_norm import layer_norm
from minidiff.kernels.geglu import geglu
from minidiff.kernels.lora_linear import lora_linear
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
g = torch.Generator().manual_seed(0)
def rand(*shape, std=1.0):
    return (torch.randn(*shape, generator=g) * std).to(DEVICE)
def check(name, ours, ref32, dtype):
    assert ours.dtype == dtype and ours.shape == ref32.shape, (name, ours.dtype, ours.shape, ref32.shape)
    err = (ours.float() - ref32).abs().max().item()
    scale = ref32.abs().max().clamp_min(1e-6).item()
    assert err <= TOL[dtype] * scale, f"{name} {dtype}: max error {err:.3g} > {TOL[dtype]} x {scale:.3g}"
def f32(t):
    return None if t is None else t.float()
def nchw_to_cl(t):
    return t.contiguous(memory_format=torch.channels_last)
for dt in (torch.float32, torch.float16, torch.bfloat16):
    # group norm: odd sizes, one group, one channel per group, channels_last, non-contiguous, 3-D input
    for shape, groups, layout in [((2, 6, 5, 3), 3, "nchw"), ((1, 4, 7, 7), 1, "nchw"), ((2, 8, 3, 5), 8, "nchw"),
                                  ((2, 6, 5, 3), 2, "channels_last"), ((1, 12, 9, 1), 4, "channels_last"),
                                  ((2, 6, 11), 3, "nchw"), ((2, 6, 8, 6), 3, "sliced")]:
        x = rand(*shape).to(dt)
        x = nchw_to_cl(x) if layout == "channels_last" else x[..., ::2] if layout == "sliced" else x
        for affine in (True, False):
            w, b = (rand(shape[1]).to(dt), rand(shape[1]).to(dt)) if affine else (None, None)
            for silu in (False, True):
                out = group_norm(x, groups, w, b, 1e-5, silu=silu)
                check(f"group_norm {shape} G={groups} {layout} affine={affine} silu={silu}", out,
                      ops.ref_group_norm(x.float(), groups, f32(w), f32(b), 1e-5, silu=silu), dt)
                if layout == "channels_last":
                    assert out.is_contiguous(memory_format=torch.channels_last)
    # layer norm: last dim (odd, 1, wider than one block), affine-free, non-contiguous rows, dim=1 maps
    for shape, dim, sliced in [((2, 5, 7), -1, False), ((3, 33), -1, False), ((1, 1, 1), -1, False),
                               ((2, 4, 4099), -1, False), ((4, 9, 10), -1, True), ((2, 6, 3, 5), 1, False)]:
        x = rand(*shape).to(dt) * 3 + 1
        x = x[:, :, ::2] if sliced else x
        c = x.shape[dim]
        for affine in (True, False):
            w, b = (rand(c).to(dt), rand(c).to(dt)) if affine else (None, None)
            check(f"layer_norm {tuple(x.shape)} dim={dim} affine={affine}", layer_norm(x, w, b, 1e-6, dim=dim),
                  ops.ref_layer_norm(x.float(), f32(w), f32(b), 1e-6, dim=dim), dt)
    # GEGLU: odd widths, one pair, a transposed (non-contiguous) input
    for h in [rand(2, 5, 14, std=3), rand(3, 2), rand(1, 9, 66, std=3), rand(4, 10, 6).transpose(1, 2)]:
        h = h.to(dt)
        check(f"geglu {tuple(h.shape)}", geglu(h), ops.ref_geglu(h.float()), dt)
    # LoRA linear: odd sizes, several adapters of different ranks, with and without biases, a 3-D input
    for lead, k, n, ranks, has_bias in [((2, 5), 33, 17, [4], True), ((3,), 40, 70, [2, 3], False),
                                        ((1,), 7, 5, [1], True), ((2, 3), 64, 64, [8], False)]:
        x = rand(*lead, k).to(dt)
        w, b = rand(n, k, std=0.1).to(dt), rand(n).to(dt) if has_bias else None
        loras = [(rand(r, k, std=0.1).to(dt), rand(n, r, std=0.1).to(dt), rand(n).to(dt) if i == 0 else None, 0.7 + i)
                 for i, r in enumerate(ranks)]
        loras32 = [(d.float(), u.float(), f32(c), s) for d, u, c, s in loras]
        check(f"lora_linear {lead} {k}->{n} ranks {ranks}", lora_linear(x, w, b, loras),
              ops.ref_lora_linear(x.float(), f32(w), f32(b), loras32), dt)
# backward: the reference's gradient, for every input that asks for one (LoRA training goes through here)
def grads(fn, *inputs):
    inputs = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*inputs)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)).pow(2).sum().backward()
    return [t.grad for t in inputs if t is not None]
for fn_k, fn_r, shapes in [(lambda x, w, b: group_norm(x, 3, w, b, 1e-5, silu=True),
                            lambda x, w, b: ops.ref_group_norm(x, 3, w, b, 1e-5, silu=True), [(2, 6, 5), (6,), (6,)]),
                           (lambda x, w, b: layer_norm(x, w, b, 1e-5), lambda x, w, b: ops.ref_layer_norm(x, w, b, 1e-5),
                            [(7, 6), (6,), (6,)]),
                           (geglu, ops.ref_geglu, [(7, 12)]),
                           (lambda x, w, a, u: lora_linear(x, w, None, [(a, u, None, 0.5)]),
                            lambda x, w, a, u: ops.ref_lora_linear(x, w, None, [(a, u, None, 0.5)]), [(7, 6), (5, 6), (2, 6), (5, 2)])]:
    inputs = [rand(*s) for s in shapes]
    for a, b in zip(grads(fn_k, *inputs), grads(fn_r, *inputs)):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (a - b).abs().max()
# through the seam and through torch.compile: a resnet-style norm+SiLU, a layer norm, a GEGLU feed-forward
# with a LoRA on its projection (the ops every UNet block runs), kernels on vs the references
from minidiff import lora
class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = ops.GroupNorm(2, 8), ops.LayerNorm(8)
        self.proj, self.out = torch.nn.Linear(8, 16), torch.nn.Linear(8, 8)
    def forward(self, x):
        h = self.norm1(x, silu=True).flatten(2).transpose(1, 2)
        return self.out(ops.geglu(self.proj(self.norm2(h))))
block = Block().to(DEVICE)
lora.load_lora_weights(block, {"unet.proj.lora_A.weight": rand(2, 8), "unet.proj.lora_B.weight": rand(16, 2)}, verbose=False)
x = rand(2, 8, 3, 3)
with torch.no_grad():
    ref = block(x)
    seen = []
    with kernels.use("triton"):
        counted = {n: (lambda f, n: lambda *a, **k: (seen.append(n), f(*a, **k))[1])(f, n) for n, f in ops.current().items() if n in kernels.KERNELS}
        with ops.use(**counted):
            out = block(x)
        assert set(seen) == {"group_norm", "layer_norm", "geglu", "lora_linear"}, seen
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        # the custom ops trace (fake implementations) and run inside one compiled graph, no break
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    assert (compiled - ref).abs().max() <= 1e-5 * ref.abs().max()
print("ok")
"""


def run_kernel_checks(**env):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    r = subprocess.run([sys.executable, "-c", KERNEL_CHECKS], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


def test_triton_kernels_match_references_interpreted():
    pytest.importorskip("triton")  # the [triton] extra; the test extra installs it
    run_kernel_checks(TRITON_INTERPRET="1", KERNEL_TEST_DEVICE="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu.sh runs it)")
def test_triton_kernels_match_references_on_cuda():
    pytest.importorskip("triton")
    run_kernel_checks(TRITON_INTERPRET="0", KERNEL_TEST_DEVICE="cuda")


def with_lora(build):
    """A tiny UNet with a LoRA on an attention projection and on a resnet conv (the LoRA seam ops)."""
    def built():
        unet, run = build()
        g = torch.Generator().manual_seed(3)
        names = [n for n, m in unet.named_modules() if n.endswith("attn2.to_k") or n.endswith("resnets.0.conv1")][:4]
        sd = {}
        for n in names:
            m = unet.get_submodule(n)
            shape = (m.in_features,) if isinstance(m, torch.nn.Linear) else (m.in_channels, *m.kernel_size)
            out = m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels
            sd[f"unet.{n}.lora_A.weight"] = torch.randn(2, *shape, generator=g) * 0.1
            sd[f"unet.{n}.lora_B.weight"] = torch.randn(out, 2, *(1,) * (len(shape) - 1), generator=g) * 0.1
        lora.load_lora_weights(unet, sd, verbose=False)
        assert len(lora.lora_layers(unet)) == len(names) >= 2
        return unet, run
    return built


def vae_decode():
    m, _ = utils.autoencoder_kl()
    return m, lambda: m.decode(utils.rand(1, 4, 8, 8)).sample


MODELS = {"unet_sd_lora": with_lora(utils.unet_sd), "unet_sdxl_lora": with_lora(utils.unet_sdxl), "vae_decode": vae_decode,
          "clip_text": utils.clip_text, "clip_text_projection": utils.clip_text_projection,
          "wuerstchen_prior": utils.wuerstchen_prior, "wuerstchen_diffnext": utils.wuerstchen_diffnext}


def compiled_equals_eager(build, backend):
    model, run = build()
    utils.seeded_(model)
    model.eval()
    torch._dynamo.reset()
    with torch.no_grad():
        ref = run()
        method = "decode" if build is vae_decode else "forward"
        # fullgraph=True: any graph break raises here; explain counts them too
        explanation = torch._dynamo.explain(getattr(model, method))
        setattr(model, method, torch.compile(getattr(model, method), fullgraph=True, backend=backend))
        out = run()
    return ref, out


@pytest.mark.parametrize("name", MODELS)
def test_models_compile_fullgraph(name):
    """Dynamo captures every model whole (references through the ops seam, LoRA loaded on the UNets):
    no graph break, compiled output equal to eager. backend="eager" checks the capture, not Inductor's
    code (that is the opt-in `compile` marker below: slow on 2 cores)."""
    ref, out = compiled_equals_eager(MODELS[name], "eager")
    utils.assert_close(out, ref, rel=0, name=name)


@pytest.mark.compile
@pytest.mark.parametrize("name", ["unet_sd_lora", "unet_sdxl_lora"])
def test_unet_inductor_matches_eager(name):
    """Opt-in (pytest -m compile): Inductor's generated code for the tiny UNets equals eager within 1e-4."""
    ref, out = compiled_equals_eager(MODELS[name], "inductor")
    utils.assert_close(out, ref, rel=1e-4, name=name)


def test_kernels_use_switches_the_seam_and_says_what_is_wrong():
    with kernels.use("reference"):
        assert ops.current()["group_norm"] is ops.ref_group_norm
    with pytest.raises(ValueError, match="choose one of"):
        kernels.use("cuda")
    env = {**os.environ, "MINIDIFF_KERNELS": "triton", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "import minidiff; from minidiff import ops; print(sorted(n for n, f in ops.current().items() if f.__module__.startswith('minidiff.kernels')))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == str(sorted(kernels.KERNELS)), r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", "import minidiff"], env={**env, "MINIDIFF_KERNELS": "cuda"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "MINIDIFF_KERNELS='cuda'" in r.stderr
    # CPU tensors take the reference (no interpreter in this process): bit-identical
    x = utils.rand(2, 8, 5, 5)
    with kernels.use("triton"):
        assert torch.equal(ops.group_norm(x, 4, None, None, 1e-5, silu=True), ops.ref_group_norm(x, 4, None, None, 1e-5, silu=True))
