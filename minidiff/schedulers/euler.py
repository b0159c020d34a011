"""Euler sampler on the DDPM noise levels, as diffusers' EulerDiscreteScheduler (k-diffusion's `sample_euler`).

In sigma form the noisy latent is x = x_0 + sigma eps and the UNet sees x / sqrt(sigma^2 + 1). One step
is an Euler step of the probability-flow ODE dx/dsigma = (x - x_0) / sigma from sigma_i to sigma_{i+1}
(Karras et al. 2022, Algorithm 2; `s_churn` adds its optional noise).
"""
import dataclasses
from typing import Optional

import numpy as np
import torch

from .base import KARRAS_SCHEDULERS, SigmaConfig, SigmaScheduler, step_output
from .common import (check_choice, check_float_timestep, check_schedule, check_sigma_schedule, convert_sigmas, euler_step,
                     predict_x0_sigma, randn_tensor, sigma_schedule, sigma_to_t, spaced_sigmas, train_sigmas)


@dataclasses.dataclass
class EulerDiscreteConfig(SigmaConfig):
    use_karras_sigmas: Optional[bool] = False  # (Optional here, as in diffusers: null means False)
    use_exponential_sigmas: Optional[bool] = False
    use_beta_sigmas: Optional[bool] = False
    interpolation_type: str = "linear"  # sigma between training steps: "linear" in t, or "log_linear" (see below)
    sigma_min: Optional[float] = None  # bounds of the three sigma schedules (default: the training schedule's own)
    sigma_max: Optional[float] = None
    timestep_type: str = "discrete"  # "continuous": the UNet gets 0.25 log(sigma) (EDM-style v-prediction models)
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"  # the loop ends at sigma 0, or at the first training step's sigma

    def validate(self, where):
        check_schedule(self, where, ("epsilon", "v_prediction", "sample", "original_sample"))
        check_choice(where, "timestep_type", self.timestep_type, ("discrete", "continuous"))
        check_choice(where, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        check_choice(where, "interpolation_type", self.interpolation_type, ("linear", "log_linear"))
        check_sigma_schedule(self, where)


class EulerDiscreteScheduler(SigmaScheduler):
    config_dataclass = EulerDiscreteConfig
    _compatibles = KARRAS_SCHEDULERS

    def __init__(self, **config):
        super().__init__(**config)
        self.betas, self.alphas_cumprod, self.sigmas = sigma_schedule(self.cfg)
        # until set_timesteps: every training step
        train_steps = torch.arange(self.cfg.num_train_timesteps - 1, -1, -1, dtype=torch.float32)
        self.timesteps = self._model_timesteps(train_steps)

    def _model_timesteps(self, timesteps):
        # what the UNet is given at each sigma (self.sigmas[:-1] for continuous time)
        c = self.cfg
        if c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
            return 0.25 * self.sigmas[:-1].log()
        return timesteps

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
        """The loop's timesteps and sigmas: evenly spaced (`timestep_spacing`), Karras, exponential or beta-spaced, or
        given."""
        c = self.cfg
        if sum(x is not None for x in (num_inference_steps, timesteps, sigmas)) != 1:
            raise ValueError("set_timesteps: pass exactly one of num_inference_steps, timesteps or sigmas")
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if timesteps is not None and getattr(c, flag):
                raise ValueError(f"set_timesteps: custom `timesteps` cannot be used with {flag}=True")
        if timesteps is not None and c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
            raise ValueError("set_timesteps: custom `timesteps` cannot be used with timestep_type='continuous' "
                             "and prediction_type='v_prediction'")
        trained = train_sigmas(self.alphas_cumprod).numpy()
        log_sigmas = np.log(trained)
        if sigmas is not None:  # the whole sigma list is given, final sigma included
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = sigma_to_t(sigmas[:-1], log_sigmas)
        else:
            timesteps, sigmas = spaced_sigmas(c, self.alphas_cumprod, num_inference_steps, timesteps)
            if c.interpolation_type == "log_linear":  # n + 1 levels evenly spaced in log sigma (as diffusers)
                sigmas = torch.linspace(np.log(trained[-1]), np.log(trained[0]), len(timesteps) + 1).exp().numpy()
            converted = convert_sigmas(c, sigmas, len(timesteps), c.sigma_min, c.sigma_max)
            if converted is not None:  # Karras, exponential or beta: the timesteps follow the sigmas
                sigmas, timesteps = converted, sigma_to_t(converted, log_sigmas)
            last = trained[0] if c.final_sigmas_type == "sigma_min" else 0.0
            sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.num_inference_steps = len(timesteps)
        self.sigmas = torch.from_numpy(sigmas)  # stays on the CPU: indexed once per step
        self.timesteps = self._model_timesteps(torch.from_numpy(timesteps.astype(np.float32))).to(device)
        self.reset_loop()

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        check_float_timestep("EulerDiscreteScheduler.step", timestep)
        i = self.enter_loop(timestep)
        sigma = self.sigmas[i]
        sample = sample.to(torch.float32)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:  # churn: first raise the noise level from sigma to sigma_hat
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            sample = sample + noise * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
        x0 = predict_x0_sigma(self.cfg.prediction_type, model_output, sample, sigma, sigma_hat)
        prev_sample = euler_step(sample, x0, sigma_hat, self.sigmas[i + 1]).to(model_output.dtype)
        self._step_index += 1
        return step_output(return_dict, prev_sample, x0)
