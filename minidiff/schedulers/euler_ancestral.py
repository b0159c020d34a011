"""Ancestral Euler sampler, as diffusers' EulerAncestralDiscreteScheduler (k-diffusion's `sample_euler_ancestral`).

Each step goes from sigma_from to sigma_to in two parts: a deterministic Euler step down to
sigma_down, then fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2 and
sigma_up chosen as in DDPM's ancestral sampling (eta = 1). Noise is drawn on every step, the last included.
"""
import dataclasses

import numpy as np
import torch

from .base import KARRAS_SCHEDULERS, SigmaScheduler, TrainScheduleConfig, step_output
from .common import check_float_timestep, euler_step, predict_x0_sigma, randn_tensor, sigma_schedule, \
    spaced_sigmas


@dataclasses.dataclass
class EulerAncestralDiscreteConfig(TrainScheduleConfig):
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    prediction_types = ("epsilon", "v_prediction")


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    config_dataclass = EulerAncestralDiscreteConfig
    _compatibles = KARRAS_SCHEDULERS

    def __init__(self, **config):
        super().__init__(**config)
        self.betas, self.alphas_cumprod, self.sigmas = sigma_schedule(self.cfg)
        # until set_timesteps: every training step
        self.timesteps = torch.arange(self.cfg.num_train_timesteps - 1, -1, -1, dtype=torch.float32)

    def set_timesteps(self, num_inference_steps, device=None):
        timesteps, sigmas = spaced_sigmas(self.cfg, self.alphas_cumprod, num_inference_steps)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # CPU: indexed per step
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.num_inference_steps = num_inference_steps
        self.reset_loop()

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        check_float_timestep("EulerAncestralDiscreteScheduler.step", timestep)
        i = self.enter_loop(timestep)
        sigma, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        sample = sample.to(torch.float32)
        x0 = predict_x0_sigma(self.cfg.prediction_type, model_output, sample, sigma, sigma)
        sigma_up = (sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        prev_sample = euler_step(sample, x0, sigma, sigma_down)
        noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1
        return step_output(return_dict, prev_sample, x0)
