"""The shell every model with weights shares: its config, loading, saving, dtype and device; and the one
output convention of every model and pipeline.

A model subclasses `Model`, names its `config_class` (a dataclass filled from config.json) and its
`weight_names` (the file stems its weights may have), optionally `rename_key(file_key)` for a second
key form of the same weights, and builds its modules in `__init__(config)`. Everything about how a
model meets the outside world (from_pretrained, save_pretrained, config access, dtype, device) is
written here once; the model files hold only their architecture.
"""
import dataclasses

import torch
import torch.nn as nn

from ..weights.hub import hub_options
from ..device import use_fast_linear
from ..weights.load import load_model, save_model


class Model(nn.Module):
    config_class = None  # the model's config dataclass
    weight_names = ("diffusion_pytorch_model",)  # file stems: <stem>[.<variant>].safetensors; the first is written
    single_file_part = None  # the part of an LDM/SGM single file this model is: "unet", "vae", "text_encoder", ...

    def __init__(self, config):
        super().__init__()
        self.config = config

    @classmethod
    def from_pretrained(cls, repo_or_path, subfolder=None, variant=None, torch_dtype=None, device=None,
                        allow_pickle=False, memory_format=None, **loading_args):
        """Build from `config.json` on the meta device and assign the weights file's tensors (every key and
        shape checked first); see minidiff.weights.load.load_model. diffusers' loading arguments (cache_dir,
        revision, token, local_files_only, force_download, use_safetensors, low_cpu_mem_usage, device_map as
        one device) are taken as minidiff/loading.py says. `memory_format` (minidiff's): the convolution
        weights' layout, set while they are read (torch.channels_last); torch_dtype="auto" picks the device's
        fast dtype, layout and matmul (minidiff/device.py)."""
        from .. import loading
        where = f"{cls.__name__}.from_pretrained({repo_or_path!r})"
        auto, torch_dtype, memory_format = loading.dtype_and_layout(torch_dtype, memory_format, device, where)
        hub, device, allow_pickle = loading.model_options(loading_args, torch_dtype, device, allow_pickle, where)
        with hub_options(**hub):
            model = load_model(cls, repo_or_path, subfolder, variant, torch_dtype, device, allow_pickle,
                               memory_format=memory_format)
        if auto:
            use_fast_linear(model, device)
        return model

    @classmethod
    def from_single_file(cls, path, config=None, original_config=None, torch_dtype=None, device=None,
                         allow_pickle=False, subfolder=None, memory_format=None):
        """Load from one LDM-layout checkpoint (a whole model file or one holding only this part); see
        weights/single_file.py. `config=`: a folder or repo with this model's config.json (in `subfolder`);
        `memory_format` and torch_dtype="auto" as in from_pretrained."""
        if cls.single_file_part is None:
            raise ValueError(f"{cls.__name__}.from_single_file: single files hold UNets, VAEs and CLIP text encoders, "
                             f"not {cls.__name__}")
        from .. import loading
        from ..weights.single_file import load_component
        auto, torch_dtype, memory_format = loading.dtype_and_layout(torch_dtype, memory_format, device,
                                                                    f"{cls.__name__}.from_single_file({path!r})")
        model = load_component(cls, path, cls.single_file_part, config, original_config, torch_dtype, device,
                               allow_pickle, subfolder, memory_format=memory_format)
        if auto:
            use_fast_linear(model, device)
        return model

    def save_pretrained(self, folder, variant=None, safe_serialization=True):
        """Write config.json and <weight_names[0]>[.<variant>].safetensors, the layout from_pretrained (and
        diffusers) read."""
        if not safe_serialization:
            raise ValueError(f"{type(self).__name__}.save_pretrained(safe_serialization=False): minidiff writes only "
                             ".safetensors files (pickle files can run code when loaded)")
        name = self.weight_names[0] + (f".{variant}" if variant else "")
        save_model(self, folder, weight_name=name, extra_config=self.extra_config())

    def __getattr__(self, name):
        # diffusers' deprecated shortcut to config fields (`unet.in_channels` for `unet.config.in_channels`),
        # still used by snippets; looked up only after nn.Module's parameters, buffers and submodules
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("config")
            if config is not None and not name.startswith("_") and hasattr(config, name):
                return getattr(config, name)
            raise

    def extra_config(self):
        """Keys written to config.json beside the config's fields (none but for transformers' models)."""
        return {}

    def fuse_qkv_projections(self):
        """One matmul for each attention's q, k, v (k, v in cross-attention), as diffusers' (fused_qkv.py)."""
        from .. import fused_qkv
        fused_qkv.fuse_qkv_projections(self)

    def unfuse_qkv_projections(self):
        """Back to the separate projections, exactly (the fused copies are dropped)."""
        from .. import fused_qkv
        fused_qkv.unfuse_qkv_projections(self)

    def enable_layerwise_casting(self, storage_dtype=torch.float8_e4m3fn, compute_dtype=None, skip_modules_pattern=None,
                                 skip_modules_classes=None):
        """Linear/Conv weights kept in `storage_dtype`, each cast to `compute_dtype` for its own forward
        (minidiff/layerwise_casting.py): an fp16 file run in fp32 stays memory-mapped."""
        from .. import layerwise_casting
        layerwise_casting.enable_layerwise_casting(self, storage_dtype, compute_dtype, skip_modules_pattern,
                                                   skip_modules_classes)

    def disable_layerwise_casting(self):
        from .. import layerwise_casting
        layerwise_casting.disable_layerwise_casting(self)

    @property
    def dtype(self):  # under layerwise casting: the compute dtype, as in diffusers
        return self.__dict__.get("_layerwise_compute_dtype") or next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device


@dataclasses.dataclass(eq=False)  # (each output dataclass decides its own eq: the schedulers' compare by identity)
class ModelOutput:
    """What models and pipelines return: fields by attribute (`out.sample`), and, over the fields that are
    set, by index or name (`out[0]`, `out["sample"]`) and by unpacking (`(sample,) = out`), as diffusers'
    and transformers' outputs read. `return_dict=False` returns `to_tuple()`."""

    def to_tuple(self):
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def __getitem__(self, i):
        return getattr(self, i) if isinstance(i, str) else self.to_tuple()[i]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self):
        return len(self.to_tuple())
