"""The configs of the Stable Diffusion families, for single files that carry none (read offline, no Hub fetch).

Values are those of the families' reference repos (stable-diffusion-v1-5/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1 and -2-1-base, stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0),
which are also the repos diffusers' from_single_file fetches configs from. The functions below replace the
structural values (channels, depths, widths) with what the file's tensors say, so these supply what
tensors cannot tell: head counts, activations, scaling factors, schedulers, pipeline options.

Below the tables: the structural values read from a file's tensors (`infer_unet_config`, `infer_vae_config`,
`infer_clip_config`), the prediction type (`choose_prediction_type`) and what an original_config= yaml adds
(`apply_original_config`).
"""
import re

from ..errors import FileFormatError
from .single_file_keys import unet_blocks

_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "trained_betas": None, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "clip_sample": False}

_CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
           "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
           "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
           "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}

_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu", "norm_num_groups": 32,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 512,
        "scaling_factor": 0.18215, "force_upcast": True}

_UNET_SD = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
            "mid_block_scale_factor": 1, "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 768,
            "attention_head_dim": 8, "use_linear_projection": False, "upcast_attention": False}

FAMILIES = {
    "sd1": {
        "name": "SD 1.x",
        "pipelines": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
        # SD 1.x: 8 heads whatever the width (attention_head_dim means the number of heads there)
        "head_channels": None,
        "unet": _UNET_SD,
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "tokenizer_pad": {"tokenizer": "<|endoftext|>"},
        "scheduler": ("PNDMScheduler", dict(_SCHEDULE, prediction_type="epsilon")),
        "pipeline": {},
    },
    "sd2": {
        "name": "SD 2.x",
        "pipelines": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
        "head_channels": 64,  # heads of 64 channels: [5, 10, 20, 20]
        "unet": dict(_UNET_SD, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                     use_linear_projection=True),
        # 768-v (stable-diffusion-2-1) and 512-base (-2-1-base) differ only here: nothing in the tensors tells them apart
        "v_prediction": {"unet": {"sample_size": 96, "upcast_attention": True}, "vae": {"sample_size": 768},
                         "scheduler": ("DDIMScheduler", dict(_SCHEDULE, prediction_type="v_prediction"))},
        "epsilon": {"unet": {"sample_size": 64, "upcast_attention": False}, "vae": {"sample_size": 512},
                    "scheduler": ("PNDMScheduler", dict(_SCHEDULE, prediction_type="epsilon"))},
        "vae": _VAE,
        # OpenCLIP ViT-H/14 without its last layer (the pipeline reads the penultimate one): 23 of 24
        "text_encoder": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "projection_dim": 512,
                         "num_hidden_layers": 23, "num_attention_heads": 16, "max_position_embeddings": 77,
                         "hidden_act": "gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
                         "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
        "tokenizer_pad": {"tokenizer": "!"},
        "scheduler": None,  # from "v_prediction" or "epsilon"
        "pipeline": {},
    },
    "sdxl": {
        "name": "SDXL base",
        "pipelines": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
        "head_channels": 64,  # [5, 10, 20]
        "unet": dict(_UNET_SD, sample_size=128, down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
                     up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"], block_out_channels=[320, 640, 1280],
                     cross_attention_dim=2048, attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                     use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816),
        "vae": dict(_VAE, sample_size=1024, scaling_factor=0.13025),
        "text_encoder": _CLIP_L,
        "text_encoder_2": {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
                           "projection_dim": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
                           "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                           "attention_dropout": 0.0, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
        "tokenizer_pad": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
        "scheduler": ("EulerDiscreteScheduler", dict(_SCHEDULE, prediction_type="epsilon", interpolation_type="linear",
                                                     timestep_spacing="leading", use_karras_sigmas=False,
                                                     sample_max_value=1.0)),
        "pipeline": {"force_zeros_for_empty_prompt": True},
        "time_ids": 6,  # original size, crop corner, target size
    },
    "sdxl_refiner": {
        "name": "SDXL refiner",
        "pipelines": ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline"),
        "head_channels": 64,  # [6, 12, 24, 24]
        "unet": dict(_UNET_SD, sample_size=128, down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"],
                     block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280,
                     attention_head_dim=[6, 12, 24, 24], transformer_layers_per_block=4, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2560),
        "vae": dict(_VAE, sample_size=1024, scaling_factor=0.13025),
        "text_encoder_2": {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
                           "projection_dim": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
                           "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                           "attention_dropout": 0.0, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
        "tokenizer_pad": {"tokenizer_2": "!"},
        "scheduler": ("EulerDiscreteScheduler", dict(_SCHEDULE, prediction_type="epsilon", interpolation_type="linear",
                                                     timestep_spacing="leading", use_karras_sigmas=False,
                                                     sample_max_value=1.0)),
        "pipeline": {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True},
        "time_ids": 5,  # original size, crop corner, aesthetic score
    },
}


# ---- values read from the tensors, the prediction type, original_config= ----------------------------------
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
