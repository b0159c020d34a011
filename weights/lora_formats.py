"""Reading LoRA files: find the file, tell its format from its keys, and sort its tensors onto module paths.

A LoRA file holds, for some Linear/Conv2d layers of a model, two small matrices `down` (A, rank x in) and
`up` (B, out x rank), often an `alpha`; how minidiff.lora applies them is described there. This file only
reads: `parse_lora(state_dict, {component: model})` returns, per (component, module path), a `ModuleLoRA`
with the file's tensors, plus every key that lands nowhere with the reason, so that the caller can refuse
the file or load what matches.

File formats, told apart by their keys:
  - kohya / A1111 (`lora_unet_...`, `lora_te_...`, `lora_te1_...`/`lora_te2_...` with `.lora_down.weight`,
    `.lora_up.weight`, `.alpha`): the module path with "." written as "_". SD 1.x files use diffusers'
    module names, SDXL files the original SAI/LDM UNet names (`input_blocks_4_1_...`); LoCon files add
    convolutions (k x k down, 1 x 1 up). An absent alpha means alpha = rank (scale 1).
  - diffusers / PEFT (`unet.<module>.lora_A.weight`, `.lora_B.weight`, `text_encoder.`, `text_encoder_2.`),
    alpha from `.alpha` keys, the file's `lora_adapter_metadata` or an `adapter_config.json` beside it.
  - the older diffusers form (`...attn1.processor.to_q_lora.down.weight`, `...proj_in.lora.down.weight`,
    `...mlp.fc1.lora_linear_layer.down.weight`).
Rather than parsing "_"-joined names back (module names contain "_" too), every candidate module's name
is written in each file form and looked up, so a key either lands on exactly one module or on none.

The models come in as plain nn.Modules; this file does not import minidiff.lora (which imports it), so a
layer that an earlier adapter already wrapped is recognised by the `is_lora_layer` flag of its class.
"""
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from . import lycoris
from .hub import is_local, resolve_file
from .load import read_state_dict
from ..errors import LoRAFileError
from ..prepack import is_plain_layer
from .lora_checks import alpha_value, check_lora_config
from .safe import check_pickle, read_json_file, read_safetensors_header

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Pipeline components a LoRA file can adapt, with their kohya key prefixes.
COMPONENTS = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
METADATA_KEY = "lora_adapter_metadata"  # diffusers writes the PEFT LoraConfig of each component here


def is_target(module):
    """A layer a LoRA can land on: a plain nn.Linear / nn.Conv2d (prepacked or not), or one minidiff.lora has
    already adapted."""
    return is_plain_layer(module) or getattr(type(module), "is_lora_layer", False)


# ----------------------------------------------------------------------------- SAI (LDM) UNet names

RESNET_TO_SAI = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection"}
TOP_LEVEL_TO_SAI = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                    "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                    "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2"}


def sai_prefixes(unet):
    """{diffusers module path prefix: original SAI/LDM path}, from the UNet's blocks.

    The LDM UNet numbers its blocks flat: input_blocks.i holds one resnet (.0) and its attention (.1), or a
    downsampler (.0.op); output_blocks.i one resnet, its attention, and the block's upsampler last (.1 or .2).
    """
    out = dict(TOP_LEVEL_TO_SAI)

    def resnet(diffusers_path, sai_path):
        for ours, theirs in RESNET_TO_SAI.items():
            out[f"{diffusers_path}.{ours}"] = f"{sai_path}.{theirs}"

    i = 1  # input_blocks.0 is conv_in
    for b, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            resnet(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i + j}.0")
            if attentions is not None:
                out[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i + j}.1"
        i += len(block.resnets)
        if getattr(block, "downsamplers", None) is not None:
            out[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    if getattr(unet, "mid_block", None) is not None:
        resnet("mid_block.resnets.0", "middle_block.0")
        out["mid_block.attentions.0"] = "middle_block.1"
        resnet("mid_block.resnets.1", "middle_block.2")
    o = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        n = len(block.resnets)
        for j in range(n):
            resnet(f"up_blocks.{b}.resnets.{j}", f"output_blocks.{o + j}.0")
            if attentions is not None:
                out[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{o + j}.1"
        if getattr(block, "upsamplers", None) is not None:
            out[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{o + n - 1}.{2 if attentions is not None else 1}.conv"
        o += n
    return out


def sai_name(name, prefixes):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in prefixes:
            return ".".join([prefixes[head]] + parts[i:])
    return None


def kohya_table(models):
    """{kohya module name (without suffix): (component, module path)} for every adaptable layer."""
    table = {}
    for component, model in models.items():
        prefixes = sai_prefixes(model) if component == "unet" and hasattr(model, "down_blocks") else None
        for name, module in model.named_modules():
            if not is_target(module):
                continue
            for p in COMPONENTS[component]:
                table[p + name.replace(".", "_")] = (component, name)
            sai = sai_name(name, prefixes) if prefixes else None
            if sai is not None:
                table["lora_unet_" + sai.replace(".", "_")] = (component, name)
    return table


# ----------------------------------------------------------------------------- reading a file

def resolve_lora_file(source, weight_name=None, subfolder=None):
    """Path of the LoRA file: a file, a file in a local folder, or a file of a Hub repo."""
    source = os.fspath(source)
    if os.path.isfile(source):
        return source
    if weight_name is not None:
        return resolve_file(source, weight_name, subfolder)
    if is_local(source):
        path = resolve_file(source, DEFAULT_WEIGHT_NAME, subfolder, required=False)
        if path is not None:
            return path
        folder = os.path.join(source, subfolder or "")
        found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if len(found) == 1:
            return os.path.join(folder, found[0])
        raise FileNotFoundError(f"{folder} has no {DEFAULT_WEIGHT_NAME} and {len(found)} other .safetensors files "
                                f"({', '.join(found) or 'none'}): pass weight_name=... to pick one")
    try:
        return resolve_file(source, DEFAULT_WEIGHT_NAME, subfolder)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; pass weight_name=... to name the LoRA file of this repo") from e


def read_lora_file(path, allow_pickle=False, header_only=False):
    """(state dict, {component: PEFT config dict} or {}) of a LoRA file. With `header_only`, a safetensors
    file's tensors are meta tensors of the shapes its (checked, bounded) header gives: nothing is read, so
    keys and shapes can be checked first."""
    kind = check_pickle(path, allow_pickle)  # by content, not by name
    configs = {}
    if kind == "safetensors":
        header = read_safetensors_header(path)
        if header_only:
            state_dict = {k: torch.empty(shape, device="meta") for k, (shape, _) in header.tensors.items()}
        else:
            state_dict = read_state_dict([path], allow_pickle=allow_pickle)
        raw = header.metadata.get(METADATA_KEY)
        if raw:
            try:
                flat = json.loads(raw)
            except (ValueError, RecursionError) as e:
                raise LoRAFileError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON: {e}") from None
            if not isinstance(flat, dict):
                raise LoRAFileError(f"{path}: metadata {METADATA_KEY!r} must be a JSON object")
            for key, value in flat.items():  # "unet.lora_alpha" -> configs["unet"]["lora_alpha"]
                component, _, option = key.partition(".")
                configs.setdefault(component, {})[option] = value
    else:
        state_dict = read_state_dict([path], allow_pickle=allow_pickle)
    adapter_config = os.path.join(os.path.dirname(path), "adapter_config.json")
    if os.path.isfile(adapter_config):  # PEFT's own layout: one config for the whole file
        config = read_json_file(adapter_config)
        if not isinstance(config, dict):
            raise LoRAFileError(f"{adapter_config}: a JSON object is needed")
        configs.setdefault("*", config)
    for component, config in configs.items():
        check_lora_config(config, f"{path} ({component} LoRA config)")
    return state_dict, configs


# ----------------------------------------------------------------------------- sorting keys onto modules

@dataclass
class ModuleLoRA:
    """The tensors one file holds for one layer."""
    down: torch.Tensor = None
    up: torch.Tensor = None
    up_bias: torch.Tensor = None
    alpha: float = None
    keys: list = field(default_factory=list)
    factors: dict = field(default_factory=dict)  # a LyCORIS layer's tensors by suffix (hada_w1_a, lokr_w1, diff...)
    kind: str = "lora"  # or LyCORIS' "loha", "lokr", "full"


# Key suffixes of the diffusers / PEFT forms and what they hold.
SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),
            (".lora.down.weight", "down"), (".lora.up.weight", "up"),
            (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"), (".alpha", "alpha"))
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# the older diffusers attention-processor form: attn1.processor.to_q_lora.down.weight
OLD_PROCESSOR = re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
OLD_PROJECTIONS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                   "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
UNSUPPORTED = (("dora_scale", "DoRA (weight-decomposed LoRA) is not supported"),
               ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA) is not supported"))


def _unsupported(key):
    for marker, reason in UNSUPPORTED:
        if marker in key:
            return reason
    return None


def _split_diffusers_key(key, models):
    """(component, module path, role, form) of a diffusers/PEFT-form key, or a reason string."""
    component, rest = None, key
    for c in sorted(COMPONENTS, key=len, reverse=True):  # text_encoder_2 before text_encoder
        if key.startswith(c + "."):
            component, rest = c, key[len(c) + 1:]
            break
    rest = rest.removeprefix("base_model.model.")  # PEFT's own wrapper prefix
    m = OLD_PROCESSOR.match(rest)
    if m:
        path, proj, role = m.groups()
        candidates = [component] if component else list(models)
        for c in candidates:
            full = f"{path}.{OLD_PROJECTIONS['unet' if c == 'unet' else 'text'][proj]}"
            if c in models and _has_target(models[c], full):
                return c, full, role, "diffusers (old attention-processor form)"
        return f"no {' or '.join(candidates)} module {path}.{proj}"
    for suffix, role in SUFFIXES:
        if rest.endswith(suffix):
            path = rest[:-len(suffix)].replace(".processor.", ".")
            form = "diffusers/PEFT" if suffix.startswith((".lora_A", ".lora_B", ".alpha")) else \
                "diffusers (old LoRA-layer form)"
            if component is None:  # no component prefix: the first component that has the module
                component = next((c for c in models if _has_target(models[c], path)), None)
                if component is None:
                    return f"no module {path} in {' or '.join(models)}"
            if component not in models:
                return f"the pipeline has no {component}"
            if not _has_target(models[component], path):
                return f"{component} has no Linear/Conv2d {path}"
            return component, path, role, form
    return "not a LoRA key (unknown suffix)"


def _has_target(model, path):
    try:
        return is_target(model.get_submodule(path))
    except AttributeError:
        return False


def parse_lora(state_dict, models):
    """Sort a LoRA state dict onto the modules of `models` ({component: module}).

    Returns ({(component, path): ModuleLoRA}, {unmatched key: reason}, format description).
    """
    targets, unmatched, forms = {}, {}, set()
    table = None
    for key, tensor in state_dict.items():
        reason = _unsupported(key)
        if reason:
            unmatched[key] = reason
            continue
        if key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
            table = table if table is not None else kohya_table(models)
            name, _, suffix = key.partition(".")
            role = KOHYA_SUFFIXES.get(suffix) or ("factor" if suffix in lycoris.KEYS else None)
            if role is None:
                unmatched[key] = f"unknown kohya suffix {suffix!r}"
                continue
            if name not in table:
                comp, prefix = next((c, p) for c, ps in COMPONENTS.items() for p in ps if name.startswith(p))
                unmatched[key] = (f"the pipeline has no {comp}" if comp not in models else
                                  f"{comp} has no Linear/Conv2d named {name[len(prefix):]} (with '.' as '_')")
                continue
            component, path = table[name]
            sai = any(b in name for b in ("input_blocks", "middle_block", "output_blocks"))
            forms.add("kohya (SAI UNet names)" if sai else "kohya")
        else:
            found = _split_diffusers_key(key, models)
            if isinstance(found, str):
                unmatched[key] = found
                continue
            component, path, role, form = found
            forms.add(form)
        t = targets.setdefault((component, path), ModuleLoRA())
        if role == "factor":  # LyCORIS (weights/lycoris.py)
            if suffix in t.factors:
                unmatched[key] = f"a second {suffix} for {component}.{path} (first from {t.keys[0]})"
                continue
            t.keys.append(key)
            t.factors[suffix] = tensor
            forms.add("LyCORIS")
            continue
        if (t.alpha if role == "alpha" else getattr(t, role)) is not None:  # e.g. one layer under two names
            unmatched[key] = f"a second {role} for {component}.{path} (first from {t.keys[0]})"
            continue
        t.keys.append(key)
        if role == "alpha":
            t.alpha = alpha_value(tensor, key)
        else:
            setattr(t, role, tensor)
    for (component, path), t in list(targets.items()):
        if t.factors:
            t.kind = lycoris.kind_of(t.factors)
            if t.down is not None or t.up is not None:
                t.kind = "LyCORIS factors and a LoRA down/up pair on one layer"
            if t.kind not in ("loha", "lokr", "full"):
                for key in t.keys:
                    unmatched[key] = t.kind
                del targets[(component, path)]
        elif t.down is None or t.up is None:
            for key in t.keys:
                unmatched[key] = f"{'down' if t.down is None else 'up'} weight missing for this module"
            del targets[(component, path)]
    if "kohya (SAI UNet names)" in forms:  # its text-encoder keys are plain kohya
        forms.discard("kohya")
    return targets, unmatched, " + ".join(sorted(forms)) or "empty"


# ----------------------------------------------------------------------------- alpha / rank

def _pattern_value(patterns, path, default):
    """PEFT's rank/alpha pattern rule: a key matches a module path that equals it or ends with "." + it.
    The patterns were checked to be safe regular expressions by check_lora_config."""
    starts = [0] + [i + 1 for i, ch in enumerate(path) if ch == "."]
    for pattern, value in (patterns or {}).items():
        # PEFT's (.*\.)?(pattern)$, without the leading .* that would multiply the backtracking
        if any(re.fullmatch(pattern, path[s:]) for s in starts):
            return value
    return default


def layer_scale(t, component, path, configs):
    """alpha / rank of one layer: alpha from the file's key, else the component's PEFT config, else = rank."""
    rank = t.down.shape[0]
    config = configs.get(component) or configs.get("*")
    alpha = t.alpha
    if alpha is None and config is not None and config.get("lora_alpha") is not None:
        alpha = _pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"])
    if alpha is None:
        return 1.0
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise LoRAFileError(f"{t.keys[0]}: alpha {alpha!r} for {component}.{path} is not a finite number")
    if config is not None and config.get("use_rslora"):
        return alpha / rank ** 0.5
    return alpha / rank
