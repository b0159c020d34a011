"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"), as diffusers'
DEISMultistepScheduler: the "logrho" multistep variant.

In rho = sigma_t / alpha_t the noise-prediction ODE is dx/alpha = eps drho; DEIS integrates the Lagrange
polynomial through the last 1-3 eps predictions exactly, in log rho, so each step is one UNet call.
"""
import dataclasses

import numpy as np
import torch

from .base import KARRAS_SCHEDULERS, step_output
from .common import check_choice, check_schedule, check_sigma_schedule, train_sigmas
from .multistep import (MultistepScheduler, SolverConfig, alpha_sigma, check_solver, data_prediction, log_snr,
                        solver_sigmas, solver_timesteps)


@dataclasses.dataclass
class DEISMultistepConfig(SolverConfig):
    algorithm_type: str = "deis"
    solver_type: str = "logrho"
    lower_order_final: bool = True
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def validate(self, where):
        if self.algorithm_type in ("dpmsolver", "dpmsolver++"):  # DPM-Solver configs: diffusers runs them as DEIS
            self.algorithm_type = "deis"
        if self.solver_type in ("midpoint", "heun", "bh1", "bh2"):
            self.solver_type = "logrho"
        check_schedule(self, where, ("epsilon", "sample", "v_prediction"))
        check_solver(self, where)
        check_sigma_schedule(self, where)
        check_choice(where, "algorithm_type", self.algorithm_type, ("deis",))
        check_choice(where, "solver_type", self.solver_type, ("logrho",))


def lagrange_integral_2(t, b, c):
    """Integral in rho, up to t, of the degree-1 Lagrange basis polynomial (in log rho) that is 1 at b, 0 at c."""
    return t * (-np.log(c) + np.log(t) - 1) / (np.log(b) - np.log(c))


def lagrange_integral_3(t, b, c, d):
    """The same for the degree-2 basis polynomial that is 1 at b and 0 at c and d."""
    numerator = t * (np.log(c) * (np.log(d) - np.log(t) + 1) - np.log(d) * np.log(t) + np.log(d) + np.log(t) ** 2
                     - 2 * np.log(t) + 2)
    return numerator / ((np.log(b) - np.log(c)) * (np.log(b) - np.log(d)))


def deis_update(order, outputs, sigmas, x):
    """One DEIS step from noise level sigmas[1] to sigmas[0] with the last `order` eps predictions (newest last)."""
    (alpha_t, sigma_t), (alpha_s0, sigma_s0) = alpha_sigma(sigmas[0]), alpha_sigma(sigmas[1])
    if order == 1:  # DDIM in noise form
        h = log_snr(sigmas[0]) - log_snr(sigmas[1])
        return alpha_t / alpha_s0 * x - sigma_t * (torch.exp(h) - 1.0) * outputs[-1]
    rho_t, rho = sigma_t / alpha_t, [s / a for a, s in (alpha_sigma(level) for level in sigmas[1:order + 1])]
    if order == 2:
        nodes = [(rho[0], rho[1]), (rho[1], rho[0])]
        integral = lagrange_integral_2
    else:
        nodes = [(rho[0], rho[1], rho[2]), (rho[1], rho[2], rho[0]), (rho[2], rho[0], rho[1])]
        integral = lagrange_integral_3
    x_t = x / alpha_s0
    for k, args in enumerate(nodes):
        x_t = x_t + (integral(rho_t, *args) - integral(rho[0], *args)) * outputs[-1 - k]
    return alpha_t * x_t


class DEISMultistepScheduler(MultistepScheduler):
    config_dataclass = DEISMultistepConfig
    _compatibles = KARRAS_SCHEDULERS

    def set_timesteps(self, num_inference_steps, device=None):
        timesteps = solver_timesteps(self.cfg, num_inference_steps)
        sigmas, timesteps = solver_sigmas(self, timesteps, num_inference_steps)
        converted = self.cfg.use_karras_sigmas or self.cfg.use_exponential_sigmas or self.cfg.use_beta_sigmas
        last = sigmas[-1] if converted else train_sigmas(self.alphas_cumprod)[0].item()  # (as diffusers)
        self.set_loop(timesteps, np.concatenate([sigmas, [last]]), device)

    def convert_model_output(self, model_output, *args, sample=None):
        """eps, by way of the (optionally thresholded) x_0 prediction."""
        s = self.sigmas[self.step_index]
        alpha_t, sigma_t = alpha_sigma(s)
        return (sample - alpha_t * data_prediction(self.cfg, model_output, sample, s)) / sigma_t

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("DEISMultistepScheduler.step: call set_timesteps first")
        c = self.cfg
        i, n = self.enter_loop(timestep), len(self.timesteps)
        lower_final = i == n - 1 and c.lower_order_final and n < 15
        lower_second = i == n - 2 and c.lower_order_final and n < 15
        self.remember(self.convert_model_output(model_output, sample=sample))
        order = self.step_order(lower_final, lower_second)
        sigmas = [self.sigmas[i + 1]] + [self.sigmas[i - k] for k in range(order)]
        prev_sample = deis_update(order, self.model_outputs, sigmas, sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        return step_output(return_dict, prev_sample)
