"""The loading arguments diffusers' from_pretrained takes, checked and turned into minidiff's own.

What can be honoured is honoured (Hub download options, one device, a dtype per component, safetensors
only); what minidiff cannot do is refused with a message that says what to pass instead. Nothing is
accepted and then ignored.

Below them, what the Hub's real files ask of a pipeline beyond what today's save_pretrained writes:
- `variant="fp16"` / `"non_ema"` per component: the repos ship a variant for some folders only (SD 1.5's
  `non_ema` is in `unet/` alone); diffusers takes the variant where a component has it and the plain file
  elsewhere, and says so. `component_variants` decides this per folder.
- Old scheduler configs: diffusers' SD pipelines rewrite `steps_offset != 1` to 1 and `clip_sample: true`
  to false, with a FutureWarning; `rewrite_old_scheduler_config` does the same, with the same words.
- Custom `timesteps`: the scheduler gets `timesteps` alone, never with the default num_inference_steps
  (`set_timesteps`), as diffusers' `retrieve_timesteps` calls it (pipelines/steps.py `retrieve_timesteps`).
"""
import warnings

import torch

from .device import fast_memory_format, resolve_dtype
from .weights.hub import HUB_OPTION_NAMES, resolve_weights

# diffusers' loading arguments that minidiff honours (beside torch_dtype, variant, device, allow_pickle).
LOADING_NAMES = HUB_OPTION_NAMES + ("use_safetensors", "low_cpu_mem_usage", "device_map")


def pop_loading(kwargs):
    """Remove diffusers' loading arguments from `kwargs`; returns them as a dict."""
    return {k: kwargs.pop(k) for k in LOADING_NAMES if k in kwargs}


def device_from_map(device_map, device=None, where="from_pretrained"):
    """`device_map` as one device: None, "cpu", or any single device ("cuda", "cuda:1", torch.device)."""
    if device_map is None:
        return device
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        device_map = f"cuda:{device_map}"
    if isinstance(device_map, (str, torch.device)) and str(device_map) not in ("auto", "balanced", "balanced_low_0",
                                                                                "sequential"):
        try:
            dev = torch.device(device_map)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"{where}: device_map={device_map!r} is not a device") from e
        if device is not None and torch.device(device) != dev:
            raise ValueError(f"{where}: device={device!r} and device_map={device_map!r} disagree: pass one")
        return dev
    raise ValueError(f"{where}: device_map={device_map!r} is not supported: minidiff puts every model on one device "
                     "(device_map=None, 'cpu' or a single device such as 'cuda'); to keep memory low use "
                     "pipe.enable_model_cpu_offload() instead")


def pickle_choice(use_safetensors, allow_pickle, where="from_pretrained"):
    """allow_pickle after `use_safetensors`: True means safetensors only; False asks for pickle files, which
    minidiff reads only when allow_pickle=True is passed too."""
    if use_safetensors is None:
        return allow_pickle
    if use_safetensors:
        return False
    if not allow_pickle:
        raise ValueError(f"{where}: use_safetensors=False asks for pickle weights (.bin), which can run code when "
                         "loaded; minidiff reads them only with allow_pickle=True as well (then with "
                         "torch.load(weights_only=True)), and prefers .safetensors files where both exist")
    return True


def check_low_cpu_mem_usage(value, where="from_pretrained"):
    # minidiff always builds models on the meta device and assigns the file's tensors (what
    # low_cpu_mem_usage=True does in diffusers); False gives the same model, only more slowly in diffusers.
    if value not in (None, True, False):
        raise ValueError(f"{where}: low_cpu_mem_usage={value!r} must be True or False")


def dtype_for(torch_dtype, name, names, where="from_pretrained"):
    """The dtype of component `name`: torch_dtype itself, or its entry (then 'default', then float32) when a
    dict per component is given, as diffusers reads it."""
    if not isinstance(torch_dtype, dict):
        check_dtype(torch_dtype, where)
        return torch_dtype
    unknown = [k for k in torch_dtype if k != "default" and k not in names]
    if unknown:
        raise ValueError(f"{where}: torch_dtype names {unknown}, which are not components of this pipeline "
                         f"(components: {', '.join(names)}; 'default' for the rest)")
    for v in torch_dtype.values():
        check_dtype(v, where)
    return torch_dtype.get(name, torch_dtype.get("default", torch.float32))


def check_dtype(dtype, where="from_pretrained"):
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: torch_dtype={dtype!r} must be a torch.dtype (e.g. torch.float16), or a dict "
                         "{component name or 'default': torch.dtype}")


LAYOUTS = {"torch.channels_last": torch.channels_last, "torch.contiguous_format": torch.contiguous_format}


def check_memory_format(memory_format, where="from_pretrained"):
    """memory_format= is None or a layout a convolution weight can take (before anything is read)."""
    if memory_format is not None and memory_format not in LAYOUTS.values():
        raise ValueError(f"{where}: memory_format={memory_format!r} must be None (the file's layout) or one of "
                         f"{', '.join(LAYOUTS)}")


def dtype_and_layout(torch_dtype, memory_format, device=None, where="from_pretrained"):
    """(auto, dtype, memory_format) as loading takes them: torch_dtype "auto" (or a name) resolved to a dtype (a dict
    per component stays as it is) and, with "auto" and no memory_format given, the device's fast layout for it."""
    check_memory_format(memory_format, where)
    auto = isinstance(torch_dtype, str) and torch_dtype == "auto"
    if isinstance(torch_dtype, dict):
        return False, torch_dtype, memory_format
    dtype = resolve_dtype(torch_dtype, device)
    if auto and memory_format is None:  # laid out while read: one copy of the weights, not two
        memory_format = fast_memory_format(dtype, device)
    return auto, dtype, memory_format


def model_options(loading, torch_dtype, device, allow_pickle, where):
    """(hub options, device, allow_pickle) for one model's from_pretrained from diffusers' loading arguments."""
    unknown = set(loading) - set(LOADING_NAMES)
    if unknown:
        raise TypeError(f"{where} got unexpected arguments {sorted(unknown)}")
    check_dtype(torch_dtype, where)
    check_low_cpu_mem_usage(loading.get("low_cpu_mem_usage"), where)
    device = device_from_map(loading.get("device_map"), device, where)
    allow_pickle = pickle_choice(loading.get("use_safetensors"), allow_pickle, where)
    hub = {k: loading[k] for k in HUB_OPTION_NAMES if k in loading}
    return hub, device, allow_pickle


# ---- what real Hub files ask of a pipeline ---------------------------------------------------------------
def component_variants(repo_or_path, components, variant, allow_pickle=False, where="model_index.json"):
    """{component name: variant or None} for the models `components` ({name: class}) of a repo.

    A component without files of `variant` takes its plain file (a warning names them), as diffusers does;
    a variant that no component has is a ValueError (diffusers' words), naming the variant and the folders.
    """
    if not variant:
        return {name: None for name in components}
    chosen = {}
    for name, klass in components.items():
        try:
            resolve_weights(repo_or_path, klass.weight_names, name, variant, allow_pickle)
            chosen[name] = variant
        except FileNotFoundError:
            chosen[name] = None
    fell_back = sorted(name for name, v in chosen.items() if v is None)
    if components and len(fell_back) == len(components):
        raise ValueError(f"{where}: you are trying to load the model files of the `variant={variant}`, but no such "
                         f"modeling files are available (looked in {', '.join(fell_back)}): pass variant=None")
    if fell_back:
        warnings.warn(f"variant={variant!r}: {', '.join(fell_back)} {'has' if len(fell_back) == 1 else 'have'} no "
                      f"{variant} files; loading the plain files there (a mixture of {variant} and non-{variant} "
                      "files, as diffusers loads it)", UserWarning, stacklevel=3)
    return chosen


def _rewritten(scheduler, key, value):
    """A scheduler of the same class whose config has `key` = `value` (nothing else changes: no scheduler
    precomputes anything from steps_offset or clip_sample)."""
    config = dict(scheduler.config)
    config[key] = value
    config["_use_default_values"] = [k for k in config.get("_use_default_values", ()) if k != key]
    return type(scheduler).from_config(config)


def rewrite_old_scheduler_config(scheduler):
    """diffusers' StableDiffusionPipeline.__init__ rules for configs written before diffusers 0.8: same
    FutureWarnings (text and category), same rewritten values."""
    if scheduler is None or not hasattr(scheduler, "config"):
        return scheduler
    if scheduler.config.get("steps_offset", 1) != 1:
        warnings.warn(
            f"The configuration file of this scheduler: {scheduler} is outdated. `steps_offset`"
            f" should be set to 1 instead of {scheduler.config['steps_offset']}. Please make sure "
            "to update the config accordingly as leaving `steps_offset` might led to incorrect results"
            " in future versions. If you have downloaded this checkpoint from the Hugging Face Hub,"
            " it would be very nice if you could open a Pull request for the `scheduler/scheduler_config.json`"
            " file", FutureWarning, stacklevel=3)
        scheduler = _rewritten(scheduler, "steps_offset", 1)
    if scheduler.config.get("clip_sample", False) is True:
        warnings.warn(
            f"The configuration file of this scheduler: {scheduler} has not set the configuration `clip_sample`."
            " `clip_sample` should be set to False in the configuration file. Please make sure to update the"
            " config accordingly as not setting `clip_sample` in the config might lead to incorrect results in"
            " future versions. If you have downloaded this checkpoint from the Hugging Face Hub, it would be very"
            " nice if you could open a Pull request for the `scheduler/scheduler_config.json` file",
            FutureWarning, stacklevel=3)
        scheduler = _rewritten(scheduler, "clip_sample", False)
    return scheduler
