"""DDIM (Song et al. 2021), as diffusers' DDIMScheduler.

From x_t, predict x_0 and the noise eps, then jump to the previous timestep t' along
x_t' = sqrt(a_t') x_0 + sqrt(1 - a_t' - s^2) eps + s z, with s = eta sigma_t (eq. 12, 16):
eta 0 is the deterministic sampler SD uses, eta 1 is DDPM-like.
"""
import dataclasses

import numpy as np
import torch

from .base import KARRAS_SCHEDULERS, PredictedX0Config, Scheduler, step_output
from .common import alpha_at, alpha_schedule, predict_eps, predict_x0, randn_tensor, spaced_timesteps, \
    threshold_sample


@dataclasses.dataclass
class DDIMConfig(PredictedX0Config):
    set_alpha_to_one: bool = True  # the last step lands on a_0 = 1 (else on the first training step's a)


class DDIMScheduler(Scheduler):
    """Starts from unit Gaussian noise; the UNet input is not scaled; each step depends only on its timestep."""
    config_dataclass = DDIMConfig
    _compatibles = KARRAS_SCHEDULERS

    def __init__(self, **config):
        super().__init__(**config)
        self.betas, self.alphas_cumprod, self.final_alpha_cumprod = alpha_schedule(self.cfg)
        self.timesteps = torch.arange(self.cfg.num_train_timesteps - 1, -1, -1)

    def set_timesteps(self, num_inference_steps, device=None):
        N = self.cfg.num_train_timesteps
        if num_inference_steps > N:
            raise ValueError(f"DDIMScheduler.set_timesteps: num_inference_steps={num_inference_steps} is more than the "
                             f"{N} training timesteps")
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(self.cfg, num_inference_steps, round_linspace=True).astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler.step: call set_timesteps first")
        c = self.cfg
        t = int(timestep)
        t_prev = t - c.num_train_timesteps // self.num_inference_steps  # (for every spacing, as in diffusers)
        a_t, a_prev = self.alphas_cumprod[t], alpha_at(self, t_prev)
        x0 = predict_x0(c.prediction_type, model_output, sample, a_t)
        eps = predict_eps(c.prediction_type, model_output, sample, a_t, x0)
        if c.thresholding:
            x0 = threshold_sample(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)  # sigma_t^2 of eq. 16
        std = eta * variance ** 0.5
        if use_clipped_model_output:  # the noise that the clipped x_0 implies
            eps = predict_eps("sample", model_output, sample, a_t, x0)
        prev_sample = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("DDIMScheduler.step: pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + std * variance_noise
        return step_output(return_dict, prev_sample, x0)
