"""The shell every model with weights shares: its config, loading, saving, dtype and device; and the one
output convention of every model and pipeline.

A model subclasses `Model`, names its `config_class` (a dataclass filled from config.json) and its
`weight_names` (the file stems its weights may have), optionally `rename_key(file_key)` for a second
key form of the same weights, and builds its modules in `__init__(config)`. Everything about how a
model meets the outside world (from_pretrained, save_pretrained, config access, dtype, device) is
written here once; the model files hold only their architecture.
"""
import dataclasses

import torch.nn as nn

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
                        allow_pickle=False):
        """Build from `config.json` on the meta device and assign the weights file's tensors (every key and
        shape checked first); see minidiff.weights.load.load_model."""
        return load_model(cls, repo_or_path, subfolder, variant, torch_dtype, device, allow_pickle)

    @classmethod
    def from_single_file(cls, path, config=None, original_config=None, torch_dtype=None, device=None,
                         allow_pickle=False, subfolder=None):
        """Load from one LDM-layout checkpoint (a whole model file or one holding only this part); see
        weights/single_file.py. `config=`: a folder or repo with this model's config.json (in `subfolder`)."""
        if cls.single_file_part is None:
            raise ValueError(f"{cls.__name__}.from_single_file: single files hold UNets, VAEs and CLIP text encoders, "
                             f"not {cls.__name__}")
        from ..weights.single_file import load_component
        return load_component(cls, path, cls.single_file_part, config, original_config, torch_dtype, device,
                              allow_pickle, subfolder)

    def save_pretrained(self, folder):
        """Write config.json and <weight_names[0]>.safetensors, the layout from_pretrained (and diffusers) read."""
        save_model(self, folder, weight_name=self.weight_names[0], extra_config=self.extra_config())

    def extra_config(self):
        """Keys written to config.json beside the config's fields (none but for transformers' models)."""
        return {}

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device


@dataclasses.dataclass
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
