"""LoRA (Hu et al. 2021, "Low-Rank Adaptation"): adapters for the UNet and the text encoders.

The adapted layers (LoRALinear, LoRAConv2d: `y = W x + b + sum_a weight_a * (alpha_a / rank_a) * B_a (A_a x)`)
and the per-call scale are minidiff/lora_layers.py. This file holds the pipeline-level operations:
load_lora_weights, set_adapters (with block-wise weights), fuse/unfuse, delete, unload. Reading the files -
finding them, the kohya / SAI / PEFT / old diffusers key forms, alpha and adapter-config scaling - is
minidiff.weights.lora_formats; here the tensors it sorts onto module paths are checked against the
modules' shapes and installed.
"""
import sys
from typing import NamedTuple

import torch.nn as nn

from . import layerwise_casting
from .errors import ArgumentError, LoRAFileError
# the layers, also reachable as minidiff.lora.<name>
from .lora_layers import (LoRAAdapter, LoRAConv2d, LoRALayer, LoRALinear, LyCORISAdapter,  # noqa: F401
                          call_scale, describe, expected_shapes, lora_layers, scaled)
from .weights import lycoris
from .weights.lora_formats import COMPONENTS, layer_scale, parse_lora, read_lora_file, resolve_lora_file
# also reachable as minidiff.lora.<name>, as before the file formats moved out
from .weights.lora_formats import (DEFAULT_WEIGHT_NAME, METADATA_KEY, ModuleLoRA, is_target,  # noqa: F401
                                   kohya_table, sai_name, sai_prefixes)


# ----------------------------------------------------------------------------- pipeline-level operations

class LoRALoadReport(NamedTuple):
    adapter_name: str
    format: str
    modules: dict  # component -> number of layers the adapter touched


def _listing(items, n=20):
    items = list(items)
    more = f"\n    ... and {len(items) - n} more" if len(items) > n else ""
    return "\n    " + "\n    ".join(items[:n]) + more


def _fit(tensor, module, role):
    """A 1 x 1 convolution's LoRA may come as matrices, and a Linear's as 1 x 1 kernels: reshape to fit."""
    conv = isinstance(module, (nn.Conv2d, LoRAConv2d))
    if conv and tensor.ndim == 2 and (role == "up" or tuple(module.kernel_size) == (1, 1)):
        return tensor[:, :, None, None]
    if not conv and tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1):
        return tensor.flatten(1)
    return tensor


def lora_components(target):
    """{component name: module} of a pipeline (its unet / text_encoder / text_encoder_2), or of a dict."""
    if isinstance(target, dict):
        return {k: v for k, v in target.items() if v is not None}
    if isinstance(target, nn.Module):
        return {"unet": target}
    return {c: getattr(target, c) for c in COMPONENTS if isinstance(getattr(target, c, None), nn.Module)}


def _all_layers(target, components=None):
    models = lora_components(target)
    return [(c, layer) for c, m in models.items() if components is None or c in components for layer in lora_layers(m)]


def get_list_adapters(target):
    """{component: [adapter names]} of the adapters loaded."""
    out = {}
    for c, layer in _all_layers(target):
        names = out.setdefault(c, [])
        names += [n for n in layer.adapters if n not in names]
    return out


def get_active_adapters(target):
    for _, layer in _all_layers(target):
        return list(layer.active_names)
    return []


def load_lora_weights(target, repo_id_or_file_or_dict, weight_name=None, adapter_name=None, allow_partial=False,
                      allow_pickle=False, subfolder=None, verbose=True):
    """Read a LoRA file (or a state dict) and add it as adapter `adapter_name` to the pipeline's UNet and
    text encoder(s); it becomes the one active adapter (as in diffusers), at weight 1.

    Every key must land on a module of the pipeline, else a ValueError lists those that do not
    (`allow_partial=True` loads the matching ones); tensors whose shapes do not fit their module are
    always an error. Returns a LoRALoadReport and prints one line: the layers touched per component.
    """
    models = lora_components(target)
    if not models:
        raise ArgumentError("this pipeline has no unet or text encoder to load a LoRA into")
    if isinstance(repo_id_or_file_or_dict, dict):
        state_dict, configs, where = repo_id_or_file_or_dict, {}, "the LoRA state dict"
    else:
        where = resolve_lora_file(repo_id_or_file_or_dict, weight_name, subfolder)
        # keys and shapes first, from the (bounded) header alone: no tensor is read for a file that does not fit
        state_dict, configs = read_lora_file(where, allow_pickle, header_only=True)
    loaded = {n for names in get_list_adapters(models).values() for n in names}
    if adapter_name is None:
        adapter_name = f"default_{len(loaded)}"
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ArgumentError(f"adapter_name={adapter_name!r}: use a non-empty name without '.'")
    if adapter_name in loaded:
        raise ArgumentError(f"an adapter named {adapter_name!r} is already loaded (loaded: {sorted(loaded)}): pass "
                         "another adapter_name, or delete_adapters() it first")

    adapters, unmatched, form = _collect(state_dict, configs, models, where, allow_partial)
    if any(t.is_meta for t in state_dict.values()):  # the header fits: now read the tensors
        state_dict, configs = read_lora_file(where, allow_pickle)
        adapters, unmatched, form = _collect(state_dict, configs, models, where, allow_partial)

    enabled = all(layer.enabled for _, layer in _all_layers(models))
    counts = {c: 0 for c in models}
    for (component, path), tensors in adapters.items():
        layer = _wrap(models[component], path)
        layer.enabled = enabled
        w = layer.weight
        dtype = layerwise_casting.compute_dtype(models[component], w.dtype)  # the stored weight may be fp16
        if isinstance(tensors[0], str):
            kind, factors, scale = tensors
            factors = {k: v.to(w.device, dtype) for k, v in factors.items()}
            layer.adapters[adapter_name] = LyCORISAdapter(kind, factors, scale)
        else:
            down, up, up_bias, scale = tensors
            layer.adapters[adapter_name] = LoRAAdapter(down.to(w.device, dtype), up.to(w.device, dtype),
                                                       None if up_bias is None else up_bias.to(w.device, dtype), scale)
        layer.adapter_weights[adapter_name] = 1.0
        counts[component] += 1
    _activate(models, [adapter_name], [1.0])
    report = LoRALoadReport(adapter_name, form, counts)
    if verbose:
        skipped = f", {len(unmatched)} unmatched keys skipped" if unmatched else ""
        print(f"LoRA {adapter_name!r} ({form}): " + ", ".join(f"{c} {n} layers" for c, n in counts.items())
              + skipped, file=sys.stderr)
    return report


def _collect(state_dict, configs, models, where, allow_partial):
    """({(component, path): (down, up, up_bias, scale) or LyCORIS (kind, factors, scale)}, unmatched keys, format)
    of a state dict whose every key and shape was checked against `models` (meta tensors: shapes only)."""
    targets, unmatched, form = parse_lora(state_dict, models)
    for config in configs.values():
        if config.get("use_dora"):
            raise LoRAFileError(f"{where}: use_dora=True in its LoRA config: DoRA is not supported")
    if unmatched and not allow_partial:
        raise LoRAFileError(f"{where}: {len(unmatched)} of {len(state_dict)} keys match no module of "
                            f"{' / '.join(models)} ({form} format):"
                            + _listing(f"{k}: {r}" for k, r in sorted(unmatched.items()))
                            + "\n  (is this LoRA made for another base model? allow_partial=True loads the keys that match)")
    adapters, wrong = {}, []
    for (component, path), t in targets.items():
        module = models[component].get_submodule(path)
        if t.kind != "lora":  # LyCORIS: the delta its factors make must reshape onto the weight
            problem = _lycoris_problem(t, module)
            if problem:
                wrong.append(f"{t.keys[0]} (LyCORIS {t.kind}): {problem} for {component}.{path} ({describe(module)})")
                continue
            adapters[(component, path)] = (t.kind, t.factors, lycoris.scale(t.kind, t.factors, t.alpha))
            continue
        for role, x in (("down", t.down), ("up", t.up)):
            if x.ndim not in (2, 4):
                raise LoRAFileError(f"{where}: {t.keys[0]} (and its pair): the {role} weight has shape "
                                    f"{tuple(x.shape)}; a LoRA weight is a matrix or a convolution kernel")
        if t.down.shape[0] == 0 or t.up.shape[1] == 0:
            raise LoRAFileError(f"{where}: {t.keys[0]} (and its pair): rank 0 (down {tuple(t.down.shape)}, up "
                                f"{tuple(t.up.shape)}); a LoRA needs rank >= 1")
        down, up = _fit(t.down, module, "down"), _fit(t.up, module, "up")
        want_down, want_up = expected_shapes(module, down.shape[0])
        bias_ok = t.up_bias is None or (tuple(t.up_bias.shape) == (want_up[0],) and module.bias is not None)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up or not bias_ok:
            wrong.append(f"{t.keys[0]} (and its pair): down {tuple(t.down.shape)}, up {tuple(t.up.shape)}"
                         f"{'' if t.up_bias is None else f', up bias {tuple(t.up_bias.shape)}'} do not fit "
                         f"{component}.{path} ({describe(module)}), which needs down {want_down}, up {want_up}")
            continue
        adapters[(component, path)] = (down, up, t.up_bias, layer_scale(t, component, path, configs))
    if wrong:
        raise LoRAFileError(f"{where}: {len(wrong)} LoRA layers do not fit the pipeline's modules (a LoRA for another "
                            "base model, e.g. an SD 1.x LoRA on SDXL?):" + _listing(wrong, 12))
    if not adapters:
        raise LoRAFileError(f"{where}: no LoRA layer to load ({len(state_dict)} keys, none matched)")
    return adapters, unmatched, form


def _lycoris_problem(t, module):
    """Why a LyCORIS layer's factors do not fit `module` (None when they do)."""
    try:
        d = lycoris.delta(t.kind, {k: v.float() for k, v in t.factors.items()})
    except RuntimeError as e:  # factors whose shapes do not multiply
        return f"factors {dict((k, tuple(v.shape)) for k, v in t.factors.items())} do not combine ({e})"
    if not lycoris.fits(d, module.weight.shape):
        return f"factors make a delta of shape {tuple(d.shape)}, not the weight's {tuple(module.weight.shape)}"
    b = t.factors.get("diff_b")
    if b is not None and (module.bias is None or tuple(b.shape) != tuple(module.bias.shape)):
        bias = None if module.bias is None else tuple(module.bias.shape)
        return f"diff_b {tuple(b.shape)} does not fit the bias {bias}"
    return None


def _wrap(model, path):
    """The LoRA layer at `path`, replacing the plain Linear/Conv2d there on first use."""
    module = model.get_submodule(path)
    if isinstance(module, LoRALayer):
        return module
    layer = LoRALinear(module) if isinstance(module, nn.Linear) else LoRAConv2d(module)
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)
    return layer


def _activate(models, names, weights):
    """Make `names` the active adapters; `weights[i]` is adapter i's weight: a number, or a function of the
    layer's module path (block-wise UNet weights)."""
    for _, model in lora_components(models).items():
        for path, layer in [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALayer)]:
            layer.active_names = list(names)  # what get_active_adapters reports
            for n, w in zip(names, weights):
                if n in layer.adapters:
                    layer.adapter_weights[n] = w(path) if callable(w) else w
            layer.active = [n for n in names if n in layer.adapters]


def _attention_path(name):
    """diffusers' block names in set_adapters weights: "mid", "down.block_1.0", "up.block_0.2" -> module paths."""
    if name == "mid":
        return "mid_block.attentions.0"
    updown, block, attn = name.split(".")
    return f"{updown}_blocks.{block.replace('block_', '')}.attentions.{attn}"


def block_weights(unet, scales, default=1.0):
    """{attention module path: weight} from diffusers' documented per-block form, e.g. {"down": 0.9,
    "mid": 1.0, "up": {"block_0": 0.6, "block_1": [0.4, 0.8, 1.0]}}: a number for a whole side, per block,
    or per transformer of a block; whatever is left out gets `default` (diffusers' expansion rules)."""
    with_attention = {"down": [i for i, b in enumerate(unet.down_blocks) if hasattr(b, "attentions")],
                      "up": [i for i, b in enumerate(unet.up_blocks) if hasattr(b, "attentions")]}
    per_block = {"down": unet.config.layers_per_block, "up": unet.config.layers_per_block + 1}
    if isinstance(per_block["down"], (list, tuple)):
        raise ValueError("block-wise LoRA weights need one layers_per_block for the whole UNet")
    unknown = set(scales) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"block-wise LoRA weights: unknown keys {sorted(unknown)} (use 'down', 'mid', 'up')")
    out = {}
    mid = scales.get("mid", default)
    if isinstance(mid, list):
        if len(mid) != 1:
            raise ValueError(f"block-wise LoRA weights: 'mid' has one transformer, got {len(mid)} weights")
        mid = mid[0]
    out["mid"] = mid
    for side in ("down", "up"):
        given = scales.get(side, default)
        if not isinstance(given, dict):
            given = {f"block_{i}": given for i in with_attention[side]}
        bad = set(given) - {f"block_{i}" for i in with_attention[side]}
        if bad:
            raise ValueError(f"block-wise LoRA weights: {side} has no attention block(s) {sorted(bad)} (blocks with "
                             f"attention: {[f'block_{i}' for i in with_attention[side]]})")
        for i in with_attention[side]:
            w = given.get(f"block_{i}", default)
            w = w if isinstance(w, list) else [w]
            if len(w) == 1:
                w = w * per_block[side]
            if len(w) != per_block[side]:
                raise ValueError(f"block-wise LoRA weights: {side}.block_{i} has {per_block[side]} transformers, "
                                 f"got {len(w)} weights")
            for j, v in enumerate(w):
                out[f"{side}.block_{i}.{j}"] = v
    for v in out.values():
        if not isinstance(v, (int, float)):
            raise ValueError(f"block-wise LoRA weight {v!r}: use numbers")
    return {_attention_path(k): float(v) for k, v in out.items()}


def _weight_by_path(weights):
    """The weight of a LoRA layer at a module path, as diffusers (PEFT's get_module_weight) finds it: its
    attention's, else that of the attention with the same index in its block, else 1.0."""
    def weight(path):
        for prefix, w in weights.items():
            if path.startswith(prefix + "."):
                return w
        parts = path.split(".")
        if len(parts) > 3:
            return weights.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)
        return 1.0
    return weight


def set_adapters(target, adapter_names, adapter_weights=None):
    """Use these adapters together, each scaled by its weight: a number, a list (one per adapter), or per
    adapter a dict {component: weight} (a component left out gets 1.0), where the UNet's weight may itself be
    per block as diffusers documents ({"down": ..., "mid": ..., "up": {"block_0": [..]}})."""
    models = lora_components(target)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
    if len(weights) != len(names):
        raise ArgumentError(f"adapter_weights has {len(weights)} entries for {len(names)} adapters {names}")
    loaded = {n for ns in get_list_adapters(models).values() for n in ns}
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ArgumentError(f"adapters {missing} are not loaded (loaded: {sorted(loaded)})")
    for w, n in zip(weights, names):
        if isinstance(w, dict) and not set(w) & set(COMPONENTS) and set(w) & {"down", "mid", "up"}:
            raise ArgumentError(f"adapter_weights for {n!r}: put block-wise weights under 'unet', e.g. "
                             "{'unet': {'down': 0.9, 'up': {'block_0': 0.6}}}")
    for component, model in models.items():
        per_component = []
        for n, w in zip(names, weights):
            if isinstance(w, dict):
                unknown = set(w) - set(COMPONENTS)
                if unknown:
                    raise ArgumentError(f"adapter_weights for {n!r}: unknown components {sorted(unknown)} "
                                     f"(use {list(COMPONENTS)})")
                w = w.get(component)
            if isinstance(w, dict):
                if component != "unet":
                    raise ArgumentError(f"adapter weight for {n!r} on {component}: block-wise weights are for the UNet")
                w = _weight_by_path(block_weights(model, w))
            elif w is not None and not isinstance(w, (int, float)):
                raise ArgumentError(f"adapter weight {w!r} for {n!r}: use a number, or for the UNet a dict of blocks")
            per_component.append(1.0 if w is None else w if callable(w) else float(w))
        _activate({component: model}, names, per_component)


def fused_adapters(target):
    """Names of the adapters fused into the weights (diffusers' pipe.fused_loras)."""
    return {n for _, layer in _all_layers(target) for n in layer.fused}


def disable_lora(target):
    """Run the base model alone. A fused LoRA is unfused first (as PEFT does)."""
    for _, layer in _all_layers(target):
        layer.unfuse()
        layer.enabled = False


def enable_lora(target):
    for _, layer in _all_layers(target):
        layer.enabled = True


def fuse_lora(target, components=None, lora_scale=1.0, adapter_names=None):
    """Add the active adapters (or `adapter_names`), times `lora_scale`, into the weights; the weights
    before fusing are kept (on the CPU) so that unfuse_lora restores them exactly."""
    for _, layer in _all_layers(target, components):
        layer.fuse(layer.active if adapter_names is None else list(adapter_names), lora_scale)


def unfuse_lora(target, components=None):
    for _, layer in _all_layers(target, components):
        layer.unfuse()


def delete_adapters(target, adapter_names):
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    for component, model in lora_components(target).items():
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]:
            fused = [n for n in names if n in layer.fused]
            if fused:
                raise ArgumentError(f"adapters {fused} are fused into {component}.{name}: unfuse_lora() first")
            for n in names:
                if n in layer.adapters:
                    del layer.adapters[n]
                    layer.adapter_weights.pop(n, None)
            layer.active = [n for n in layer.active if n in layer.adapters]
            layer.active_names = [n for n in getattr(layer, "active_names", []) if n not in names]
            if not layer.adapters:
                _unwrap(model, name)


def unload_lora_weights(target):
    """Put the plain Linear/Conv2d modules back, with their current weights (fused LoRAs stay fused)."""
    for model in lora_components(target).values():
        for name in [n for n, m in model.named_modules() if isinstance(m, LoRALayer)]:
            _unwrap(model, name)


def _unwrap(model, path):
    layer = model.get_submodule(path)
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer.plain())
