"""Pipelines: each __call__ is the whole algorithm, written out."""
from .auto import AutoPipelineForImage2Image, AutoPipelineForText2Image
from .common import DiffusionPipeline, PipelineOutput, StableDiffusionPipelineOutput
from .lcm import LatentConsistencyModelPipeline
from .stable_diffusion import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from .stable_diffusion_xl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from .wuerstchen import WuerstchenCombinedPipeline, WuerstchenDecoderPipeline, WuerstchenPriorPipeline

# model_index.json's `_class_name` -> class, for DiffusionPipeline.from_pretrained.
PIPELINES = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionImg2ImgPipeline": StableDiffusionImg2ImgPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
    "LatentConsistencyModelPipeline": LatentConsistencyModelPipeline,
    "StableDiffusionXLImg2ImgPipeline": StableDiffusionXLImg2ImgPipeline,
    "WuerstchenPriorPipeline": WuerstchenPriorPipeline,
    "WuerstchenDecoderPipeline": WuerstchenDecoderPipeline,
    "WuerstchenCombinedPipeline": WuerstchenCombinedPipeline,
}
