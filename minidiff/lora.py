"""LoRA (Hu et al. 2021, "Low-Rank Adaptation"): adapters for the UNet and the text encoders.

A LoRA file holds, for some Linear/Conv2d layers of a model, two small matrices: `down` (A, rank x in)
and `up` (B, out x rank), and often an `alpha`. The adapted layer computes

    y = W x + b + sum over active adapters a of  weight_a * (alpha_a / rank_a) * B_a (A_a x)

Here that is an explicit injection: each targeted nn.Linear / nn.Conv2d is replaced by a `LoRALinear` /
`LoRAConv2d` that holds the base layer's own `weight` and `bias` Parameters under the same names (so the
model's state-dict keys do not change) plus the adapters, kept as non-persistent buffers (so
`save_pretrained` still writes the plain model). Adapters switch and reweight without touching W;
`fuse_lora` adds them into W for speed and keeps a copy of W so that `unfuse_lora` restores it exactly.

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
"""
import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .weights.hub import PICKLE_SUFFIXES, is_local, resolve_file
from .weights.load import read_state_dict

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Pipeline components a LoRA file can adapt, with their kohya key prefixes.
COMPONENTS = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
METADATA_KEY = "lora_adapter_metadata"  # diffusers writes the PEFT LoraConfig of each component here


# ----------------------------------------------------------------------------- the adapted layers

class LoRAAdapter(nn.Module):
    """One adapter on one layer: down (A), up (B), optional up bias, and alpha / rank.

    Buffers, not parameters, and non-persistent: they follow `.to()` but stay out of the state dict.
    """

    def __init__(self, down, up, up_bias, scale):
        super().__init__()
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("up_bias", up_bias, persistent=False)
        self.scale = scale  # alpha / rank, fixed by the file
        self.rank = down.shape[0]


class LoRALayer(nn.Module):
    """What LoRALinear and LoRAConv2d share: the adapters, which are active and with what weight,
    enable/disable, the per-call scale, fusing."""

    def __init__(self, base):
        super().__init__()
        # the base layer's own Parameters under their own names: `weight` and `bias` keep their state-dict keys
        self.weight = base.weight
        self.bias = base.bias
        self.adapters = nn.ModuleDict()
        self.adapter_weights = {}  # name -> weight from set_adapters (1.0 when loaded)
        self.active = []  # adapters of this layer in use, in the order set_adapters named them
        self.active_names = []  # all the adapters set_adapters named (some may not touch this layer)
        self.enabled = True
        self.call_scale = 1.0  # cross_attention_kwargs["scale"] during one pipeline call
        self.fused = []  # adapters added into `weight`
        self.unfused = None  # (weight, bias) as they were before fusing, on the CPU

    def forward(self, x):
        out = self.base_forward(x)
        if self.fused or not self.enabled:  # a fused layer computes with W + deltas alone, as PEFT does
            return out
        for name in self.active:
            a = self.adapters[name]
            out = out + self.lora_forward(x, a) * (a.scale * self.adapter_weights[name] * self.call_scale)
        return out

    def delta_weight(self, a):
        """B A as a weight of this layer's shape, in fp32."""
        return (a.up.float().flatten(1) @ a.down.float().flatten(1)).reshape(self.weight.shape)

    @torch.no_grad()
    def fuse(self, names, lora_scale=1.0):
        names = [n for n in names if n in self.adapters and n not in self.fused]
        if not names:
            return
        if self.unfused is None:
            self.unfused = (self.weight.detach().to("cpu", copy=True),
                            None if self.bias is None else self.bias.detach().to("cpu", copy=True))
        weight = self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        for n in names:
            a = self.adapters[n]
            s = a.scale * self.adapter_weights[n] * lora_scale
            weight += self.delta_weight(a) * s
            if a.up_bias is not None:
                bias += a.up_bias.float() * s
        self.weight.copy_(weight)
        if bias is not None:
            self.bias.copy_(bias)
        self.fused += names

    @torch.no_grad()
    def unfuse(self):
        if self.unfused is None:
            return
        weight, bias = self.unfused
        self.weight.copy_(weight)
        if bias is not None:
            self.bias.copy_(bias)
        self.unfused, self.fused = None, []


class LoRALinear(LoRALayer):
    def __init__(self, base):
        super().__init__(base)
        self.in_features, self.out_features = base.in_features, base.out_features

    def base_forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def lora_forward(self, x, a):
        return F.linear(F.linear(x, a.down), a.up, a.up_bias)

    def expected_shapes(self, rank):
        return (rank, self.in_features), (self.out_features, rank)

    def plain(self):
        with torch.device("meta"):
            m = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        m.weight, m.bias = self.weight, self.bias
        return m

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, adapters={list(self.adapters)}"


class LoRAConv2d(LoRALayer):
    """The down convolution has the base layer's kernel, stride and padding; the up one is 1 x 1 (LoCon)."""

    def __init__(self, base):
        super().__init__(base)
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError(f"LoRA on a Conv2d with groups={base.groups}, padding_mode={base.padding_mode!r} "
                             "is not supported")
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (base.kernel_size, base.stride, base.padding,
                                                                      base.dilation)

    def base_forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def lora_forward(self, x, a):
        return F.conv2d(F.conv2d(x, a.down, None, self.stride, self.padding, self.dilation), a.up, a.up_bias)

    def expected_shapes(self, rank):
        return (rank, self.in_channels, *self.kernel_size), (self.out_channels, rank, 1, 1)

    def plain(self):
        with torch.device("meta"):
            m = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, bias=self.bias is not None)
        m.weight, m.bias = self.weight, self.bias
        return m

    def extra_repr(self):
        return (f"{self.in_channels} -> {self.out_channels}, kernel {tuple(self.kernel_size)}, "
                f"adapters={list(self.adapters)}")


def is_target(module):
    return type(module) in (nn.Linear, nn.Conv2d) or isinstance(module, LoRALayer)


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALayer)]


def describe(module):
    if isinstance(module, (nn.Linear, LoRALinear)):
        return f"Linear {module.in_features} -> {module.out_features}"
    return f"Conv2d {module.in_channels} -> {module.out_channels}, kernel {tuple(module.kernel_size)}"


def expected_shapes(module, rank):
    if isinstance(module, LoRALayer):
        return module.expected_shapes(rank)
    if isinstance(module, nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)


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

@dataclass
class ModuleLoRA:
    """The tensors one file holds for one layer."""
    down: torch.Tensor = None
    up: torch.Tensor = None
    up_bias: torch.Tensor = None
    alpha: float = None
    keys: list = field(default_factory=list)


class LoRALoadReport(NamedTuple):
    adapter_name: str
    format: str
    modules: dict  # component -> number of layers the adapter touched


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


def read_lora_file(path, allow_pickle=False):
    """(state dict, {component: PEFT config dict} or {}) of a LoRA file."""
    if path.endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise ValueError(f"{path} is a pickle file, which can run code when loaded; pass allow_pickle=True to read "
                         "it anyway (with torch.load(weights_only=True)), or use the .safetensors version")
    state_dict = read_state_dict([path], allow_pickle=allow_pickle)
    configs = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        if raw:
            try:
                flat = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON: {e}") from e
            for key, value in flat.items():  # "unet.lora_alpha" -> configs["unet"]["lora_alpha"]
                component, _, option = key.partition(".")
                configs.setdefault(component, {})[option] = value
    adapter_config = os.path.join(os.path.dirname(path), "adapter_config.json")
    if os.path.isfile(adapter_config):  # PEFT's own layout: one config for the whole file
        with open(adapter_config, encoding="utf-8") as f:
            configs.setdefault("*", json.load(f))
    return state_dict, configs


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
               ("lora_magnitude_vector", "DoRA (weight-decomposed LoRA) is not supported"),
               ("hada_", "LoHa (LyCORIS) is not supported"), ("lokr_", "LoKr (LyCORIS) is not supported"))


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
            role = KOHYA_SUFFIXES.get(suffix)
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
        if (t.alpha if role == "alpha" else getattr(t, role)) is not None:  # e.g. one layer under two names
            unmatched[key] = f"a second {role} for {component}.{path} (first from {t.keys[0]})"
            continue
        t.keys.append(key)
        if role == "alpha":
            t.alpha = float(tensor.item())
        else:
            setattr(t, role, tensor)
    for (component, path), t in list(targets.items()):
        if t.down is None or t.up is None:
            for key in t.keys:
                unmatched[key] = f"{'up' if t.down is None else 'down'} weight missing for this module"
            del targets[(component, path)]
    if "kohya (SAI UNet names)" in forms:  # its text-encoder keys are plain kohya
        forms.discard("kohya")
    return targets, unmatched, " + ".join(sorted(forms)) or "empty"


def _listing(items, n=20):
    items = list(items)
    more = f"\n    ... and {len(items) - n} more" if len(items) > n else ""
    return "\n    " + "\n    ".join(items[:n]) + more


def _pattern_value(patterns, path, default):
    """PEFT's rank/alpha pattern rule: a key matches a module path that equals it or ends with "." + it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def _scale(t, component, path, configs):
    """alpha / rank of one layer: alpha from the file's key, else the component's PEFT config, else = rank."""
    rank = t.down.shape[0]
    config = configs.get(component) or configs.get("*")
    alpha = t.alpha
    if alpha is None and config is not None and config.get("lora_alpha") is not None:
        alpha = _pattern_value(config.get("alpha_pattern"), path, config["lora_alpha"])
    if alpha is None:
        return 1.0
    if config is not None and config.get("use_rslora"):
        return alpha / rank ** 0.5
    return alpha / rank


def _fit(tensor, module, role):
    """A 1 x 1 convolution's LoRA may come as matrices, and a Linear's as 1 x 1 kernels: reshape to fit."""
    conv = isinstance(module, (nn.Conv2d, LoRAConv2d))
    if conv and tensor.ndim == 2 and (role == "up" or tuple(module.kernel_size) == (1, 1)):
        return tensor[:, :, None, None]
    if not conv and tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1):
        return tensor.flatten(1)
    return tensor


# ----------------------------------------------------------------------------- pipeline-level operations

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
        raise ValueError("this pipeline has no unet or text encoder to load a LoRA into")
    if isinstance(repo_id_or_file_or_dict, dict):
        state_dict, configs, where = repo_id_or_file_or_dict, {}, "the LoRA state dict"
    else:
        where = resolve_lora_file(repo_id_or_file_or_dict, weight_name, subfolder)
        state_dict, configs = read_lora_file(where, allow_pickle)
    loaded = {n for names in get_list_adapters(models).values() for n in names}
    if adapter_name is None:
        adapter_name = f"default_{len(loaded)}"
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name={adapter_name!r}: use a non-empty name without '.'")
    if adapter_name in loaded:
        raise ValueError(f"an adapter named {adapter_name!r} is already loaded (loaded: {sorted(loaded)}): pass "
                         "another adapter_name, or delete_adapters() it first")

    targets, unmatched, form = parse_lora(state_dict, models)
    for config in configs.values():
        if config.get("use_dora"):
            raise ValueError(f"{where}: use_dora=True in its LoRA config: DoRA is not supported")
    if unmatched and not allow_partial:
        raise ValueError(f"{where}: {len(unmatched)} of {len(state_dict)} keys match no module of "
                         f"{' / '.join(models)} ({form} format):"
                         + _listing(f"{k}: {r}" for k, r in sorted(unmatched.items()))
                         + "\n  (is this LoRA made for another base model? allow_partial=True loads the keys that match)")
    adapters, wrong = {}, []
    for (component, path), t in targets.items():
        module = models[component].get_submodule(path)
        down, up = _fit(t.down, module, "down"), _fit(t.up, module, "up")
        want_down, want_up = expected_shapes(module, down.shape[0])
        bias_ok = t.up_bias is None or (tuple(t.up_bias.shape) == (want_up[0],) and module.bias is not None)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up or not bias_ok:
            wrong.append(f"{t.keys[0]} (and its pair): down {tuple(t.down.shape)}, up {tuple(t.up.shape)}"
                         f"{'' if t.up_bias is None else f', up bias {tuple(t.up_bias.shape)}'} do not fit "
                         f"{component}.{path} ({describe(module)}), which needs down {want_down}, up {want_up}")
            continue
        adapters[(component, path)] = (down, up, t.up_bias, _scale(t, component, path, configs))
    if wrong:
        raise ValueError(f"{where}: {len(wrong)} LoRA layers do not fit the pipeline's modules (a LoRA for another "
                         "base model, e.g. an SD 1.x LoRA on SDXL?):" + _listing(wrong, 12))
    if not adapters:
        raise ValueError(f"{where}: no LoRA layer to load ({len(state_dict)} keys, none matched)")

    enabled = all(layer.enabled for _, layer in _all_layers(models))
    counts = {c: 0 for c in models}
    for (component, path), (down, up, up_bias, scale) in adapters.items():
        layer = _wrap(models[component], path)
        layer.enabled = enabled
        w = layer.weight
        layer.adapters[adapter_name] = LoRAAdapter(down.to(w.device, w.dtype), up.to(w.device, w.dtype),
                                                   None if up_bias is None else up_bias.to(w.device, w.dtype), scale)
        layer.adapter_weights[adapter_name] = 1.0
        counts[component] += 1
    _activate(models, [adapter_name], [1.0])
    report = LoRALoadReport(adapter_name, form, counts)
    if verbose:
        skipped = f", {len(unmatched)} unmatched keys skipped" if unmatched else ""
        print(f"LoRA {adapter_name!r} ({form}): " + ", ".join(f"{c} {n} layers" for c, n in counts.items())
              + skipped, file=sys.stderr)
    return report


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
    for _, layer in _all_layers(models):
        layer.active_names = list(names)  # what get_active_adapters reports
        for n, w in zip(names, weights):
            if n in layer.adapters:
                layer.adapter_weights[n] = w
        layer.active = [n for n in names if n in layer.adapters]


def set_adapters(target, adapter_names, adapter_weights=None):
    """Use these adapters together, each scaled by its weight: a number, a list (one per adapter), or per
    adapter a dict {component: weight} (a component left out gets 1.0)."""
    models = lora_components(target)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"adapter_weights has {len(weights)} entries for {len(names)} adapters {names}")
    loaded = {n for ns in get_list_adapters(models).values() for n in ns}
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded (loaded: {sorted(loaded)})")
    for component, model in models.items():
        per_component = []
        for n, w in zip(names, weights):
            if isinstance(w, dict):
                unknown = set(w) - set(COMPONENTS)
                if unknown:
                    raise ValueError(f"adapter_weights for {n!r}: unknown components {sorted(unknown)} "
                                     f"(use {list(COMPONENTS)}; block-wise UNet weights are not supported)")
                w = w.get(component)
            if w is not None and not isinstance(w, (int, float)):
                raise ValueError(f"adapter weight {w!r} for {n!r}: use a number (block-wise weights are not supported)")
            per_component.append(1.0 if w is None else float(w))
        _activate({component: model}, names, per_component)


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
                raise ValueError(f"adapters {fused} are fused into {component}.{name}: unfuse_lora() first")
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


@contextmanager
def scaled(modules, scale):
    """Multiply every LoRA of `modules` by `scale` inside the block: `cross_attention_kwargs={"scale": s}`."""
    if scale is None or scale == 1:
        yield
        return
    modules = [m for m in (modules if isinstance(modules, (list, tuple)) else [modules]) if m is not None]
    layers = [layer for m in modules for layer in lora_layers(m)]
    for layer in layers:
        layer.call_scale = scale
    try:
        yield
    finally:
        for layer in layers:
            layer.call_scale = 1.0


def call_scale(cross_attention_kwargs):
    """The LoRA scale a pipeline call asks for with cross_attention_kwargs={"scale": s} (None: unscaled)."""
    return (cross_attention_kwargs or {}).get("scale")
