"""Model configs: a dataclass per model, filled from the repo's config.json.

A config.json written by diffusers lists every argument of the model, most at their neutral value.
Each config dataclass declares the keys it knows but does not implement, with their neutral value,
in `NEUTRAL`: a file that sets one to anything else asks for an architecture minidiff does not
build, and that is an error rather than a silently different model.
"""
import dataclasses
import warnings


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
