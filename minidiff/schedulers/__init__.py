"""Samplers, each a small file of plain math matching the diffusers scheduler of the same name."""
from .common import LCMSchedulerOutput, SchedulerOutput, randn_tensor
from .ddim import DDIMScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler
# issue 15 (samplers): one file each
from .ddpm import DDPMScheduler
from .heun import HeunDiscreteScheduler
from .kdpm2 import KDPM2DiscreteScheduler
from .kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from .lms import LMSDiscreteScheduler
from .tcd import TCDScheduler, TCDSchedulerOutput

__all__ = ["DDIMScheduler", "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "LCMScheduler",
           "LCMSchedulerOutput", "PNDMScheduler", "SchedulerOutput", "randn_tensor"]
__all__ += ["DDPMScheduler", "HeunDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "KDPM2DiscreteScheduler",
            "LMSDiscreteScheduler", "TCDScheduler", "TCDSchedulerOutput"]
