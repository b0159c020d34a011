"""Samplers, each a small file of plain math matching the diffusers scheduler of the same name."""
from .base import LCMSchedulerOutput, Scheduler, SchedulerOutput, SigmaScheduler
from .common import randn_tensor
from .ddim import DDIMScheduler
from .ddpm_wuerstchen import DDPMWuerstchenScheduler
from .deis_multistep import DEISMultistepScheduler
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .dpmsolver_singlestep import DPMSolverSinglestepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler
from .unipc_multistep import UniPCMultistepScheduler
# issue 15 (samplers): one file each
from .ddpm import DDPMScheduler
from .heun import HeunDiscreteScheduler
from .kdpm2 import KDPM2DiscreteScheduler
from .kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from .lms import LMSDiscreteScheduler
from .tcd import TCDScheduler, TCDSchedulerOutput

__all__ = [
    "DDIMScheduler",
    "DDPMWuerstchenScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LCMScheduler",
    "LCMSchedulerOutput",
    "PNDMScheduler",
    "Scheduler",
    "SchedulerOutput",
    "SigmaScheduler",
    "UniPCMultistepScheduler",
    "randn_tensor",
]
__all__ += ["DDPMScheduler", "HeunDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "KDPM2DiscreteScheduler",
            "LMSDiscreteScheduler", "TCDScheduler", "TCDSchedulerOutput"]
