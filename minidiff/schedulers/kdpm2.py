"""DPM2 (k-diffusion's `sample_dpm_2`, after DPM-Solver-2 and Karras et al. 2022 Algorithm 2), as diffusers'
KDPM2DiscreteScheduler.

A midpoint method in log sigma: each step from sigma_i to sigma_{i+1} first goes by Euler to the geometric
mean sigma_mid = sqrt(sigma_i sigma_{i+1}), asks the model there, and takes the whole step from x_i with that
midpoint slope. `timesteps` interleaves the steps' timesteps with the midpoints' (two model calls per step);
the last step, to sigma 0, is a plain Euler step (one call).
"""
import dataclasses

import torch

from .base import SigmaConfig, step_output
from .common import check_float_timestep, predict_x0_sigma
from .sigma_loop import LoopSigmaScheduler, config_bounds, doubled, interleaved, loop_sigmas, sigma_to_t_float32


@dataclasses.dataclass
class KDPM2DiscreteConfig(SigmaConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012

    prediction_types = ("epsilon", "v_prediction")  # diffusers has no "sample" form either


def dpm2_loop_sigmas(scheduler, num_inference_steps):
    """loop_sigmas for DPM2 and DPM2 ancestral (diffusers rounds DPM2's Karras timesteps, not the midpoints')."""
    return loop_sigmas(scheduler.cfg, scheduler.alphas_cumprod, num_inference_steps, round_converted=True,
                       bounds=config_bounds(scheduler))


def midpoint_sigmas(sigmas, sigmas_to):
    """Geometric means sqrt(sigma sigma_to), computed as diffusers does (lerp of the logs, in float32)."""
    return sigmas.log().lerp(sigmas_to.log(), 0.5).exp()


class KDPM2DiscreteScheduler(LoopSigmaScheduler):
    config_dataclass = KDPM2DiscreteConfig
    order = 2

    def set_timesteps(self, num_inference_steps, device=None):
        self.num_inference_steps = num_inference_steps
        t, sigmas, log_sigmas = dpm2_loop_sigmas(self, num_inference_steps)
        mid = midpoint_sigmas(sigmas, sigmas.roll(1))  # mid[i]: between sigma_{i-1} and sigma_i
        t_mid = sigma_to_t_float32(mid.numpy(), log_sigmas)
        self.sigmas = torch.cat([doubled(sigmas), sigmas[-1:]])  # CPU: indexed once per call
        self.sigmas_interpol = torch.cat([doubled(mid), mid[-1:]])
        self.timesteps = interleaved(torch.from_numpy(t), torch.from_numpy(t_mid[1:-1])).to(device)
        self.sample = None  # the step's start, kept between its two calls
        self.reset_loop()

    @property
    def state_in_first_order(self):
        return self.sample is None

    def scale_model_input(self, sample, timestep):
        i = self.enter_loop(timestep)
        sigma = self.sigmas[i] if self.state_in_first_order else self.sigmas_interpol[i]
        return sample / ((sigma ** 2 + 1) ** 0.5)

    def step(self, model_output, timestep, sample, return_dict=True):
        check_float_timestep("KDPM2DiscreteScheduler.step", timestep)
        i = self.enter_loop(timestep)
        first = self.state_in_first_order
        if first:
            sigma, sigma_mid, sigma_next = self.sigmas[i], self.sigmas_interpol[i + 1], self.sigmas[i + 1]
        else:
            sigma, sigma_mid, sigma_next = self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]
        seen = sigma if first else sigma_mid  # the level the model saw
        x0 = predict_x0_sigma(self.cfg.prediction_type, model_output, sample, seen, seen)
        derivative = (sample - x0) / seen
        if first:  # Euler to the midpoint (to 0 on the last step)
            dt, self.sample = sigma_mid - sigma, sample
        else:  # the whole step from its start, with the midpoint's slope
            dt, sample, self.sample = sigma_next - sigma, self.sample, None
        prev_sample = sample + derivative * dt
        self._step_index += 1
        return step_output(return_dict, prev_sample, x0)
