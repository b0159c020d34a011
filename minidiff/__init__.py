"""minidiff: small, readable text-to-image diffusion in plain PyTorch.

The public classes carry diffusers' names, so `from minidiff import StableDiffusionPipeline` replaces
`from diffusers import StableDiffusionPipeline`.
"""
from . import callbacks, utils  # noqa: F401 (minidiff.utils.load_image, minidiff.callbacks..., as in diffusers)
from .models.auto import AutoModel
from .models.clip import CLIPTextModel, CLIPTextModelWithProjection
from .models.taesd import AutoencoderTiny
from .models.unet import UNet2DConditionModel
from .models.vae import AutoencoderKL
from .models.paella_vq import PaellaVQModel
from .models.wuerstchen_diffnext import WuerstchenDiffNeXt
from .models.wuerstchen_prior import WuerstchenPrior
from .pipelines import (AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline, LatentConsistencyModelPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                        StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, WuerstchenCombinedPipeline,
                        WuerstchenDecoderPipeline, WuerstchenPriorPipeline)
from .schedulers import (DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler,
                         PNDMScheduler)
from .schedulers import (DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
                         UniPCMultistepScheduler)
from .schedulers import (DDPMScheduler, HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler,  # issue 15
                         KDPM2DiscreteScheduler, LMSDiscreteScheduler, TCDScheduler)
from .schedulers.ddpm_wuerstchen import DEFAULT_STAGE_C_TIMESTEPS, DDPMWuerstchenScheduler
from .tokenizer import CLIPTokenizer

__version__ = "0.1.0"

import os as _os

if _os.environ.get("MINIDIFF_KERNELS"):  # issue 19: MINIDIFF_KERNELS=triton turns the fused kernels on at import
    from .kernels import use_from_environment as _use_kernels_from_environment
    _use_kernels_from_environment()
