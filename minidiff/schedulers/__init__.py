"""Samplers, each a small file of plain math matching the diffusers scheduler of the same name."""
from .common import LCMSchedulerOutput, SchedulerOutput, randn_tensor
from .ddim import DDIMScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler

__all__ = ["DDIMScheduler", "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "LCMScheduler",
           "LCMSchedulerOutput", "PNDMScheduler", "SchedulerOutput", "randn_tensor"]
