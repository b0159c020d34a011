"""AutoPipelineForText2Image / AutoPipelineForImage2Image: the task's pipeline for a repo's (or a pipeline's)
model family, as diffusers' AutoPipelines pick it: an SDXL repo read for image-to-image gives
StableDiffusionXLImg2ImgPipeline, an SD img2img pipeline passed to AutoPipelineForText2Image.from_pipe gives
StableDiffusionPipeline sharing its models."""
from .common import DiffusionPipeline

# family of each pipeline class name -> (text-to-image class name, image-to-image class name)
FAMILIES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "LatentConsistencyModelPipeline": "lcm", "LatentConsistencyModelImg2ImgPipeline": "lcm",
    "WuerstchenCombinedPipeline": "wuerstchen", "WuerstchenDecoderPipeline": "wuerstchen",
}
TASKS = {
    "text2img": {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                 "lcm": "LatentConsistencyModelPipeline", "wuerstchen": "WuerstchenCombinedPipeline"},
    "img2img": {"sd": "StableDiffusionImg2ImgPipeline", "sdxl": "StableDiffusionXLImg2ImgPipeline"},
}


class _AutoPipeline(DiffusionPipeline):
    task = None

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is built with from_pretrained(...) or from_pipe(pipeline)")

    @classmethod
    def pipeline_class(cls, index, where):
        from . import PIPELINES
        name = index.get("_class_name")
        family = FAMILIES.get(name)
        target = TASKS[cls.task].get(family)
        if target is None or target not in PIPELINES:
            raise ValueError(f"{where}: {cls.__name__} has no {cls.task} pipeline for {name!r} in minidiff "
                             f"(it knows {', '.join(sorted(n for n in FAMILIES if FAMILIES[n] in TASKS[cls.task]))})")
        return PIPELINES[target]


class AutoPipelineForText2Image(_AutoPipeline):
    task = "text2img"


class AutoPipelineForImage2Image(_AutoPipeline):
    task = "img2img"
