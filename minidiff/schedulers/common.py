"""What every scheduler shares: the training noise schedule (betas -> alphas_cumprod), the config
plumbing (diffusers' rules for scheduler_config.json and `from_config`), diffusers-compatible noise
drawing, the evenly spaced inference timesteps, and the step outputs.

Noise levels are written two ways. DDPM-style schedulers (DDIM, PNDM, LCM) use alphas_cumprod:
x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps. k-diffusion-style ones (Euler) use sigma_t = sqrt((1 - a_t) / a_t):
x_t / sqrt(a_t) = x_0 + sigma_t eps.
"""
import dataclasses
import json
import math
import os
from typing import NamedTuple, Optional

import numpy as np
import torch

from ..weights.config import AttrDict, config_from_dict
from ..weights.hub import read_json

CONFIG_NAME = "scheduler_config.json"
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")


class SchedulerOutput(NamedTuple):
    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class LCMSchedulerOutput(NamedTuple):
    prev_sample: torch.Tensor
    denoised: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Training noise schedule


def cosine_betas(num_train_timesteps, max_beta=0.999):
    """Nichol & Dhariwal's squared cosine: alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2), betas capped."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    n = num_train_timesteps
    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                        dtype=torch.float32)


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2023 (Algorithm 1): shift and scale sqrt(alphas_cumprod) so the last step is pure noise,
    keeping the first step where it was."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root ** 2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def make_betas(config):
    """The training betas (float32) that config.json describes."""
    c = config
    if c.trained_betas is not None:
        betas = torch.tensor(c.trained_betas, dtype=torch.float32)
    elif c.beta_schedule == "linear":
        betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float32)
    elif c.beta_schedule == "scaled_linear":  # linear in sqrt(beta), Stable Diffusion's schedule
        betas = torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, c.num_train_timesteps, dtype=torch.float32) ** 2
    else:
        betas = cosine_betas(c.num_train_timesteps)
    if c.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def spaced_timesteps(config, num_inference_steps, round_linspace):
    """Descending inference timesteps (float64 numpy), Table 2 of Lin et al. 2023:
    "leading" k * (N // n) + steps_offset, "trailing" round(N - k N / n) - 1, "linspace" over [0, N - 1]
    (rounded for the DDPM-style schedulers, fractional for Euler)."""
    N, n = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "leading":
        return (np.arange(0, n) * (N // n)).round()[::-1].astype(np.float64) + config.steps_offset
    if config.timestep_spacing == "trailing":
        return np.arange(N, 0, -N / n).round() - 1
    t = np.linspace(0, N - 1, n)
    return (t.round() if round_linspace else t)[::-1].copy()


def add_noise_vp(alphas_cumprod, original_samples, noise, timesteps):
    """Forward process of the DDPM-style schedulers: sqrt(a_t) x_0 + sqrt(1 - a_t) noise, per batch item.
    alphas_cumprod is cast to the samples' dtype before the square roots, as diffusers does."""
    x = original_samples
    a = alphas_cumprod.to(device=x.device, dtype=x.dtype)[timesteps.to(x.device)]
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (a ** 0.5).flatten().view(shape) * x + ((1 - a) ** 0.5).flatten().view(shape) * noise


def add_noise_sigma(scheduler, original_samples, noise, timesteps):
    """Forward process of the sigma-parametrised (Euler) schedulers: x_0 + sigma noise. The noise level is
    the one at the scheduler's place in its loop when a begin index was set (img2img), otherwise the one
    of each given timestep."""
    sigmas = scheduler.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
    if scheduler.begin_index is None:
        schedule = scheduler.timesteps.to(original_samples.device)
        indices = [index_for_timestep(schedule, t) for t in timesteps.to(original_samples.device)]
    else:
        at = scheduler.step_index if scheduler.step_index is not None else scheduler.begin_index
        indices = [at] * timesteps.shape[0]
    sigma = sigmas[indices].flatten().view((-1,) + (1,) * (original_samples.ndim - 1))
    return original_samples + noise * sigma


def index_for_timestep(schedule, timestep):
    """Position of `timestep` in `schedule`. Where it occurs twice (a schedule entered mid-way by img2img can
    repeat its first value), the second occurrence, so no noise level is skipped."""
    if torch.is_tensor(timestep):
        timestep = timestep.to(schedule.device)
    hits = (schedule == timestep).nonzero()
    if len(hits) == 0:
        raise ValueError(f"timestep {timestep} is not in the scheduler's timesteps {schedule.tolist()}; pass one of "
                         "`scheduler.timesteps` (after set_timesteps)")
    return hits[1 if len(hits) > 1 else 0].item()


# ---------------------------------------------------------------------------------------------
# Noise


def randn_tensor(shape, generator=None, device=None, dtype=None):
    """Gaussian noise drawn as diffusers draws it, so a seed gives the same image as diffusers.

    A CPU generator draws on the CPU and the result moves to `device`; a list of generators draws
    (1, ...) per batch item in order and concatenates. With no device the result is on the CPU.
    """
    device = torch.device(device) if isinstance(device, str) else device
    target = device or torch.device("cpu")
    draw_on = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type == "cpu" and target.type != "cpu":
            draw_on = "cpu"
        elif gen_type != target.type and gen_type == "cuda":
            raise ValueError(f"cannot draw a {target} tensor from a {gen_type} generator: use a CPU generator "
                             f"or one on {target}")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"a list of {len(generator)} generators was given for a batch of {shape[0]}: "
                             "pass one generator per batch item")
        one = (1,) + tuple(shape[1:])
        return torch.cat([torch.randn(one, generator=g, device=draw_on, dtype=dtype) for g in generator]).to(target)
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(target)


# ---------------------------------------------------------------------------------------------
# Config: diffusers' rules, so that swapping schedulers gives what it gives in diffusers.
#
# `scheduler.config` is a dict (attribute access too) with every key of the scheduler, plus
# `_use_default_values` listing the keys nobody set, plus keys of other schedulers that came along
# (SD 1.5's PNDM file carries `clip_sample: false` on to a DDIM made from it). `from_config` drops the
# keys listed in `_use_default_values`, so the new class uses its own defaults there: an Euler made from
# SD 1.5's PNDM config gets Euler's "linspace" spacing, not PNDM's "leading". This also means that
# `{**scheduler.config, "timestep_spacing": "trailing"}` is ignored when that key was defaulted, exactly
# as in diffusers; pass overrides as keywords instead: `X.from_config(config, timestep_spacing="trailing")`.


def check_choice(where, key, value, allowed):
    """validate() helper: a config value must be one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{where}: {key}={value!r} is not supported (choose from {', '.join(map(repr, allowed))})")


def _known_keys(config_cls):
    return {f.name for f in dataclasses.fields(config_cls)} | set(getattr(config_cls, "NEUTRAL", {}))


def make_config(config_cls, explicit, where, carried=None):
    """(parsed dataclass, the scheduler's `.config` dict) from the keys a caller set; errors name `where`."""
    explicit = {k: v for k, v in explicit.items() if not k.startswith("_")}  # _class_name and the like
    unknown = sorted(set(explicit) - _known_keys(config_cls))
    if unknown:
        raise ValueError(f"{where}: unknown config keys {unknown} (known: {sorted(_known_keys(config_cls))})")
    cfg = config_from_dict(config_cls, explicit, where)
    neutral = {k: v[0] if isinstance(v, tuple) else v for k, v in getattr(config_cls, "NEUTRAL", {}).items()}
    view = AttrDict({**dataclasses.asdict(cfg), **neutral})
    view.update({k: v for k, v in explicit.items() if k in neutral})
    view["_use_default_values"] = sorted(k for k in view if k not in explicit and k != "_use_default_values")
    for k, v in (carried or {}).items():
        view.setdefault(k, v)
    return cfg, view


def from_config(cls, config_cls, config, overrides, where=None):
    """`cls.from_config(config, **overrides)`: `config` is a dict (another scheduler's `.config` or a
    scheduler_config.json); keys of other schedulers are carried along silently."""
    where = where or f"{cls.__name__}.from_config"
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    if not isinstance(config, dict):
        raise TypeError(f"{where} expects a dict (e.g. another scheduler's .config), got {type(config).__name__}; "
                        f"to read a folder or Hub repo use {cls.__name__}.from_pretrained")
    known = _known_keys(config_cls)
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"{where}: unknown arguments {bad} (known: {sorted(known)})")
    defaulted = set(config.get("_use_default_values", ()))
    given = {k: v for k, v in config.items() if k not in defaulted and not k.startswith("_")}
    explicit = {**{k: v for k, v in given.items() if k in known}, **overrides}
    carried = {k: v for k, v in given.items() if k not in known}
    return cls(_carried=carried, _where=where, **explicit)


def from_pretrained(cls, config_cls, repo_or_path, subfolder, overrides):
    """`cls.from_pretrained(repo_or_path, subfolder="scheduler", **overrides)`: reads scheduler_config.json,
    which may have been written for another scheduler class (its extra keys are carried along)."""
    raw = read_json(repo_or_path, CONFIG_NAME, subfolder)
    where = os.path.join(os.fspath(repo_or_path), subfolder or "", CONFIG_NAME)
    return from_config(cls, config_cls, raw, overrides, where)


def save_config(scheduler, folder):
    """Write scheduler_config.json (what diffusers writes: the keys, no `_use_default_values`)."""
    os.makedirs(folder, exist_ok=True)
    d = {"_class_name": type(scheduler).__name__, "_diffusers_version": "0.39.0"}
    d.update({k: v.tolist() if hasattr(v, "tolist") else v  # trained_betas given as an array
              for k, v in scheduler.config.items() if not k.startswith("_")})
    with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2, sort_keys=True)
