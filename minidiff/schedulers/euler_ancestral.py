"""Ancestral Euler sampler, as diffusers' EulerAncestralDiscreteScheduler (k-diffusion's `sample_euler_ancestral`).

Each step goes from sigma_from to sigma_to in two parts: a deterministic Euler step down to
sigma_down, then fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2 and
sigma_up chosen as in DDPM's ancestral sampling (eta = 1). Noise is drawn on every step, the last included.
"""
import dataclasses
from typing import ClassVar, Optional

import numpy as np
import torch

from .common import (BETA_SCHEDULES, SPACINGS, SchedulerOutput, add_noise_sigma, check_choice, from_config,
                     from_pretrained, index_for_timestep, make_betas, make_config, randn_tensor, save_config,
                     spaced_timesteps)


@dataclasses.dataclass
class EulerAncestralDiscreteConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[list] = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    NEUTRAL: ClassVar = {}

    def validate(self, where):
        if self.trained_betas is None:
            check_choice(where, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice(where, "prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        check_choice(where, "timestep_spacing", self.timestep_spacing, SPACINGS)


class EulerAncestralDiscreteScheduler:
    order = 1

    def __init__(self, _carried=None, _where="EulerAncestralDiscreteScheduler(...)", **config):
        _, self.config = make_config(EulerAncestralDiscreteConfig, config, _where, _carried)
        c = self.config
        self.betas = make_betas(c)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        if c.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2 ** -24  # zero terminal SNR would make the last sigma infinite
        # until set_timesteps: every training step
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1, dtype=torch.float32)
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None

    @classmethod
    def from_config(cls, config, **overrides):
        return from_config(cls, EulerAncestralDiscreteConfig, config, overrides)

    @classmethod
    def from_pretrained(cls, repo_or_path, subfolder=None, **overrides):
        return from_pretrained(cls, EulerAncestralDiscreteConfig, repo_or_path, subfolder, overrides)

    def save_pretrained(self, folder):
        save_config(self, folder)

    def __len__(self):
        return self.config.num_train_timesteps

    @property
    def init_noise_sigma(self):
        # std of the starting latent, as diffusers sets it: sigma_max, or sqrt(sigma_max^2 + 1) for "leading"
        top = self.sigmas.max()
        return top if self.config.timestep_spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index=0):
        """Start the loop at position `begin_index` of `timesteps` (img2img and the SDXL refiner start mid-way)."""
        self._begin_index = begin_index

    def _start(self, timestep):
        # first call of a loop: the place comes from set_begin_index, or from where `timestep` is
        if self._step_index is None:
            self._step_index = (self._begin_index if self._begin_index is not None
                                else index_for_timestep(self.timesteps, timestep))

    def set_timesteps(self, num_inference_steps, device=None):
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()  # ascending in t
        timesteps = spaced_timesteps(self.config, num_inference_steps, round_linspace=False).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # CPU: indexed per step
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample, timestep):
        """The UNet's input x / sqrt(sigma^2 + 1): unit variance, as in training."""
        self._start(timestep)
        return sample / ((self.sigmas[self._step_index] ** 2 + 1) ** 0.5)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError(f"EulerAncestralDiscreteScheduler.step: timestep={timestep!r} looks like a loop index; "
                             "pass the value from `scheduler.timesteps` (a float tensor)")
        self._start(timestep)
        sigma, sigma_to = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        sample = sample.to(torch.float32)
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        else:  # v_prediction
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        sigma_up = (sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample, x0)

    def add_noise(self, original_samples, noise, timesteps):
        return add_noise_sigma(self, original_samples, noise, timesteps)
