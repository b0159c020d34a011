"""Euler sampler on the DDPM noise levels, as diffusers' EulerDiscreteScheduler (k-diffusion's `sample_euler`).

In sigma form the noisy latent is x = x_0 + sigma eps and the UNet sees x / sqrt(sigma^2 + 1). One step
is an Euler step of the probability-flow ODE dx/dsigma = (x - x_0) / sigma from sigma_i to sigma_{i+1}
(Karras et al. 2022, Algorithm 2; `s_churn` adds its optional noise).
"""
import dataclasses
from typing import ClassVar, Optional

import numpy as np
import torch

from .common import (BETA_SCHEDULES, SPACINGS, SchedulerOutput, add_noise_sigma, check_choice, from_config,
                     from_pretrained, index_for_timestep, make_betas, make_config, randn_tensor, save_config,
                     spaced_timesteps)


@dataclasses.dataclass
class EulerDiscreteConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[list] = None
    prediction_type: str = "epsilon"
    use_karras_sigmas: Optional[bool] = False
    sigma_min: Optional[float] = None  # Karras schedule bounds (default: the schedule's own)
    sigma_max: Optional[float] = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"  # "continuous": the UNet gets 0.25 log(sigma) (EDM-style v-prediction models)
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"  # the loop ends at sigma 0, or at the first training step's sigma

    NEUTRAL: ClassVar = {"interpolation_type": "linear", "use_exponential_sigmas": (False, None),
                         "use_beta_sigmas": (False, None)}

    def validate(self, where):
        if self.trained_betas is None:
            check_choice(where, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice(where, "prediction_type", self.prediction_type,
                     ("epsilon", "v_prediction", "sample", "original_sample"))
        check_choice(where, "timestep_spacing", self.timestep_spacing, SPACINGS)
        check_choice(where, "timestep_type", self.timestep_type, ("discrete", "continuous"))
        check_choice(where, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))


def karras_sigmas(sigmas, n, sigma_min=None, sigma_max=None, rho=7.0):
    """Karras et al. 2022 (eq. 5): n noise levels evenly spaced in sigma^(1/rho), from sigma_max down to sigma_min."""
    lo = sigma_min if sigma_min is not None else sigmas[-1].item()
    hi = sigma_max if sigma_max is not None else sigmas[0].item()
    ramp = np.linspace(0, 1, n)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def sigma_to_t(sigmas, log_sigmas):
    """Fractional training timestep of each sigma: linear interpolation in log sigma over the training
    schedule (`log_sigmas` ascending with t), clamped to its ends."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


class EulerDiscreteScheduler:
    order = 1

    def __init__(self, _carried=None, _where="EulerDiscreteScheduler(...)", **config):
        _, self.config = make_config(EulerDiscreteConfig, config, _where, _carried)
        c = self.config
        self.betas = make_betas(c)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        if c.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2 ** -24  # zero terminal SNR would make the last sigma infinite
        # until set_timesteps: every training step
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.timesteps = self._model_timesteps(torch.arange(c.num_train_timesteps - 1, -1, -1, dtype=torch.float32))
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None

    @classmethod
    def from_config(cls, config, **overrides):
        return from_config(cls, EulerDiscreteConfig, config, overrides)

    @classmethod
    def from_pretrained(cls, repo_or_path, subfolder=None, **overrides):
        return from_pretrained(cls, EulerDiscreteConfig, repo_or_path, subfolder, overrides)

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

    def _model_timesteps(self, timesteps):
        # what the UNet is given at each sigma (self.sigmas[:-1] for continuous time)
        c = self.config
        if c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
            return 0.25 * self.sigmas[:-1].log()
        return timesteps

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
        """The loop's timesteps and sigmas: evenly spaced (`timestep_spacing`), Karras-spaced, or given."""
        c = self.config
        if sum(x is not None for x in (num_inference_steps, timesteps, sigmas)) != 1:
            raise ValueError("set_timesteps: pass exactly one of num_inference_steps, timesteps or sigmas")
        if timesteps is not None and c.use_karras_sigmas:
            raise ValueError("set_timesteps: custom `timesteps` cannot be used with use_karras_sigmas=True")
        if timesteps is not None and c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
            raise ValueError("set_timesteps: custom `timesteps` cannot be used with timestep_type='continuous' "
                             "and prediction_type='v_prediction'")
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()  # ascending in t
        log_sigmas = np.log(train_sigmas)
        if sigmas is not None:  # the whole sigma list is given, final sigma included
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = sigma_to_t(sigmas[:-1], log_sigmas)
            self.num_inference_steps = len(sigmas) - 1
        else:
            if timesteps is not None:
                timesteps = np.array(timesteps).astype(np.float32)
            else:
                timesteps = spaced_timesteps(c, num_inference_steps, round_linspace=False).astype(np.float32)
            self.num_inference_steps = len(timesteps)
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
            if c.use_karras_sigmas:
                sigmas = karras_sigmas(sigmas, self.num_inference_steps, c.sigma_min, c.sigma_max)
                timesteps = sigma_to_t(sigmas, log_sigmas)
            last = train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0.0
            sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)  # stays on the CPU: indexed once per step
        self.timesteps = self._model_timesteps(torch.from_numpy(timesteps.astype(np.float32))).to(device)
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample, timestep):
        """The UNet's input x / sqrt(sigma^2 + 1): unit variance, as in training."""
        self._start(timestep)
        return sample / ((self.sigmas[self._step_index] ** 2 + 1) ** 0.5)

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError(f"EulerDiscreteScheduler.step: timestep={timestep!r} looks like a loop index; pass the "
                             "value from `scheduler.timesteps` (a float tensor)")
        self._start(timestep)
        sigma = self.sigmas[self._step_index]
        sample = sample.to(torch.float32)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:  # churn: first raise the noise level from sigma to sigma_hat
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            sample = sample + noise * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = sample - sigma_hat * model_output
        elif kind == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x_0, written with sigma
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        else:
            x0 = model_output
        derivative = (sample - x0) / sigma_hat
        prev_sample = sample + derivative * (self.sigmas[self._step_index + 1] - sigma_hat)
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample, x0)

    def add_noise(self, original_samples, noise, timesteps):
        return add_noise_sigma(self, original_samples, noise, timesteps)
