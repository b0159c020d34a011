"""The DPM-Solver family (issue 15) against diffusers 0.39: timesteps and sigmas for each spacing and sigma
schedule, every step of whole loops (bit-exact: the same float operations in the same order), seeded SDE
noise, and the config swaps diffusers' own tests make."""
import itertools
import warnings

import diffusers
import pytest
import torch

from minidiff import schedulers as ours
from tests.utils import compare_loop, start_sample

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
warnings.filterwarnings("ignore", message=".*deprecated.*", category=FutureWarning)


def both(name, **config):
    return getattr(ours, name)(**config), getattr(diffusers, name)(**config)


def check_loops(name, config, steps=(7, 20), scale=1.0):
    a, b = both(name, **config)
    for n in steps:
        for s in (a, b):
            s.set_timesteps(n)
        compare_loop(a, b, start_sample() * scale, fields=("prev_sample",), seed=3)


DPM_SOLVERS = [dict(algorithm_type=a, solver_order=o, solver_type=t, prediction_type=p)
               for a, o, t, p in itertools.product(["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"],
                                                   [1, 2, 3], ["midpoint", "heun"], ["epsilon", "v_prediction", "sample"])
               if not (a == "sde-dpmsolver" and o == 3) and not (o == 1 and t == "heun")]
DPM_SCHEDULES = [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
                 dict(use_lu_lambdas=True), dict(use_lu_lambdas=True, use_karras_sigmas=True),
                 dict(use_lu_lambdas=True, use_exponential_sigmas=True), dict(timestep_spacing="trailing"),
                 dict(timestep_spacing="leading", steps_offset=1), dict(final_sigmas_type="sigma_min"),
                 dict(euler_at_final=True), dict(lower_order_final=False), dict(beta_schedule="squaredcos_cap_v2",
                                                                               lambda_min_clipped=-5.1),
                 dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"),
                 dict(thresholding=True, sample_max_value=1.5),
                 dict(algorithm_type="dpmsolver", thresholding=True, final_sigmas_type="sigma_min"),
                 dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++", solver_order=2)]  # "DPM++ 2M SDE Karras"


@pytest.mark.parametrize("solver", DPM_SOLVERS, ids=lambda d: "-".join(map(str, d.values())))
def test_dpm_multistep_solvers(solver):
    config = dict(SD, **solver)
    if solver["algorithm_type"] in ("dpmsolver", "sde-dpmsolver"):
        config["final_sigmas_type"] = "sigma_min"  # diffusers refuses "zero" for these
    check_loops("DPMSolverMultistepScheduler", config, steps=(7,) if solver["solver_order"] < 3 else (7, 20))


@pytest.mark.parametrize("schedule", DPM_SCHEDULES, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_dpm_multistep_schedules(schedule):
    exact = not schedule.get("use_beta_sigmas")  # beta quantiles without scipy: equal within float64 rounding
    if exact:
        check_loops("DPMSolverMultistepScheduler", dict(SD, **schedule), scale=3.0 if "thresholding" in schedule else 1)
    else:
        a, b = both("DPMSolverMultistepScheduler", **SD, **schedule)
        for s in (a, b):
            s.set_timesteps(12)
        assert torch.allclose(a.sigmas, b.sigmas, rtol=1e-6, atol=0) and torch.equal(a.timesteps, b.timesteps)
        a.sigmas = b.sigmas.clone()
        compare_loop(a, b, start_sample(), fields=("prev_sample",))


def test_dpm_multistep_custom_timesteps_img2img_and_noise():
    a, b = both("DPMSolverMultistepScheduler", **SD)
    for s in (a, b):
        s.set_timesteps(timesteps=[999, 850, 600, 401, 250, 90, 12])
    compare_loop(a, b, start_sample(), fields=("prev_sample",))
    a, b = both("DPMSolverMultistepScheduler", **SD, algorithm_type="sde-dpmsolver++")
    x0, noise = start_sample(1), start_sample(2)
    for s in (a, b):  # img2img: enter the loop mid-way, noise at the begin index
        s.set_timesteps(10)
        s.set_begin_index(4)
    assert torch.equal(a.add_noise(x0, noise, a.timesteps[4:5]), b.add_noise(x0, noise, b.timesteps[4:5]))
    outs = compare_loop(a, b, start_sample(), fields=("prev_sample",), timesteps=a.timesteps[4:], seed=5)
    # variance_noise replaces the generator's draw
    for s in (a, b):
        s.set_timesteps(4)
    v = start_sample(9)
    ra = a.step(start_sample(), a.timesteps[0], start_sample(), variance_noise=v).prev_sample
    rb = b.step(start_sample(), b.timesteps[0], start_sample(), variance_noise=v).prev_sample
    assert torch.equal(ra, rb) and len(outs) == 6


def test_dpm_multistep_config_rules():
    # DEIS's and UniPC's own keys map as in diffusers (algorithm_type deis -> dpmsolver++, bh2 -> midpoint)
    for extra in (dict(algorithm_type="deis", solver_type="logrho", final_sigmas_type="sigma_min"),
                  dict(solver_type="bh2")):
        a, b = (cls.from_config({**SD, **extra}) for cls in (ours.DPMSolverMultistepScheduler,
                                                               diffusers.DPMSolverMultistepScheduler))
        assert a.config.algorithm_type == b.config.algorithm_type == "dpmsolver++"
        assert a.config.solver_type == b.config.solver_type == "midpoint"
    for algorithm in ("dpmsolver", "deis"):  # diffusers refuses these as well
        with pytest.raises(ValueError, match=f"final_sigmas_type='zero' is not supported with algorithm_type='{algorithm}'"):
            ours.DPMSolverMultistepScheduler(algorithm_type=algorithm)
    with pytest.raises(ValueError, match="use_karras_sigmas=True and use_beta_sigmas=True: choose at most one"):
        ours.DPMSolverMultistepScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="use_flow_sigmas=True is not supported"):
        ours.DPMSolverMultistepScheduler(use_flow_sigmas=True)
    with pytest.raises(ValueError, match="custom timesteps cannot be used with use_karras_sigmas"):
        ours.DPMSolverMultistepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[900, 500])
