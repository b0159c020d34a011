"""Trajectory Consistency Distillation sampling (Zheng et al. 2024, "TCD"), as diffusers' TCDScheduler.

Timesteps as LCM's: a subset of the `original_inference_steps`-step grid the model was distilled on. Each
step predicts x_0 and the noise at t, moves deterministically (DDIM) to an intermediate s = floor((1 - gamma)
t'), and then forward-diffuses from s back up to the next timestep t' with fresh noise (the paper's strategic
stochastic sampling). gamma, the step's `eta`, sets the mix: 0 is deterministic (DDIM to t'), 1 is LCM's
jump to x_0 and re-noise. The last step returns the estimate at s (no noise).
"""
import dataclasses
from typing import Optional

import numpy as np
import torch

from .base import Output, Scheduler
from .common import check_timesteps, predict_eps, predict_x0, randn_tensor, train_schedule
from .lcm import LCMConfig


@dataclasses.dataclass(eq=False)
class TCDSchedulerOutput(Output):
    prev_sample: torch.Tensor
    pred_noised_sample: Optional[torch.Tensor] = None


@dataclasses.dataclass
class TCDConfig(LCMConfig):  # LCM's keys and defaults (clip_sample, thresholding: unused by TCD's step, as in diffusers)
    pass


class TCDScheduler(Scheduler):
    config_dataclass = TCDConfig

    def __init__(self, **config):
        super().__init__(**config)
        self.betas, self.alphas_cumprod = train_schedule(self.cfg)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = torch.arange(self.cfg.num_train_timesteps - 1, -1, -1)
        self.custom_timesteps = False

    def set_timesteps(self, num_inference_steps=None, device=None, original_inference_steps=None, timesteps=None,
                      strength=1.0):
        """`num_inference_steps` timesteps evenly spaced (by index) over the distillation grid, or the given
        descending `timesteps`; `strength` < 1 (img2img) keeps only the lower part of the grid."""
        N, where = self.cfg.num_train_timesteps, "TCDScheduler.set_timesteps"
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{where}: pass exactly one of num_inference_steps or timesteps")
        original = original_inference_steps if original_inference_steps is not None else self.cfg.original_inference_steps
        if original > N:
            raise ValueError(f"{where}: original_inference_steps={original} is more than the {N} training timesteps")
        if original_inference_steps is None:  # the distillation grid, ascending
            grid = np.arange(1, int(original * strength) + 1) * (N // original) - 1
        else:  # (as diffusers: an explicit original_inference_steps means every training step)
            grid = np.arange(0, int(N * strength))
        if timesteps is not None:
            check_timesteps(where, timesteps, N)
            timesteps = np.array(timesteps, dtype=np.int64)
            self.num_inference_steps, self.custom_timesteps = len(timesteps), True
            kept = min(int(self.num_inference_steps * strength), self.num_inference_steps)  # img2img
            timesteps = timesteps[max(self.num_inference_steps - kept, 0):]
        else:
            n = num_inference_steps
            if n > N:
                raise ValueError(f"{where}: num_inference_steps={n} is more than the {N} training timesteps")
            if len(grid) // n < 1:
                raise ValueError(f"{where}: original_inference_steps x strength = {original} x {strength} leaves "
                                 f"{len(grid)} timesteps, fewer than num_inference_steps={n}")
            if n > original:
                raise ValueError(f"{where}: num_inference_steps={n} is more than original_inference_steps="
                                 f"{original}, the grid the schedule is taken from")
            self.num_inference_steps = n
            timesteps = grid[::-1][np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)]
        self.timesteps = torch.from_numpy(np.ascontiguousarray(timesteps)).to(device=device, dtype=torch.long)
        self.reset_loop()

    def step(self, model_output, timestep, sample, eta=0.3, generator=None, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("TCDScheduler.step: call set_timesteps first")
        if not 0 <= eta <= 1:
            raise ValueError(f"TCDScheduler.step: eta (TCD's gamma) = {eta} must be in [0, 1]")
        c = self.cfg
        i = self.enter_loop(timestep)
        t_prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else torch.tensor(0)
        s = torch.floor((1 - eta) * t_prev).to(dtype=torch.long)
        a_t, a_s = self.alphas_cumprod[timestep], self.alphas_cumprod[s]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        x0 = predict_x0(c.prediction_type, model_output, sample, a_t)
        eps = predict_eps(c.prediction_type, model_output, sample, a_t, x0)
        noised = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps  # DDIM from t down to s
        if eta > 0 and i != self.num_inference_steps - 1:  # forward-diffuse from s up to t'
            noise = randn_tensor(model_output.shape, generator, model_output.device, noised.dtype)
            prev_sample = (a_prev / a_s).sqrt() * noised + (1 - a_prev / a_s).sqrt() * noise
        else:
            prev_sample = noised
        self._step_index += 1
        out = TCDSchedulerOutput(prev_sample, noised)
        return out if return_dict else out.to_tuple()
