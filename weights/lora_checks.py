"""LoRA files checked before anything is applied: alpha values, the PEFT config in the metadata, and its
rank/alpha patterns, which are regular expressions from a stranger's file.

A pattern is matched with Python's `re` (as PEFT does), so it is first parsed and refused if it could
backtrack catastrophically: a repeated group that itself repeats or branches (`(a+)+`, `(a|a)*`), a
backreference or a lookaround, or more than MAX_PATTERN characters. At most MAX_OPEN_REPEATS unbounded repetitions are
allowed, and the PEFT rule (the pattern matches the whole path or a suffix after a ".") is applied suffix by
suffix rather than with a leading `.*`, so a check costs at most a small power of a short path's length.
"""
import math

from ..errors import LoRAFileError

MAX_PATTERN = 256
MAX_PATTERNS = 10_000
MAX_OPEN_REPEATS = 3  # `.*` and the like: each multiplies the worst case by the path's length


def alpha_value(tensor, key):
    """An alpha key's value: a single finite number (checked on meta tensors by shape only)."""
    if tensor.numel() != 1:
        raise LoRAFileError(f"{key}: an alpha must be a single number, this one has shape {tuple(tensor.shape)}")
    if tensor.is_meta:
        return 1.0
    value = float(tensor.float().item())
    if not math.isfinite(value):
        raise LoRAFileError(f"{key}: alpha {value} is not a finite number")
    return value


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_lora_config(config, where):
    """A PEFT LoraConfig dict (from the file's metadata or adapter_config.json)."""
    if not isinstance(config, dict):
        raise LoRAFileError(f"{where}: must be a JSON object, found {type(config).__name__}")
    if config.get("lora_alpha") is not None and not _number(config["lora_alpha"]):
        raise LoRAFileError(f"{where}: lora_alpha={config['lora_alpha']!r} must be a finite number")
    r = config.get("r")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
        raise LoRAFileError(f"{where}: r={r!r} must be a positive integer")
    for key in ("use_rslora", "use_dora"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise LoRAFileError(f"{where}: {key}={config[key]!r} must be true or false")
    for key in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict) or len(patterns) > MAX_PATTERNS:
            raise LoRAFileError(f"{where}: {key} must be an object {{pattern: number}} of at most {MAX_PATTERNS}")
        for pattern, value in patterns.items():
            check_pattern(pattern, f"{where}: {key}")
            if not _number(value):
                raise LoRAFileError(f"{where}: {key}[{pattern!r}]={value!r} must be a finite number")


def check_pattern(pattern, where):
    """Refuse a regular expression that is malformed or could backtrack catastrophically."""
    import re
    try:
        from re import _parser as sre_parse  # Python 3.11+
    except ImportError:  # pragma: no cover
        import sre_parse
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
        raise LoRAFileError(f"{where}: pattern {str(pattern)[:60]!r} must be a string of at most {MAX_PATTERN} chars")
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise LoRAFileError(f"{where}: pattern {pattern!r} is not a valid regular expression: {e}") from None
    reason = _unsafe(parsed, sre_parse, inside_repeat=False)
    if reason is None and _open_repeats(parsed, sre_parse) > MAX_OPEN_REPEATS:
        reason = f"more than {MAX_OPEN_REPEATS} unbounded repetitions"
    if reason:
        raise LoRAFileError(f"{where}: pattern {pattern!r} is refused: {reason} (it could take exponential time)")


def _unsafe(items, sre, inside_repeat):
    c = sre._constants if hasattr(sre, "_constants") else sre
    repeats = (c.MAX_REPEAT, c.MIN_REPEAT) + ((c.POSSESSIVE_REPEAT,) if hasattr(c, "POSSESSIVE_REPEAT") else ())
    for op, av in items:
        if op in (c.GROUPREF, c.GROUPREF_EXISTS):
            return "a backreference"
        if op in (c.ASSERT, c.ASSERT_NOT):
            return "a lookaround"
        if op in repeats:
            lo, hi, sub = av
            if inside_repeat:
                return "a repetition inside a repetition"
            if _has_branch(sub, c):
                return "a repeated alternation"
            reason = _unsafe(sub, sre, True)
            if reason:
                return reason
        elif op == c.SUBPATTERN:
            reason = _unsafe(av[-1], sre, inside_repeat)
            if reason:
                return reason
        elif op == c.BRANCH:
            for alt in av[1]:
                reason = _unsafe(alt, sre, inside_repeat)
                if reason:
                    return reason
    return None


def _open_repeats(items, sre):
    c = sre._constants if hasattr(sre, "_constants") else sre
    n = 0
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT):
            n += (av[1] > 16) + _open_repeats(av[2], sre)
        elif op == c.SUBPATTERN:
            n += _open_repeats(av[-1], sre)
        elif op == c.BRANCH:
            n += max(_open_repeats(alt, sre) for alt in av[1])
    return n


def _has_branch(items, c):
    for op, av in items:
        if op == c.BRANCH:
            return True
        if op == c.SUBPATTERN and _has_branch(av[-1], c):
            return True
    return False
