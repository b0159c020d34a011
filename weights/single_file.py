"""Single-file checkpoints: the original (LDM / SGM) layout of A1111, ComfyUI and civitai files.

One file holds every model under a prefix:
    model.diffusion_model.…               the UNet
    first_stage_model.…                   the VAE (a VAE-only file has no prefix)
    cond_stage_model.transformer.…        SD 1.x: CLIP ViT-L, already in transformers' layout
    cond_stage_model.model.…              SD 2.x: OpenCLIP ViT-H
    conditioner.embedders.0.transformer.… SDXL base: CLIP ViT-L;  conditioner.embedders.1.model.… OpenCLIP bigG
    conditioner.embedders.0.model.…       SDXL refiner: OpenCLIP bigG

The key rules, block kind by block kind, are in single_file_keys.py; the family's configs and the values read
from the tensors in single_file_configs.py; the original_config= yaml reader in small_yaml.py.

The family is told from the tensors (prefixes, then shapes) as ComfyUI does; configs come from the file's
shapes over the family's defaults (single_file_configs.py), or from `config=` (a diffusers folder or repo).
Keys no model uses (EMA copies, position ids, the LDM noise-schedule buffers, training leftovers) are skipped
and counted; any other key must land, and every shape is checked before a tensor is read.
"""
import logging
import os
from collections import Counter

import torch

from ..errors import ArgumentError, FileFormatError
from .config import config_from_dict
from .hub import read_json
from .load import _listing, _no_gc, _no_init, cast_tensor, read_header
from .safe import check_pickle
from .single_file_configs import (FAMILIES, apply_original_config, choose_prediction_type, infer_clip_config,
                                  infer_unet_config, infer_vae_config)
from .single_file_keys import (UNUSED, apply_transform, clip_mapping, openclip_mapping, transformed_shape,
                               unet_mapping, vae_mapping)
from .small_yaml import parse_small_yaml, read_yaml  # noqa: F401 (parse_small_yaml: the old import path)

logger = logging.getLogger("minidiff")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_SD1 = "cond_stage_model.transformer."
OPENCLIP_SD2 = "cond_stage_model.model."
CLIP_XL = "conditioner.embedders.0.transformer."
OPENCLIP_XL = "conditioner.embedders.1.model."
OPENCLIP_REFINER = "conditioner.embedders.0.model."

# ---- keys no model reads -------------------------------------------------------------------------------
# the DDPM schedule LDM stores as buffers (a scheduler recomputes it), and the training-only log-variance
_LDM_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                "logvar"}


def skip_reason(key):
    """Why a key of a single file is read by no model (None: it must land somewhere)."""
    if key.startswith("model_ema."):
        return "EMA copy (model_ema.*)"
    if key.endswith("position_ids"):
        return "position ids"
    if key in _LDM_BUFFERS:
        return "LDM schedule buffer"
    if key.endswith((".logit_scale", ".attn_mask")) and ("cond_stage_model." in key or "conditioner." in key):
        return "OpenCLIP training buffer"
    if key.startswith(("loss.", "first_stage_model.loss.", "model.diffusion_model.loss.")):
        return "training loss module"
    if key.startswith(("optimizer", "lr_scheduler", "callbacks")):
        return "optimizer leftover"
    return None


# ---- reading ---------------------------------------------------------------------------------------------
HUB_URLS = ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")


def resolve_single_file(path_or_url):
    """A local path as it is; a Hub address (`https://huggingface.co/owner/repo/blob/main/file.safetensors`, or
    `owner/repo/file.safetensors`) through huggingface_hub's cache (offline when cached, HF_HUB_OFFLINE=1)."""
    s = os.fspath(path_or_url)
    if os.path.isfile(s):
        return s
    rest = next((s[len(p):] for p in HUB_URLS if s.startswith(p)), None)
    if rest is None and not s.startswith(("/", ".", "~")) and s.count("/") >= 2 and not os.path.exists(s):
        rest = s
    if rest is None:
        raise FileNotFoundError(f"{s}: no such file (from_single_file takes the path of one checkpoint file, a Hub "
                                "URL or owner/repo/file.safetensors)")
    parts = rest.split("/")
    repo, tail, revision = "/".join(parts[:2]), parts[2:], None
    if tail[:1] in (["blob"], ["resolve"]) and len(tail) >= 3:
        revision, tail = tail[1], tail[2:]
    filename = "/".join(tail)
    if not filename or ".." in tail:
        raise FileNotFoundError(f"{s}: names no file inside the repo {repo!r}")
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo, filename, revision=revision)


class SingleFile:
    """The tensors of one .safetensors (or, with allow_pickle, .ckpt) file: shapes first, data on demand."""

    def __init__(self, path, allow_pickle=False):
        self.path = path = resolve_single_file(path)
        self.extra = Counter()
        self.global_step = None
        if check_pickle(path, allow_pickle) == "safetensors":  # the kind from the first bytes (weights/safe.py)
            self.shapes = {k: tuple(s) for k, (s, _) in read_header(path).items()}
            self._tensors = None
            return
        try:
            with open(path, "rb") as fh:
                sd = torch.load(fh, map_location="cpu", weights_only=True)
        except Exception as e:
            raise FileFormatError(f"{path}: torch.load(weights_only=True) refused or failed (truncated or corrupt?): "
                                  f"{type(e).__name__}: {e}") from e
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            # a Lightning checkpoint: the weights, plus training state (global_step, optimizer states, ...)
            self.global_step = sd.get("global_step")
            self.extra.update("optimizer leftover" for k in sd if k != "state_dict")
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise FileFormatError(f"{path}: a pickle holding {type(sd).__name__}, not a dict of named tensors")
        self._tensors = {k: v for k, v in sd.items() if torch.is_tensor(v)}
        self.extra.update("optimizer leftover" for v in sd.values() if not torch.is_tensor(v))
        self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

    def read(self, keys):
        """(key, tensor) for each of `keys`, one at a time, so that one tensor is in flight."""
        if self._tensors is not None:
            yield from ((k, self._tensors[k]) for k in keys)
            return
        from safetensors import safe_open
        with safe_open(self.path, framework="pt", device="cpu") as f:
            for k in keys:
                try:
                    t = f.get_tensor(k)
                except Exception as e:
                    raise FileFormatError(f"{self.path}: could not read tensor {k!r} (truncated or corrupt file?): {e}") from e
                yield k, t

    def has(self, prefix):
        return any(k.startswith(prefix) for k in self.shapes)

    def under(self, prefix):
        """{key without prefix: shape} of the keys under `prefix` that a model reads."""
        n = len(prefix)
        return {k[n:]: s for k, s in self.shapes.items() if k.startswith(prefix) and skip_reason(k) is None}


# ---- the family ----------------------------------------------------------------------------------------
def detect_family(f):
    """sd1 / sd2 / sdxl / sdxl_refiner from the prefixes, then the UNet's shapes (cross-attention width)."""
    if f.has(OPENCLIP_XL) or f.has(CLIP_XL):
        return "sdxl"
    if f.has(OPENCLIP_REFINER):
        return "sdxl_refiner"
    if f.has(OPENCLIP_SD2):
        return "sd2"
    if f.has(CLIP_SD1):
        return "sd1"
    unet = f.under(UNET) or ({k: s for k, s in f.shapes.items()} if "input_blocks.0.0.weight" in f.shapes else {})
    context = next((s[1] for k, s in unet.items() if k.endswith("attn2.to_k.weight")), None)
    if "label_emb.0.0.weight" in unet:
        return "sdxl_refiner" if context == 1280 else "sdxl"
    if context == 1024:
        return "sd2"
    return "sd1"




# ---- building models -------------------------------------------------------------------------------------
class Report:
    """What a single-file load did: tensors loaded per model, keys skipped per reason."""

    def __init__(self, path):
        self.path, self.loaded, self.skipped, self.notes = path, {}, Counter(), []

    def __str__(self):
        loaded = ", ".join(f"{n} {k}" for k, n in self.loaded.items())
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        notes = "".join(f"\n  {n}" for n in self.notes)
        return f"{os.path.basename(self.path)}: loaded {loaded} tensors; skipped {skipped}{notes}"


def build(cls, cfg_dict, f, prefix, mapping, torch_dtype, device, report, name, where, memory_format=None):
    """Build `cls` on meta from `cfg_dict`, map the file's keys under `prefix`, check every key and shape, read
    (cast, and the convolutions' weights laid out in `memory_format` if given, in one copy)."""
    cfg = config_from_dict(cls.config_class, cfg_dict, where=where)
    with _no_gc():
        with torch.device("meta"), _no_init():
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        plan, unused = {}, []
        for key, targets in mapping.items():
            for target, transform in targets:
                if target == UNUSED:
                    unused.append(key)
                    continue
                plan.setdefault(target, []).append((prefix + key, transform))
        missing = expected.keys() - plan.keys() - {None}
        unexpected = [src for t, srcs in plan.items() if t not in expected for src, _ in srcs]
        doubled = [t for t, srcs in plan.items() if len(srcs) > 1]
        wrong = [f"{srcs[0][0]}: file {f.shapes[srcs[0][0]]} -> {transformed_shape(f.shapes[srcs[0][0]], srcs[0][1])}"
                 f" vs model {t} {expected[t]}" for t, srcs in plan.items()
                 if t in expected and transformed_shape(f.shapes[srcs[0][0]], srcs[0][1]) != expected[t]]
        if missing or unexpected or wrong or doubled:
            parts = [f"{f.path} does not fit {cls.__name__} ({name}):"]
            if unexpected:
                parts.append(f"{len(unexpected)} keys in the file that no rule maps into it: {_listing(unexpected)}")
            if missing:
                parts.append(f"{len(missing)} missing tensors: {_listing(missing)}")
            if wrong:
                parts.append(f"{len(wrong)} wrong shapes: {_listing(wrong, 6)}")
            if doubled:
                parts.append(f"{len(doubled)} tensors two keys map to: {_listing(doubled)}")
            raise FileFormatError("\n  ".join(parts))
        dtype = torch_dtype or torch.float32
        targets = {}  # file key -> [(model key, transform)]: a fused q/k/v feeds three
        for target, [(src, transform)] in plan.items():
            targets.setdefault(src, []).append((target, transform))
        sd = {}
        for src, t in f.read(sorted(targets)):
            for target, transform in targets[src]:
                part = apply_transform(t, transform)
                sd[target] = cast_tensor(part, dtype, device or "cpu", memory_format)
        model.load_state_dict(sd, strict=True, assign=True)
    report.loaded[name] = len(sd)
    if unused:
        report.skipped[f"{name} tensors the pipeline never reads"] += len(unused)
    return model.eval()


def _parts(f):
    """{component: (prefix, kind)} present in the file."""
    parts = {}
    unet_prefix = UNET if f.has(UNET) else ("" if "input_blocks.0.0.weight" in f.shapes else None)
    if unet_prefix is not None:
        parts["unet"] = (unet_prefix, "unet")
    if f.has(VAE):
        parts["vae"] = (VAE, "vae")
    elif "encoder.conv_in.weight" in f.shapes and "decoder.conv_out.weight" in f.shapes:
        parts["vae"] = ("", "vae")
    for prefix, component, kind in ((CLIP_SD1, "text_encoder", "clip"), (OPENCLIP_SD2, "text_encoder", "openclip"),
                                    (CLIP_XL, "text_encoder", "clip"), (OPENCLIP_XL, "text_encoder_2", "openclip"),
                                    (OPENCLIP_REFINER, "text_encoder_2", "openclip")):
        if f.has(prefix):
            parts[component] = (prefix, kind)
    return parts


def _model_class(component):
    from ..models.clip import CLIPTextModel, CLIPTextModelWithProjection
    from ..models.unet import UNet2DConditionModel
    from ..models.vae import AutoencoderKL
    return {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection}[component]


def _is_diffusers_vae(shapes):
    return any(k.startswith("encoder.down_blocks.") for k in shapes)


def load_models(f, family, components, config_dicts=None, original=None, torch_dtype=None, device=None,
                prediction_type=None, report=None, scheduler_config=None, memory_format=None):
    """Build the named models from the file, each from `config_dicts[component]` (a config.json's dict) when
    given, else from the file's shapes over the family's config. Returns ({component: model}, (prediction, why))."""
    fam = FAMILIES[family]
    parts = _parts(f)
    pred, why = choose_prediction_type(family, f, prediction_type, original, scheduler_config)
    if family == "sd2" and "rule" in why:
        logger.warning("%s: %s", f.path, why)
    variant = fam.get(pred, {})
    models = {}
    for component in components:
        if component not in parts:
            hint = (" (a file saved without its VAE: pass vae=AutoencoderKL.from_single_file(...) or "
                    "from_pretrained(...))") if component == "vae" else ""
            raise FileFormatError(f"{f.path}: has no {component} (found: {', '.join(parts) or 'no known model keys'}; "
                                  f"a {fam['name']} file){hint}")
        prefix, kind = parts[component]
        shapes = f.under(prefix)
        if kind == "vae" and _is_diffusers_vae(shapes):
            raise FileFormatError(f"{f.path}: a VAE in diffusers' layout, not an LDM one: load its folder with "
                             "AutoencoderKL.from_pretrained")
        if config_dicts and component in config_dicts:
            cfg, where = config_dicts[component], f"config= ({component})"
        else:
            where = f"{f.path} ({component}: {fam['name']} config with the tensors' shapes)"
            if kind == "unet":
                cfg = dict(infer_unet_config(shapes, family), **variant.get("unet", {}))
                if "time_ids" in fam and "text_encoder_2" in parts:
                    # SDXL: the pooled text width plus one sinusoid per time id enter add_embedding
                    pooled = f.shapes[parts["text_encoder_2"][0] + "text_projection"][1]
                    cfg["addition_time_embed_dim"] = (cfg["projection_class_embeddings_input_dim"] - pooled) // fam["time_ids"]
            elif kind == "vae":
                cfg = dict(infer_vae_config(shapes, family), **variant.get("vae", {}))
            else:
                cfg = infer_clip_config(shapes, fam[component], kind == "openclip", drop_last=family == "sd2")
            if original is not None:
                apply_original_config(original, cfg if kind == "unet" else None, cfg if kind == "vae" else None, None)
        if kind == "unet":
            mapping = unet_mapping(shapes)
        elif kind == "vae":
            mapping = vae_mapping(shapes)
        elif kind == "clip":
            mapping = clip_mapping(shapes)
        else:
            mapping = openclip_mapping(shapes, cfg["num_hidden_layers"], component == "text_encoder_2")
        models[component] = build(_model_class(component), cfg, f, prefix, mapping, torch_dtype, device, report,
                                  component, where, memory_format)
    return models, (pred, why)


def _count_unread(f, report):
    for k in f.shapes:
        reason = skip_reason(k)
        if reason is not None:
            report.skipped[reason] += 1
    report.skipped.update(f.extra)


def _check_unknown(f, parts):
    prefixes = [p for p, _ in parts.values()]
    unknown = [k for k in f.shapes if skip_reason(k) is None and not any(k.startswith(p) for p in prefixes)]
    if unknown:
        raise FileFormatError(f"{f.path}: {len(unknown)} keys belong to no model minidiff knows in this file: "
                         f"{_listing(unknown)} (known prefixes: {', '.join(p or '(none)' for p in prefixes)})")


def clip_tokenizer(pad_token, max_length=77):
    """CLIP's BPE tokenizer (the 49408-token vocabulary of CLIP L, OpenCLIP H and bigG), shipped with minidiff:
    the vocabulary is the 256 byte symbols, the same with `</w>`, one token per merge, then the two specials."""
    import gzip
    from ..tokenizer import CLIPTokenizer, byte_to_char
    # absolute: weights/ is installed as minidiff.weights, but an editable install reads it in place
    from minidiff.assets import CLIP_MERGES
    with gzip.open(CLIP_MERGES, "rt", encoding="utf-8") as fh:
        merges = [tuple(line.split()) for line in fh.read().strip().split("\n")[1:]]
    chars = sorted(byte_to_char().values())  # CLIP's order: the printable bytes, then those moved past 255
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, merges, pad_token=pad_token, model_max_length=max_length)


def load_pipeline(cls, path, config=None, original_config=None, prediction_type=None, torch_dtype=None, device=None,
                  allow_pickle=False, memory_format=None, **kwargs):
    """The body of every pipeline's from_single_file (see DiffusionPipeline.from_single_file)."""
    from .. import schedulers
    from ..tokenizer import CLIPTokenizer
    f = SingleFile(path, allow_pickle)
    original = read_yaml(original_config) if original_config is not None else None
    family = detect_family(f)
    fam = FAMILIES[family]
    if cls.__name__ == "DiffusionPipeline":  # the generic entry point takes the family's text-to-image class
        from ..pipelines import PIPELINES
        cls = PIPELINES[fam["pipelines"][0]]
    if cls.__name__ not in fam["pipelines"]:
        raise ArgumentError(f"{f.path} is a {fam['name']} checkpoint: load it with {fam['pipelines'][0]}.from_single_file, "
                            f"not {cls.__name__}")
    parts = _parts(f)
    _check_unknown(f, parts)
    # the models the pipeline takes from the file; a text encoder the family lacks (the refiner's first) is None
    wanted = [c for c in ("unet", "vae", "text_encoder", "text_encoder_2")
              if c in cls.component_names and c not in kwargs and (c in parts or c in ("unet", "vae"))]
    config_dicts, sched_raw = None, None
    if config is not None:
        config_dicts = {c: read_json(config, "config.json", c) for c in wanted}
        sched_raw = read_json(config, "scheduler_config.json", "scheduler") if "scheduler" not in kwargs else None
    report = Report(f.path)
    components, (pred, why) = load_models(f, family, wanted, config_dicts, original, torch_dtype, device,
                                          prediction_type, report, sched_raw, memory_format)
    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if encoder not in cls.component_names:
            continue
        components.setdefault(encoder, None)
        if tokenizer in kwargs:
            continue
        if components[encoder] is None and encoder not in kwargs:
            components[tokenizer] = None
        elif config is not None:
            components[tokenizer] = CLIPTokenizer.from_pretrained(config, subfolder=tokenizer)
        else:
            components[tokenizer] = clip_tokenizer(fam["tokenizer_pad"][tokenizer])
    if "scheduler" not in kwargs:
        if sched_raw is not None:
            sched_cls, sched_cfg = sched_raw.get("_class_name"), sched_raw
        else:
            sched_cls, sched_cfg = fam.get(pred, {}).get("scheduler") or fam["scheduler"]
            sched_cfg = dict(sched_cfg)
            if original is not None:
                apply_original_config(original, None, None, sched_cfg)
        if not hasattr(schedulers, str(sched_cls)):
            raise ArgumentError(f"{config}/scheduler/scheduler_config.json names {sched_cls!r}, which minidiff does "
                                "not implement: pass scheduler= one of minidiff.schedulers")
        components["scheduler"] = getattr(schedulers, sched_cls).from_config(sched_cfg, prediction_type=pred)
    if config is not None:
        index = read_json(config, "model_index.json")
        options = {k: v for k, v in index.items() if k in fam["pipeline"]}
    else:
        options = dict(fam["pipeline"])
    for c, (prefix, _) in parts.items():
        if c in kwargs:  # the user's component replaces the file's, whose keys nothing reads then
            report.skipped[f"{c} replaced by the {c}= argument"] += len(f.under(prefix))
    _count_unread(f, report)
    report.notes.append(f"family {fam['name']}; prediction_type {pred} ({why})")
    logger.info("%s", report)
    pipe = cls(**components, **options, **kwargs)
    pipe.single_file_report = report
    return pipe


def load_component(cls, path, component, config=None, original_config=None, torch_dtype=None, device=None,
                   allow_pickle=False, subfolder=None, prediction_type=None, memory_format=None):
    """The body of a model's from_single_file: one model out of a whole checkpoint or out of a file holding only it.
    `config`: a folder or repo whose config.json (in `subfolder`) is the model's."""
    f = SingleFile(path, allow_pickle)
    original = read_yaml(original_config) if original_config is not None else None
    family = detect_family(f)
    report = Report(f.path)
    config_dicts = {component: read_json(config, "config.json", subfolder)} if config is not None else None
    parts = _parts(f)
    models, _ = load_models(f, family, [component], config_dicts, original, torch_dtype, device, prediction_type, report,
                            memory_format=memory_format)
    for other, (p, _) in parts.items():
        if other != component:
            report.skipped[f"{other} (not asked for)"] += len(f.under(p))
    _count_unread(f, report)
    logger.info("%s", report)
    model = models[component]
    model.single_file_report = report
    return model
