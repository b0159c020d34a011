"""Load safetensors straight into a model built on the meta device.

The module is created with no storage, every tensor of the file is read once, cast to the target
dtype, moved to the target device and assigned in place: no random init, no second fp32 copy, so
loading takes about as long as reading the file and peaks at about one copy of the weights.
Every key and shape is checked against the model before any tensor is read.
"""
import gc
import json
import os
import sys
from contextlib import contextmanager

import torch

from .config import config_from_dict, config_to_dict
from ..errors import ConfigError, FileFormatError
from .hub import read_json, resolve_weights
from .safe import check_pickle, read_safetensors_header, torch_load


def read_header(path):
    """{key: (shape, dtype_name)} of a safetensors file, from its header only (checked: weights/safe.py)."""
    return read_safetensors_header(path).tensors


def read_state_dict(files, allow_pickle=False):
    """Whole state dict of one or more files (safetensors, or pickle when allowed) on the CPU."""
    return {k: t for _, k, t in _iter_tensors(files, allow_pickle)}


TORCH_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
                "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _torch_dtype(name):
    """The torch dtype of a safetensors dtype name (None: one this torch lacks, or read through safetensors)."""
    return getattr(torch, TORCH_DTYPES.get(name, "-"), None)


def _needs_copy(header, key, cast):
    """Is `key` to be read into memory and cast (or moved, or laid out) rather than mapped? `cast`: (dtype, device,
    memory_format) or None."""
    if cast is None or sys.byteorder != "little":
        return False
    shape, name = header.tensors[key]
    file_dtype = _torch_dtype(name)
    if file_dtype is None:
        return False
    dtype, device, memory_format = cast
    return (torch.device(device).type != "cpu" or (file_dtype.is_floating_point and file_dtype != dtype)
            or (memory_format is not None and len(shape) == 4))


def cast_tensor(t, dtype, device, memory_format=None):
    """`t` on `device`, in `dtype` if floating, and a 4-D one (a convolution's weight) in `memory_format` if given:
    one copy for all three (a model laid out after loading would copy its weights a second time)."""
    fmt = memory_format if memory_format is not None and t.dim() == 4 else torch.preserve_format
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, memory_format=fmt)


def _read_cast(f, header, key, cast, buf=None):
    """One tensor read with pread into `buf` (uint8, at least its size; one buffer serves a whole file, so that
    no freed buffer leaves holes among the kept tensors) and cast: the file's pages are never mapped into the
    process, so the peak is the cast copies plus one buffer (not the whole file's pages too)."""
    shape, name = header.tensors[key]
    begin, end = header.offsets[key]
    file_dtype = _torch_dtype(name)
    buf = torch.empty(end - begin, dtype=torch.uint8) if buf is None else buf[:end - begin]
    view, got = memoryview(buf.numpy()), 0
    while got < len(view):
        n = os.preadv(f.fileno(), [view[got:]], header.data_start + begin + got)
        if n <= 0:
            raise FileFormatError(f"{header.path}: tensor {key!r} ends past the end of the file (truncated?)")
        got += n
    t = buf.view(file_dtype).reshape(shape) if len(view) else torch.empty(shape, dtype=file_dtype)
    out = cast_tensor(t, *cast)
    return out.clone() if out is t else out  # already in that layout (a 1x1 kernel's): not a view of the buffer


def _iter_tensors(files, allow_pickle, keys=None, cast=None):
    """(file, key, tensor) one at a time, so that only one tensor is in flight; the kind of each file is
    told by its content (a pickle is read only with allow_pickle). `keys`: only these. `cast` (dtype,
    device, memory_format): tensors of another floating dtype, all for a device other than the CPU, and 4-D ones
    given a memory format come read and cast (_read_cast); the others are the file's memory-mapped tensors."""
    for path in files:
        if check_pickle(path, allow_pickle) == "safetensors":
            from safetensors import safe_open
            header = read_safetensors_header(path)  # checked before safetensors maps the file
            names = list(header.tensors)
            copied = [k for k in names if (keys is None or k in keys) and _needs_copy(header, k, cast)]
            if copied:
                buf = torch.empty(max(e - b for b, e in (header.offsets[k] for k in copied)), dtype=torch.uint8)
                with open(path, "rb") as raw:
                    for k in copied:
                        yield path, k, _read_cast(raw, header, k, cast, buf)
                del buf
            names = [k for k in names if k not in set(copied)]
            if not names:
                continue
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for k in names:
                        if keys is not None and k not in keys:
                            continue
                        try:
                            t = f.get_tensor(k)
                        except Exception as e:
                            raise FileFormatError(f"{path}: could not read tensor {k!r} (truncated or corrupt file?): "
                                                  f"{e}") from e
                        yield path, k, t
            except FileFormatError:
                raise
            except Exception as e:  # safetensors' own error types for what the header check let through
                raise FileFormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
        else:
            for k, t in torch_load(path).items():
                if keys is None or k in keys:
                    yield path, k, t


def _shapes(files, allow_pickle):
    shapes = {}
    for path in files:
        if check_pickle(path, allow_pickle) == "safetensors":
            for k, (shape, _) in read_header(path).items():
                shapes[k] = (path, shape)
        else:
            for k, t in torch_load(path, mmap=True).items():
                shapes[k] = (path, tuple(t.shape))
    return shapes


def _listing(keys, n=12):
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_into(model, files, dtype=None, device=None, rename=None, allow_pickle=False, shapes=None,
              memory_format=None):
    """Assign the tensors of `files` to `model` (built on meta), checking every key and shape first.

    `rename(file_key) -> module_key` maps another key form of the same model (None: keys are equal);
    a key it maps to None is skipped (a stale buffer some files carry, e.g. CLIP's position_ids).
    Floating tensors are cast to `dtype` (None: float32); others keep theirs. `memory_format`
    (torch.channels_last): the layout of the 4-D tensors, the convolutions' weights.
    """
    rename = rename or (lambda k: k)
    dtype = dtype or torch.float32
    device = torch.device(device) if device is not None else torch.device("cpu")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = shapes if shapes is not None else _shapes(files, allow_pickle)
    found = {rename(k): (path, shape, k) for k, (path, shape) in shapes.items()}
    found.pop(None, None)
    where = files[0] if len(files) == 1 else f"{os.path.dirname(files[0])} ({len(files)} shards)"
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    wrong = [f"{k}: file {found[k][1]} vs model {expected[k]}" for k in expected.keys() & found.keys()
             if tuple(found[k][1]) != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{where} does not fit {type(model).__name__}:"]
        if missing:
            parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            listed = unexpected if len(files) == 1 else [f"{k} (in {os.path.basename(found[k][0])})" for k in unexpected]
            parts.append(f"{len(unexpected)} unexpected keys: {_listing(listed)}")
        if wrong:
            parts.append(f"{len(wrong)} wrong shapes: {_listing(wrong, 6)}")
        parts.append("(is the config.json beside the weights the one they were saved with?)")
        raise ConfigError("\n  ".join(parts))
    sd = {}
    wanted = {k for k in shapes if rename(k) is not None}  # a skipped key is neither read nor cast
    for _, k, t in _iter_tensors(files, allow_pickle, keys=wanted, cast=(dtype, device, memory_format)):
        if rename(k) is None:
            continue
        sd[rename(k)] = cast_tensor(t, dtype, device, memory_format)
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise FileFormatError(f"{type(model).__name__}: tensors not set by {where}: {_listing(left)}")
    return model


@contextmanager
def _no_init():
    """Build modules without running their random initialisers: on meta tensors they compute nothing, but some
    (nn.Embedding's normal_) dispatch through torch's Python references and pull in seconds of imports."""
    import torch.nn.init as init
    names = ["normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "zeros_", "ones_", "constant_"]
    saved = {n: getattr(init, n) for n in names}
    for n in names:
        setattr(init, n, lambda tensor, *a, **k: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


@contextmanager
def _bounded_build(cls, n_tensors, files):
    """Stop building a model as soon as it has more parameters than the weights hold tensors: a config that
    asks for a million layers fails after a few thousand modules, naming both, instead of filling memory."""
    from torch.nn.modules.module import register_module_parameter_registration_hook
    limit, count = 4 * n_tensors + 20_000, [0]  # slack: a near miss still gets the missing-keys listing

    def hook(module, name, param):
        count[0] += 1
        if count[0] > limit:
            raise ConfigError(f"{cls.__name__}: its config asks for more than {limit} parameter tensors, but "
                              f"{files[0]}{f' (and {len(files) - 1} more shards)' if len(files) > 1 else ''} holds "
                              f"{n_tensors}: the config.json does not belong to these weights")
    handle = register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _no_gc():
    """Pause the cyclic garbage collector while a model is built: the thousands of small objects a build
    allocates trigger full collections over everything imported so far (torch and friends), which made
    building a CLIP text encoder take 0.18 s instead of 0.015 s. A build creates no garbage cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_model(cls, repo_or_path, subfolder=None, variant=None, torch_dtype=None, device=None,
               allow_pickle=False, config=None, memory_format=None):
    """Build `cls` from its config.json and load its weights: the body of every model's from_pretrained.

    The class provides `config_class` (a dataclass), `weight_names` (file stems) and optionally
    `rename_key(file_key)` for a second key form of the same weights.
    """
    repo_or_path = os.fspath(repo_or_path)
    if config is None:
        raw = read_json(repo_or_path, "config.json", subfolder)
        config = config_from_dict(cls.config_class, raw, where=os.path.join(repo_or_path, subfolder or "", "config.json"))
    files = resolve_weights(repo_or_path, cls.weight_names, subfolder, variant, allow_pickle)
    shapes = _shapes(files, allow_pickle)  # headers only: checked before anything is built
    from minidiff.compress import build_palettised, palettised_layers
    palettised = palettised_layers(files)  # a file minidiff.compress wrote: its layers say so in the metadata
    with _no_gc():
        with torch.device("meta"), _no_init(), _bounded_build(cls, len(shapes), files):
            model = cls(config)
            if palettised:
                build_palettised(model, palettised, files[0])
        load_into(model, files, torch_dtype, device, getattr(cls, "rename_key", None), allow_pickle, shapes,
                  memory_format)
    return model.eval()


def save_model(model, folder, weight_name="diffusion_pytorch_model", class_name=None, extra_config=None):
    """Write config.json (the config's fields, then `extra_config`) and <weight_name>.safetensors into
    `folder` (the Hub layout diffusers reads)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    config = config_to_dict(model.config, class_name or type(model).__name__)
    config.update(extra_config or {})
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(folder, weight_name + ".safetensors"), metadata={"format": "pt"})


def load_config(cls_config, repo_or_path, subfolder=None):
    raw = read_json(repo_or_path, "config.json", subfolder)
    return config_from_dict(cls_config, raw, where=os.path.join(os.fspath(repo_or_path), subfolder or "", "config.json"))
