"""Samplers, each a small file of plain math matching the diffusers scheduler of the same name."""
from .base import LCMSchedulerOutput, Scheduler, SchedulerOutput, SigmaScheduler
from .common import randn_tensor
from .ddim import DDIMScheduler
from .ddpm_wuerstchen import DDPMWuerstchenScheduler
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMWuerstchenScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LCMScheduler",
    "LCMSchedulerOutput",
    "PNDMScheduler",
    "Scheduler",
    "SchedulerOutput",
    "SigmaScheduler",
    "randn_tensor",
]
