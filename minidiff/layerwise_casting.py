"""Layerwise casting (diffusers' `enable_layerwise_casting`): weights kept in a storage dtype, each layer cast to
the compute dtype just before it runs and the cast copy dropped right after.

The use on a CPU: an fp16 file run in fp32 (or bf16). Loaded with `torch_dtype=torch.float16`, the weights are
the file's own pages, memory-mapped (weights/load.py casts nothing when the dtypes agree); with

    unet = UNet2DConditionModel.from_pretrained(repo, subfolder="unet", torch_dtype=torch.float16)
    unet.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)

every Linear / Conv (and LoRA-adapted) layer keeps pointing at those pages and casts its weight for its own
forward only, so the memory the process owns is about one layer's fp32 weight plus the activations, where
casting up front (`torch_dtype=torch.float32`) owns a whole fp32 copy. The output is the same, bit for bit:
a layer computes with the same fp32 (bf16) values either way.

As in diffusers: only Linear / Conv layers are stored in `storage_dtype` (a dtype other than the weights'
present one casts them once, e.g. to float8_e4m3fn); everything else (norms, embeddings, LoRA adapters,
fused q/k/v copies) is small and lives in the compute dtype, as do the layers that `skip_modules_pattern`
(regexes searched in the module path; default diffusers' own) or `skip_modules_classes` name. `model.dtype`
reads the compute dtype, so pipelines feed the model compute-dtype inputs. Unlike diffusers, it can be undone:
`disable_layerwise_casting()` casts the stored layers to the compute dtype for good.

LoRA: layers wrapped or unwrapped later (load_lora_weights, unload_lora_weights) are picked up at the model's
next call; adapters load in the compute dtype; `fuse_lora` adds into the stored weight, so the fused weight
is rounded to the storage dtype. Offload: a pipeline refuses to combine the two (one moves weights between
devices, the other casts them in place; on a CPU offload saves nothing). Inference only: a backward pass
through a layer whose weight was swapped back is not supported.
"""
import re

import torch
import torch.nn as nn

# diffusers' DEFAULT_SKIP_MODULES_PATTERN plus its UNet's own "norm" (already in it)
DEFAULT_SKIP_MODULES_PATTERN = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class _State:
    def __init__(self, storage_dtype, compute_dtype, pattern, classes):
        self.storage_dtype, self.compute_dtype = storage_dtype, compute_dtype
        self.pattern, self.classes = tuple(pattern), tuple(classes)
        self.hooked = {}  # layer -> its two hook handles
        self.sync_handle = None


def _streamed(state, name, module):
    """Is `module` (at path `name`) a layer whose weights stay in the storage dtype?"""
    if not (isinstance(module, LAYERS) or getattr(module, "is_lora_layer", False)):
        return False
    if state.classes and isinstance(module, state.classes):
        return False
    return not any(re.search(p, name) for p in state.pattern)


def _own_tensors(module):
    """(dict, name, tensor) of `module`'s own floating parameters' data and buffers."""
    return [(table, n, t) for table in (module._parameters, module._buffers) for n, t in table.items()
            if t is not None and t.is_floating_point()]


def _set(table, name, tensor):
    if isinstance(table[name], nn.Parameter):
        table[name].data = tensor
    else:
        table[name] = tensor


def _cast_in(state):
    def hook(module, args):
        stored = []
        for table, name, t in _own_tensors(module):
            if t.dtype != state.compute_dtype:
                stored.append((table, name, t.data if isinstance(t, nn.Parameter) else t))
                _set(table, name, t.to(state.compute_dtype))
        module._layerwise_stored = stored
    return hook


def _cast_out(module, args, out):
    for table, name, t in module.__dict__.pop("_layerwise_stored", ()):
        _set(table, name, t)  # the stored tensor (the file's pages); the cast copy is dropped


def sync(model):
    """Hook every streamed layer not hooked yet (LoRA wraps replace layers), unhook the ones gone, and cast all
    other floating tensors to the compute dtype once. Runs at enable time and before each call of `model`."""
    state = model._layerwise_state
    present = {}
    for name, module in model.named_modules():
        if _streamed(state, name, module):
            present[module] = None
            if module not in state.hooked:
                if state.storage_dtype is not None:
                    for table, n, t in _own_tensors(module):
                        if t.dtype != state.storage_dtype:
                            _set(table, n, t.to(state.storage_dtype))
                state.hooked[module] = (module.register_forward_pre_hook(_cast_in(state)),
                                        module.register_forward_hook(_cast_out, always_call=True))
        else:
            for table, n, t in _own_tensors(module):
                if t.dtype != state.compute_dtype:
                    _set(table, n, t.to(state.compute_dtype))
    for module in [m for m in state.hooked if m not in present]:
        for h in state.hooked.pop(module):
            h.remove()


def enable_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=None, skip_modules_pattern=None,
                             skip_modules_classes=None):
    """See the module doc; diffusers' signature (`non_blocking` has no meaning on a CPU and is not taken)."""
    for what, d in (("storage_dtype", storage_dtype), ("compute_dtype", compute_dtype)):
        if d is not None and not (isinstance(d, torch.dtype) and d.is_floating_point):
            raise ValueError(f"{type(model).__name__}.enable_layerwise_casting({what}={d!r}): a floating torch.dtype "
                             "is needed (e.g. torch.float16 to keep an fp16 file's weights as they are)")
    compute_dtype = compute_dtype or model.dtype
    disable_layerwise_casting(model)
    pattern = DEFAULT_SKIP_MODULES_PATTERN if skip_modules_pattern is None else skip_modules_pattern
    model._layerwise_state = _State(storage_dtype, compute_dtype, pattern, skip_modules_classes or ())
    model._layerwise_compute_dtype = compute_dtype
    sync(model)
    model._layerwise_state.sync_handle = model.register_forward_pre_hook(lambda m, args: sync(m))


def disable_layerwise_casting(model):
    """Remove the hooks and cast the stored layers to the compute dtype (the model as if loaded in it)."""
    state = model.__dict__.pop("_layerwise_state", None)
    if state is None:
        return
    model.__dict__.pop("_layerwise_compute_dtype", None)
    state.sync_handle.remove()
    for module, handles in state.hooked.items():
        for h in handles:
            h.remove()
        for table, n, t in _own_tensors(module):
            _set(table, n, t.to(state.compute_dtype))


def compute_dtype(model, default):
    """The dtype `model` computes in under layerwise casting, else `default` (LoRA adapters load in it)."""
    return model.__dict__.get("_layerwise_compute_dtype") or default


def pipeline_enable(pipe, storage_dtype, compute_dtype, **skip):
    """Layerwise casting on every model of `pipe` (refused with offload on: see the module doc)."""
    check_no_offload(pipe)
    for m in pipe.modules():
        if hasattr(m, "enable_layerwise_casting"):
            m.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=compute_dtype, **skip)


def pipeline_disable(pipe):
    for m in pipe.modules():
        disable_layerwise_casting(m)


def check_no_offload(pipe):
    if pipe._offload_device is not None:
        raise RuntimeError(f"{type(pipe).__name__}.enable_layerwise_casting: CPU offload is on (device "
                           f"{str(pipe._offload_device)!r}); the two do not combine: call remove_all_hooks() first "
                           "(layerwise casting is the CPU's way to save memory, offload the accelerator's)")


def check_not_casting(pipe, what):
    """For the offload calls: refuse while any model of `pipe` casts layerwise."""
    if any("_layerwise_state" in m.__dict__ for m in pipe.modules()):
        raise RuntimeError(f"{type(pipe).__name__}.{what}: layerwise casting is on; the two do not combine: call "
                           "pipe.disable_layerwise_casting() first")
