"""Shared test helpers: tolerances stated once."""
import inspect

import torch


def assert_close(ours, ref, rel=1e-4, name="output"):
    """Max abs error within `rel` of the reference's scale (max |ref|), the project's fp32 tolerance."""
    ours, ref = torch.as_tensor(ours).float(), torch.as_tensor(ref).float()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    scale = ref.abs().max().clamp_min(1e-12)
    err = (ours - ref).abs().max()
    assert err <= rel * scale, f"{name}: max abs error {err.item():.3g} > {rel} x scale {scale.item():.3g}"


def seeded_(module, seed=0, std=0.05):
    """Fill every parameter with seeded random values (diffusers' inits leave many at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # norm scales around 1, everything else around 0
            base = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * std + base)
    return module


# ---------------------------------------------------------------------------------------------
# Schedulers: a fake model and a pipeline's loop, run on minidiff's and diffusers' schedulers side by side


def fake_unet(x, t):
    """A deterministic stand-in for the UNet: a smooth function of the sample and the timestep."""
    return torch.sin(1.3 * x + float(t) / 250.0) * 0.8 + 0.1 * x


def start_sample(seed=0, dtype=torch.float32):
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed)).to(dtype)


def run_loop(sched, x, timesteps=None, seed=None, **step_kwargs):
    """A pipeline's loop (a generator goes to schedulers whose step takes one); returns the step outputs."""
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    g = torch.Generator().manual_seed(seed) if seed is not None and takes_generator else None
    outs = []
    for t in (sched.timesteps if timesteps is None else timesteps):
        eps = fake_unet(sched.scale_model_input(x, t), t)
        kw = dict(step_kwargs, **({"generator": g} if g is not None else {}))
        out = sched.step(eps, t, x, **kw)
        outs.append(out)
        x = out.prev_sample
    return outs


def compare_loop(a, b, x, fields=("prev_sample", "pred_original_sample"), rel=0.0, **kw):
    """Same timesteps (values and dtype) and the same output at every step: bit-exact by default, since the
    schedulers do the same float operations as diffusers."""
    assert a.timesteps.dtype == b.timesteps.dtype, (a.timesteps.dtype, b.timesteps.dtype)
    assert torch.equal(a.timesteps, b.timesteps), (a.timesteps, b.timesteps)
    if hasattr(b, "sigmas"):
        assert torch.equal(a.sigmas, b.sigmas), (a.sigmas, b.sigmas)
    assert_close(torch.as_tensor(a.init_noise_sigma), torch.as_tensor(b.init_noise_sigma), name="init_noise_sigma")
    x = x * b.init_noise_sigma
    outs_a, outs_b = run_loop(a, x, **kw), run_loop(b, x, **kw)
    assert len(outs_a) == len(outs_b) > 0
    for i, (oa, ob) in enumerate(zip(outs_a, outs_b)):
        for f in fields:
            assert_close(getattr(oa, f), getattr(ob, f), rel=rel, name=f"step {i} {f}")
    return outs_a
