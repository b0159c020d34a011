"""Ancestral DPM2 (k-diffusion's `sample_dpm_2_ancestral`), as diffusers' KDPM2AncestralDiscreteScheduler.

Each step from sigma_i to sigma_{i+1} splits like Euler ancestral's: a deterministic part down to sigma_down,
then fresh noise of std sigma_up (sigma_down^2 + sigma_up^2 = sigma_{i+1}^2). The deterministic part is DPM2's
midpoint step (two model calls, the second at sqrt(sigma_i sigma_down)); noise is drawn after the second
call. The last step, to sigma 0, is a plain Euler step (one call, no noise).
"""
import dataclasses

import torch

from .base import step_output
from .common import check_float_timestep, predict_x0_sigma, randn_tensor
from .kdpm2 import KDPM2DiscreteConfig, KDPM2DiscreteScheduler, dpm2_loop_sigmas, midpoint_sigmas
from .sigma_loop import doubled, interleaved, sigma_to_t_float32


@dataclasses.dataclass
class KDPM2AncestralDiscreteConfig(KDPM2DiscreteConfig):  # the same keys and defaults
    pass


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):  # DPM2's two-call loop state; its own schedule, step
    config_dataclass = KDPM2AncestralDiscreteConfig

    def set_timesteps(self, num_inference_steps, device=None):
        self.num_inference_steps = num_inference_steps
        t, sigmas, log_sigmas = dpm2_loop_sigmas(self, num_inference_steps)
        to = torch.cat([sigmas[1:], sigmas[:1] * 0])
        up = (to ** 2 * (sigmas ** 2 - to ** 2) / sigmas ** 2) ** 0.5  # DDPM's ancestral noise (eta = 1)
        down = (to ** 2 - up ** 2) ** 0.5
        down[-1] = 0.0
        mid = midpoint_sigmas(sigmas, down)
        mid[-2:] = 0.0  # the last step is Euler to 0
        t_mid = sigma_to_t_float32(mid.numpy(), log_sigmas)
        self.sigmas, self.sigmas_interpol = (torch.cat([doubled(s), s[-1:]]) for s in (sigmas, mid))
        self.sigmas_up, self.sigmas_down = (torch.cat([doubled(s), s[-1:]]) for s in (up, down))
        self.timesteps = interleaved(torch.from_numpy(t), torch.from_numpy(t_mid[:-2])).to(device)
        self.sample = None  # the step's start, kept between its two calls
        self.reset_loop()

    def scale_model_input(self, sample, timestep):
        i = self.enter_loop(timestep)
        sigma = self.sigmas[i] if self.state_in_first_order else self.sigmas_interpol[i - 1]
        return sample / ((sigma ** 2 + 1) ** 0.5)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        check_float_timestep("KDPM2AncestralDiscreteScheduler.step", timestep)
        i = self.enter_loop(timestep)
        first = self.state_in_first_order
        j = i if first else i - 1  # this step's entry in the doubled schedules
        sigma, sigma_mid = self.sigmas[j], self.sigmas_interpol[j]
        seen = sigma if first else sigma_mid  # the level the model saw
        x0 = predict_x0_sigma(self.cfg.prediction_type, model_output, sample, seen, seen)
        derivative = (sample - x0) / seen
        if first:  # Euler to the midpoint (to 0 on the last step)
            self.sample = sample
            prev_sample = sample + derivative * (sigma_mid - sigma)
        else:  # the deterministic part from the step's start with the midpoint's slope, then fresh noise
            prev_sample = self.sample + derivative * (self.sigmas_down[i - 1] - sigma)
            self.sample = None
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + noise * self.sigmas_up[i - 1]
        self._step_index += 1
        return step_output(return_dict, prev_sample, x0)
