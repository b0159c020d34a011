"""DPM-Solver and DPM-Solver++ singlestep (Lu et al. 2022), as diffusers' DPMSolverSinglestepScheduler.

"DPM++ SDE"-like A1111 entries map here or to the multistep solver. A singlestep solver of order k spends k
UNet calls on one block of k steps: every step of the block starts from the block's first sample, using the
outputs at the block's intermediate levels as the Taylor terms, and the last one lands at the block's end.
`order_list` holds the order of each step (1, 2, 3, 1, 2, 3, ...).
"""
import dataclasses
import logging
from typing import Optional

import numpy as np
import torch

from .base import KARRAS_SCHEDULERS, step_output
from .common import BETA_SCHEDULES, check_choice, check_sigma_schedule, randn_tensor, train_sigmas
from .multistep import MultistepScheduler, SolverConfig, check_solver, dpm_combine, log_snr, solver_sigmas

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DPMSolverSinglestepConfig(SolverConfig):
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: Optional[str] = None

    def validate(self, where):
        if self.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and self.final_sigmas_type == "zero":
            raise ValueError(f"{where}: final_sigmas_type='zero' is not supported with algorithm_type="
                             f"{self.algorithm_type!r}; use final_sigmas_type='sigma_min'")
        if self.algorithm_type == "deis":  # as diffusers
            self.algorithm_type = "dpmsolver++"
        if self.solver_type in ("logrho", "bh1", "bh2"):
            self.solver_type = "midpoint"
        if self.trained_betas is None:
            check_choice(where, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_solver(self, where)
        check_sigma_schedule(self, where)
        check_choice(where, "algorithm_type", self.algorithm_type, ("dpmsolver++", "sde-dpmsolver++", "dpmsolver"))
        check_choice(where, "solver_type", self.solver_type, ("midpoint", "heun"))
        check_choice(where, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        check_choice(where, "variance_type", self.variance_type, (None, "learned", "learned_range"))


def order_list(steps, order, lower_order_final, final_zero):
    """The order of each step: blocks 1, 2, .., order; with lower_order_final the last block is cut short."""
    if lower_order_final:
        full, rest = divmod(steps, order)
        if order == 3 and rest == 0:
            orders = [1, 2, 3] * (full - 1) + [1, 2] + [1]
        elif order == 2 and rest == 0:
            orders = [1, 2] * (full - 1) + [1, 1]
        else:
            orders = list(range(1, order + 1)) * full + list(range(1, rest + 1))
    else:
        orders = list(range(1, order + 1)) * (steps // order)
    if final_zero:
        orders[-1] = 1
    return orders


def singlestep_update(algorithm, solver_type, order, outputs, sigmas, x, noise=None):
    """One step of `order` from x at noise level sigmas[order] (the block's start) to sigmas[0]; `outputs` (newest
    last) were taken at sigmas[1], sigmas[2], ...: the Taylor terms are their differences to the oldest one."""
    lam = [log_snr(s) for s in sigmas[:order + 1]]
    h = lam[0] - lam[order]
    if order == 1:
        D, midpoint = [outputs[-1]], False
    elif order == 2:
        r0 = (lam[1] - lam[2]) / h
        D, midpoint = [outputs[-2], 1.0 / r0 * (outputs[-1] - outputs[-2])], solver_type == "midpoint"
    else:
        r0, r1 = (lam[1] - lam[3]) / h, (lam[2] - lam[3]) / h
        m0, m1, m2 = outputs[-1], outputs[-2], outputs[-3]
        D1_0, D1_1 = 1.0 / r1 * (m1 - m2), 1.0 / r0 * (m0 - m2)
        if solver_type == "midpoint":  # the second-order term from the newest output only, no third-order term
            D = [m2, D1_1]
        else:
            D = [m2, (r0 * D1_0 - r1 * D1_1) / (r0 - r1), 2.0 * (D1_1 - D1_0) / (r0 - r1)]
        midpoint = False
    return dpm_combine(algorithm, h, sigmas[0], sigmas[order], midpoint, D, x, noise)


class DPMSolverSinglestepScheduler(MultistepScheduler):
    config_dataclass = DPMSolverSinglestepConfig
    _compatibles = KARRAS_SCHEDULERS

    def reset_history(self):
        super().reset_history()
        self.sample = None  # the sample at the start of the current block

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        c = self.cfg
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("DPMSolverSinglestepScheduler.set_timesteps: pass exactly one of num_inference_steps or "
                             "timesteps")
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if timesteps is not None and getattr(c, flag):
                raise ValueError(f"DPMSolverSinglestepScheduler.set_timesteps: custom timesteps cannot be used with "
                                 f"{flag}=True")
        n = num_inference_steps or len(timesteps)
        if timesteps is not None:
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped).item()
            timesteps = np.linspace(0, c.num_train_timesteps - 1 - clipped, n + 1).round()[::-1][:-1].copy()
            timesteps = timesteps.astype(np.int64)
        sigmas, timesteps = solver_sigmas(self, timesteps, n)
        last = train_sigmas(self.alphas_cumprod)[0].item() if c.final_sigmas_type == "sigma_min" else 0
        self.set_loop(timesteps, np.concatenate([sigmas, [last]]), device)
        for uneven, why in ((n % c.solver_order != 0, "an uneven number of steps"),
                            (c.final_sigmas_type == "zero", "final_sigmas_type='zero'")):
            if not c.lower_order_final and uneven:  # diffusers switches it on, in the config too
                logger.warning("DPMSolverSinglestepScheduler: lower_order_final set to True for %s", why)
                c.lower_order_final = self.config["lower_order_final"] = True
        self.order_list = order_list(n, c.solver_order, c.lower_order_final, c.final_sigmas_type == "zero")

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("DPMSolverSinglestepScheduler.step: call set_timesteps first")
        c = self.cfg
        i = self.enter_loop(timestep)
        self.remember(self.convert_model_output(model_output, sample=sample))
        noise = None
        if c.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        order = self.order_list[i]
        while self.model_outputs[-order] is None:  # (a loop entered mid-block)
            order -= 1
        if order == 1:
            self.sample = sample
        sigmas = [self.sigmas[i + 1]] + [self.sigmas[i - k] for k in range(order)]
        prev_sample = singlestep_update(c.algorithm_type, c.solver_type, order, self.model_outputs, sigmas,
                                        self.sample, noise)
        self._step_index += 1
        return step_output(return_dict, prev_sample)
