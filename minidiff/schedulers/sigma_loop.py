"""What the k-diffusion-style samplers of issue 15 share (Heun, DPM2, DPM2 ancestral, LMS): the loop's noise
levels and the timesteps the UNet sees at each, the doubled schedule of the two-call samplers, and the base
class of DPM2, DPM2 ancestral and LMS (`LoopSigmaScheduler`).

The loop runs over sigmas spaced by `timestep_spacing` (interpolated between training steps), optionally
replaced by a Karras / exponential / beta schedule between the same end points, whose timesteps are then
found back by interpolating in log sigma.
"""
import numpy as np
import torch

from .base import KARRAS_SCHEDULERS, SigmaScheduler
from .common import convert_sigmas, sigma_to_t, spaced_sigmas, train_schedule, train_sigmas


class LoopSigmaScheduler(SigmaScheduler):
    """Base of DPM2, DPM2 ancestral and LMS: the training schedule, and a full-length loop until set_timesteps."""
    _compatibles = KARRAS_SCHEDULERS

    def __init__(self, **config):
        super().__init__(**config)
        self.betas, self.alphas_cumprod = train_schedule(self.cfg)
        self.set_timesteps(self.cfg.num_train_timesteps)  # as diffusers: a full-length loop until set_timesteps


def loop_sigmas(cfg, alphas_cumprod, num_inference_steps, timesteps=None, round_converted=False, bounds=(None, None)):
    """(timesteps, sigmas, log_sigmas): sigmas a float32 tensor ending in 0; timesteps numpy, float32, or
    float64 where a sigma schedule replaced the spacing (rounded if `round_converted`), as diffusers has them;
    log_sigmas the training schedule's (float32 numpy). `bounds`: (sigma_min, sigma_max) of the sigma
    schedule, None for the training schedule's ends."""
    timesteps, sigmas = spaced_sigmas(cfg, alphas_cumprod, num_inference_steps, timesteps)
    log_sigmas = np.log(train_sigmas(alphas_cumprod).numpy())
    converted = convert_sigmas(cfg, sigmas, num_inference_steps, *bounds)
    if converted is not None:
        sigmas, timesteps = converted, sigma_to_t(converted, log_sigmas)
        if round_converted and cfg.use_karras_sigmas:
            timesteps = timesteps.round()
    return timesteps, torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)), log_sigmas


def config_bounds(scheduler):
    """(sigma_min, sigma_max) from the scheduler's config: none of these schedulers has the keys, but diffusers
    reads them where a config made for another scheduler (Euler's) carried them along."""
    return scheduler.config.get("sigma_min"), scheduler.config.get("sigma_max")


def doubled(x):
    """A two-call sampler's schedule, as diffusers lays it out: each entry after the first twice (one per
    model call of a step)."""
    x = torch.as_tensor(x)
    return torch.cat([x[:1], x[1:].repeat_interleave(2)])


def interleaved(first, second):
    """[first[0], second[0], first[1], second[1], ...]: the timesteps of a two-call sampler, whose second call
    of each step is at an interpolated noise level (first is one longer than second)."""
    first, second = torch.as_tensor(first), torch.as_tensor(second).to(torch.as_tensor(first).dtype)
    return torch.cat([first[:1], torch.stack([second, first[1:]], dim=-1).flatten()])


def sigma_to_t_float32(sigmas, log_sigmas):
    """common.sigma_to_t kept in float32 throughout, as diffusers computes the DPM2 midpoints' timesteps (from
    float32 tensors), so the UNet sees the same values."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10)).astype(np.float32)
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low.astype(np.float32) + w * (low + 1).astype(np.float32)
