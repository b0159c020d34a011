"""The SD 1.5 pipeline folder (diffusers' layout) as one LDM single file (model.diffusion_model.*,
first_stage_model.*, cond_stage_model.transformer.*): the file stable-diffusion.cpp reads. The inverse of
minidiff's single-file key rules (minidiff/weights/single_file.py), checked against them key by key.

    python bench/ldm_single_file.py FOLDER OUT.safetensors [--dtype float16]
"""
import argparse
import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
           "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}


def _resnet(rest):
    for new, old in _RESNET.items():
        if rest.startswith(new):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_key(k, layers, attn_levels):
    """diffusers UNet key -> LDM key, for the SD 1.x layout (`layers` resnets per down level, 4 levels)."""
    for new, old in (("conv_in.", "input_blocks.0.0."), ("time_embedding.linear_1.", "time_embed.0."),
                     ("time_embedding.linear_2.", "time_embed.2."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")):
        if k.startswith(new):
            return old + k[len(new):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", k)
    if m:
        level, part, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        n = 1 + (layers + 1) * level + j
        if part == "resnets":
            return f"input_blocks.{n}.0.{_resnet(rest)}"
        if part == "attentions":
            return f"input_blocks.{n}.1.{rest}"
        return f"input_blocks.{(layers + 1) * (level + 1)}.0.op.{rest[len('conv.'):]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        part, j, rest = m.group(1), int(m.group(2)), m.group(3)
        return f"middle_block.{2 * j}.{_resnet(rest)}" if part == "resnets" else f"middle_block.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", k)
    if m:
        level, part, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        n = (layers + 1) * level + j
        if part == "resnets":
            return f"output_blocks.{n}.0.{_resnet(rest)}"
        if part == "attentions":
            return f"output_blocks.{n}.1.{rest}"
        last = (layers + 1) * level + layers
        return f"output_blocks.{last}.{2 if level in attn_levels else 1}.{rest}"
    raise KeyError(k)


_VAE_MID = {"mid_block.resnets.0.": "mid.block_1.", "mid_block.resnets.1.": "mid.block_2.",
            "mid_block.attentions.0.group_norm.": "mid.attn_1.norm.", "mid_block.attentions.0.to_q.": "mid.attn_1.q.",
            "mid_block.attentions.0.to_k.": "mid.attn_1.k.", "mid_block.attentions.0.to_v.": "mid.attn_1.v.",
            "mid_block.attentions.0.to_out.0.": "mid.attn_1.proj_out.", "conv_norm_out.": "norm_out."}


def vae_key(k, levels):
    """diffusers AutoencoderKL key -> (LDM key, whether the tensor is an attention matrix stored as a 1x1 conv)."""
    if k.startswith(("quant_conv.", "post_quant_conv.")):
        return k, False
    side, _, rest = k.partition(".")
    rest = rest.replace("conv_shortcut.", "nin_shortcut.")
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.*)", rest)
    if m:
        i = int(m.group(2))
        if m.group(1) == "up":
            i = levels - 1 - i
        inner = f"block.{m.group(4)}" if m.group(4) is not None else ("downsample" if "down" in m.group(3) else "upsample")
        return f"{side}.{m.group(1)}.{i}.{inner}.{m.group(5)}", False
    for new, old in _VAE_MID.items():
        if rest.startswith(new):
            matrix = new.endswith(("to_q.", "to_k.", "to_v.", "to_out.0.")) and rest.endswith("weight")
            return f"{side}.{old}{rest[len(new):]}", matrix
    return k, False  # conv_in, conv_out


def read(folder, sub, dtype):
    path = os.path.join(folder, sub, next(f for f in sorted(os.listdir(os.path.join(folder, sub)))
                                          if f.endswith(".safetensors")))
    with safe_open(path, "pt") as f:
        for k in f.keys():
            yield k, f.get_tensor(k).to(dtype)


def convert(folder, out, dtype=torch.float16):
    with open(os.path.join(folder, "unet", "config.json")) as f:
        cfg = json.load(f)
    layers = cfg["layers_per_block"]
    attn_levels = {i for i, t in enumerate(cfg["up_block_types"]) if t.startswith("CrossAttn")}
    with open(os.path.join(folder, "vae", "config.json")) as f:
        levels = len(json.load(f)["block_out_channels"])
    sd, origin = {}, {}
    for k, t in read(folder, "unet", dtype):
        key = "model.diffusion_model." + unet_key(k, layers, attn_levels)
        sd[key], origin[key] = t, k
    for k, t in read(folder, "vae", dtype):
        key, matrix = vae_key(k, levels)
        key = "first_stage_model." + key
        sd[key], origin[key] = (t[:, :, None, None].contiguous() if matrix else t), k
    for k, t in read(folder, "text_encoder", dtype):
        sd["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = t
    check(sd, origin)
    save_file(sd, out)
    return len(sd)


def check(sd, origin):
    """Every LDM key maps back, by minidiff's own single-file rules, to the diffusers key it was made from (an
    independent check of the inverse: a wrong block number or name lands on another key or none)."""
    from minidiff.weights.single_file import UNET, VAE
    from minidiff.weights.single_file_keys import unet_blocks, unet_rule, vae_rule
    unet = {k[len(UNET):]: tuple(v.shape) for k, v in sd.items() if k.startswith(UNET)}
    where, _ = unet_blocks(unet)
    vae = {k[len(VAE):]: tuple(v.shape) for k, v in sd.items() if k.startswith(VAE)}
    up_levels = len({k.split(".")[2] for k in vae if k.startswith("decoder.up.")})
    back = {UNET + k: unet_rule(k, where) for k in unet}
    back.update({VAE + k: vae_rule(k, up_levels)[0] for k in vae})
    wrong = [(k, v, origin[k]) for k, v in back.items() if v != origin[k]]
    if wrong:
        raise AssertionError(f"bench/ldm_single_file.py: the inverse key rules do not round-trip: {wrong[:5]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--dtype", default="float16")
    a = p.parse_args()
    print(f"{convert(a.folder, a.out, getattr(torch, a.dtype))} tensors -> {a.out}")


if __name__ == "__main__":
    main()
