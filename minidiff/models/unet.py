"""The Stable Diffusion UNet (SD 1.x/2.x, SDXL, SDXL-Turbo, LCM, Segmind distilled UNets).

A noise predictor eps(x_t, t, text): a convolutional U-Net whose resolution levels are
ResNet blocks interleaved with transformers that cross-attend to the text encoder's hidden states.
Module names equal diffusers' UNet2DConditionModel checkpoint keys, so Hub weights load as they are.

Layout, for block_out_channels (c0, c1, ..., cN):
    conv_in -> down blocks (each: resnets [+ transformers], then a stride-2 conv but the last)
            -> mid block (resnet, transformer, resnet; SSD-1B/Vega: one resnet) -> up blocks (mirror, each resnet taking a
            skip connection from the down path, then nearest x2 upsample + conv) -> norm, SiLU, conv_out.
The timestep (and for SDXL the pooled text embedding + image size "time ids") becomes one vector
that every resnet adds to its features.

The blocks are in unet_blocks.py; this file holds the config and the model that assembles them.
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from minidiff import ops
from .base import Model, ModelOutput
# the blocks (Attention, ResnetBlock2D, GEGLU: also reachable as minidiff.models.unet.<name>)
from .unet_blocks import (GEGLU, Attention, DownBlock, ResnetBlock2D, TimestepEmbedding, tile_batch,  # noqa: F401
                          UNetMidBlock2DCrossAttn, UpBlock, timestep_embedding)

# ----------------------------------------------------------------------------- the UNet

@dataclass
class UNet2DConditionOutput(ModelOutput):
    sample: torch.Tensor


@dataclass
class UNet2DConditionConfig:
    sample_size: object = None  # latent side (int or [h, w]); informs pipelines of the default resolution
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: object = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: object = False  # bool or per block: attn1 attends to the text too
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: object = 2  # int or per block
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: object = 1280  # int or per block
    transformer_layers_per_block: object = 1  # int, per block, or per block and layer
    reverse_transformer_layers_per_block: object = None  # up path, when the above is per layer
    attention_head_dim: object = 8  # read as the number of heads (see heads_per_block)
    num_attention_heads: object = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    class_embed_type: object = None
    addition_embed_type: object = None
    addition_time_embed_dim: object = None
    projection_class_embeddings_input_dim: object = None
    time_embedding_dim: object = None
    time_cond_proj_dim: object = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    mid_block_only_cross_attention: object = None  # read only by UNetMidBlock2DSimpleCrossAttn: no effect here

    NEUTRAL: ClassVar[dict] = {
        "act_fn": ("silu", "swish"),
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "num_class_embeds": None,
        "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional",
        "time_embedding_act_fn": None,
        "timestep_post_act": None,
        "attention_type": "default",
        "class_embeddings_concat": False,
    }
    # dropout acts in training only; the rest are read only by block types minidiff does not build
    # (the Simple*/ResnetDownsample blocks) or by addition_embed_type "text".
    IGNORED: ClassVar[tuple] = ("dropout", "cross_attention_norm", "resnet_skip_time_act", "resnet_out_scale_factor",
                                "addition_embed_type_num_heads")

    def per_block(self, key):
        """A config value that may be one for all blocks or a list, as a list with one entry per down block."""
        value = getattr(self, key)
        return list(value) if isinstance(value, (list, tuple)) else [value] * len(self.down_block_types)

    def heads_per_block(self):
        # Trap kept from diffusers: configs written before `num_attention_heads` existed call the number
        # of heads `attention_head_dim` (SD 1.5: 8 heads of 40, 80, 160 channels).
        if self.num_attention_heads is not None:
            return self.per_block("num_attention_heads")
        return self.per_block("attention_head_dim")

    def validate(self, where="config.json"):
        def bad(key, value, why):
            raise ValueError(f"{where}: {key}={value!r} {why}")

        n = len(self.down_block_types)
        for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            for t in getattr(self, key):
                if t not in allowed:
                    bad(key, getattr(self, key), f"has {t!r}, not supported by minidiff (supported: {allowed})")
        if self.mid_block_type not in MID_BLOCKS:
            bad("mid_block_type", self.mid_block_type, f"is not supported (supported: {MID_BLOCKS})")
        for key in ("up_block_types", "block_out_channels", "only_cross_attention", "layers_per_block",
                    "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads"):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)) and len(value) != n:
                bad(key, value, f"must have one entry per down block ({n}: {self.down_block_types})")
        tlpb = self.transformer_layers_per_block
        if isinstance(tlpb, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in tlpb):
            if self.reverse_transformer_layers_per_block is None:
                bad("transformer_layers_per_block", tlpb, "is per layer, which needs reverse_transformer_layers_per_block")
        if self.reverse_transformer_layers_per_block is not None and len(self.reverse_transformer_layers_per_block) != n:
            bad("reverse_transformer_layers_per_block", self.reverse_transformer_layers_per_block,
                f"must have one entry per up block ({n})")
        if self.norm_num_groups is None:
            bad("norm_num_groups", None, "is not supported (an int such as 32 is)")
        key = "attention_head_dim" if self.num_attention_heads is None else "num_attention_heads"
        if not all(isinstance(h, int) and h > 0 for h in self.heads_per_block()):
            bad(key, getattr(self, key), "must be a positive number of heads, or one per block")
        if self.addition_embed_type not in (None, "text_time"):
            bad("addition_embed_type", self.addition_embed_type, "is not supported (supported: None or 'text_time')")
        if self.class_embed_type not in (None, "timestep", "identity", "projection"):
            bad("class_embed_type", self.class_embed_type,
                "is not supported (supported: None, 'timestep', 'identity', 'projection')")
        needs_projection = self.addition_embed_type == "text_time" or self.class_embed_type == "projection"
        if needs_projection and self.projection_class_embeddings_input_dim is None:
            bad("projection_class_embeddings_input_dim", None, "must be set for text_time / projection embeddings")
        if self.addition_embed_type == "text_time" and self.addition_time_embed_dim is None:
            bad("addition_time_embed_dim", None, "must be set when addition_embed_type is 'text_time'")


class UNet2DConditionModel(Model):
    """diffusers' UNet2DConditionModel for the SD 1.x/2.x/XL families: `unet(sample, t, text).sample`."""

    config_class = UNet2DConditionConfig
    single_file_part = "unet"

    def __init__(self, config):
        super().__init__(config)
        cfg = config
        n = len(cfg.down_block_types)
        channels = list(cfg.block_out_channels)
        heads = cfg.heads_per_block()
        context_dims = cfg.per_block("cross_attention_dim")
        only_cross = cfg.per_block("only_cross_attention")
        layers = cfg.per_block("layers_per_block")
        tlpb = cfg.per_block("transformer_layers_per_block")

        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2)

        # time: sinusoid of width c0 -> MLP of width 4 c0 (or time_embedding_dim)
        temb = cfg.time_embedding_dim or 4 * channels[0]
        self.time_embedding = TimestepEmbedding(channels[0], temb, cfg.time_cond_proj_dim)
        self.class_embedding = None
        if cfg.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(channels[0], temb)
        elif cfg.class_embed_type == "projection":
            self.class_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
        if cfg.addition_embed_type == "text_time":
            # SDXL: pooled text embedding ++ sinusoids of the size/crop (or aesthetic score) ids
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            attn = kind == "CrossAttnDownBlock2D"
            self.down_blocks.append(DownBlock(
                channels[max(i - 1, 0)], channels[i], temb, layers[i], cfg, add_downsample=i < n - 1,
                context_dim=context_dims[i] if attn else None, heads=heads[i],
                transformer_layers_per_layer=tlpb[i], only_cross_attention=only_cross[i]))

        self.mid_block = None
        if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], temb, cfg, context_dims[-1], heads[-1], tlpb[-1])
        elif cfg.mid_block_type == "UNetMidBlock2D":
            self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], temb, cfg)

        # the up path mirrors the down path, with one more resnet per block (it also eats the downsampler's skip)
        reverse_tlpb = cfg.reverse_transformer_layers_per_block or tlpb[::-1]
        rc = channels[::-1]
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            attn = kind == "CrossAttnUpBlock2D"
            j = n - 1 - i  # the matching down block
            self.up_blocks.append(UpBlock(
                rc[max(i - 1, 0)], rc[min(i + 1, n - 1)], rc[i], temb, layers[j] + 1, cfg, add_upsample=i < n - 1,
                context_dim=context_dims[j] if attn else None, heads=heads[j],
                transformer_layers_per_layer=reverse_tlpb[i], only_cross_attention=only_cross[j]))

        self.conv_norm_out = ops.GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, cfg.conv_out_kernel,
                                  padding=(cfg.conv_out_kernel - 1) // 2)

    def time_embed(self, sample, timestep, timestep_cond, class_labels, added_cond_kwargs):
        """The vector every resnet adds: embedded timestep [+ class/guidance] [+ SDXL text/size ids]."""
        cfg, b = self.config, sample.shape[0]
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep, device=sample.device)
        t = t.to(sample.device).reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t  # a number or (1,) broadcasts to the batch
        sinusoid = timestep_embedding(t, self.config.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(sinusoid.to(sample.dtype), timestep_cond)
        if cfg.class_embed_type is not None:
            if class_labels is None:
                raise ValueError(f"class_labels must be given: this UNet has class_embed_type={cfg.class_embed_type!r}")
            if cfg.class_embed_type == "timestep":
                class_labels = timestep_embedding(class_labels.reshape(-1), cfg.block_out_channels[0],
                                                  cfg.flip_sin_to_cos, cfg.freq_shift).to(sample.dtype)
            class_emb = class_labels if self.class_embedding is None else self.class_embedding(class_labels)
            emb = emb + class_emb.to(sample.dtype)
        if cfg.addition_embed_type == "text_time":
            for key in ("text_embeds", "time_ids"):
                if not added_cond_kwargs or key not in added_cond_kwargs:
                    raise ValueError(f"added_cond_kwargs[{key!r}] must be given: this UNet has "
                                     "addition_embed_type='text_time' (SDXL)")
            text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            time_embeds = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                             cfg.freq_shift).reshape(text_embeds.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        return emb

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None, *,
                encoder_attention_mask=None, return_dict=True, features=None):
        """Predict the noise (or v) of `sample` (B, C, H, W) at `timestep` given text `encoder_hidden_states`.

        Masks are (B, tokens), 1 = keep: `encoder_attention_mask` over the text, `attention_mask` over
        what attn1 attends to. `cross_attention_kwargs` (e.g. a LoRA {"scale": s}) is accepted and unused:
        LoRA acts through the modules it replaces. The residual arguments are ControlNet's additions.
        `features` (minidiff's own, for distillation): a dict that receives each block's output by name
        (`down_blocks.i`: its last resnet/attention pair, before the downsampler; `mid_block`; `up_blocks.i`).

        minidiff's own too: `sample` may hold fewer rows than `encoder_hidden_states` when it would otherwise be
        repeated, as classifier-free guidance repeats the latents for its unconditional and conditional halves
        (encoder_hidden_states k * B rows, sample B rows: the same as torch.cat([sample] * k)). The layers before the
        text enters (SD 1.x/2.x: conv_in, the first resnet and the first self-attention) then run once per latent,
        not k times; the pipelines pass the latents so. The output has the text's rows.
        """
        context = encoder_hidden_states
        rows = sample.shape[0] if context is None else context.shape[0]
        if rows % sample.shape[0]:
            raise ValueError(f"UNet2DConditionModel: sample has {sample.shape[0]} rows and encoder_hidden_states "
                             f"{rows}: the text's rows must equal the sample's or be a multiple of them (guidance's "
                             "halves sharing the latents)")
        # attn1's mask has the text's rows; SDXL's added embedding (or a class embedding) carries the text into the
        # time embedding that every resnet adds, leaving only conv_in to run once: not worth another rounding order
        cfg = self.config
        if attention_mask is not None or cfg.class_embed_type is not None or cfg.addition_embed_type is not None:
            sample = tile_batch(sample, rows)
        # keep = 0, drop = -10000 added to the attention logits, as diffusers does
        mask = None if attention_mask is None else ((1 - attention_mask.to(sample.dtype)) * -10000.0)[:, None, None]
        context_mask = None if encoder_attention_mask is None else (
            (1 - encoder_attention_mask.to(sample.dtype)) * -10000.0)[:, None, None]
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.time_embed(sample, timestep, timestep_cond, class_labels, added_cond_kwargs)

        x = self.conv_in(sample)
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            x, block_skips = block(x, emb, context, mask, context_mask)
            skips += block_skips
            if features is not None:
                features[f"down_blocks.{i}"] = block_skips[len(block.resnets) - 1]
        skips = [tile_batch(s, x.shape[0]) for s in skips]  # conv_in's output may still have the latents' rows
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context, mask, context_mask)
            if features is not None:
                features["mid_block"] = x
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual

        for i, block in enumerate(self.up_blocks):
            block_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            # upsample to the size of the next skip: odd sizes halved by a stride-2 conv come back exactly
            size = tuple(skips[-1].shape[-2:]) if skips else None
            x = block(x, block_skips, emb, context, mask, context_mask, upsample_size=size)
            if features is not None:
                features[f"up_blocks.{i}"] = x

        x = self.conv_out(self.conv_norm_out(tile_batch(x, rows), silu=True))
        return UNet2DConditionOutput(sample=x) if return_dict else (x,)


# ----------------------------------------------------------------------------- what the config may name

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
