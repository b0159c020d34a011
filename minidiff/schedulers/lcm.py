"""Multistep Latent Consistency Model sampling (Luo et al. 2023), as diffusers' LCMScheduler.

The schedule is a subset of the `original_inference_steps`-step grid the model was distilled on
(t = k * (1000 // original) - 1). Each step maps x_t straight to a clean estimate with the consistency
boundary condition denoised = c_skip(t) x_t + c_out(t) x_0(x_t), then noises it again to the next
timestep with fresh noise; the last step returns the clean estimate (no noise drawn).
"""
import dataclasses

import numpy as np
import torch

from .base import LCMSchedulerOutput, PredictedX0Config, Scheduler
from .common import alpha_at, alpha_schedule, check_timesteps, predict_x0, randn_tensor, threshold_sample


@dataclasses.dataclass
class LCMConfig(PredictedX0Config):  # (timestep_spacing and steps_offset: unused by LCM's schedule, as in diffusers)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    clip_sample: bool = False
    original_inference_steps: int = 50
    set_alpha_to_one: bool = True
    timestep_scaling: float = 10.0


class LCMScheduler(Scheduler):
    """Starts from unit Gaussian noise; the UNet input is not scaled."""
    config_dataclass = LCMConfig

    def __init__(self, **config):
        super().__init__(**config)
        self.betas, self.alphas_cumprod, self.final_alpha_cumprod = alpha_schedule(self.cfg)
        self.timesteps = torch.arange(self.cfg.num_train_timesteps - 1, -1, -1)
        self.custom_timesteps = False

    def set_timesteps(self, num_inference_steps=None, device=None, original_inference_steps=None, timesteps=None,
                      strength=1.0):
        """`num_inference_steps` timesteps evenly spaced (by index) over the distillation grid, or the given
        descending `timesteps`; `strength` < 1 (img2img) keeps only the lower part of the grid."""
        N = self.cfg.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("LCMScheduler.set_timesteps: pass exactly one of num_inference_steps or timesteps")
        original = original_inference_steps if original_inference_steps is not None \
            else self.cfg.original_inference_steps
        if original > N:
            raise ValueError(f"LCMScheduler.set_timesteps: original_inference_steps={original} is more than the "
                             f"{N} training timesteps")
        grid = np.arange(1, int(original * strength) + 1) * (N // original) - 1  # ascending
        if timesteps is not None:
            check_timesteps("LCMScheduler.set_timesteps", timesteps, N)
            timesteps = np.array(timesteps, dtype=np.int64)
            self.num_inference_steps = len(timesteps)
            self.custom_timesteps = True
            # img2img: keep the last `strength` fraction of the given steps
            kept = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            timesteps = timesteps[max(self.num_inference_steps - kept, 0) * self.order:]
        else:
            n = num_inference_steps
            if n > N:
                raise ValueError(f"LCMScheduler.set_timesteps: num_inference_steps={n} is more than the {N} "
                                 "training timesteps")
            if len(grid) // n < 1:
                raise ValueError(f"LCMScheduler.set_timesteps: original_inference_steps x strength = {original} x "
                                 f"{strength} leaves {len(grid)} timesteps, fewer than num_inference_steps={n}; "
                                 f"lower num_inference_steps or raise strength to at least {n / original}")
            if n > original:
                raise ValueError(f"LCMScheduler.set_timesteps: num_inference_steps={n} is more than "
                                 f"original_inference_steps={original}, the grid the schedule is taken from")
            self.num_inference_steps = n
            picks = np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)
            timesteps = grid[::-1][picks]
        self.timesteps = torch.from_numpy(np.ascontiguousarray(timesteps)).to(device=device, dtype=torch.long)
        self.reset_loop()

    def previous_timestep(self, timestep):
        """The timestep after `timestep` in this loop (-1 after the last one), as diffusers."""
        if self.custom_timesteps or self.num_inference_steps:
            index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
            return torch.tensor(-1) if index == self.timesteps.shape[0] - 1 else self.timesteps[index + 1]
        return timestep - 1

    def boundary_scalings(self, timestep):
        """(c_skip, c_out) of consistency models with sigma_data 0.5, at scaled time t * timestep_scaling:
        c_skip -> 1 and c_out -> 0 as t -> 0, so the model is the identity on clean data."""
        sigma_data = 0.5
        scaled = timestep * self.cfg.timestep_scaling
        c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
        c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
        return c_skip, c_out

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("LCMScheduler.step: call set_timesteps first")
        c = self.cfg
        i = self.enter_loop(timestep)
        t = int(timestep)
        # past the end of `timesteps` the next timestep is t itself (as in diffusers)
        t_prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        a_t, a_prev = self.alphas_cumprod[t], alpha_at(self, t_prev)
        c_skip, c_out = self.boundary_scalings(torch.as_tensor(timestep))
        x0 = predict_x0(c.prediction_type, model_output, sample, a_t)
        if c.thresholding:
            x0 = threshold_sample(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        denoised = c_out * x0 + c_skip * sample
        if i != self.num_inference_steps - 1:  # noise again, down to the next timestep
            noise = randn_tensor(model_output.shape, generator, model_output.device, denoised.dtype)
            prev_sample = a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * noise
        else:
            prev_sample = denoised
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return LCMSchedulerOutput(prev_sample, denoised)
