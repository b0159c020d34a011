"""Samplers by the names A1111 and ComfyUI show them, mapped to the scheduler class and config that diffusers'
docs give for each (docs/source/en/api/schedulers/overview.md: "A1111/k-diffusion" table).

    pipe.scheduler = scheduler_for("DPM++ 2M Karras", pipe.scheduler.config)

The scheduler is built with `from_config` from the model's own scheduler config, so the training schedule
(betas, prediction type, ...) stays the model's and only the sampler changes.
"""
from . import schedulers

# A1111 name: (scheduler class, config keys set on top of the model's config)
SAMPLERS = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "TCD": ("TCDScheduler", {}),
}
# ComfyUI's sampler names (its "karras" is a separate scheduler setting: use the A1111 "... Karras" names)
COMFYUI = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
           "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
           "dpmpp_sde": "DPM++ SDE", "uni_pc": "UniPC", "deis": "DEIS", "ddim": "DDIM", "ddpm": "DDPM",
           "lcm": "LCM", "tcd": "TCD"}


def sampler_name(name):
    """The A1111 name of `name` (an A1111 name in any case, or a ComfyUI name); a minidiff scheduler class name
    (what the PNG parameters say where A1111 has no name) stays itself. Unknown names are an error that lists
    the known ones."""
    key = name.strip().lower()
    by_lower = {k.lower(): k for k in SAMPLERS}
    classes = {n.lower(): n for n in schedulers.__all__ if n.endswith("Scheduler")}
    found = by_lower.get(key) or COMFYUI.get(key) or classes.get(key)
    if found is None:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)} (or ComfyUI's "
                         f"{', '.join(COMFYUI)}, or a scheduler class name)")
    return found


def scheduler_class(name):
    """(scheduler class, config keys) of sampler `name`."""
    canonical = sampler_name(name)
    class_name, keys = SAMPLERS.get(canonical, (canonical, {}))
    cls = getattr(schedulers, class_name, None)
    if cls is None:
        raise ValueError(f"sampler {canonical!r} needs {class_name}, which this minidiff does not have")
    return cls, keys


def scheduler_for(name, config):
    """The scheduler that sampler `name` means, built from `config` (the model's scheduler config)."""
    cls, keys = scheduler_class(name)
    return cls.from_config(config, **keys)


def name_of(scheduler):
    """The A1111 name of a scheduler object (the class name where no entry matches its config)."""
    cls = type(scheduler).__name__
    matches = [n for n, (c, keys) in SAMPLERS.items() if c == cls
               and all(scheduler.config.get(k) == v for k, v in keys.items())]
    return max(matches, key=lambda n: len(SAMPLERS[n][1])) if matches else cls
