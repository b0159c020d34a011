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


UNIPC_SOLVERS = [dict(solver_order=o, solver_type=t, prediction_type=p, predict_x0=x0)
                 for o, t, p, x0 in itertools.product([1, 2, 3], ["bh1", "bh2"], ["epsilon", "v_prediction", "sample"],
                                                      [True, False])]
UNIPC_SCHEDULES = [dict(use_karras_sigmas=True), dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"),
                   dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min"), dict(timestep_spacing="trailing"),
                   dict(timestep_spacing="leading", steps_offset=1), dict(final_sigmas_type="sigma_min"),
                   dict(disable_corrector=[0, 2]), dict(thresholding=True, sample_max_value=1.5),
                   dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"),
                   dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)]


@pytest.mark.parametrize("solver", UNIPC_SOLVERS, ids=lambda d: "-".join(map(str, d.values())))
def test_unipc_solvers(solver):
    # (with final sigma 0 some orders give NaN on the last step in diffusers too: its own tests use sigma_min)
    check_loops("UniPCMultistepScheduler", dict(SD, **solver, final_sigmas_type="sigma_min"),
                steps=(7,) if solver["solver_order"] < 3 else (7, 20))


@pytest.mark.parametrize("schedule", UNIPC_SCHEDULES, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_unipc_schedules(schedule):
    check_loops("UniPCMultistepScheduler", dict(SD, **schedule), scale=3.0 if "thresholding" in schedule else 1)


def test_unipc_config_rules(tmp_path):
    a, b = (cls.from_config({**SD, "solver_type": "midpoint"}) for cls in (ours.UniPCMultistepScheduler,
                                                                            diffusers.UniPCMultistepScheduler))
    assert a.config.solver_type == b.config.solver_type == "bh2"
    a = ours.UniPCMultistepScheduler(**SD, disable_corrector=[1, 3])
    a.save_config(tmp_path)
    b = diffusers.UniPCMultistepScheduler.from_pretrained(tmp_path)
    assert b.config.disable_corrector == [1, 3]
    with pytest.raises(ValueError, match="solver_p=.* is not supported"):
        ours.UniPCMultistepScheduler(solver_p=ours.DDIMScheduler())


DEIS_CASES = [dict(solver_order=o, prediction_type=p) for o, p in itertools.product([1, 2, 3], ["epsilon", "v_prediction",
                                                                                                "sample"])] + [
    dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True, solver_order=3), dict(timestep_spacing="trailing"),
    dict(timestep_spacing="leading", steps_offset=1), dict(lower_order_final=False, solver_order=3),
    dict(thresholding=True, sample_max_value=1.5)]


@pytest.mark.parametrize("case", DEIS_CASES, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_deis(case):
    check_loops("DEISMultistepScheduler", dict(SD, **case), scale=3.0 if "thresholding" in case else 1)


def test_deis_config_rules():
    for extra in (dict(algorithm_type="dpmsolver++", solver_type="midpoint"), dict(solver_type="bh2")):
        a, b = (cls.from_config({**SD, **extra}) for cls in (ours.DEISMultistepScheduler,
                                                               diffusers.DEISMultistepScheduler))
        assert (a.config.algorithm_type, a.config.solver_type) == (b.config.algorithm_type, b.config.solver_type) == \
            ("deis", "logrho")
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver\\+\\+' is not supported"):
        ours.DEISMultistepScheduler(algorithm_type="sde-dpmsolver++")


SINGLE_SOLVERS = [dict(algorithm_type=a, solver_order=o, solver_type=t, prediction_type=p)
                  for a, o, t, p in itertools.product(["dpmsolver++", "sde-dpmsolver++", "dpmsolver"], [1, 2, 3],
                                                      ["midpoint", "heun"], ["epsilon", "v_prediction", "sample"])
                  if not (o == 1 and t == "heun")]
SINGLE_SCHEDULES = [dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
                    dict(final_sigmas_type="sigma_min", lower_order_final=False, solver_order=3),
                    dict(final_sigmas_type="sigma_min", lower_order_final=True, solver_order=3),
                    dict(thresholding=True, sample_max_value=1.5),
                    dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)]


@pytest.mark.parametrize("solver", SINGLE_SOLVERS, ids=lambda d: "-".join(map(str, d.values())))
def test_dpm_singlestep_solvers(solver):
    config = dict(SD, **solver)
    if solver["algorithm_type"] == "dpmsolver":
        config["final_sigmas_type"] = "sigma_min"
    check_loops("DPMSolverSinglestepScheduler", config, steps=(7,) if solver["solver_order"] < 3 else (7, 9))


@pytest.mark.parametrize("schedule", SINGLE_SCHEDULES, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_dpm_singlestep_schedules(schedule):
    a, b = both("DPMSolverSinglestepScheduler", **{**SD, **schedule})
    for n in (8, 9):  # an uneven count switches lower_order_final on, in the config too, as diffusers does
        for s in (a, b):
            s.set_timesteps(n)
        assert a.order_list == b.order_list and a.config.lower_order_final == b.config.lower_order_final
        compare_loop(a, b, start_sample() * (3.0 if "thresholding" in schedule else 1), fields=("prev_sample",),
                     seed=3)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                                  "UniPCMultistepScheduler", "DEISMultistepScheduler"])
def test_solvers_from_every_other_config(name, tmp_path):
    """Swapping among the solvers and the older schedulers keeps diffusers' config (mapped keys included)."""
    start = {"DDIMScheduler": dict(SD, clip_sample=False, timestep_spacing="trailing"),
             "EulerDiscreteScheduler": dict(SD, use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1),
             "UniPCMultistepScheduler": dict(SD, solver_type="bh1", final_sigmas_type="sigma_min"),
             "DEISMultistepScheduler": dict(SD, solver_order=3)}
    for source, config in start.items():
        src_a, src_b = both(source, **config)
        a, b = getattr(ours, name).from_config(src_a.config), getattr(diffusers, name).from_config(src_b.config)
        assert {k: v for k, v in a.config.items() if k != "_use_default_values"} == \
            {k: v for k, v in b.config.items() if k != "_use_default_values"}, source
        for s in (a, b):
            s.set_timesteps(8)
        compare_loop(a, b, start_sample(), fields=("prev_sample",), seed=1)
    a = getattr(ours, name)(**SD)
    a.save_pretrained(tmp_path)
    b = getattr(diffusers, name).from_pretrained(tmp_path)
    assert a.config["beta_schedule"] == b.config["beta_schedule"] and len(a) == len(b) == 1000
    assert sorted(c.__name__ for c in a.compatibles) == sorted(c.__name__ for c in b.compatibles
                                                                if hasattr(ours, c.__name__))


@pytest.mark.parametrize("name, extra", [("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
                                         ("DPMSolverMultistepScheduler", dict(thresholding=True)),
                                         ("DPMSolverSinglestepScheduler", dict(solver_order=3)),
                                         ("UniPCMultistepScheduler", dict(solver_order=3)),
                                         ("DEISMultistepScheduler", dict(solver_order=3))])
def test_solvers_in_float16(name, extra):
    """fp16 samples and model outputs (a pipeline in float16): the same dtype handling as diffusers."""
    a, b = both(name, **SD, **extra)
    for s in (a, b):
        s.set_timesteps(6)
    outs = compare_loop(a, b, start_sample(dtype=torch.float16), fields=("prev_sample",), seed=2)
    assert outs[-1].prev_sample.dtype == torch.float16
