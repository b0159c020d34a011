"""CLIP's text encoder (Radford et al. 2021), as Stable Diffusion uses it to turn a prompt into tokens.

A causal pre-norm transformer over at most 77 BPE tokens: token + learned position embeddings, N
layers of [LayerNorm -> causal self-attention -> +residual, LayerNorm -> MLP -> +residual], a final
LayerNorm. The "pooled" prompt vector is the final state at the <|endoftext|> token;
CLIPTextModelWithProjection (SDXL's second encoder) maps it through a bias-less linear layer.

Outputs equal transformers' CLIPTextModel / CLIPTextModelWithProjection; module names equal the Hub
keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...) so the file loads as it is.
"""
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidiff import ops
from ..weights.config import TRANSFORMERS_GENERIC_KEYS
from .base import Model, ModelOutput


# ---- the transformer


def quick_gelu(x):
    # OpenAI CLIP's sigmoid approximation of GELU (SD 1.x); OpenCLIP models use the exact one
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids):
        length, max_len = input_ids.shape[-1], self.position_embedding.num_embeddings
        if length > max_len:
            raise ValueError(f"CLIP text encoder: input_ids has {length} tokens, more than its "
                             f"max_position_embeddings={max_len}; truncate the prompt (tokenizer truncation=True)")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.num_attention_heads
        dim = cfg.hidden_size
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        # no padding mask: SDPA's own causal masking, which lets it pick its fastest kernel
        out = ops.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask=mask, causal=mask is None)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = ops.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = ops.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


def attention_bias(attention_mask, length, dtype):
    """Additive (B, 1, L, L) bias: causal part + padded keys, each the dtype's lowest value where blocked.

    The two parts are summed as transformers does, so that even a query with every key blocked
    (left padding) gets transformers' result rather than NaN.
    """
    lowest = torch.finfo(dtype).min
    causal = torch.full((length, length), lowest, dtype=dtype, device=attention_mask.device).triu(1)
    padded = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    padded = padded.masked_fill(attention_mask == 0, lowest)
    return causal + padded[:, None, None, :]


def pooled_row(input_ids, eos_token_id):
    """Index of the token whose final state is the pooled prompt vector, per sequence."""
    if eos_token_id == 2:
        # configs written before transformers fixed eos_token_id: <|endoftext|> has the highest id
        return input_ids.argmax(dim=-1)
    # first <|endoftext|> (the pad token may be <|endoftext|> too)
    return (input_ids == eos_token_id).int().argmax(dim=-1)


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = ops.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        x = self.embeddings(input_ids)
        mask = None if attention_mask is None else attention_bias(attention_mask.view(input_ids.shape),
                                                                   input_ids.shape[1], x.dtype)
        hidden_states = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = layer(x, mask)
            if output_hidden_states:
                hidden_states.append(x)
        last = self.final_layer_norm(x)
        rows = pooled_row(input_ids.to(last.device), self.config.eos_token_id)
        pooled = last[torch.arange(last.shape[0], device=last.device), rows]
        return CLIPTextOutput(last, pooled, tuple(hidden_states) if output_hidden_states else None)


# ---- outputs (minidiff.models.base.ModelOutput: by attribute, and out[0], out[1], ... over the fields set)


@dataclass
class CLIPTextOutput(ModelOutput):
    last_hidden_state: torch.Tensor = None  # (B, L, hidden), after the final LayerNorm
    pooler_output: torch.Tensor = None  # (B, hidden): the <|endoftext|> row of last_hidden_state
    hidden_states: Optional[tuple] = None  # embeddings + each layer's output (before the final LayerNorm)


@dataclass
class CLIPTextProjectionOutput(ModelOutput):
    text_embeds: torch.Tensor = None  # (B, projection_dim): projected pooled vector
    last_hidden_state: torch.Tensor = None
    hidden_states: Optional[tuple] = None


# ---- the two Hub classes and their config


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0  # kept for the config's sake: dropout only acts in training
    pad_token_id: int = 1
    bos_token_id: int = 49406
    # picks the pooled row; 2 in older configs means "argmax of the ids" (see pooled_row)
    eos_token_id: int = 49407

    # transformers' generic config keys that would change the architecture
    NEUTRAL: ClassVar[dict] = {
        "model_type": "clip_text_model",
        "pruned_heads": ({},),
        "is_decoder": False,
        "add_cross_attention": False,
        "is_encoder_decoder": False,
        "tie_encoder_decoder": False,
    }
    IGNORED: ClassVar[tuple] = TRANSFORMERS_GENERIC_KEYS  # informational, training and generation defaults

    def validate(self, where):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act={self.hidden_act!r} is not supported by minidiff's CLIP text "
                             f"encoder (supported: {', '.join(repr(a) for a in ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{where}: hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")


class _CLIPTextBase(Model):
    config_class = CLIPTextConfig
    weight_names = ("model",)

    @staticmethod
    def rename_key(key):
        """Hub files name keys `text_model.…`; transformers 5 saves them without the prefix. None skips
        `position_ids`, a constant buffer older files carry (positions are computed in forward)."""
        if key.endswith("embeddings.position_ids"):
            return None
        if key.startswith(("text_model.", "text_projection.")):
            return key
        return "text_model." + key

    def extra_config(self):
        # transformers reads the config too when it names its model type and class
        return {"architectures": [type(self).__name__], "model_type": "clip_text_model"}


class CLIPTextModel(_CLIPTextBase):
    single_file_part = "text_encoder"

    def __init__(self, config):
        super().__init__(config)
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        return out if return_dict else out.to_tuple()


class CLIPTextModelWithProjection(_CLIPTextBase):
    single_file_part = "text_encoder_2"

    def __init__(self, config):
        super().__init__(config)
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        out = CLIPTextProjectionOutput(self.text_projection(out.pooler_output), out.last_hidden_state,
                                       out.hidden_states)
        return out if return_dict else out.to_tuple()


# ---- what the config may name

ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}
