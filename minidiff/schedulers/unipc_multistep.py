"""UniPC (Zhao et al. 2023, "A Unified Predictor-Corrector Framework"), as diffusers' UniPCMultistepScheduler.

Each step first corrects the current sample with the fresh model output (UniC: the previous step redone with
one more, implicit-like term, at no extra UNet call), then predicts the next one (UniP: a multistep update of
order p in log-SNR time). The coefficients solve a small linear system R rho = b built from the ratios r_k
of past step sizes; B(h) is h ("bh1") or e^h - 1 ("bh2", better for guided sampling).
"""
import dataclasses
from typing import Optional

import numpy as np
import torch

from .base import KARRAS_SCHEDULERS, step_output
from .common import check_choice, check_schedule, check_sigma_schedule, train_sigmas
from .multistep import (MultistepScheduler, SolverConfig, alpha_sigma, check_solver, data_prediction, log_snr,
                        noise_prediction, solver_sigmas, solver_timesteps)


@dataclasses.dataclass
class UniPCMultistepConfig(SolverConfig):
    predict_x0: bool = True  # expand the x_0 prediction (UniPC's data-prediction form) or the noise
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: list = dataclasses.field(default_factory=list)  # step indices whose corrector is skipped
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False
    sigma_min: Optional[float] = None  # bounds of the Karras / exponential / beta schedules
    sigma_max: Optional[float] = None

    NEUTRAL = {**SolverConfig.NEUTRAL, "solver_p": None, "shift_terminal": None}

    def validate(self, where):
        if self.solver_type in ("midpoint", "heun", "logrho"):  # DPM-Solver or DEIS configs: diffusers uses bh2
            self.solver_type = "bh2"
        check_schedule(self, where, ("epsilon", "sample", "v_prediction"))
        check_solver(self, where)
        check_sigma_schedule(self, where)
        check_choice(where, "solver_type", self.solver_type, ("bh1", "bh2"))
        check_choice(where, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))


def unipc_coefficients(rks, hh, solver_type, order):
    """(R, b) of UniPC's linear system for `order` terms: R[i] = r^i, b[i] = i! phi_{i+1}(hh) / B(h)."""
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B_h = hh if solver_type == "bh1" else torch.expm1(hh)
    factorial_i, R, b = 1, [], []
    for i in range(1, order + 1):
        R.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return torch.stack(R), torch.stack(b), h_phi_1, B_h


class UniPCMultistepScheduler(MultistepScheduler):
    config_dataclass = UniPCMultistepConfig
    _compatibles = KARRAS_SCHEDULERS

    def __init__(self, **config):
        super().__init__(**config)
        self.predict_x0 = self.cfg.predict_x0
        self.disable_corrector = self.cfg.disable_corrector

    def reset_history(self):
        super().reset_history()
        self.timestep_list = [None] * self.cfg.solver_order
        self.last_sample = None  # the sample the last prediction started from (the corrector redoes that step)

    def set_timesteps(self, num_inference_steps=None, device=None):
        c, n = self.cfg, num_inference_steps
        timesteps = solver_timesteps(c, n)
        sigmas, timesteps = solver_sigmas(self, timesteps, n)
        if c.final_sigmas_type == "zero":
            last = 0
        elif c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas:
            last = sigmas[-1]  # the schedule's own end (as diffusers)
        else:
            last = train_sigmas(self.alphas_cumprod)[0].item()
        self.set_loop(timesteps, np.concatenate([sigmas, [last]]), device)

    def convert_model_output(self, model_output, *args, sample=None):
        s = self.sigmas[self.step_index]
        return (data_prediction if self.predict_x0 else noise_prediction)(self.cfg, model_output, sample, s)

    def _update(self, x, m0, older, levels, order, x_t=None, model_t=None):
        """UniP (x_t None: predict the level after levels[1]) or UniC (correct x_t, which the model gave model_t at
        levels[0]): from x at levels[1] with outputs m0 there and `older` at levels[2:]."""
        device = x.device
        alpha_t, sigma_t = alpha_sigma(levels[0].to(device))
        alpha_s0, sigma_s0 = alpha_sigma(levels[1].to(device))
        lambda_s0 = log_snr(levels[1].to(device))
        h = log_snr(levels[0].to(device)) - lambda_s0
        rks, D1s = [], []
        for level, mi in zip(levels[2:], older):
            rk = (log_snr(level.to(device)) - lambda_s0) / h
            rks.append(rk)
            D1s.append((mi - m0) / rk)
        rks = torch.stack(rks + [torch.ones((), device=device)])
        hh = -h if self.predict_x0 else h
        R, b, h_phi_1, B_h = unipc_coefficients(rks, hh, self.cfg.solver_type, order)
        D1s = torch.stack(D1s, dim=1) if D1s else None
        if x_t is None:  # predictor: order - 1 past differences
            rhos = (None if D1s is None else torch.ones(1, dtype=x.dtype, device=device) * 0.5 if order == 2 else
                    torch.linalg.solve(R[:-1, :-1], b[:-1]).to(device).to(x.dtype))
            res = torch.einsum("k,bkc...->bc...", rhos, D1s) if D1s is not None else 0
        else:  # corrector: the past differences and the new one, model_t - m0
            rhos = (torch.ones(1, dtype=x.dtype, device=device) * 0.5 if order == 1 else
                    torch.linalg.solve(R, b).to(device).to(x.dtype))
            res = torch.einsum("k,bkc...->bc...", rhos[:-1], D1s) if D1s is not None else 0
            res = res + rhos[-1] * (model_t - m0)
        if self.predict_x0:
            x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
            out = x_t_ - alpha_t * B_h * res
        else:
            x_t_ = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0
            out = x_t_ - sigma_t * B_h * res
        return out.to(x.dtype)

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("UniPCMultistepScheduler.step: call set_timesteps first")
        i = self.enter_loop(timestep)
        converted = self.convert_model_output(model_output, sample=sample)
        if i > 0 and i - 1 not in self.disable_corrector and self.last_sample is not None:  # UniC
            k = self.this_order
            levels = [self.sigmas[i], self.sigmas[i - 1]] + [self.sigmas[i - 1 - j] for j in range(1, k)]
            older = [self.model_outputs[-(j + 1)] for j in range(1, k)]
            sample = self._update(self.last_sample, self.model_outputs[-1], older, levels, k, sample, converted)
        self.remember(converted)
        self.timestep_list = self.timestep_list[1:] + [timestep]
        order = self.cfg.solver_order
        if self.cfg.lower_order_final:
            order = min(order, len(self.timesteps) - i)
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        k = self.this_order
        levels = [self.sigmas[i + 1], self.sigmas[i]] + [self.sigmas[i - j] for j in range(1, k)]
        older = [self.model_outputs[-(j + 1)] for j in range(1, k)]
        prev_sample = self._update(sample, self.model_outputs[-1], older, levels, k)  # UniP
        self.lower_order_nums = min(self.lower_order_nums + 1, self.cfg.solver_order)
        self._step_index += 1
        return step_output(return_dict, prev_sample)
