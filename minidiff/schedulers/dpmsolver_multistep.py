"""DPM-Solver and DPM-Solver++ multistep (Lu et al. 2022a, 2022b), as diffusers' DPMSolverMultistepScheduler.

"DPM++ 2M" (Karras) in A1111's names. The solution of the diffusion ODE over one step in log-SNR time,
h = lambda_t - lambda_s, is exact for its linear part; the model's part is a Taylor expansion whose
derivatives come from the previous steps' outputs (multistep: one UNet call per step). dpmsolver++ expands
the x_0 prediction ("data prediction", stable with guidance), dpmsolver the noise prediction; the sde-
variants add the matching fresh noise (Gonzalez et al. 2023's SDE-DPM-Solver++).
"""
import dataclasses
import warnings
from typing import Optional

import numpy as np
import torch

from .base import KARRAS_SCHEDULERS, step_output
from .common import check_choice, check_schedule, check_sigma_schedule, randn_tensor, sigma_to_t, train_sigmas
from .multistep import MultistepScheduler, SolverConfig, check_solver, dpm_combine, log_snr, solver_sigmas, \
    solver_timesteps

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")


@dataclasses.dataclass
class DPMSolverMultistepConfig(SolverConfig):
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"  # how the second-order term is taken: "midpoint" or "heun"
    lower_order_final: bool = True  # first/second order for the last steps of short (< 15 step) loops
    euler_at_final: bool = False
    use_lu_lambdas: bool = False  # noise levels evenly spaced in log sigma (Lu et al.'s "logSNR" spacing)
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")  # cut the schedule where lambda falls below this (cosine schedules)
    variance_type: Optional[str] = None  # "learned"/"learned_range": the model also outputs a variance; dropped
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def validate(self, where):
        if self.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and self.final_sigmas_type == "zero":
            raise ValueError(f"{where}: final_sigmas_type='zero' is not supported with algorithm_type="
                             f"{self.algorithm_type!r}; use final_sigmas_type='sigma_min'")
        if self.algorithm_type == "deis":  # a DEIS config: diffusers runs it as dpmsolver++
            self.algorithm_type = "dpmsolver++"
        if self.solver_type in ("logrho", "bh1", "bh2"):  # DEIS or UniPC configs: diffusers uses midpoint
            self.solver_type = "midpoint"
        check_schedule(self, where, ("epsilon", "sample", "v_prediction"))
        check_solver(self, where)
        check_sigma_schedule(self, where)
        check_choice(where, "algorithm_type", self.algorithm_type, ALGORITHMS)
        check_choice(where, "solver_type", self.solver_type, ("midpoint", "heun"))
        check_choice(where, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        check_choice(where, "variance_type", self.variance_type, (None, "learned", "learned_range"))
        if self.algorithm_type == "sde-dpmsolver" and self.solver_order == 3:
            raise ValueError(f"{where}: algorithm_type='sde-dpmsolver' has no third-order solver; use solver_order 1 "
                             "or 2, or algorithm_type='sde-dpmsolver++'")


def dpm_solver_update(algorithm, solver_type, order, outputs, sigmas, x, noise=None):
    """One step of `order` from noise level sigmas[1] to sigmas[0]; `outputs` are the converted model outputs
    (newest last) taken at sigmas[1], sigmas[2], sigmas[3]: D_k are their divided differences in lambda."""
    h = log_snr(sigmas[0]) - log_snr(sigmas[1])
    m0 = outputs[-1]
    D = [m0]
    if order >= 2:
        r0 = (log_snr(sigmas[1]) - log_snr(sigmas[2])) / h
        D1_0 = 1.0 / r0 * (m0 - outputs[-2])
        D.append(D1_0)
    if order == 3:
        r1 = (log_snr(sigmas[2]) - log_snr(sigmas[3])) / h
        D1_1 = 1.0 / r1 * (outputs[-2] - outputs[-3])
        D[1] = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D.append(1.0 / (r0 + r1) * (D1_0 - D1_1))
    midpoint = solver_type == "midpoint" and order == 2  # third order always uses the full expansion
    return dpm_combine(algorithm, h, sigmas[0], sigmas[1], midpoint, D, x, noise)


class DPMSolverMultistepScheduler(MultistepScheduler):
    config_dataclass = DPMSolverMultistepConfig
    _compatibles = KARRAS_SCHEDULERS

    def __init__(self, **config):
        super().__init__(**config)
        if self.cfg.algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            warnings.warn(f"DPMSolverMultistepScheduler: algorithm_type {self.cfg.algorithm_type!r} is deprecated in "
                          "diffusers; choose 'dpmsolver++' or 'sde-dpmsolver++'", FutureWarning, stacklevel=2)

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        c, n = self.cfg, num_inference_steps
        if (n is None) == (timesteps is None):
            raise ValueError("DPMSolverMultistepScheduler.set_timesteps: pass exactly one of num_inference_steps or "
                             "timesteps")
        for flag in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"):
            if timesteps is not None and getattr(c, flag):
                raise ValueError(f"DPMSolverMultistepScheduler.set_timesteps: custom timesteps cannot be used with "
                                 f"{flag}=True")
        if timesteps is not None:
            timesteps = np.array(timesteps).astype(np.int64)
            sigmas, _ = solver_sigmas(self, timesteps, len(timesteps))
        else:
            clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped)
            timesteps = solver_timesteps(c, n, last=(c.num_train_timesteps - clipped).item())
            rounded = c.beta_schedule != "squaredcos_cap_v2"
            if c.use_lu_lambdas and not c.use_karras_sigmas:  # (diffusers' order: Karras, Lu, exponential, beta)
                log_sigmas = np.log(np.array(train_sigmas(self.alphas_cumprod)))
                lam_max, lam_min = float(log_sigmas[-1]), float(log_sigmas[0])  # evenly spaced in log sigma
                sigmas = np.exp(lam_max + np.linspace(0, 1, n) * (lam_min - lam_max))
                timesteps = sigma_to_t(sigmas, log_sigmas)
                timesteps = timesteps.round() if rounded else timesteps
            else:
                sigmas, timesteps = solver_sigmas(self, timesteps, n, round_karras=rounded)
        last = train_sigmas(self.alphas_cumprod)[0].item() if c.final_sigmas_type == "sigma_min" else 0
        self.set_loop(timesteps, np.concatenate([sigmas, [last]]), device)

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("DPMSolverMultistepScheduler.step: call set_timesteps first")
        c = self.cfg
        i, n = self.enter_loop(timestep), len(self.timesteps)
        lower_final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or
                                      c.final_sigmas_type == "zero")
        lower_second = i == n - 2 and c.lower_order_final and n < 15
        self.remember(self.convert_model_output(model_output, sample=sample))
        sample = sample.to(torch.float32)
        noise = None
        if c.algorithm_type.startswith("sde-"):
            noise = (randn_tensor(model_output.shape, generator, model_output.device, torch.float32)
                     if variance_noise is None else variance_noise.to(device=model_output.device, dtype=torch.float32))
        order = self.step_order(lower_final, lower_second)
        sigmas = [self.sigmas[i + 1]] + [self.sigmas[i - k] for k in range(order)]
        prev_sample = dpm_solver_update(c.algorithm_type, c.solver_type, order, self.model_outputs, sigmas, sample,
                                        noise)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        return step_output(return_dict, prev_sample.to(model_output.dtype))
