"""What every pipeline shares: building it from a repo's model_index.json, moving it between devices,
manual model offload, a progress bar, LoRA delegates. The steps a __call__ shares (timesteps, first latents,
guidance, callbacks, images in and out) are in steps.py; its argument checks in arguments.py.

A pipeline is a plain object holding its components; its __call__ is the whole algorithm, written out.
"""
import importlib
import inspect
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import ArgumentTypeError, FileFormatError
from ..tokenizer_files import check_tokenizers_fit
from .. import layerwise_casting, loading
from ..device import use_fast_layout, use_fast_linear
from ..models.base import ModelOutput
from ..weights.config import AttrDict
from ..weights.hub import hub_options, read_json
# the steps and checks every __call__ shares, also reachable as minidiff.pipelines.common.<name>
from .arguments import (callback_inputs, check_batch, check_latents, check_negative, check_size_and_steps,  # noqa: F401,E501
                        negative_list, prompt_batch, steps_of)
from .steps import (guidance_scale_embedding, initial_latents, numpy_to_pil, postprocess,  # noqa: F401
                    preprocess_image, progress, repeat_to, rescale_noise_cfg, retrieve_timesteps, step_callback)

logger = logging.getLogger("minidiff")

# model_index.json names classes; this is where each one lives in minidiff. Several Hub names map to one class.
COMPONENT_MODULES = {
    "UNet2DConditionModel": "minidiff.models.unet",
    "AutoencoderKL": "minidiff.models.vae",
    "AutoencoderTiny": "minidiff.models.taesd",
    "CLIPTextModel": "minidiff.models.clip",
    "CLIPTextModelWithProjection": "minidiff.models.clip",
    "CLIPTokenizer": "minidiff.tokenizer",
    "CLIPTokenizerFast": "minidiff.tokenizer",
    "PreTrainedTokenizerFast": "minidiff.tokenizer",
    "EulerDiscreteScheduler": "minidiff.schedulers",
    "EulerAncestralDiscreteScheduler": "minidiff.schedulers",
    "DDIMScheduler": "minidiff.schedulers",
    "PNDMScheduler": "minidiff.schedulers",
    "LCMScheduler": "minidiff.schedulers",
    "DDPMWuerstchenScheduler": "minidiff.schedulers.ddpm_wuerstchen",
    "WuerstchenPrior": "minidiff.models.wuerstchen_prior",
    "WuerstchenDiffNeXt": "minidiff.models.wuerstchen_diffnext",
    "PaellaVQModel": "minidiff.models.paella_vq",
    "VQModelPaella": "minidiff.models.paella_vq",
}
# Hub class names served by another minidiff class (CLIPTokenizer and CLIPTokenizerFast serve the tokenizers).
CLASS_ALIASES = {"PreTrainedTokenizerFast": "CLIPTokenizerFast",
                 "VQModelPaella": "PaellaVQModel"}
# Components minidiff does not run; the pipeline holds None for them.
SKIPPED = {"safety_checker", "feature_extractor", "image_encoder"}


def component_class(name, where):
    schedulers = importlib.import_module("minidiff.schedulers")
    if name not in COMPONENT_MODULES and name in schedulers.__all__:  # every scheduler lives there
        return getattr(schedulers, name)
    if name not in COMPONENT_MODULES:
        raise FileFormatError(f"{where}: component class {name!r} is not implemented by minidiff "
                         f"(known: {', '.join(sorted(COMPONENT_MODULES))})")
    module = importlib.import_module(COMPONENT_MODULES[name])
    return getattr(module, CLASS_ALIASES.get(name, name))


@dataclass
class PipelineOutput(ModelOutput):
    """What a pipeline returns: `.images` (PIL list, numpy array, tensor or latents)."""
    images: object
    nsfw_content_detected: object = None


StableDiffusionPipelineOutput = PipelineOutput


class DiffusionPipeline:
    """Base of every pipeline: construction from the Hub layout, devices, offload. No denoising here."""

    # Component names, in model_index.json order; subclasses list theirs.
    component_names = ()
    # Optional components a pipeline can run without (e.g. text encoders when embeddings are given).
    optional_components = ()

    def __init__(self, **components):
        for name in self.component_names:
            setattr(self, name, components.get(name))
        self._offload_device = None
        self._progress_disable = False

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, repo_or_path, torch_dtype=None, variant=None, device=None, allow_pickle=False,
                        memory_format=None, **kwargs):
        """Build the pipeline from a Hub repo id or a local folder holding model_index.json.

        Keyword arguments named after a component replace it (`vae=AutoencoderTiny.from_pretrained(...)`,
        `text_encoder=None`); other keyword arguments go to the pipeline's constructor. diffusers' loading
        arguments are taken as diffusers takes them (see minidiff/loading.py): cache_dir, revision, token,
        local_files_only, force_download, use_safetensors, low_cpu_mem_usage, device_map (one device), and
        torch_dtype as one dtype or a dict {component or "default": dtype}. torch_dtype="auto": the device's fast
        dtype, layout and matmul (minidiff/device.py); `memory_format` (minidiff's): the convolution weights'
        layout, set while they are read (torch.channels_last).
        """
        repo_or_path = os.fspath(repo_or_path)
        where = f"{cls.__name__}.from_pretrained({repo_or_path!r})"
        auto, torch_dtype, memory_format = loading.dtype_and_layout(torch_dtype, memory_format, device, where)
        opts = loading.pop_loading(kwargs)
        hub, device, allow_pickle = loading.model_options(opts, None, device, allow_pickle, where)
        with hub_options(**hub):
            index = read_json(repo_or_path, "model_index.json")
            pick = cls.pipeline_class(index, os.path.join(repo_or_path, "model_index.json"))
            if pick is not cls:  # DiffusionPipeline and the AutoPipelines pick the class the repo names
                return pick.from_pretrained(repo_or_path, torch_dtype="auto" if auto else torch_dtype, variant=variant,
                                            device=device, allow_pickle=allow_pickle, memory_format=memory_format,
                                            **opts, **kwargs)
            pipe = cls._from_index(repo_or_path, index, torch_dtype, variant, device, allow_pickle, kwargs,
                                   memory_format)
        pipe._name_or_path = repo_or_path
        if auto:
            pipe._use_fast_layout()
        return pipe

    def _use_fast_layout(self):
        """torch_dtype="auto" also picks the CPU's fast layout and matmul for each model (device.py); the layout
        of models loaded with it is set already (then this costs nothing), not of components passed in."""
        for m in self.modules():
            use_fast_layout(m)
            use_fast_linear(m)

    @classmethod
    def pipeline_class(cls, index, where):
        """The class that builds a repo: the one named by its model_index.json for DiffusionPipeline, else cls."""
        if cls is not DiffusionPipeline:
            return cls
        from . import PIPELINES
        name = index.get("_class_name")
        if name not in PIPELINES:
            raise FileFormatError(f"{where}: pipeline class {name!r} is not implemented by minidiff "
                             f"(known: {', '.join(sorted(PIPELINES))})")
        return PIPELINES[name]

    @classmethod
    def _from_index(cls, repo_or_path, index, torch_dtype, variant, device, allow_pickle, kwargs, memory_format=None):
        where = os.path.join(repo_or_path, "model_index.json")
        names = [k for k in index if not k.startswith("_")]
        init_params = inspect.signature(cls.__init__).parameters
        components, options = {}, {}
        variants = _variants(repo_or_path, index, kwargs, variant, allow_pickle, where)
        for key, value in index.items():
            if key.startswith("_"):
                continue
            if key in kwargs:
                components[key] = kwargs.pop(key)
            elif key in SKIPPED or not (isinstance(value, (list, tuple)) and len(value) == 2):
                if key in init_params and not isinstance(value, (list, tuple)):
                    options[key] = value
            elif value[1] is None:
                components[key] = None
            else:
                klass = component_class(value[1], f"{where} ({key})")
                if hasattr(klass, "config_class"):  # a model with weights
                    dtype = loading.dtype_for(torch_dtype, key, names, f"{cls.__name__}.from_pretrained")
                    components[key] = klass.from_pretrained(repo_or_path, subfolder=key, variant=variants[key],
                                                            torch_dtype=dtype, device=device,
                                                            allow_pickle=allow_pickle, memory_format=memory_format)
                else:  # a scheduler or a tokenizer
                    components[key] = klass.from_pretrained(repo_or_path, subfolder=key)
        unknown = [k for k in kwargs if k not in init_params]
        if unknown:
            raise ArgumentTypeError(f"{cls.__name__}.from_pretrained got unexpected arguments {unknown} (not supported "
                            "by minidiff)")
        for name in cls.component_names:
            if name not in components and name not in kwargs and name not in cls.optional_components:
                raise FileFormatError(f"{where} has no {name!r} component, which {cls.__name__} needs")
        check_tokenizers_fit(components, where)  # ids and lengths every text encoder can embed
        return cls(**components, **options, **kwargs)

    @classmethod
    def from_single_file(cls, path, config=None, original_config=None, prediction_type=None, torch_dtype=None,
                         device=None, allow_pickle=False, memory_format=None, **kwargs):
        """Build the pipeline from one A1111 / ComfyUI / civitai checkpoint file (LDM / SGM layout), offline.

        The family (SD 1.x, SD 2.x, SDXL base or refiner) is told from the tensors; `config=` a diffusers folder or
        repo, `original_config=` the LDM yaml and `prediction_type=` override the guess. Component keyword
        arguments (`vae=`, `scheduler=`) replace the file's. See weights/single_file.py. torch_dtype="auto" and
        `memory_format` as in from_pretrained.
        """
        from ..weights.single_file import load_pipeline
        auto, torch_dtype, memory_format = loading.dtype_and_layout(
            torch_dtype, memory_format, device, f"{cls.__name__}.from_single_file({os.fspath(path)!r})")
        pipe = load_pipeline(cls, path, config=config, original_config=original_config, prediction_type=prediction_type,
                             torch_dtype=torch_dtype, device=device, allow_pickle=allow_pickle,
                             memory_format=memory_format, **kwargs)
        if auto:
            pipe._use_fast_layout()
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """A `cls` pipeline sharing `pipeline`'s components (no copy), as diffusers' from_pipe: keyword
        arguments named after a component replace it; `torch_dtype` casts the new pipeline."""
        torch_dtype = kwargs.pop("torch_dtype", None)
        cls = cls.pipeline_class({"_class_name": type(pipeline).__name__}, f"from_pipe({type(pipeline).__name__})")
        params = inspect.signature(cls.__init__).parameters
        parts = {k: v for k, v in pipeline.components.items() if k in params}
        parts.update({k: kwargs.pop(k) for k in list(kwargs) if k in params})
        for name, value in pipeline.extra_config().items():  # pipeline options: force_zeros_for_empty_prompt, ...
            if name in params and name not in parts:
                parts[name] = value
        if kwargs:
            raise TypeError(f"{cls.__name__}.from_pipe got unexpected arguments {sorted(kwargs)} (not supported "
                            "by minidiff)")
        missing = [p for p, v in params.items() if p != "self" and v.default is inspect.Parameter.empty
                   and p not in parts]
        if missing:
            raise ValueError(f"{cls.__name__}.from_pipe({type(pipeline).__name__}): the pipeline has no {missing}")
        new = cls(**parts)
        new._offload_device = pipeline._offload_device
        new._progress_disable = pipeline._progress_disable
        new._name_or_path = getattr(pipeline, "_name_or_path", None)
        return new.to(torch_dtype) if torch_dtype is not None else new

    def save_pretrained(self, folder, safe_serialization=True, variant=None, push_to_hub=False, **kwargs):
        """Write the pipeline in the Hub layout (model_index.json + one folder per component); `variant`
        names the weight files as diffusers does (diffusion_pytorch_model.fp16.safetensors)."""
        if not safe_serialization:
            raise ValueError("save_pretrained(safe_serialization=False): minidiff writes only .safetensors files "
                             "(pickle files can run code when loaded)")
        if push_to_hub or kwargs:
            raise TypeError(f"save_pretrained: {'push_to_hub ' if push_to_hub else ''}{sorted(kwargs)} not "
                            "supported by minidiff (it writes a local folder; upload it with huggingface_hub)")
        os.makedirs(folder, exist_ok=True)
        index = {"_class_name": type(self).__name__, "_diffusers_version": "0.39.0"}
        for name in self.component_names:
            comp = getattr(self, name)
            if comp is None:
                index[name] = [None, None]
                continue
            index[name] = list(_library_and_class(comp))
            if variant is not None and isinstance(comp, torch.nn.Module):
                comp.save_pretrained(os.path.join(folder, name), variant=variant)
            else:
                comp.save_pretrained(os.path.join(folder, name))
        index.update(self.extra_config())
        with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)

    def extra_config(self):
        """Pipeline options written to model_index.json (e.g. force_zeros_for_empty_prompt)."""
        return {}

    @property
    def config(self):
        """model_index.json as diffusers' pipe.config shows it: each component's (library, class), the options.
        (A pipeline that sets its own `self.config`, as Wuerstchen's do for their options, gets that back.)"""
        if "_own_config" in self.__dict__:
            return self._own_config
        cfg = AttrDict(_class_name=type(self).__name__, _diffusers_version="0.39.0",
                       _name_or_path=getattr(self, "_name_or_path", None))
        for name in self.component_names:
            comp = getattr(self, name)
            cfg[name] = (None, None) if comp is None else _library_and_class(comp)
        cfg.update(self.extra_config())
        return cfg

    @config.setter
    def config(self, value):
        self._own_config = value

    def __repr__(self):
        return f"{type(self).__name__} {json.dumps(dict(self.config), indent=2, sort_keys=True, default=str)}"

    @property
    def components(self):
        return {name: getattr(self, name) for name in self.component_names}

    def modules(self):
        return [m for m in self.components.values() if isinstance(m, torch.nn.Module)]

    # ---- devices ------------------------------------------------------------------------------
    def to(self, *args, **kwargs):
        """pipe.to(device), pipe.to(dtype), pipe.to(device, dtype), pipe.to(torch_device=..., torch_dtype=...)."""
        device = kwargs.pop("torch_device", kwargs.pop("device", None))
        dtype = kwargs.pop("torch_dtype", kwargs.pop("dtype", None))
        kwargs.pop("silence_dtype_warnings", None)
        if kwargs:
            raise TypeError(f"to() got unexpected arguments {sorted(kwargs)}")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
                device = torch.device(a)
            else:
                raise TypeError(f"to({a!r}): pass a device (e.g. 'cuda'), a torch.dtype, or both")
        for m in self.modules():
            m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self):
        for m in self.modules():
            return next(m.parameters()).device
        return torch.device("cpu")

    @property
    def dtype(self):
        for m in self.modules():
            return m.dtype if isinstance(getattr(type(m), "dtype", None), property) else next(m.parameters()).dtype
        return torch.float32

    @property
    def _execution_device(self):
        return torch.device(self._offload_device) if self._offload_device is not None else self.device

    def enable_model_cpu_offload(self, device="cuda"):
        """Keep every model on the CPU and move each to `device` only while it works (one at a time)."""
        from minidiff import offload
        device = offload.check_device(device, "enable_model_cpu_offload")
        layerwise_casting.check_not_casting(self, "enable_model_cpu_offload")
        self.remove_all_hooks()
        self._offload_device = device
        for m in self.modules():
            m.to("cpu")

    def enable_sequential_cpu_offload(self, device="cuda"):
        """Every submodule's weights on the CPU, each moved to `device` only for its own forward
        (minidiff/offload.py): the least device memory, the most transfers. Undo: remove_all_hooks()."""
        from minidiff import offload
        device = offload.check_device(device, "enable_sequential_cpu_offload")
        layerwise_casting.check_not_casting(self, "enable_sequential_cpu_offload")
        self.remove_all_hooks()
        self._offload_device = device
        self._offload_hooks = []
        for m in self.modules():
            m.to("cpu")
            self._offload_hooks += offload.sequential_hooks(m, device)

    def remove_all_hooks(self):
        """Undo either offload: the models stay where they are (on the CPU); .to(device) moves them back."""
        for h in getattr(self, "_offload_hooks", None) or []:
            h.remove()
        self._offload_hooks = None
        self._offload_device = None

    @contextmanager
    def _on_device(self, model):
        """With offload on: `model` sits on the execution device inside the block, on the CPU after."""
        if self._offload_device is None or model is None or getattr(self, "_offload_hooks", None):
            yield model
            return
        model.to(self._offload_device)
        try:
            yield model
        finally:
            model.to("cpu")

    def fuse_qkv_projections(self, unet=True, vae=True):
        """diffusers' call: fused q/k/v projections in the UNet and the VAE (minidiff/fused_qkv.py)."""
        for name, wanted in (("unet", unet), ("vae", vae)):
            if wanted and hasattr(getattr(self, name, None), "fuse_qkv_projections"):
                getattr(self, name).fuse_qkv_projections()

    def unfuse_qkv_projections(self, unet=True, vae=True):
        for name, wanted in (("unet", unet), ("vae", vae)):
            if wanted and hasattr(getattr(self, name, None), "unfuse_qkv_projections"):
                getattr(self, name).unfuse_qkv_projections()

    def enable_layerwise_casting(self, storage_dtype=torch.float8_e4m3fn, compute_dtype=None, **skip):
        """Every model's layerwise casting (minidiff/layerwise_casting.py); diffusers has it per model only."""
        layerwise_casting.pipeline_enable(self, storage_dtype, compute_dtype, **skip)

    def disable_layerwise_casting(self):
        layerwise_casting.pipeline_disable(self)

    def enable_vae_slicing(self):
        self.vae.enable_slicing()

    def enable_attention_slicing(self, slice_size="auto"):
        """Attention computed slice_size (batch x head) rows at a time, same output (minidiff/attention_slicing.py).
        Process-wide: the ops seam is one module."""
        from minidiff import attention_slicing
        attention_slicing.enable_attention_slicing(slice_size)

    def disable_attention_slicing(self):
        from minidiff import attention_slicing
        attention_slicing.disable_attention_slicing()

    def disable_vae_slicing(self):
        self.vae.disable_slicing()

    def enable_vae_tiling(self):
        self.vae.enable_tiling()

    def disable_vae_tiling(self):
        self.vae.disable_tiling()

    # ---- progress -----------------------------------------------------------------------------
    def set_progress_bar_config(self, disable=False, **_):
        self._progress_disable = disable

    def progress_bar(self, iterable, desc="denoising"):
        # a second-order scheduler (order 2) calls the model twice per step: the bar counts steps, as diffusers'
        order = getattr(getattr(self, "scheduler", None), "order", 1)
        return progress(iterable, desc, disable=self._progress_disable, order=order)

    # ---- LoRA: thin delegates to minidiff/lora.py, which does the work (begin) --------------------
    def load_lora_weights(self, repo_id_or_file_or_dict, weight_name=None, adapter_name=None, allow_partial=False,
                          allow_pickle=False, subfolder=None):
        """Add a LoRA file (kohya, SAI, LoCon, diffusers/PEFT) to the UNet and text encoder(s); see lora.py."""
        from .. import lora
        return lora.load_lora_weights(self, repo_id_or_file_or_dict, weight_name, adapter_name, allow_partial,
                                      allow_pickle, subfolder)

    def set_adapters(self, adapter_names, adapter_weights=None):
        from .. import lora
        lora.set_adapters(self, adapter_names, adapter_weights)

    def disable_lora(self):
        from .. import lora
        lora.disable_lora(self)

    def enable_lora(self):
        from .. import lora
        lora.enable_lora(self)

    def fuse_lora(self, components=None, lora_scale=1.0, adapter_names=None):
        from .. import lora
        lora.fuse_lora(self, components, lora_scale, adapter_names)

    def unfuse_lora(self, components=None):
        from .. import lora
        lora.unfuse_lora(self, components)

    def unload_lora_weights(self):
        from .. import lora
        lora.unload_lora_weights(self)

    def delete_adapters(self, adapter_names):
        from .. import lora
        lora.delete_adapters(self, adapter_names)

    def get_active_adapters(self):
        from .. import lora
        return lora.get_active_adapters(self)

    def get_list_adapters(self):
        from .. import lora
        return lora.get_list_adapters(self)

    @property
    def fused_loras(self):
        from .. import lora
        return lora.fused_adapters(self)

    @property
    def num_fused_loras(self):
        return len(self.fused_loras)
    # ---- LoRA (end) ---------------------------------------------------------------------------


def _library_and_class(comp):
    """model_index.json's (library, class name) of a component, as diffusers writes it."""
    name = type(comp).__name__
    return ("transformers" if name.startswith("CLIP") else "diffusers", name)


def _variants(repo_or_path, index, given, variant, allow_pickle, where):
    """{component: variant or None} for the models the pipeline reads from the repo (minidiff/loading.py)."""
    from ..loading import component_variants
    models = {}
    for key, value in index.items():
        if (key.startswith("_") or key in given or key in SKIPPED or not isinstance(value, (list, tuple))
                or len(value) != 2 or value[1] is None):
            continue
        klass = component_class(value[1], f"{where} ({key})")
        if hasattr(klass, "config_class"):
            models[key] = klass
    return component_variants(repo_or_path, models, variant, allow_pickle, where)
