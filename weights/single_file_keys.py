"""Single files' key rules: each key of the original (LDM / SGM) layout -> minidiff's (= diffusers') key.

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

single_file.py's `build` checks every mapped key and shape against the model before it reads a tensor
(`transformed_shape`), then reads and transforms each (`apply_transform`).
"""
import re

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


def transformed_shape(shape, transform):
    if transform is None:
        return tuple(shape)
    if transform == "linear":
        return tuple(shape[:2])
    if transform == "T":
        return tuple(shape[::-1])
    return (shape[0] // 3,) + tuple(shape[1:])  # chunk


def apply_transform(t, transform):
    if transform is None:
        return t
    if transform == "linear":
        return t.reshape(t.shape[0], t.shape[1])
    if transform == "T":
        return t.t().contiguous()
    return t.chunk(3, dim=0)[transform[1]].contiguous()
