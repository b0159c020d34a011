"""k-diffusion (crowsonkb's k_diffusion.sampling, the samplers A1111 runs) as a second, independent reference:
minidiff's Heun, DPM2, DPM2 ancestral, Euler ancestral and LMS on the same Karras sigmas and the same model
agree with it within 1e-5 of scale, step by step.

How k-diffusion is imported: its package __init__ imports its training modules, which import torchvision
(and k_diffusion/utils.py imports torchvision at top level); PyPI's torchvision does not import beside torch
2.13 CPU. So k-diffusion is installed with `pip install --no-deps k-diffusion` (see .ci/run) plus what
sampling.py imports (scipy, torchsde, torchdiffeq, tqdm: setup.py's test extra), and this file registers a
bare `k_diffusion` package (no __init__ run) and a `k_diffusion.utils` holding the one helper sampling.py and
external.py use (append_dims, copied from k_diffusion/utils.py), then imports the real sampling.py and
external.py from the installed package.
"""
import functools
import importlib
import importlib.util
import sys
import types

import pytest
import torch

from minidiff import schedulers
from utils import assert_close

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@functools.lru_cache(maxsize=None)
def import_k_diffusion():
    spec = importlib.util.find_spec("k_diffusion")
    assert spec is not None, "k-diffusion is a test dependency: pip install --no-deps k-diffusion (see .ci/run)"
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        utils = types.ModuleType("k_diffusion.utils")

        def append_dims(x, target_dims):  # k_diffusion/utils.py's, verbatim in effect
            return x[(...,) + (None,) * (target_dims - x.ndim)]
        utils.append_dims = append_dims
        package.utils = utils
        sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    return importlib.import_module("k_diffusion.sampling"), importlib.import_module("k_diffusion.external")


class EpsModel(torch.nn.Module):
    """A fixed stand-in for an eps-predicting UNet, taking (scaled input, timestep)."""

    def __init__(self, uses_t=True):
        super().__init__()
        self.uses_t = uses_t

    def forward(self, x, t):
        t = torch.as_tensor(t).to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return torch.sin(1.3 * x + (t / 250.0 if self.uses_t else 0.0)) * 0.8 + 0.1 * x


def minidiff_run(sched, model, x, generator=None):
    """The pipeline loop; returns x at the start of each step (every first call) and the final x."""
    starts = []
    for t in sched.timesteps:
        if getattr(sched, "state_in_first_order", True):
            starts.append(x)
        kw = {"generator": generator} if generator is not None else {}
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return starts, x


def k_run(sampler, denoiser, x, sigmas, generator=None):
    starts = []
    kw = {"noise_sampler": lambda s, s_next: torch.randn(x.shape, generator=generator)} if generator else {}
    out = sampler(denoiser, x, sigmas, callback=lambda info: starts.append(info["x"]), disable=True, **kw)
    return starts, out


# (minidiff scheduler, k-diffusion sampler, stochastic, the model sees t)
CASES = {
    "Heun": ("HeunDiscreteScheduler", "sample_heun", False, True),
    "LMS": ("LMSDiscreteScheduler", "sample_lms", False, True),
    "Euler a": ("EulerAncestralDiscreteScheduler", "sample_euler_ancestral", True, True),
    # diffusers' KDPM2 rounds its Karras timesteps (not the midpoints'), k-diffusion's wrapper does not: the model
    # ignores t here, so what is compared is the sampler (sigmas, midpoints, input scaling, steps, noise)
    "DPM2": ("KDPM2DiscreteScheduler", "sample_dpm_2", False, False),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", "sample_dpm_2_ancestral", True, False),
    # DPM-Solver++ works on x_vp = x / sqrt(sigma^2 + 1) (minidiff and diffusers) where k-diffusion has x: both
    # start from the same state and are compared in k-diffusion's form; its Karras timesteps are rounded too
    "DPM++ 2M": ("DPMSolverMultistepScheduler", "sample_dpmpp_2m", False, False),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", "sample_dpmpp_2m_sde", True, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_k_diffusion_on_karras_sigmas(case):
    sampling, external = import_k_diffusion()
    name, sampler, stochastic, uses_t = CASES[case]
    n = 8
    cls = getattr(schedulers, name)
    if "use_karras_sigmas" in cls.config_dataclass.__dataclass_fields__:
        extra = {"algorithm_type": "sde-dpmsolver++"} if case == "DPM++ 2M SDE" else {}
        sched = cls(**SD, use_karras_sigmas=True, **extra)
        sched.set_timesteps(n)
    else:  # Euler a has no Karras option (as in diffusers): give it the Karras loop directly
        sched = cls(**SD)
        sched.set_timesteps(n)
        heun = schedulers.HeunDiscreteScheduler(**SD, use_karras_sigmas=True)
        heun.set_timesteps(n)
        sched.sigmas = torch.cat([heun.sigmas[0::2], heun.sigmas[-1:]])
        sched.timesteps = heun.timesteps[0::2].clone()
    model = EpsModel(uses_t)
    # k-diffusion's own Karras sigmas between the training schedule's ends, and its own DDPM eps wrapper
    denoiser = external.DiscreteEpsDDPMDenoiser(model, sched.alphas_cumprod, quantize=False)
    sigmas = sampling.get_sigmas_karras(n, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    distinct = torch.unique_consecutive(sched.sigmas)
    assert_close(distinct, sigmas, rel=1e-6, name="Karras sigmas")

    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    g1 = torch.Generator().manual_seed(7) if stochastic else None
    g2 = torch.Generator().manual_seed(7) if stochastic else None
    ours, ours_out = minidiff_run(sched, model, noise * sched.init_noise_sigma, g1)
    vp = name == "DPMSolverMultistepScheduler"
    if vp:  # to k-diffusion's x = x_vp sqrt(sigma^2 + 1)
        ours = [x * (s ** 2 + 1) ** 0.5 for x, s in zip(ours, sched.sigmas)]
    start = noise * ((sigmas[0] ** 2 + 1) ** 0.5 if vp else sigmas[0])
    ref, ref_out = k_run(getattr(sampling, sampler), denoiser, start, sigmas, g2)
    assert len(ours) == len(ref) == n
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, rel=1e-5, name=f"{case} x at step {i}")
    assert_close(ours_out, ref_out, rel=1e-5, name=f"{case} result")


@pytest.mark.parametrize("case", ["DPM++ 2M Karras", "DPM++ 2M SDE Karras"])
def test_dpm_solver_matches_k_diffusion(case):
    """DPM++ 2M (SDE) Karras: diffusers' form works on x_vp = x / sqrt(sigma^2 + 1) with log-SNR time, k-diffusion's
    on x itself with t = -log sigma (the same time): the states agree after that rescaling."""
    sampling, external = import_k_diffusion()
    sde = "SDE" in case
    n = 8
    sched = schedulers.DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True,
                                                   algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++")
    sched.set_timesteps(n)
    model = EpsModel(uses_t=False)  # diffusers rounds the Karras timesteps, k-diffusion's wrapper does not
    denoiser = external.DiscreteEpsDDPMDenoiser(model, sched.alphas_cumprod, quantize=False)
    sigmas = sampling.get_sigmas_karras(n, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    assert_close(sched.sigmas, sigmas, rel=1e-6, name="Karras sigmas")
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    # (diffusers starts the solvers from plain noise, init_noise_sigma 1; here both start from the same state)
    ours, ours_out = minidiff_run(sched, model, noise * sigmas[0] / (sigmas[0] ** 2 + 1) ** 0.5, g1 if sde else None)
    sampler = sampling.sample_dpmpp_2m_sde if sde else sampling.sample_dpmpp_2m
    ref, ref_out = k_run(sampler, denoiser, noise * sigmas[0], sigmas, g2 if sde else None)
    assert len(ours) == len(ref) == n
    for i, (a, b) in enumerate(zip(ours, ref)):  # x_vp = x / sqrt(sigma^2 + 1)
        assert_close(a, b / (sigmas[i] ** 2 + 1) ** 0.5, rel=1e-5, name=f"{case} x at step {i}")
    assert_close(ours_out, ref_out, rel=1e-5, name=f"{case} result")
