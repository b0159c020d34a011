"""Model configs: a dataclass per model, filled from the repo's config.json.

A config.json written by diffusers lists every argument of the model, most at their neutral value.
Each config dataclass declares the keys it knows but does not implement, with their neutral value,
in `NEUTRAL`: a file that sets one to anything else asks for an architecture minidiff does not
build, and that is an error rather than a silently different model.

Every value's type and range is checked before anything is built from it (`check_values`, at the bottom).
The type comes from the config dataclass: a field declared `int`, `float`, `bool`, `str` or `tuple` takes
that JSON type (an int where a float is declared is fine; "false" is not a bool); a field declared `object`
(a value that may also be per block) takes the type of its default, alone or in a list. Numbers must be
finite and within bounds: counts of layers, heads and timesteps are capped at a few times the largest
model published, so that a hostile file cannot ask for a million modules or a 40 GB schedule.
"""
import dataclasses
import math
import typing
import warnings

from ..errors import ConfigError

# The keys every transformers config.json carries that do not describe the architecture: informational,
# training-only (dropout, init), generation and output-format defaults. A text encoder's config ignores them.
TRANSFORMERS_GENERIC_KEYS = (
    "architectures", "torch_dtype", "dtype", "transformers_version", "initializer_range", "initializer_factor",
    "dropout", "output_attentions", "output_hidden_states", "return_dict", "torchscript", "use_bfloat16",
    "chunk_size_feed_forward", "tie_word_embeddings", "cross_attention_hidden_size", "finetuning_task",
    "id2label", "label2id", "task_specific_params", "problem_type", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "tf_legacy_loss", "gradient_checkpointing",
)


def config_from_dict(config_cls, d, where="config.json"):
    from ..errors import MinidiffError
    d = check_values(config_cls, d, where)  # types and ranges first (check_values, below)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    neutral = getattr(config_cls, "NEUTRAL", {})
    ignored = getattr(config_cls, "IGNORED", ())
    kwargs = {}
    for key, value in d.items():
        if key.startswith("_"):
            continue
        if key in fields:
            kwargs[key] = value
        elif key in neutral:
            allowed = neutral[key]
            allowed = allowed if isinstance(allowed, tuple) else (allowed,)
            if value not in allowed:
                raise ConfigError(f"{where}: {key}={value!r} is not supported by minidiff's {config_cls.__name__} "
                                 f"(supported: {' or '.join(repr(a) for a in allowed)})")
        elif key not in ignored:
            warnings.warn(f"{where}: unknown config key {key!r}={value!r} ignored by {config_cls.__name__}", stacklevel=3)
    try:
        cfg = config_cls(**kwargs)
        if hasattr(cfg, "validate"):
            cfg.validate(where)
    except MinidiffError:
        raise
    except (ValueError, TypeError, ZeroDivisionError, IndexError, KeyError, AttributeError) as e:
        msg = str(e) if str(e).startswith(str(where)) else f"{where}: {type(e).__name__}: {e}"
        raise ConfigError(msg) from e
    return cfg


def config_to_dict(cfg, class_name):
    d = {"_class_name": class_name, "_diffusers_version": "0.39.0"}
    d.update(dataclasses.asdict(cfg))
    return d


class AttrDict(dict):
    """A dict whose keys read as attributes, like diffusers' FrozenDict (`scheduler.config.num_train_timesteps`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# ---- a value's type and range ------------------------------------------------------------------------
MAX_INT = 1 << 31
MAX_LIST = 4096
# key -> the largest value accepted (the largest published models use a small fraction of these)
CAPS = {
    "layers_per_block": 64, "transformer_layers_per_block": 256, "reverse_transformer_layers_per_block": 256,
    "num_hidden_layers": 256, "num_attention_heads": 1024, "attention_head_dim": 4096, "num_train_timesteps": 100_000,
    "original_inference_steps": 100_000, "max_position_embeddings": 1 << 16, "vocab_size": 1 << 22,
    "block_out_channels": 1 << 16, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "norm_num_groups": 1 << 12,
    "in_channels": 1 << 12, "out_channels": 1 << 12, "latent_channels": 1 << 12, "sample_size": 1 << 14,
    "cross_attention_dim": 1 << 16, "projection_dim": 1 << 16, "level_config": 64, "blocks": 256,
}
# keys whose values must be at least 1 (the other capped keys: at least 0)
POSITIVE = {"num_attention_heads", "attention_head_dim", "num_train_timesteps", "original_inference_steps",
            "max_position_embeddings", "vocab_size", "block_out_channels", "hidden_size", "intermediate_size",
            "norm_num_groups", "in_channels", "out_channels", "latent_channels", "sample_size", "cross_attention_dim",
            "projection_dim"}
LONG_LISTS = ("trained_betas",)  # a schedule given value by value


def _kind(field):
    """('int'|'float'|'bool'|'str'|'list'|'any', may be None, may be per block) for a dataclass field."""
    t, default = field.type, field.default
    optional = default is None  # (null itself is always let through: see check_values)
    origin = typing.get_origin(t)
    if origin is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        optional = True
        t = args[0] if len(args) == 1 else object
        origin = typing.get_origin(t)
    if t is bool:
        return "bool", optional, False
    if t is int:
        return "int", optional, False
    if t is float:
        return "float", optional, False
    if t is str:
        return "str", optional, False
    if t in (tuple, list) or origin in (tuple, list):
        return "list", optional, False
    # `object`: what the default is, alone or per block
    sample = default
    if isinstance(sample, (list, tuple)) and sample:
        sample = sample[0]
    if isinstance(sample, bool):
        return "bool", True, True
    if isinstance(sample, int):
        return "int", True, True
    if isinstance(sample, float):
        return "float", True, True
    if isinstance(sample, str):
        return "str", True, True
    return "any", True, True


def _check_scalar(where, key, v, kind):
    if kind == "bool":
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: {key}={v!r} must be true or false (a JSON boolean, not {type(v).__name__})")
        return v
    if kind == "int":
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{where}: {key}={v!r} must be an integer, not {type(v).__name__}")
        return v
    if kind == "float":
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConfigError(f"{where}: {key}={v!r} must be a number, not {type(v).__name__}")
        return v
    if kind == "str" and not isinstance(v, str):
        raise ConfigError(f"{where}: {key}={v!r} must be a string, not {type(v).__name__}")
    return v


def _walk_numbers(where, key, v, depth=0, infinite_ok=False):
    """Every number inside `v` finite and bounded, every list short, nesting shallow."""
    if depth > 4:
        raise ConfigError(f"{where}: {key} is nested too deep")
    if isinstance(v, (list, tuple)):
        if len(v) > MAX_LIST and key not in LONG_LISTS:
            raise ConfigError(f"{where}: {key} has {len(v)} entries, more than {MAX_LIST}")
        for x in v:
            _walk_numbers(where, key, x, depth + 1)
    elif isinstance(v, dict):
        for x in v.values():
            _walk_numbers(where, key, x, depth + 1)
    elif isinstance(v, float) and not math.isfinite(v):
        if infinite_ok and not math.isnan(v):
            return
        raise ConfigError(f"{where}: {key}={v!r} must be a finite number")
    elif isinstance(v, (int, float)) and not isinstance(v, bool) and (key in CAPS or isinstance(v, int)):
        cap = CAPS.get(key, MAX_INT)
        low = 1 if key in POSITIVE else 0 if key in CAPS else -MAX_INT
        if not low <= v <= cap:
            raise ConfigError(f"{where}: {key}={v!r} is out of range (allowed: {low} to {cap})")


def check_values(config_cls, values, where):
    """The config's known keys with their types checked (and integral floats made ints); see the docstring."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: a JSON object {{key: value}} is needed, found {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    out = {}
    for key, v in values.items():
        f = fields.get(key)
        # a field whose own default is +-inf (DPM's lambda_min_clipped) takes +-inf
        infinite_ok = f is not None and isinstance(f.default, float) and math.isinf(f.default)
        _walk_numbers(where, key, v, infinite_ok=infinite_ok)
        if f is None:
            out[key] = v
            continue
        kind, optional, per_block = _kind(f)
        if v is None:  # real files write null for "the default" (SDXL's upcast_attention): the model decides
            out[key] = v
        elif kind == "list":
            if not isinstance(v, (list, tuple)):
                raise ConfigError(f"{where}: {key}={v!r} must be a list, not {type(v).__name__}")
            out[key] = v
        elif per_block and isinstance(v, (list, tuple)):
            out[key] = [x if isinstance(x, (list, tuple)) or x is None else _check_scalar(where, key, x, kind) for x in v]
        elif kind != "any":
            out[key] = _check_scalar(where, key, v, kind)
        else:
            out[key] = v
    return out
