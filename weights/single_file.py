"""Single-file checkpoints: the original (LDM / SGM) layout of A1111, ComfyUI and civitai files.

One file holds every model under a prefix:
    model.diffusion_model.…               the UNet
    first_stage_model.…                   the VAE (a VAE-only file has no prefix)
    cond_stage_model.transformer.…        SD 1.x: CLIP ViT-L, already in transformers' layout
    cond_stage_model.model.…              SD 2.x: OpenCLIP ViT-H
    conditioner.embedders.0.transformer.… SDXL base: CLIP ViT-L;  conditioner.embedders.1.model.… OpenCLIP bigG
    conditioner.embedders.0.model.…       SDXL refiner: OpenCLIP bigG

How the layouts relate, block kind by block kind (left: the file, right: minidiff = diffusers):
  UNet   input_blocks.0.0 = conv_in; then, level by level, input_blocks.N.0 is a resnet (or, ending a level,
         a downsampler `op`) and input_blocks.N.1 its transformer -> down_blocks.i.resnets.j / attentions.j /
         downsamplers.0.conv. middle_block.0/1/2 = mid_block.resnets.0 / attentions.0 / resnets.1.
         output_blocks.N.0 is a resnet, .1 its transformer, the last of a level ends with an upsampler
         `conv` -> up_blocks.i.resnets.j / attentions.j / upsamplers.0. time_embed.0/2 = time_embedding.
         linear_1/2, label_emb.0.0/2 = add_embedding (SDXL), out.0/2 = conv_norm_out / conv_out.
         Resnet parts: in_layers.0/2 = norm1/conv1, emb_layers.1 = time_emb_proj, out_layers.0/3 =
         norm2/conv2, skip_connection = conv_shortcut. Transformers are named alike in both layouts.
  VAE    encoder.down.i.block.j / .downsample = encoder.down_blocks.i.resnets.j / downsamplers.0;
         decoder.up.i counts from the lowest resolution: decoder.up_blocks.(n-1-i). mid.block_1/2 =
         mid_block.resnets.0/1, mid.attn_1.norm/q/k/v/proj_out = attentions.0.group_norm/to_q/to_k/to_v/
         to_out.0 (1x1 convolutions in the file: the same matrices as linear layers), nin_shortcut =
         conv_shortcut, norm_out = conv_norm_out.
  CLIP   transformers' keys under the prefix (`text_model.` added where old files lack it).
  OpenCLIP  transformer.resblocks.i.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj} = text_model.encoder.layers.i.
         {layer_norm1, self_attn, layer_norm2, mlp.fc1, mlp.fc2}; attn.in_proj_{weight,bias} is q, k, v stacked
         (split in three); token_embedding, positional_embedding, ln_final = the embeddings and final norm;
         text_projection is x @ P (a Linear's weight is its transpose).

The family is told from the tensors (prefixes, then shapes) as ComfyUI does; configs come from the file's
shapes over the family's defaults (single_file_configs.py), or from `config=` (a diffusers folder or repo).
Keys no model uses (EMA copies, position ids, the LDM noise-schedule buffers, training leftovers) are skipped
and counted; any other key must land, and every shape is checked before a tensor is read.
"""
import logging
import os
import re
from collections import Counter

import torch

from ..errors import ArgumentError, FileFormatError
from .config import config_from_dict
from .hub import read_json
from .load import _listing, _no_gc, _no_init, read_header
from .safe import check_pickle
from .single_file_configs import FAMILIES

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


# ---- key rules, block kind by block kind -----------------------------------------------------------------
# Each rule maps one file key (prefix removed) to [(model key, transform)], transform None, "linear" (a 1x1
# conv's [C, C, 1, 1] as [C, C]), "T" (transpose) or ("chunk", i) (the i-th of three stacked q, k, v).
# A model key None means no rule knows the key (an error); UNUSED, a tensor the pipeline never reads.
UNUSED = "<unused>"

_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
           ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]


def _resnet(rest, target):
    for old, new in _RESNET:
        if rest.startswith(old):
            return target + new + rest[len(old):]
    return None


def unet_blocks(shapes):
    """Where each numbered LDM block sits in diffusers' layout, read from the keys: {("input"|"output", N):
    (level, j, kind)} with kind "resnet" or "down"/"up" (a block ending a level), plus the level count."""
    def kind_of(side, n):
        if f"{side}_blocks.{n}.0.op.weight" in shapes:
            return "down"
        if f"{side}_blocks.{n}.0.in_layers.0.weight" in shapes:
            return "resnet"
        return None

    where, level, j, n = {}, 0, 0, 1
    while kind_of("input", n):
        kind = kind_of("input", n)
        where[("input", n)] = (level, j, kind)
        if kind == "down":
            level, j = level + 1, 0
        else:
            j += 1
        n += 1
    levels = level + 1
    level, j, n = 0, 0, 0
    while kind_of("output", n):
        where[("output", n)] = (level, j, "resnet")
        # an upsampler (`conv`) in the block ends its level
        if any(f"output_blocks.{n}.{m}.conv.weight" in shapes for m in (1, 2)):
            level, j = level + 1, 0
        else:
            j += 1
        n += 1
    return where, levels


def unet_rule(key, where):
    m = re.match(r"(input|output)_blocks\.(\d+)\.(\d+)\.(.*)", key)
    if m:
        side, n, part, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if side == "input" and n == 0 and part == 0:
            return "conv_in." + rest
        if (side, n) not in where:
            return None
        level, j, kind = where[(side, n)]
        blocks = "down_blocks" if side == "input" else "up_blocks"
        if kind == "down":
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[len('op.'):]}" if rest.startswith("op.") else None
        if part == 0:
            return _resnet(rest, f"{blocks}.{level}.resnets.{j}.")
        if rest.startswith("conv."):  # the upsampler
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        if part == 1:
            return f"{blocks}.{level}.attentions.{j}.{rest}"
        return None
    m = re.match(r"middle_block\.(\d)\.(.*)", key)
    if m:
        part, rest = int(m.group(1)), m.group(2)
        return "mid_block.attentions.0." + rest if part == 1 else _resnet(rest, f"mid_block.resnets.{part // 2}.")
    for old, new in (("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
                     ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
                     ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")):
        if key.startswith(old):
            return new + key[len(old):]
    return None


def unet_mapping(shapes):
    where, _ = unet_blocks(shapes)
    return {k: [(unet_rule(k, where), None)] for k in shapes}


_VAE_PARTS = [("norm_out.", "conv_norm_out."), ("mid.block_1.", "mid_block.resnets.0."),
              ("mid.block_2.", "mid_block.resnets.1."), ("mid.attn_1.norm.", "mid_block.attentions.0.group_norm."),
              ("mid.attn_1.q.", "mid_block.attentions.0.to_q."), ("mid.attn_1.k.", "mid_block.attentions.0.to_k."),
              ("mid.attn_1.v.", "mid_block.attentions.0.to_v."),
              ("mid.attn_1.proj_out.", "mid_block.attentions.0.to_out.0.")]


def vae_rule(key, up_levels):
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key, None
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return None, None
    rest = rest.replace("nin_shortcut.", "conv_shortcut.")
    m = re.match(r"(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)", rest)
    if m:
        i = int(m.group(2))
        blocks = "down_blocks" if m.group(1) == "down" else "up_blocks"
        if m.group(1) == "up":
            i = up_levels - 1 - i  # LDM counts the decoder's levels from the lowest resolution
        inner = f"resnets.{m.group(4)}" if m.group(4) is not None else f"{m.group(3)}rs.0"
        return f"{side}.{blocks}.{i}.{inner}.{m.group(5)}", None
    for old, new in _VAE_PARTS:
        if rest.startswith(old):
            attn_matrix = old.startswith("mid.attn_1.") and old != "mid.attn_1.norm." and rest.endswith("weight")
            return f"{side}.{new}{rest[len(old):]}", "linear" if attn_matrix else None
    return f"{side}.{rest}", None  # conv_in, conv_out


def vae_mapping(shapes):
    up_levels = len({k.split(".")[2] for k in shapes if k.startswith("decoder.up.")})
    out = {}
    for k in shapes:
        target, transform = vae_rule(k, up_levels)
        out[k] = [(target, transform if transform and len(shapes[k]) == 4 else None)]
    return out


def clip_mapping(shapes):
    """transformers' CLIP under a prefix: the keys as they are, with `text_model.` where old files lack it."""
    return {k: [(k if k.startswith("text_model.") else "text_model." + k, None)] for k in shapes}


_OPENCLIP = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
             ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")]


def openclip_mapping(shapes, layers, projection):
    """OpenCLIP -> transformers' CLIP. Resblocks from `layers` on and a text_projection the model lacks (SD 2.x
    reads the penultimate layer, without projection) are UNUSED."""
    out = {}
    for k in shapes:
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            layer = f"text_model.encoder.layers.{i}."
            if i >= layers:
                out[k] = [(UNUSED, None)]
            elif rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]
                out[k] = [(f"{layer}self_attn.{p}_proj.{kind}", ("chunk", c)) for c, p in enumerate("qkv")]
            else:
                out[k] = [(next((layer + new + rest[len(old):] for old, new in _OPENCLIP if rest.startswith(old)), None),
                           None)]
        elif k == "text_projection":
            out[k] = [("text_projection.weight" if projection else UNUSED, "T")]
        else:
            name = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                    "positional_embedding": "text_model.embeddings.position_embedding.weight",
                    "ln_final.weight": "text_model.final_layer_norm.weight",
                    "ln_final.bias": "text_model.final_layer_norm.bias"}.get(k)
            out[k] = [(name, None)]
    return out


def _transformed_shape(shape, transform):
    if transform is None:
        return tuple(shape)
    if transform == "linear":
        return tuple(shape[:2])
    if transform == "T":
        return tuple(shape[::-1])
    return (shape[0] // 3,) + tuple(shape[1:])  # chunk


def _apply(t, transform):
    if transform is None:
        return t
    if transform == "linear":
        return t.reshape(t.shape[0], t.shape[1])
    if transform == "T":
        return t.t().contiguous()
    return t.chunk(3, dim=0)[transform[1]].contiguous()


# ---- config inference from shapes ------------------------------------------------------------------------
def _count(shapes, pattern):
    found = {int(m.group(1)) for k in shapes for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def infer_unet_config(shapes, family):
    """UNet config: the family's values, with every structural one read from the tensors."""
    fam = FAMILIES[family]
    cfg = dict(fam["unet"])
    where, levels = unet_blocks(shapes)
    c0, in_ch, k_in = shapes["input_blocks.0.0.weight"][:3]
    cfg.update(in_channels=in_ch, out_channels=shapes["out.2.weight"][0], conv_in_kernel=k_in,
               conv_out_kernel=shapes["out.2.weight"][2])
    channels, layers, depth, kinds = [None] * levels, [0] * levels, [1] * levels, ["DownBlock2D"] * levels
    context_dim, linear = None, False
    for (side, n), (level, j, kind) in sorted(where.items()):
        if side != "input" or kind != "resnet":
            continue
        channels[level] = shapes[f"input_blocks.{n}.0.out_layers.3.weight"][0]
        layers[level] += 1
        d = _count(shapes, rf"input_blocks\.{n}\.1\.transformer_blocks\.(\d+)\.")
        if d:
            kinds[level], depth[level] = "CrossAttnDownBlock2D", d
            context_dim = shapes[f"input_blocks.{n}.1.transformer_blocks.0.attn2.to_k.weight"][1]
            linear = len(shapes[f"input_blocks.{n}.1.proj_in.weight"]) == 2
    up_kinds, up_depth = ["UpBlock2D"] * levels, [1] * levels
    for (side, n), (level, j, kind) in where.items():
        d = _count(shapes, rf"output_blocks\.{n}\.1\.transformer_blocks\.(\d+)\.") if side == "output" else 0
        if d:
            up_kinds[level], up_depth[level] = "CrossAttnUpBlock2D", d
    attn_depths = {d for d, k in zip(depth, kinds) if k.startswith("CrossAttn")}
    cfg.update(block_out_channels=channels, layers_per_block=layers[0] if len(set(layers)) == 1 else layers,
               down_block_types=kinds, up_block_types=up_kinds,
               transformer_layers_per_block=attn_depths.pop() if len(attn_depths) == 1 else depth)
    if up_depth != depth[::-1]:
        cfg["reverse_transformer_layers_per_block"] = up_depth
    if context_dim is not None:
        cfg.update(cross_attention_dim=context_dim, use_linear_projection=linear)
    mid = _count(shapes, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    if "middle_block.0.in_layers.0.weight" not in shapes:
        cfg["mid_block_type"] = None
    elif not mid:
        cfg["mid_block_type"] = "UNetMidBlock2D"  # refused by the config check: minidiff has no such block
    else:
        tl = cfg["transformer_layers_per_block"]
        last = tl if isinstance(tl, int) else tl[-1]
        if mid != last:
            raise FileFormatError(f"UNet mid block has {mid} transformer layers, transformer_layers_per_block {tl}: "
                             "minidiff builds the mid block as deep as the last level")
    if fam["head_channels"]:
        cfg["attention_head_dim"] = [max(c // fam["head_channels"], 1) for c in channels]
    temb = shapes["time_embed.0.weight"][0]
    cfg["time_embedding_dim"] = None if temb == 4 * c0 else temb
    if "label_emb.0.0.weight" in shapes:
        cfg.update(addition_embed_type="text_time",
                   projection_class_embeddings_input_dim=shapes["label_emb.0.0.weight"][1])
    return cfg


def infer_vae_config(shapes, family):
    cfg = dict(FAMILIES[family]["vae"])
    levels = _count(shapes, r"encoder\.down\.(\d+)\.")
    cfg.update(in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
               latent_channels=shapes["decoder.conv_in.weight"][1],
               block_out_channels=[shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
               layers_per_block=_count(shapes, r"encoder\.down\.0\.block\.(\d+)\."),
               down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
               use_quant_conv="quant_conv.weight" in shapes, use_post_quant_conv="post_quant_conv.weight" in shapes,
               mid_block_add_attention="encoder.mid.attn_1.q.weight" in shapes)
    return cfg


def infer_clip_config(shapes, base, openclip, drop_last=False):
    """Text encoder config: widths and depth from the tensors, heads of 64 channels (CLIP L, H and bigG)."""
    cfg = dict(base)
    if openclip:
        vocab, hidden = shapes["token_embedding.weight"]
        layers = _count(shapes, r"transformer\.resblocks\.(\d+)\.") - (1 if drop_last else 0)
        cfg.update(max_position_embeddings=shapes["positional_embedding"][0],
                   intermediate_size=shapes["transformer.resblocks.0.mlp.c_fc.weight"][0])
        if "text_projection" in shapes:
            cfg["projection_dim"] = shapes["text_projection"][1]
    else:
        p = "" if "embeddings.token_embedding.weight" in shapes else "text_model."
        vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
        layers = _count(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
        cfg.update(max_position_embeddings=shapes[p + "embeddings.position_embedding.weight"][0],
                   intermediate_size=shapes[p + "encoder.layers.0.mlp.fc1.weight"][0])
        if "text_projection.weight" in shapes:
            cfg["projection_dim"] = shapes["text_projection.weight"][0]
    cfg.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1))
    return cfg


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


def choose_prediction_type(family, f, prediction_type=None, original=None, scheduler_config=None):
    """(prediction_type, why). SD 2.x files do not say: diffusers' rule is v-prediction (the 768-v model) unless
    the checkpoint's global_step is 875000 (the 512-base training run), which only .ckpt files carry."""
    if prediction_type is not None:
        return prediction_type, "prediction_type= argument"
    if scheduler_config is not None:
        return scheduler_config.get("prediction_type", "epsilon"), "config= scheduler"
    if original is not None:
        p = _get(original, "model", "params", "parameterization")  # LDM
        scaling = _get(original, "model", "params", "denoiser_config", "params", "scaling_config", "target")  # SGM
        if scaling is not None and p is None:
            return ("v_prediction" if scaling.endswith("VScaling") else "epsilon"), f"original_config scaling {scaling}"
        return ("v_prediction" if p == "v" else "epsilon"), f"original_config parameterization={p or 'eps'}"
    if family != "sd2":
        return "epsilon", f"{FAMILIES[family]['name']} default"
    if f.global_step == 875000:
        return "epsilon", "SD 2.x with global_step 875000 (the 512-base run), diffusers' rule"
    return "v_prediction", ("SD 2.x: v-prediction, diffusers' rule for files without global_step 875000 (the 768-v "
                            "model); pass prediction_type='epsilon' for a 512-base model")


# ---- original_config: the LDM yaml -------------------------------------------------------------------------
def read_yaml(path):
    """The LDM / SGM yaml (v1-inference.yaml, sd_xl_base.yaml, ...). pyyaml when installed (it is no dependency of
    minidiff); else a small reader of the subset those files use: nested mappings, `- ` lists of scalars or of
    mappings, inline [lists], scalars and comments. It refuses anything else, naming the line."""
    if isinstance(path, dict):
        return path
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        import yaml
    except ImportError:
        return parse_small_yaml(text, path)
    return yaml.safe_load(text)


def parse_small_yaml(text, where="yaml"):
    lines = []  # (line number, indent, content) without blanks and comments
    for lineno, raw in enumerate(text.splitlines(), 1):
        content = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if content.strip():
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise FileFormatError(f"{where}:{lineno}: a tab in the indentation (pip install pyyaml to read any yaml)")
            lines.append([lineno, len(content) - len(content.lstrip()), content.strip()])

    def block(i, indent):
        """The mapping or list whose lines start at lines[i] with `indent`; returns (value, next i)."""
        if lines[i][2].startswith("- ") or lines[i][2] == "-":
            items = []
            while i < len(lines) and lines[i][1] == indent and lines[i][2].startswith("-"):
                lineno, _, content = lines[i]
                rest = content[1:].strip()
                if re.match(r"[\w.\-]+\s*:(\s|$)", rest):  # "- key: value": a mapping, its keys two columns in
                    lines[i] = [lineno, indent + 2, rest]
                    value, i = block(i, indent + 2)
                else:
                    value, i = _yaml_scalar(rest, where, lineno), i + 1
                items.append(value)
            return items, i
        mapping = {}
        while i < len(lines) and lines[i][1] == indent:
            lineno, _, content = lines[i]
            m = re.match(r"([\w.\-/]+)\s*:(?:\s+(.*))?$", content)
            if not m:
                raise FileFormatError(f"{where}:{lineno}: {content!r} is beyond minidiff's small yaml reader "
                                 "(pip install pyyaml to read any yaml)")
            key, value = m.group(1), (m.group(2) or "").strip()
            i += 1
            if value:
                mapping[key] = _yaml_scalar(value, where, lineno)
            elif i < len(lines) and (lines[i][1] > indent or (lines[i][1] == indent and lines[i][2].startswith("-"))):
                mapping[key], i = block(i, lines[i][1])
            else:
                mapping[key] = None
        if i < len(lines) and lines[i][1] > indent:
            raise FileFormatError(f"{where}:{lines[i][0]}: unexpected indentation (pip install pyyaml to read any yaml)")
        return mapping, i

    if not lines:
        return {}
    value, i = block(0, lines[0][1])
    if i < len(lines):
        raise FileFormatError(f"{where}:{lines[i][0]}: unexpected indentation (pip install pyyaml to read any yaml)")
    return value


def _yaml_scalar(v, where, lineno):
    if v.startswith("[") and v.endswith("]"):
        return [_yaml_scalar(x.strip(), where, lineno) for x in v[1:-1].split(",") if x.strip()]
    if v.startswith(("{", "|", ">", "&", "*", "!", "[")):
        raise FileFormatError(f"{where}:{lineno}: {v!r} is beyond minidiff's small yaml reader (pip install pyyaml)")
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v in ("null", "Null", "NULL", "~"):
        return None
    if re.fullmatch(r"[-+]?\d+", v):
        return int(v)
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+)([eE][-+]?\d+)?", v):  # yaml 1.1 floats have a dot
        return float(v)
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    return v


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def apply_original_config(original, unet_cfg, vae_cfg, scheduler_cfg):
    """What the LDM yaml says that tensors cannot: heads, scale factor, noise schedule."""
    params = _get(original, "model", "params") or {}
    unet = _get(params, "unet_config", "params") or _get(params, "network_config", "params") or {}
    if unet_cfg is not None:
        heads, head_channels = unet.get("num_heads", -1), unet.get("num_head_channels", -1)
        if head_channels and head_channels > 0:
            unet_cfg["attention_head_dim"] = [max(c // head_channels, 1) for c in unet_cfg["block_out_channels"]]
        elif heads and heads > 0:
            unet_cfg["attention_head_dim"] = heads
        if "use_linear_in_transformer" in unet:
            unet_cfg["use_linear_projection"] = unet["use_linear_in_transformer"]
    if vae_cfg is not None and "scale_factor" in params:
        vae_cfg["scaling_factor"] = params["scale_factor"]
    if scheduler_cfg is not None:
        for src, dst in (("linear_start", "beta_start"), ("linear_end", "beta_end"), ("timesteps", "num_train_timesteps")):
            if src in params:
                scheduler_cfg[dst] = params[src]


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


def build(cls, cfg_dict, f, prefix, mapping, torch_dtype, device, report, name, where):
    """Build `cls` on meta from `cfg_dict`, map the file's keys under `prefix`, check every key and shape, read."""
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
        wrong = [f"{srcs[0][0]}: file {f.shapes[srcs[0][0]]} -> {_transformed_shape(f.shapes[srcs[0][0]], srcs[0][1])}"
                 f" vs model {t} {expected[t]}" for t, srcs in plan.items()
                 if t in expected and _transformed_shape(f.shapes[srcs[0][0]], srcs[0][1]) != expected[t]]
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
                part = _apply(t, transform)
                sd[target] = part.to(device=device or "cpu", dtype=dtype if part.is_floating_point() else part.dtype)
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
                prediction_type=None, report=None, scheduler_config=None):
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
                                  component, where)
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
                  allow_pickle=False, **kwargs):
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
                                          prediction_type, report, sched_raw)
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
                   allow_pickle=False, subfolder=None, prediction_type=None):
    """The body of a model's from_single_file: one model out of a whole checkpoint or out of a file holding only it.
    `config`: a folder or repo whose config.json (in `subfolder`) is the model's."""
    f = SingleFile(path, allow_pickle)
    original = read_yaml(original_config) if original_config is not None else None
    family = detect_family(f)
    report = Report(f.path)
    config_dicts = {component: read_json(config, "config.json", subfolder)} if config is not None else None
    parts = _parts(f)
    models, _ = load_models(f, family, [component], config_dicts, original, torch_dtype, device, prediction_type, report)
    for other, (p, _) in parts.items():
        if other != component:
            report.skipped[f"{other} (not asked for)"] += len(f.under(p))
    _count_unread(f, report)
    logger.info("%s", report)
    model = models[component]
    model.single_file_report = report
    return model
