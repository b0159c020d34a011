"""DDIM (Song et al. 2021), as diffusers' DDIMScheduler.

From x_t, predict x_0 and the noise eps, then jump to the previous timestep t' along
x_t' = sqrt(a_t') x_0 + sqrt(1 - a_t' - s^2) eps + s z, with s = eta sigma_t (eq. 12, 16):
eta 0 is the deterministic sampler SD uses, eta 1 is DDPM-like.
"""
import dataclasses
from typing import ClassVar, Optional

import numpy as np
import torch

from .common import (BETA_SCHEDULES, SPACINGS, SchedulerOutput, add_noise_vp, check_choice, from_config,
                     from_pretrained, make_betas, make_config, randn_tensor, save_config, spaced_timesteps)


@dataclasses.dataclass
class DDIMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[list] = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True  # the last step lands on a_0 = 1 (else on the first training step's a)
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    dynamic_thresholding_ratio: float = 0.995  # used only with thresholding, which is not implemented
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0  # used only with thresholding
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    NEUTRAL: ClassVar = {"thresholding": False}

    def validate(self, where):
        if self.trained_betas is None:
            check_choice(where, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice(where, "prediction_type", self.prediction_type, ("epsilon", "v_prediction", "sample"))
        check_choice(where, "timestep_spacing", self.timestep_spacing, SPACINGS)


class DDIMScheduler:
    order = 1
    init_noise_sigma = 1.0  # the loop starts from unit Gaussian noise and the UNet input is not scaled

    def __init__(self, _carried=None, _where="DDIMScheduler(...)", **config):
        _, self.config = make_config(DDIMConfig, config, _where, _carried)
        c = self.config
        self.betas = make_betas(c)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1)
        self.num_inference_steps = None

    @classmethod
    def from_config(cls, config, **overrides):
        return from_config(cls, DDIMConfig, config, overrides)

    @classmethod
    def from_pretrained(cls, repo_or_path, subfolder=None, **overrides):
        return from_pretrained(cls, DDIMConfig, repo_or_path, subfolder, overrides)

    def save_pretrained(self, folder):
        save_config(self, folder)

    def __len__(self):
        return self.config.num_train_timesteps

    def set_begin_index(self, begin_index=0):
        """Nothing to do: each DDIM step depends only on its own timestep (diffusers' DDIM has no such method;
        this lets a pipeline call it on any scheduler)."""

    def scale_model_input(self, sample, timestep=None):
        return sample

    def set_timesteps(self, num_inference_steps, device=None):
        N = self.config.num_train_timesteps
        if num_inference_steps > N:
            raise ValueError(f"DDIMScheduler.set_timesteps: num_inference_steps={num_inference_steps} is more than the "
                             f"{N} training timesteps")
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(self.config, num_inference_steps, round_linspace=True).astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler.step: call set_timesteps first")
        c = self.config
        t = int(timestep)
        t_prev = t - c.num_train_timesteps // self.num_inference_steps  # (for every spacing, as in diffusers)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        if c.prediction_type == "epsilon":
            x0, eps = (sample - b_t ** 0.5 * model_output) / a_t ** 0.5, model_output
        elif c.prediction_type == "sample":
            x0 = model_output
            eps = (sample - a_t ** 0.5 * x0) / b_t ** 0.5
        else:  # v_prediction: v = sqrt(a) eps - sqrt(1 - a) x_0
            x0 = a_t ** 0.5 * sample - b_t ** 0.5 * model_output
            eps = a_t ** 0.5 * model_output + b_t ** 0.5 * sample
        if c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)  # sigma_t^2 of eq. 16
        std = eta * variance ** 0.5
        if use_clipped_model_output:  # the noise that the clipped x_0 implies
            eps = (sample - a_t ** 0.5 * x0) / b_t ** 0.5
        prev_sample = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("DDIMScheduler.step: pass either generator or variance_noise, not both")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + std * variance_noise
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample, x0)

    def add_noise(self, original_samples, noise, timesteps):
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)
