"""Heun's method (Karras et al. 2022, Algorithm 1), as diffusers' HeunDiscreteScheduler (k-diffusion's `sample_heun`).

In sigma form (x = x_0 + sigma eps) each step from sigma_i to sigma_{i+1} takes an Euler step, asks the model
again at the result, and redoes the step with the mean of the two slopes (the trapezoid rule). `timesteps`
lists every step's timestep twice after the first, one entry per model call; the last step, to sigma 0, is
a plain Euler step (one call).
"""
import dataclasses
import math

import numpy as np
import torch

from .base import KARRAS_SCHEDULERS, SigmaConfig, SigmaScheduler, step_output
from .common import (check_float_timestep, check_schedule, check_sigma_schedule, make_betas,
                     predict_x0_sigma)
from .sigma_loop import config_bounds, doubled, loop_sigmas


@dataclasses.dataclass
class HeunDiscreteConfig(SigmaConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    def validate(self, where):
        # (Heun alone has the "exp" beta schedule in diffusers)
        plain = dataclasses.replace(self, beta_schedule="linear") if self.beta_schedule == "exp" else self
        check_schedule(plain, where, self.prediction_types)
        check_sigma_schedule(self, where)


def exp_betas(n, max_beta=0.999):
    """diffusers' betas_for_alpha_bar(alpha_transform_type="exp"): alpha_bar(t) = exp(-12 t), betas capped."""
    return torch.tensor([min(1 - math.exp(-12.0 * (i + 1) / n) / math.exp(-12.0 * i / n), max_beta)
                         for i in range(n)], dtype=torch.float32)


class HeunDiscreteScheduler(SigmaScheduler):
    config_dataclass = HeunDiscreteConfig
    order = 2
    _compatibles = KARRAS_SCHEDULERS

    def __init__(self, **config):
        super().__init__(**config)
        exp = self.cfg.beta_schedule == "exp" and self.cfg.trained_betas is None
        self.betas = exp_betas(self.cfg.num_train_timesteps) if exp else make_betas(self.cfg)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.set_timesteps(self.cfg.num_train_timesteps)  # as diffusers: a full-length loop until set_timesteps

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """The loop: evenly spaced (`timestep_spacing`), Karras/exponential/beta sigmas, or given `timesteps`."""
        c = self.cfg
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("HeunDiscreteScheduler.set_timesteps: pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None and (c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas):
            raise ValueError("HeunDiscreteScheduler.set_timesteps: custom `timesteps` cannot be used with "
                             "use_karras_sigmas, use_exponential_sigmas or use_beta_sigmas")
        self.num_inference_steps = num_inference_steps or len(timesteps)
        t, sigmas, _ = loop_sigmas(c, self.alphas_cumprod, self.num_inference_steps, timesteps,
                                   bounds=config_bounds(self))
        self.sigmas = doubled(sigmas)[:-1]  # stays on the CPU: indexed once per call
        self.timesteps = doubled(torch.from_numpy(np.asarray(t))).to(device=device, dtype=torch.float32)
        self.prev_derivative = self.dt = self.sample = None  # the first call's slope, step and sample
        self.reset_loop()

    @property
    def state_in_first_order(self):
        return self.dt is None

    def step(self, model_output, timestep, sample, return_dict=True):
        check_float_timestep("HeunDiscreteScheduler.step", timestep)
        i = self.enter_loop(timestep)
        first = self.state_in_first_order
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        # x_0 at the level the model saw: sigma on the first call, sigma_next on the second
        seen = sigma if first else sigma_next
        x0 = predict_x0_sigma(self.cfg.prediction_type, model_output, sample, seen, seen)
        if self.cfg.clip_sample:
            x0 = x0.clamp(-self.cfg.clip_sample_range, self.cfg.clip_sample_range)
        if first:  # Euler step; keep its slope, step and start for the correction
            derivative = (sample - x0) / sigma
            self.prev_derivative, self.dt, self.sample = derivative, sigma_next - sigma, sample
            dt = self.dt
        else:  # redo the step from the same start with the mean slope
            derivative = (self.prev_derivative + (sample - x0) / sigma_next) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative = self.dt = self.sample = None
        prev_sample = sample + derivative * dt
        self._step_index += 1
        return step_output(return_dict, prev_sample, x0)
