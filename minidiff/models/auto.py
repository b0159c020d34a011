"""AutoModel: diffusers' loader that reads a model folder's config.json and builds the class it names."""
import os

from ..weights.hub import hub_options, read_json


class AutoModel:
    def __init__(self, *args, **kwargs):
        raise TypeError("AutoModel is built with AutoModel.from_pretrained(repo_or_path, subfolder=...)")

    @classmethod
    def from_pretrained(cls, repo_or_path, subfolder=None, **kwargs):
        """The model config.json's `_class_name` names (UNet2DConditionModel, AutoencoderKL, ...), loaded
        with that class's from_pretrained and the same arguments."""
        from ..pipelines.common import component_class
        repo_or_path = os.fspath(repo_or_path)
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "force_download")
               if k in kwargs}
        with hub_options(**hub):
            config = read_json(repo_or_path, "config.json", subfolder)
        where = os.path.join(repo_or_path, subfolder or "", "config.json")
        name = config.get("_class_name") or (config.get("architectures") or [None])[0]
        if name is None:
            raise ValueError(f"{where} names no model class (_class_name or architectures)")
        klass = component_class(name, where)
        if not hasattr(klass, "config_class"):
            raise ValueError(f"{where}: {name} is not a model with weights")
        return klass.from_pretrained(repo_or_path, subfolder=subfolder, **kwargs)
