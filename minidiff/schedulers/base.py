"""The one scheduler base: config handling with diffusers' rules, save/load, loop position, outputs.

A scheduler file defines a config dataclass (diffusers' __init__ arguments: same names, same defaults) and
a class on `Scheduler` (or `SigmaScheduler`) with `__init__`, `set_timesteps`, `scale_model_input` where
the base's does not fit, and `step`; the math lives in plain functions (common.py or the file itself).

Config rules (diffusers' ConfigMixin, so that swapping schedulers gives what it gives in diffusers):
`scheduler.config` is a dict (attribute access too) with every key of the scheduler, `_use_default_values`
listing the keys nobody set, and keys of other schedulers that came along (SD 1.5's PNDM file carries
`clip_sample: false` on to a DDIM made from it). Such carried keys are only remembered: the math reads
`scheduler.cfg`, the parsed dataclass, so a key this class does not have in diffusers changes nothing.
`from_config` drops the keys listed in `_use_default_values`, so the new class uses its own defaults there:
an Euler made from SD 1.5's PNDM config gets Euler's "linspace" spacing, not PNDM's "leading". Hence
`{**scheduler.config, "timestep_spacing": "trailing"}` is ignored when that key was defaulted, exactly as
in diffusers; pass overrides as keywords: `X.from_config(config, timestep_spacing="trailing")`.
"""
import dataclasses
import importlib
import json
import os
import warnings
from typing import Optional

import torch

from ..models.base import ModelOutput
from ..weights.config import AttrDict, config_from_dict
from ..weights.hub import read_json
from .common import check_schedule, check_sigma_schedule, index_for_timestep, start_noise_std

CONFIG_NAME = "scheduler_config.json"
# diffusers' KarrasDiffusionSchedulers: the schedulers that share the DDPM noise schedule and swap freely
KARRAS_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
                     "EulerDiscreteScheduler", "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                     "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
                     "KDPM2AncestralDiscreteScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                     "DPMSolverSDEScheduler", "EDMEulerScheduler")


# ---------------------------------------------------------------------------------------------
# Outputs: the one output convention (models/base.py ModelOutput: by attribute, by index over the fields that
# are set, as diffusers' BaseOutput), and by key.


class Output(ModelOutput):
    def keys(self):
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@dataclasses.dataclass(eq=False)
class SchedulerOutput(Output):
    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


@dataclasses.dataclass(eq=False)
class LCMSchedulerOutput(Output):
    prev_sample: torch.Tensor
    denoised: Optional[torch.Tensor] = None


def step_output(return_dict, prev_sample, pred_original_sample=None):
    """What step returns: the output object, or diffusers' tuple (prev_sample[, pred_original_sample])."""
    out = SchedulerOutput(prev_sample, pred_original_sample)
    return out if return_dict else out.to_tuple()


# ---------------------------------------------------------------------------------------------
# Config bases: the keys most schedulers share, with diffusers' names and defaults. A scheduler's config
# dataclass derives from one and adds its own keys (or gives one its own default, as diffusers does).


@dataclasses.dataclass
class TrainScheduleConfig:
    """The training noise schedule (common.py `train_schedule`) and what the model predicts."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[list] = None
    prediction_type: str = "epsilon"

    prediction_types = ("epsilon", "v_prediction", "sample")  # (not a field: what validate accepts)

    def validate(self, where):  # (for the subclasses: they have timestep_spacing)
        check_schedule(self, where, self.prediction_types)


@dataclasses.dataclass
class PredictedX0Config(TrainScheduleConfig):
    """... for the schedulers that step through a predicted x_0 (DDIM, DDPM, LCM, TCD): its clipping, or Imagen's
    dynamic thresholding, and diffusers' "leading" spacing."""
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False  # Imagen's dynamic thresholding of x_0 (pixel-space models; it replaces clipping)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False


@dataclasses.dataclass
class SigmaConfig(TrainScheduleConfig):
    """... for the k-diffusion-style schedulers (sigma_loop.py): the optional Karras / exponential / beta sigmas."""
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    def validate(self, where):
        super().validate(where)
        check_sigma_schedule(self, where)


# ---------------------------------------------------------------------------------------------


def _known_keys(config_cls):
    return {f.name for f in dataclasses.fields(config_cls)} | set(getattr(config_cls, "NEUTRAL", {}))


class Scheduler:
    config_dataclass = None  # each scheduler names its config dataclass (not `config_class`: that marks a model)
    order = 1  # UNet calls per step
    init_noise_sigma = 1.0  # the loop starts from unit Gaussian noise times this
    _compatibles = ()  # names of the schedulers that can be built from this one's config

    def __init__(self, _carried=None, _where=None, **config):
        cls = type(self)
        where = _where or f"{cls.__name__}(...)"
        private = {k: v for k, v in config.items() if k.startswith("_") and k != "_use_default_values"}
        explicit = {k: v for k, v in config.items() if not k.startswith("_")}
        known = _known_keys(cls.config_dataclass)
        unknown = sorted(set(explicit) - known)
        if unknown:
            raise ValueError(f"{where}: unknown config keys {unknown} (known: {sorted(known)})")
        self.cfg = config_from_dict(cls.config_dataclass, explicit, where)
        neutral = {k: v[0] if isinstance(v, tuple) else v for k, v in getattr(cls.config_dataclass, "NEUTRAL", {}).items()}
        view = AttrDict({**private, **dataclasses.asdict(self.cfg), **neutral})
        view.update({k: v for k, v in explicit.items() if k in neutral})
        view["_use_default_values"] = sorted(k for k in known if k not in explicit)  # (diffusers omits it when empty)
        for k, v in (_carried or {}).items():
            view.setdefault(k, v)
        self.config = view
        self.num_inference_steps = None
        self.reset_loop()

    # config files ------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config, **overrides):
        """`cls.from_config(config, **overrides)`: `config` is a dict (another scheduler's `.config` or a
        scheduler_config.json); keys of other schedulers are carried along and ignored."""
        return cls._from_dict(config, overrides, f"{cls.__name__}.from_config")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **overrides):
        """`cls.from_pretrained(repo_or_path, subfolder="scheduler", **overrides)`: reads scheduler_config.json,
        which may have been written for another scheduler class (its extra keys are carried along)."""
        raw = read_json(pretrained_model_name_or_path, CONFIG_NAME, subfolder)
        where = os.path.join(os.fspath(pretrained_model_name_or_path), subfolder or "", CONFIG_NAME)
        return cls._from_dict(raw, overrides, where)

    @classmethod
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
        given = {k: v for k, v in config.items() if k not in defaulted and k != "_use_default_values"}
        explicit = {**{k: v for k, v in given.items() if k in known}, **overrides}
        carried = {k: v for k, v in given.items() if k not in known}
        if "_class_name" in carried:
            carried["_class_name"] = cls.__name__
        return cls(_carried=carried, _where=where, **explicit)

    def save_config(self, save_directory, **kwargs):
        """Write scheduler_config.json as diffusers writes it (every key, no `_use_default_values`)."""
        os.makedirs(save_directory, exist_ok=True)
        d = {k: v.tolist() if hasattr(v, "tolist") else v  # trained_betas given as an array
             for k, v in self.config.items() if k != "_use_default_values"}
        d.update({"_class_name": type(self).__name__, "_diffusers_version": "0.39.0"})
        with open(os.path.join(save_directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(d, indent=2, sort_keys=True) + "\n")

    save_pretrained = save_config

    @property
    def compatibles(self):
        """The minidiff classes that can be built from this scheduler's config (diffusers' list, where built)."""
        schedulers = importlib.import_module(__package__)
        names = sorted(set((type(self).__name__,) + tuple(self._compatibles)))
        return [getattr(schedulers, n) for n in names if hasattr(schedulers, n)]

    def __len__(self):
        return self.cfg.num_train_timesteps

    def __getattr__(self, name):  # only reached for names that are not attributes
        config = self.__dict__.get("config")
        if config is not None and name in config and not name.startswith("_"):
            warnings.warn(f"{type(self).__name__}.{name}: reading config values as scheduler attributes is deprecated "
                          f"(as in diffusers); use scheduler.config.{name}", FutureWarning, stacklevel=2)
            return config[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __bool__(self):  # never falsy, whatever __len__ says
        return True

    # loop position: the index of the next step in `timesteps`, fixed on the first call of a loop from
    # set_begin_index (img2img and the SDXL refiner start mid-way) or from where the timestep stands ----------

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index=0):
        self._begin_index = begin_index

    def reset_loop(self):
        """A new loop (set_timesteps): no position yet and no begin index."""
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        return index_for_timestep(self.timesteps if schedule_timesteps is None else schedule_timesteps, timestep)

    def enter_loop(self, timestep):
        """The loop position for this call (fixing it on the first call of a loop)."""
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        return self._step_index

    # defaults: the DDPM-style (alphas_cumprod) schedulers ---------------------------------------------------

    def scale_model_input(self, sample, timestep=None):
        return sample

    def add_noise(self, original_samples, noise, timesteps):
        """sqrt(a_t) x_0 + sqrt(1 - a_t) noise, per batch item; alphas_cumprod is cast to the samples' dtype
        before the square roots, as diffusers does."""
        x = original_samples
        a = self.alphas_cumprod.to(device=x.device, dtype=x.dtype)[timesteps.to(x.device)]
        shape = (-1,) + (1,) * (x.ndim - 1)
        return (a ** 0.5).flatten().view(shape) * x + ((1 - a) ** 0.5).flatten().view(shape) * noise


class SigmaScheduler(Scheduler):
    """k-diffusion-style schedulers: x = x_0 + sigma eps, the UNet sees x / sqrt(sigma^2 + 1)."""

    @property
    def init_noise_sigma(self):
        return start_noise_std(self)

    def scale_model_input(self, sample, timestep):
        """The UNet's input x / sqrt(sigma^2 + 1): unit variance, as in training."""
        sigma = self.sigmas[self.enter_loop(timestep)]
        return sample / ((sigma ** 2 + 1) ** 0.5)

    def noise_level_indices(self, timesteps, device):
        """Where add_noise reads sigma: the scheduler's place in its loop when a begin index was set (img2img),
        otherwise the place of each given timestep."""
        if self.begin_index is None:
            schedule = self.timesteps.to(device)
            return [index_for_timestep(schedule, t) for t in timesteps.to(device)]
        at = self.step_index if self.step_index is not None else self.begin_index
        return [at] * timesteps.shape[0]

    def add_noise(self, original_samples, noise, timesteps):
        """x_0 + sigma noise."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigmas[self.noise_level_indices(timesteps, original_samples.device)]
        return original_samples + noise * sigma.flatten().view((-1,) + (1,) * (original_samples.ndim - 1))
