"""diffusers' own scheduler tests, in minidiff's words: the same deterministic sample and model
(tests/schedulers/test_schedulers.py: `dummy_sample_deter`, `dummy_model`), the same configs, and the sums
and means of the final sample that diffusers' tests expect (copied from its test files; tolerances theirs)."""
import inspect

import pytest
import torch

from minidiff import schedulers as ours

LINEAR = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
LINEAR_1100 = dict(LINEAR, num_train_timesteps=1100)
LCM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# test_scheduler_dpm_multi.py's config
DPM = dict(LINEAR, solver_order=2, prediction_type="epsilon", thresholding=False, sample_max_value=1.0,
           algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=False, euler_at_final=False,
           lambda_min_clipped=-float("inf"), variance_type=None, final_sigmas_type="sigma_min")
DEIS = dict(LINEAR, solver_order=2)  # test_scheduler_deis.py's
SINGLE = dict(LINEAR, solver_order=2, prediction_type="epsilon", thresholding=False, sample_max_value=1.0,
              algorithm_type="dpmsolver++", solver_type="midpoint", lambda_min_clipped=-float("inf"), variance_type=None,
              final_sigmas_type="sigma_min")  # test_scheduler_dpm_single.py's
UNIPC = dict(LINEAR, solver_order=2, solver_type="bh2", final_sigmas_type="sigma_min")  # test_scheduler_unipc.py's

# (test file: test name, scheduler, config, steps, expected sum, expected mean)
CASES = [
    ("euler: full_loop_no_noise", "EulerDiscreteScheduler", LINEAR_1100, 10, 10.0807, 0.0131),
    ("euler: full_loop_with_v_prediction", "EulerDiscreteScheduler", dict(LINEAR_1100, prediction_type="v_prediction"),
     10, 0.0002, 2.2676e-06),
    ("euler: full_loop_device_karras_sigmas", "EulerDiscreteScheduler", dict(LINEAR_1100, use_karras_sigmas=True), 10,
     124.52299499511719, 0.16213932633399963),
    ("euler_ancestral: full_loop_no_noise", "EulerAncestralDiscreteScheduler", LINEAR_1100, 10, 152.3192, 0.1983),
    ("euler_ancestral: full_loop_with_v_prediction", "EulerAncestralDiscreteScheduler",
     dict(LINEAR_1100, prediction_type="v_prediction"), 10, 108.4439, 0.1412),
    ("ddim: full_loop_no_noise", "DDIMScheduler", dict(LINEAR, clip_sample=True), 10, 172.0067, 0.223967),
    ("ddim: full_loop_with_v_prediction", "DDIMScheduler", dict(LINEAR, clip_sample=True, prediction_type="v_prediction"),
     10, 52.5302, 0.0684),
    ("ddim: full_loop_with_set_alpha_to_one", "DDIMScheduler",
     dict(LINEAR, clip_sample=True, set_alpha_to_one=True, beta_start=0.01), 10, 149.8295, 0.1951),
    ("ddim: full_loop_with_no_set_alpha_to_one", "DDIMScheduler",
     dict(LINEAR, clip_sample=True, set_alpha_to_one=False, beta_start=0.01), 10, 149.0784, 0.1941),
    ("pndm: full_loop_no_noise", "PNDMScheduler", LINEAR, 10, 198.1318, 0.2580),
    ("pndm: full_loop_with_v_prediction", "PNDMScheduler", dict(LINEAR, prediction_type="v_prediction"), 10,
     67.3986, 0.0878),
    ("pndm: full_loop_with_set_alpha_to_one", "PNDMScheduler", dict(LINEAR, set_alpha_to_one=True, beta_start=0.01), 10,
     230.0399, 0.2995),
    ("pndm: full_loop_with_no_set_alpha_to_one", "PNDMScheduler", dict(LINEAR, set_alpha_to_one=False, beta_start=0.01),
     10, 186.9482, 0.2434),
    ("lcm: full_loop_onestep", "LCMScheduler", LCM, 1, 18.7097, 0.0244),
    ("lcm: full_loop_multistep", "LCMScheduler", LCM, 10, 197.7616, 0.2575),
    ("dpm_multi: full_loop_no_noise", "DPMSolverMultistepScheduler", DPM, 10, None, 0.3301),
    ("dpm_multi: full_loop_no_noise_thres", "DPMSolverMultistepScheduler",
     dict(DPM, thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5), 10, None, 1.1364),
    ("dpm_multi: full_loop_with_v_prediction", "DPMSolverMultistepScheduler", dict(DPM, prediction_type="v_prediction"),
     10, None, 0.2251),
    ("dpm_multi: full_loop_with_karras_and_v_prediction", "DPMSolverMultistepScheduler",
     dict(DPM, prediction_type="v_prediction", use_karras_sigmas=True), 10, None, 0.2096),
    ("dpm_multi: full_loop_with_lu_and_v_prediction", "DPMSolverMultistepScheduler",
     dict(DPM, prediction_type="v_prediction", use_lu_lambdas=True), 10, None, 0.1554),
    ("unipc: full_loop_no_noise", "UniPCMultistepScheduler", UNIPC, 10, None, 0.2464),
    ("unipc: full_loop_with_karras", "UniPCMultistepScheduler", dict(UNIPC, use_karras_sigmas=True), 10, None, 0.2925),
    ("unipc: full_loop_with_v_prediction", "UniPCMultistepScheduler", dict(UNIPC, prediction_type="v_prediction"), 10,
     None, 0.1014),
    ("unipc: full_loop_with_karras_and_v_prediction", "UniPCMultistepScheduler",
     dict(UNIPC, prediction_type="v_prediction", use_karras_sigmas=True), 10, None, 0.1966),
    ("deis: full_loop_no_noise", "DEISMultistepScheduler", DEIS, 10, None, 0.23916),
    ("deis: full_loop_with_v_prediction", "DEISMultistepScheduler", dict(DEIS, prediction_type="v_prediction"), 10,
     None, 0.091),
    ("dpm_single: full_loop_no_noise", "DPMSolverSinglestepScheduler", SINGLE, 10, None, 0.2791),
    ("dpm_single: full_loop_with_karras", "DPMSolverSinglestepScheduler", dict(SINGLE, use_karras_sigmas=True), 10,
     None, 0.2248),
    ("dpm_single: full_loop_with_v_prediction", "DPMSolverSinglestepScheduler",
     dict(SINGLE, prediction_type="v_prediction"), 10, None, 0.1453),
    ("dpm_single: full_loop_with_karras_and_v_prediction", "DPMSolverSinglestepScheduler",
     dict(SINGLE, prediction_type="v_prediction", use_karras_sigmas=True), 10, None, 0.0649),
]


def dummy_sample_deter():
    """diffusers' deterministic test sample: arange over (3, 8, 8, 4) / its size, batch moved first."""
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def dummy_model(sample, t):
    t = t.reshape(-1, *(1,) * (sample.ndim - 1)).to(sample.dtype) if torch.is_tensor(t) else t
    return sample * t / (t + 1)


def full_loop(scheduler, steps, seed=0):
    """The loop of diffusers' scheduler tests (it feeds the scaled sample to step, as they do)."""
    scheduler.set_timesteps(steps)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    generator = {"generator": torch.manual_seed(seed)} if takes_generator else {}
    sample = dummy_sample_deter() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        sample = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(dummy_model(sample, t), t, sample, **generator).prev_sample
    return sample


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_diffusers_full_loop_numbers(case):
    _, name, config, steps, expected_sum, expected_mean = case
    sample = full_loop(getattr(ours, name)(**config), steps)
    tol = 1e-3 if name == "LCMScheduler" else 1e-2  # diffusers' own tolerances
    if expected_sum is not None:  # (diffusers' solver tests check the mean only)
        assert abs(sample.abs().sum().item() - expected_sum) < tol
    assert abs(sample.abs().mean().item() - expected_mean) < 1e-3


# test_switch of diffusers' solver tests: a chain of from_config swaps among the four solvers ends where it began
SWITCH = [("DPMSolverMultistepScheduler", DPM, 0.3301), ("UniPCMultistepScheduler", UNIPC, 0.2464),
          ("DEISMultistepScheduler", DEIS, 0.23916), ("DPMSolverSinglestepScheduler", SINGLE, 0.2791)]
SOLVERS = ["DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
           "DPMSolverMultistepScheduler"]


@pytest.mark.parametrize("name, config, expected_mean", SWITCH, ids=[s[0] for s in SWITCH])
def test_diffusers_switch(name, config, expected_mean):
    scheduler = getattr(ours, name)(**config)
    assert abs(full_loop(scheduler, 10).abs().mean().item() - expected_mean) < 1e-3
    for other in [n for n in SOLVERS if n != name] + [name]:
        scheduler = getattr(ours, other).from_config(scheduler.config)
    assert abs(full_loop(scheduler, 10).abs().mean().item() - expected_mean) < 1e-3


def test_diffusers_dpm_single_full_uneven_loop():
    scheduler = ours.DPMSolverSinglestepScheduler(**SINGLE)
    scheduler.set_timesteps(50)
    sample = dummy_sample_deter()
    for t in scheduler.timesteps[3:]:  # the first timestep is uneven
        sample = scheduler.step(dummy_model(sample, t), t, sample).prev_sample
    assert abs(sample.abs().mean().item() - 0.2574) < 1e-3
