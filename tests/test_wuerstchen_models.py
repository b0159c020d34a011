"""Würstchen v2 stage C prior, stage B DiffNeXt, stage A Paella VQGAN and the DDPMWuerstchen
scheduler against diffusers 0.39, on tiny configs with seeded random weights."""
import json

import pytest
import torch

from tests.utils import assert_close, seeded_

from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel as RefVQ
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext import WuerstchenDiffNeXt as RefDiffNeXt
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior import WuerstchenPrior as RefPrior

from minidiff.models.paella_vq import PaellaVQModel
from minidiff.models.wuerstchen_diffnext import WuerstchenDiffNeXt
from minidiff.models.wuerstchen_prior import WuerstchenPrior

PRIOR = dict(c_in=4, c=32, c_cond=24, c_r=16, depth=2, nhead=2, dropout=0.1)
DIFFNEXT = dict(c_in=4, c_out=4, c_r=16, patch_size=2, c_cond=16, c_hidden=[8, 16, 32, 32], nhead=[-1, 2, 4, 4],
                blocks=[1, 1, 1, 1], level_config=["CT", "CTA", "CTA", "CTA"], inject_effnet=[False, True, True, True],
                effnet_embd=4, clip_embd=12, kernel_size=3, dropout=0.1)
# three levels, repeated blocks, effnet on the outer levels only, a per-level dropout list, 5x5 kernels
DIFFNEXT_ALT = dict(c_in=4, c_out=4, c_r=17, patch_size=1, c_cond=8, c_hidden=[8, 16, 16], nhead=[2, -1, 4],
                    blocks=[2, 1, 2], level_config=["CTA", "CT", "CTA"], inject_effnet=[True, False, True],
                    effnet_embd=3, clip_embd=10, kernel_size=5, dropout=[0.1, 0.0, 0.1])
VQ = dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=2, embed_dim=16,
          latent_channels=4, num_vq_embeddings=32, scale_factor=0.3764)


def saved(ref, folder, seed=0):
    seeded_(ref, seed)
    ref.eval().save_pretrained(folder)
    return ref


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


# ---- stage C prior ----

def test_prior_matches_diffusers(tmp_path):
    ref = saved(RefPrior(**PRIOR), tmp_path)
    ours = WuerstchenPrior.from_pretrained(tmp_path)
    x, c = torch.randn(2, 4, 6, 5), torch.randn(2, 7, 24)
    r = torch.tensor([0.93, 0.12])
    with torch.no_grad():
        want = ref(x, r, c)
        got = ours(x, r, c)
    assert_close(got, want, name="prior")
    assert ours.config.depth == 2 and ours.dtype == torch.float32


def test_prior_rejects_mismatched_weights(tmp_path):
    saved(RefPrior(**PRIOR), tmp_path)
    edit_config(tmp_path, c_r=32)
    with pytest.raises(ValueError, match=r"wrong shapes.*blocks\.1\.mapper\.weight"):
        WuerstchenPrior.from_pretrained(tmp_path)


def test_prior_rejects_bad_nhead(tmp_path):
    saved(RefPrior(**PRIOR), tmp_path)
    edit_config(tmp_path, nhead=3)
    with pytest.raises(ValueError, match=r"config\.json: nhead=3 must be a positive divisor of c=32"):
        WuerstchenPrior.from_pretrained(tmp_path)


# ---- stage B DiffNeXt ----

@pytest.mark.parametrize("cfg", [DIFFNEXT, DIFFNEXT_ALT], ids=["default-layout", "alt-layout"])
def test_diffnext_matches_diffusers(tmp_path, cfg):
    ref = saved(RefDiffNeXt(**cfg), tmp_path)
    ours = WuerstchenDiffNeXt.from_pretrained(tmp_path)
    # effnet 6x6: upsampled at the outer levels, antialias-downsampled at the inner ones
    size = 32 // cfg["patch_size"]  # 16x16 tokens at the first level
    x, effnet = torch.randn(2, 4, size, size), torch.randn(2, cfg["effnet_embd"], 6, 6)
    clip, r = torch.randn(2, 5, cfg["clip_embd"]), torch.tensor([0.7, 0.05])
    with torch.no_grad():
        want = ref(x, r, effnet, clip)
        got = ours(x, r, effnet, clip)
        want_ab = ref(x, r, effnet, clip, return_noise=False)
        got_ab = ours(x, r, effnet, clip, return_noise=False)
    assert_close(got, want, name="diffnext")
    assert_close(got_ab[0], want_ab[0], name="a")
    assert_close(got_ab[1], want_ab[1], name="b")


def test_diffnext_rejects_unknown_block_type(tmp_path):
    saved(RefDiffNeXt(**DIFFNEXT), tmp_path)
    edit_config(tmp_path, level_config=["CT", "CTX", "CTA", "CTA"])
    with pytest.raises(ValueError, match=r"level_config\[1\]='CTX' has unknown block types \['X'\]"):
        WuerstchenDiffNeXt.from_pretrained(tmp_path)


def test_diffnext_rejects_ragged_level_lists(tmp_path):
    saved(RefDiffNeXt(**DIFFNEXT), tmp_path)
    edit_config(tmp_path, blocks=[1, 1, 1])
    with pytest.raises(ValueError, match=r"blocks=\[1, 1, 1\] needs one entry per level \(4 levels"):
        WuerstchenDiffNeXt.from_pretrained(tmp_path)


def test_diffnext_rejects_mismatched_weights(tmp_path):
    saved(RefDiffNeXt(**DIFFNEXT), tmp_path)
    edit_config(tmp_path, inject_effnet=[True, True, True, True])
    expected = r"(?s)missing keys: effnet_mappers\.0\.bias.*wrong shapes: down_blocks\.0\.0\.channelwise\.0\.weight"
    with pytest.raises(ValueError, match=expected):
        WuerstchenDiffNeXt.from_pretrained(tmp_path)


# ---- stage A Paella VQGAN ----

def vq_reference(folder):
    ref = seeded_(RefVQ(**VQ))
    # BatchNorm statistics are buffers seeded_ leaves at 0 / 1
    bn = ref.down_blocks[-1][1]
    g = torch.Generator().manual_seed(1)
    bn.running_mean.copy_(torch.randn(4, generator=g) * 0.1)
    bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    ref.eval().save_pretrained(folder)
    return ref


def test_paella_vq_matches_diffusers(tmp_path):
    ref = vq_reference(tmp_path)
    edit_config(tmp_path, _class_name="VQModelPaella")  # older Hub configs' class name
    ours = PaellaVQModel.from_pretrained(tmp_path)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        # diffusers 0.39's encode(return_dict=True) raises a stale deprecation error: use the tuple form
        lat_ref, lat = ref.encode(x, return_dict=False)[0], ours.encode(x).latents
        assert_close(lat, lat_ref, name="latents")
        h = torch.randn(2, 4, 5, 6)
        assert_close(ours.decode(h).sample, ref.decode(h).sample, name="decode")
        q_ref = ref.decode(lat_ref, force_not_quantize=False).sample
        q = ours.decode(lat_ref, force_not_quantize=False).sample
        assert_close(q, q_ref, name="decode quantised")
        assert (q - ours.decode(lat_ref).sample).abs().max() > 1e-3  # quantising changed something
        assert_close(ours(x).sample, ref.decode(lat_ref).sample, name="forward")
    assert ours.config.scale_factor == 0.3764
    assert ours.encode(x, return_dict=False)[0].shape == (2, 4, 4, 4)


def test_paella_vq_rejects_mismatched_weights(tmp_path):
    vq_reference(tmp_path)
    edit_config(tmp_path, bottleneck_blocks=3)
    with pytest.raises(ValueError, match=r"missing keys: up_blocks\.3\.channelwise"):
        PaellaVQModel.from_pretrained(tmp_path)


# ---- scheduler ----

def sched_modules():
    from diffusers import DDPMWuerstchenScheduler as Ref

    from minidiff.schedulers import ddpm_wuerstchen
    return Ref, ddpm_wuerstchen


@pytest.mark.parametrize("scaler", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("custom", [False, True], ids=["linspace", "stage-c-default"])
def test_scheduler_matches_diffusers(tmp_path, scaler, custom):
    Ref, mod = sched_modules()
    ref = Ref(scaler=scaler, s=0.008)
    ref.save_config(tmp_path / "scheduler")
    ours = mod.DDPMWuerstchenScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert ours.config.scaler == scaler and ours.config["s"] == 0.008

    if custom:
        from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS
        assert mod.DEFAULT_STAGE_C_TIMESTEPS == [float(t) for t in DEFAULT_STAGE_C_TIMESTEPS]
        assert len(mod.DEFAULT_STAGE_C_TIMESTEPS) == 30
        ref.set_timesteps(timesteps=DEFAULT_STAGE_C_TIMESTEPS)
        ours.set_timesteps(timesteps=mod.DEFAULT_STAGE_C_TIMESTEPS)
    else:
        ref.set_timesteps(12)
        ours.set_timesteps(12)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert_close(ours.alpha_bar(ours.timesteps), ref._alpha_cumprod(ref.timesteps, "cpu"), name="alpha_bar")

    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    sample_ref = sample = torch.randn(2, 3, 4, 4)
    for t in ref.timesteps[:-1]:
        ratio = t.expand(2)
        eps = torch.randn(2, 3, 4, 4)
        sample_ref = ref.step(eps, ratio, sample_ref, generator=g_ref).prev_sample
        sample = ours.step(eps, ratio, sample, generator=g_ours).prev_sample
        assert_close(sample, sample_ref, name=f"step t={t.item():.3f}")
    # the last step added no noise but still drew it: both generators are at the same place
    assert torch.equal(torch.randn(3, generator=g_ours), torch.randn(3, generator=g_ref))


def test_scheduler_config_and_errors():
    Ref, mod = sched_modules()
    s = mod.DDPMWuerstchenScheduler.from_config(Ref(scaler=1.5).config)
    assert s.config.scaler == 1.5 and s.config["s"] == 0.008
    assert mod.DDPMWuerstchenScheduler(s=0.01).alpha_bar(0.5) != s.alpha_bar(0.5)
    noise, x0, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0.3, 0.9])
    assert_close(s.add_noise(x0, noise, t), Ref(scaler=1.5).add_noise(x0, noise, t), name="add_noise")
    with pytest.raises(ValueError, match="pass num_inference_steps or timesteps"):
        s.set_timesteps()
    s.set_timesteps(2)
    with pytest.raises(ValueError, match=r"timestep 0\.0000 is the last of the schedule"):
        s.step(noise, torch.zeros(2), x0)
    with pytest.raises(ValueError, match=r"from_config: scaler=-1 must be > 0"):
        mod.DDPMWuerstchenScheduler.from_config({"scaler": -1})
    with pytest.raises(ValueError, match=r"unknown config keys \['beta_end'\]"):
        mod.DDPMWuerstchenScheduler(beta_end=0.02)


# ---- real checkpoint layouts (meta device: no memory, no weights) ----

REAL = [
    (RefPrior, WuerstchenPrior, dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.1)),
    (RefDiffNeXt, WuerstchenDiffNeXt, {}),  # the defaults are warp-ai/wuerstchen's decoder
    (RefVQ, PaellaVQModel, {}),  # and its vqgan
]


@pytest.mark.parametrize("ref_cls,cls,cfg", REAL, ids=["prior", "diffnext", "vqgan"])
def test_real_sizes_have_diffusers_keys(ref_cls, cls, cfg, monkeypatch):
    if ref_cls is RefDiffNeXt:  # its weight init is quadratic in the block count: seconds at full size
        monkeypatch.setattr(RefDiffNeXt, "_init_weights", lambda self, m: None)
    with torch.device("meta"):
        ref = ref_cls(**cfg)
        ours = cls(cls.config_class(**cfg))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
