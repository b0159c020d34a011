"""DDPM (Ho et al. 2020), as diffusers' DDPMScheduler: ancestral sampling of the learned reverse chain.

From x_t, predict x_0, then draw x_t' from the forward process's posterior q(x_t' | x_t, x_0): mean
sqrt(a_t') beta x_0 / (1 - a_t) + sqrt(alpha) (1 - a_t') x_t / (1 - a_t) (eq. 7), with alpha = a_t / a_t' and
beta = 1 - alpha over the (possibly skipped) interval t -> t'. The variance is the posterior's
("fixed_small"), beta ("fixed_large"), or the model's own (`learned`, `learned_range`: Nichol & Dhariwal's
interpolation of the two logs). Noise is drawn on every step but the one at t = 0.
"""
import dataclasses

import numpy as np
import torch

from .base import KARRAS_SCHEDULERS, PredictedX0Config, Scheduler, step_output
from .common import (check_choice, check_timesteps, train_schedule, predict_x0, randn_tensor, spaced_timesteps,
                     threshold_sample)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


@dataclasses.dataclass
class DDPMConfig(PredictedX0Config):
    variance_type: str = "fixed_small"

    def validate(self, where):
        super().validate(where)
        check_choice(where, "variance_type", self.variance_type, VARIANCE_TYPES)


class DDPMScheduler(Scheduler):
    config_dataclass = DDPMConfig
    _compatibles = KARRAS_SCHEDULERS

    def __init__(self, **config):
        super().__init__(**config)
        self.betas, self.alphas_cumprod = train_schedule(self.cfg)
        self.timesteps = torch.arange(self.cfg.num_train_timesteps - 1, -1, -1)
        self.custom_timesteps = False

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """`num_inference_steps` spaced by `timestep_spacing`, or the given descending integer `timesteps`."""
        N = self.cfg.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("DDPMScheduler.set_timesteps: pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            check_timesteps("DDPMScheduler.set_timesteps", timesteps, N)
            timesteps, self.custom_timesteps = np.array(timesteps, dtype=np.int64), True
        else:
            if num_inference_steps > N:
                raise ValueError(f"DDPMScheduler.set_timesteps: num_inference_steps={num_inference_steps} is more "
                                 f"than the {N} training timesteps")
            self.num_inference_steps, self.custom_timesteps = num_inference_steps, False
            timesteps = spaced_timesteps(self.cfg, num_inference_steps, round_linspace=True).astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def previous_timestep(self, timestep):
        """The next timestep of the loop (-1 after the last), or t - 1 before set_timesteps."""
        if self.custom_timesteps or self.num_inference_steps:
            index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
            return torch.tensor(-1) if index == len(self.timesteps) - 1 else self.timesteps[index + 1]
        return timestep - 1

    def _alphas(self, t):
        a_t = self.alphas_cumprod[t]
        prev_t = self.previous_timestep(t)
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        return a_t, a_prev, a_t / a_prev  # the last: alpha of the interval t -> t'

    def _variance(self, t, predicted_variance=None):
        """The variance (its log for learned_range; its std for fixed_small_log), as diffusers' _get_variance."""
        a_t, a_prev, alpha = self._alphas(t)
        beta = 1 - alpha
        posterior = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)  # eq. 7's beta tilde
        kind = self.cfg.variance_type
        if kind == "fixed_small_log":
            return torch.exp(0.5 * torch.log(posterior))
        if kind in ("fixed_large", "fixed_large_log"):  # (diffusers' fixed_large_log gives NaN: taken as fixed_large)
            return beta
        if kind == "learned":
            return predicted_variance
        if kind == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(beta) + (1 - frac) * torch.log(posterior)
        return posterior

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        c = self.cfg
        t = timestep
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and c.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        a_t, a_prev, alpha = self._alphas(t)
        beta = 1 - alpha
        x0 = predict_x0(c.prediction_type, model_output, sample, a_t)
        if c.thresholding:
            x0 = threshold_sample(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        # the posterior mean (eq. 7)
        x0_coeff = (a_prev ** 0.5 * beta) / (1 - a_t)
        xt_coeff = alpha ** 0.5 * (1 - a_prev) / (1 - a_t)
        prev_sample = x0_coeff * x0 + xt_coeff * sample
        if t > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            variance = self._variance(t, predicted_variance)
            if c.variance_type == "fixed_small_log":
                std = variance
            elif c.variance_type == "learned_range":
                std = torch.exp(0.5 * variance)
            else:
                std = variance ** 0.5
            prev_sample = prev_sample + std * noise
        return step_output(return_dict, prev_sample, x0)
