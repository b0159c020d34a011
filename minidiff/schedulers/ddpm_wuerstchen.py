"""DDPM sampling in continuous time for Würstchen (stages B and C).

Time t runs from 1 (pure noise) to 0 (clean). The noise level is the cosine schedule
alpha_bar(t) = cos^2((t + s) / (1 + s) * pi/2) / cos^2(s / (1 + s) * pi/2), clamped to
[1e-4, 0.9999]; `scaler` warps t first (t -> 1 - (1 - t)^scaler above 1, t^scaler below).
Each step is the DDPM posterior mean from the predicted noise plus fresh Gaussian noise, drawn on
every step (also the last, where it is multiplied by 0) so a seeded generator advances exactly as
in diffusers.
"""
import dataclasses
import math

import numpy as np
import torch

from .base import Scheduler, step_output
from .common import randn_tensor

# Stage C's default schedule: 20 steps over the noisiest third, then 10 over the rest.
DEFAULT_STAGE_C_TIMESTEPS = [float(t) for t in np.linspace(1.0, 2 / 3, 20)] + \
                            [float(t) for t in np.linspace(2 / 3, 0.0, 11)[1:]]


@dataclasses.dataclass
class DDPMWuerstchenConfig:
    scaler: float = 1.0
    s: float = 0.008

    def validate(self, where):
        if not self.scaler > 0:
            raise ValueError(f"{where}: scaler={self.scaler!r} must be > 0")
        if not self.s >= 0:
            raise ValueError(f"{where}: s={self.s!r} must be >= 0")


class DDPMWuerstchenScheduler(Scheduler):
    """The initial latents are unit Gaussian noise; the model input is not scaled."""
    config_dataclass = DDPMWuerstchenConfig

    def __init__(self, **config):
        super().__init__(**config)
        self.timesteps = None

    def alpha_bar(self, t, device=None):
        """Cumulative signal fraction at continuous time(s) t, computed in fp32 like the reference."""
        cfg = self.cfg
        t = torch.as_tensor(t, device=device)
        if cfg.scaler > 1:
            t = 1 - (1 - t) ** cfg.scaler
        elif cfg.scaler < 1:
            t = t ** cfg.scaler
        s = torch.tensor([cfg.s], device=t.device)  # a 1-d fp32 tensor: fp16 t is promoted to fp32
        at_zero = torch.cos(s / (1 + s) * math.pi * 0.5) ** 2
        return (torch.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2 / at_zero).clamp(1e-4, 0.9999)

    def set_timesteps(self, num_inference_steps=None, timesteps=None, device=None):
        """Either `num_inference_steps` (t = linspace(1, 0, n + 1)) or a descending list `timesteps`
        ending at 0; the sampler steps from each entry to the next, so it runs len - 1 steps."""
        if timesteps is None:
            if num_inference_steps is None:
                raise ValueError("set_timesteps: pass num_inference_steps or timesteps (both are None)")
            timesteps = torch.linspace(1.0, 0.0, num_inference_steps + 1, device=device)
        elif not isinstance(timesteps, torch.Tensor):
            timesteps = torch.tensor([float(t) for t in timesteps], dtype=torch.float32, device=device)
        elif device is not None:
            timesteps = timesteps.to(device)
        self.timesteps = timesteps

    def previous_timestep(self, timestep):
        """The entry after `timestep` in self.timesteps, for each of the batch."""
        if self.timesteps is None:
            raise RuntimeError("DDPMWuerstchenScheduler: call set_timesteps before step")
        index = (self.timesteps.to(timestep.device) - timestep[0]).abs().argmin().item()
        if index + 1 >= len(self.timesteps):
            raise ValueError(f"step: timestep {timestep[0].item():.4f} is the last of the schedule; "
                             "loop over scheduler.timesteps[:-1]")
        return self.timesteps[index + 1].to(timestep.device)[None].expand(timestep.shape[0])

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """x_t -> x_{t_prev} from the predicted noise; `timestep` is the (B,) ratio (or one float)."""
        dtype, device = model_output.dtype, model_output.device
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t.expand(sample.shape[0])
        prev_t = self.previous_timestep(t)
        bcast = (t.shape[0],) + (1,) * (sample.ndim - 1)
        ab = self.alpha_bar(t, device).view(bcast)
        ab_prev = self.alpha_bar(prev_t, device).view(bcast)
        alpha = ab / ab_prev

        mean = (1.0 / alpha).sqrt() * (sample - (1 - alpha) * model_output / (1 - ab).sqrt())
        noise = randn_tensor(mean.shape, generator=generator, device=device, dtype=dtype)
        std = ((1 - alpha) * (1.0 - ab_prev) / (1.0 - ab)).sqrt()
        prev = mean + std * noise * (prev_t != 0).float().view(bcast)  # no noise into t = 0
        return step_output(return_dict, prev.to(dtype))

    def add_noise(self, original_samples, noise, timesteps):
        """Forward process: sqrt(ab) x0 + sqrt(1 - ab) noise at continuous times (B,)."""
        ab = self.alpha_bar(timesteps, original_samples.device)
        ab = ab.view((timesteps.shape[0],) + (1,) * (original_samples.ndim - 1))
        return (ab.sqrt() * original_samples + (1 - ab).sqrt() * noise).to(original_samples.dtype)
