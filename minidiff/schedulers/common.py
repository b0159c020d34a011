"""What the schedulers share, as plain functions each scheduler calls (or takes as a method): the training
noise schedule (betas -> alphas_cumprod -> sigmas), the evenly spaced inference timesteps, the model's
x_0 / noise predictions, the loop position (step and begin index), the forward process (add_noise),
diffusers-compatible noise drawing, and the config plumbing (diffusers' rules for scheduler_config.json and
`from_config`).

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


def alpha_schedule(config):
    """(betas, alphas_cumprod, final_alpha_cumprod) of the DDPM-style schedulers. The final value is where
    the last step lands: a = 1 exactly (`set_alpha_to_one`), or the first training step's a."""
    betas = make_betas(config)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    final = torch.tensor(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
    return betas, alphas_cumprod, final


def alpha_at(scheduler, t):
    """alphas_cumprod at training step t; t < 0 (a step past the first training step) is the final value."""
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def train_sigmas(alphas_cumprod):
    """sigma_t = sqrt((1 - a_t) / a_t) for every training step, ascending in t."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_schedule(config):
    """(betas, alphas_cumprod, sigmas) of the Euler samplers before set_timesteps: every training step,
    noisiest first, then sigma 0."""
    betas = make_betas(config)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if config.rescale_betas_zero_snr:
        alphas_cumprod[-1] = 2 ** -24  # zero terminal SNR would make the last sigma infinite
    sigmas = torch.cat([train_sigmas(alphas_cumprod).flip(0), torch.zeros(1)])
    return betas, alphas_cumprod, sigmas


# ---------------------------------------------------------------------------------------------
# Inference timesteps


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


def spaced_sigmas(config, alphas_cumprod, num_inference_steps, timesteps=None):
    """The Euler samplers' loop: timesteps (float32 numpy; spaced by `timestep_spacing` unless given) and the
    sigma at each (float64), interpolated linearly between training steps since they may be fractional."""
    if timesteps is None:
        timesteps = spaced_timesteps(config, num_inference_steps, round_linspace=False)
    timesteps = np.array(timesteps).astype(np.float32)
    sigmas = train_sigmas(alphas_cumprod).numpy()
    return timesteps, np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def start_noise_std(scheduler):
    """init_noise_sigma of the Euler samplers, as diffusers sets it: sigma_max for "linspace" and "trailing",
    sqrt(sigma_max^2 + 1) for "leading"."""
    top = scheduler.sigmas.max()
    return top if scheduler.config.timestep_spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5


# ---------------------------------------------------------------------------------------------
# What the model predicts, turned into x_0 and the noise


def predict_x0(prediction_type, model_output, sample, a_t):
    """x_0 from x_t (= sample) at signal level a_t, for an eps-, x_0- ("sample") or v-predicting model."""
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        return (sample - b_t ** 0.5 * model_output) / a_t ** 0.5
    if prediction_type == "sample":
        return model_output
    return a_t ** 0.5 * sample - b_t ** 0.5 * model_output  # v = sqrt(a) eps - sqrt(1 - a) x_0


def predict_eps(prediction_type, model_output, sample, a_t, x0=None):
    """The noise in x_t: the output itself, from v, or the noise that the estimate x0 implies ("sample")."""
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return a_t ** 0.5 * model_output + b_t ** 0.5 * sample
    return (sample - a_t ** 0.5 * x0) / b_t ** 0.5


def predict_x0_sigma(prediction_type, model_output, sample, sigma, sigma_hat):
    """x_0 in sigma form (x = x_0 + sigma eps). `sigma_hat` is the level after Euler's optional churn: the eps
    form uses it, the v form uses the unchurned sigma (both as diffusers does)."""
    if prediction_type == "epsilon":
        return sample - sigma_hat * model_output
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x_0, written with sigma
        return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
    return model_output


def euler_step(sample, x0, sigma, sigma_next):
    """One Euler step of the probability-flow ODE dx/dsigma = (x - x_0) / sigma, from sigma to sigma_next."""
    derivative = (sample - x0) / sigma
    return sample + derivative * (sigma_next - sigma)


def check_float_timestep(where, timestep):
    """The sigma schedulers look timesteps up by value; an int is almost surely a loop counter."""
    if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
        raise ValueError(f"{where}: timestep={timestep!r} looks like a loop index; pass the value from "
                         "`scheduler.timesteps` (a float tensor)")


# ---------------------------------------------------------------------------------------------
# Loop position (Euler, Euler ancestral, LCM): the index of the next step in `timesteps`. It is fixed on the
# first call of a loop, from set_begin_index (img2img and the SDXL refiner start mid-way) or else from where
# the given timestep stands, then advances by one per step. The schedulers take these as their methods.


def reset_loop(scheduler):
    """A new loop (set_timesteps): no position yet and no begin index."""
    scheduler._step_index = None
    scheduler._begin_index = None


def step_index(scheduler):
    return scheduler._step_index


def begin_index(scheduler):
    return scheduler._begin_index


def set_begin_index(scheduler, begin_index=0):
    """Start the loop at position `begin_index` of `timesteps` (img2img and the SDXL refiner start mid-way)."""
    scheduler._begin_index = begin_index


def enter_loop(scheduler, timestep):
    """The loop position for this call (fixing it on the first call of a loop)."""
    if scheduler._step_index is None:
        scheduler._step_index = (scheduler._begin_index if scheduler._begin_index is not None
                                 else index_for_timestep(scheduler.timesteps, timestep))
    return scheduler._step_index


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
# Forward process (add_noise): the schedulers take these as their add_noise method.


def add_noise_vp(scheduler, original_samples, noise, timesteps):
    """DDPM-style schedulers: sqrt(a_t) x_0 + sqrt(1 - a_t) noise, per batch item. alphas_cumprod is cast to
    the samples' dtype before the square roots, as diffusers does."""
    x = original_samples
    a = scheduler.alphas_cumprod.to(device=x.device, dtype=x.dtype)[timesteps.to(x.device)]
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (a ** 0.5).flatten().view(shape) * x + ((1 - a) ** 0.5).flatten().view(shape) * noise


def add_noise_sigma(scheduler, original_samples, noise, timesteps):
    """Sigma-parametrised (Euler) schedulers: x_0 + sigma noise. The noise level is the one at the scheduler's
    place in its loop when a begin index was set (img2img), otherwise the one of each given timestep."""
    sigmas = scheduler.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
    if scheduler.begin_index is None:
        schedule = scheduler.timesteps.to(original_samples.device)
        indices = [index_for_timestep(schedule, t) for t in timesteps.to(original_samples.device)]
    else:
        at = scheduler.step_index if scheduler.step_index is not None else scheduler.begin_index
        indices = [at] * timesteps.shape[0]
    sigma = sigmas[indices].flatten().view((-1,) + (1,) * (original_samples.ndim - 1))
    return original_samples + noise * sigma


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
#
# Each scheduler class names its dataclass in `config_dataclass` (not `config_class`, which the pipelines
# read as the mark of a model with weights) and takes from_config and from_pretrained (as classmethods),
# save_pretrained and __len__ from here.


def check_choice(where, key, value, allowed):
    """validate() helper: a config value must be one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{where}: {key}={value!r} is not supported (choose from {', '.join(map(repr, allowed))})")


def check_schedule(config, where, prediction_types):
    """validate() checks of the DDPM-family configs: beta schedule, prediction type, timestep spacing."""
    if config.trained_betas is None:  # given betas make beta_schedule moot
        check_choice(where, "beta_schedule", config.beta_schedule, BETA_SCHEDULES)
    check_choice(where, "prediction_type", config.prediction_type, prediction_types)
    check_choice(where, "timestep_spacing", config.timestep_spacing, SPACINGS)


def _known_keys(config_cls):
    return {f.name for f in dataclasses.fields(config_cls)} | set(getattr(config_cls, "NEUTRAL", {}))


def make_config(cls, explicit, where=None, carried=None):
    """(parsed dataclass, the `.config` dict) of scheduler class `cls` from the keys a caller set; errors
    name `where` (by default the constructor call)."""
    config_cls, where = cls.config_dataclass, where or f"{cls.__name__}(...)"
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


def from_config(cls, config, **overrides):
    """`cls.from_config(config, **overrides)`: `config` is a dict (another scheduler's `.config` or a
    scheduler_config.json); keys of other schedulers are carried along silently."""
    return _from_dict(cls, config, overrides, f"{cls.__name__}.from_config")


def from_pretrained(cls, repo_or_path, subfolder=None, **overrides):
    """`cls.from_pretrained(repo_or_path, subfolder="scheduler", **overrides)`: reads scheduler_config.json,
    which may have been written for another scheduler class (its extra keys are carried along)."""
    raw = read_json(repo_or_path, CONFIG_NAME, subfolder)
    where = os.path.join(os.fspath(repo_or_path), subfolder or "", CONFIG_NAME)
    return _from_dict(cls, raw, overrides, where)


def _from_dict(cls, config, overrides, where):
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    if not isinstance(config, dict):
        raise TypeError(f"{where} expects a dict (e.g. another scheduler's .config), got {type(config).__name__}; "
                        f"to read a folder or Hub repo use {cls.__name__}.from_pretrained")
    known = _known_keys(cls.config_dataclass)
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"{where}: unknown arguments {bad} (known: {sorted(known)})")
    defaulted = set(config.get("_use_default_values", ()))
    given = {k: v for k, v in config.items() if k not in defaulted and not k.startswith("_")}
    explicit = {**{k: v for k, v in given.items() if k in known}, **overrides}
    carried = {k: v for k, v in given.items() if k not in known}
    return cls(_carried=carried, _where=where, **explicit)


def save_pretrained(scheduler, folder):
    """Write scheduler_config.json (what diffusers writes: the keys, no `_use_default_values`)."""
    os.makedirs(folder, exist_ok=True)
    d = {"_class_name": type(scheduler).__name__, "_diffusers_version": "0.39.0"}
    d.update({k: v.tolist() if hasattr(v, "tolist") else v  # trained_betas given as an array
              for k, v in scheduler.config.items() if not k.startswith("_")})
    with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2, sort_keys=True)


def num_train_timesteps(scheduler):
    """len(scheduler), as in diffusers."""
    return scheduler.config.num_train_timesteps
