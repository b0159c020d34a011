"""Model configs: a dataclass per model, filled from the repo's config.json.

A config.json written by diffusers lists every argument of the model, most at their neutral value.
Each config dataclass declares the keys it knows but does not implement, with their neutral value,
in `NEUTRAL`: a file that sets one to anything else asks for an architecture minidiff does not
build, and that is an error rather than a silently different model.
"""
import dataclasses
import warnings

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
    from ..errors import ConfigError, MinidiffError
    from .config_checks import check_values
    d = check_values(config_cls, d, where)  # types and ranges first (weights/config_checks.py)
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
