"""Reading files that strangers publish, without trusting them.

- `file_kind(path)`: what a weights file is, by its first bytes (a safetensors header, a zip archive as
  torch.save writes, a pickle stream), never by its name; `check_pickle` refuses the last two unless the
  caller passed allow_pickle=True (they are then read with torch.load(weights_only=True)).
- `read_safetensors_header(path)`: the header of a safetensors file parsed and checked by minidiff itself
  before safetensors maps the file: bounded size and key count, no duplicated key (the format forbids them,
  a plain JSON parse keeps the last), known dtypes, shapes and byte ranges that tile the data exactly.
- `safe_name` / `contained`: a path that a file names (a shard in an index, a component folder in
  model_index.json) must be relative, without "..", and stay inside the repo folder once links are resolved.
- `read_json_file(path)`: bounded size and nesting depth, strict UTF-8, no NaN (Infinity only as written by
  Python's json for a config default such as -inf), no number literal that overflows, clean errors.
"""
import json
import math
import os
import struct

from ..errors import FileFormatError, PickleRefusedError, UnsafePathError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # what safetensors itself accepts
MAX_TENSORS = 200_000  # an SDXL single file has ~2,600; a LoRA for every layer of SDXL ~7,000
MAX_NDIM = 8
MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64

# safetensors dtype names and their sizes in bits
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
              "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


# ----------------------------------------------------------------------------- what a file is

def file_kind(path):
    """"safetensors", "zip" (torch.save's default), "pickle" (older torch.save, plain pickles) or "unknown"."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except IsADirectoryError:
        raise FileFormatError(f"{path} is a folder, not a weights file") from None
    except OSError as e:
        raise FileFormatError(f"{path} cannot be read: {e.strerror or e}") from e
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def check_pickle(path, allow_pickle, kind=None):
    """Raise unless `path` is safetensors, or a torch pickle and allow_pickle; returns the kind."""
    kind = kind or file_kind(path)
    if kind == "safetensors":
        return kind
    if kind == "unknown":
        raise FileFormatError(f"{path} is neither a safetensors file nor a torch checkpoint (its first bytes are no "
                              "safetensors header, zip archive or pickle stream): truncated, corrupt or another format?")
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path} is a pickle checkpoint ({'zip archive' if kind == 'zip' else 'pickle stream'}, whatever its name), "
            "which can run code when loaded; pass allow_pickle=True (CLI: --allow-pickle) to read it anyway (it is then "
            "read with torch.load(weights_only=True)), or use a .safetensors file")
    return kind


def torch_load(path, mmap=False):
    """A pickle checkpoint through torch.load(weights_only=True), as a flat {key: tensor} dict."""
    import torch
    try:
        if mmap and file_kind(path) == "zip" and not path.endswith(".safetensors"):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:  # a file object: torch.load picks its reader by name otherwise (".safetensors")
            with open(path, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses foreign objects; truncated archives raise their own errors
        raise FileFormatError(f"{path}: torch.load(weights_only=True) refused or failed ({type(e).__name__}): "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # the LDM checkpoint layout
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise FileFormatError(f"{path}: a pickle checkpoint holding {type(obj).__name__}, not a dict of named tensors")
    return obj


# ----------------------------------------------------------------------------- safetensors headers

class Header:
    """A checked safetensors header: `tensors` {key: (shape tuple, dtype name)}, `metadata` {str: str}."""

    def __init__(self, path, tensors, metadata, data_start=None, offsets=None):
        self.path, self.tensors, self.metadata = path, tensors, metadata
        self.data_start = data_start  # file offset of the data bytes (8 + header length)
        self.offsets = offsets or {}  # {key: (begin, end)} within the data bytes


def _no_duplicates(where):
    def hook(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise FileFormatError(f"{where}: the header holds key {k!r} twice (the safetensors format forbids "
                                      "duplicated keys; which one is meant is unknown)")
            seen[k] = v
        return seen
    return hook


def _bad(path, why):
    return FileFormatError(f"{path}: not a valid safetensors file: {why}")


def read_safetensors_header(path, max_tensors=MAX_TENSORS):
    """Parse and check the header of a safetensors file (see the module docstring); a Header."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            first = f.read(8)
            if len(first) < 8:
                raise _bad(path, f"{size} bytes, shorter than the 8-byte header length (truncated?)")
            (n,) = struct.unpack("<Q", first)
            if n > MAX_HEADER_BYTES:
                raise _bad(path, f"header length {n} bytes is over the {MAX_HEADER_BYTES} bytes allowed")
            if 8 + n > size:
                raise _bad(path, f"header length {n} bytes, but the file has {size} bytes (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise FileFormatError(f"{path} cannot be read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(path, f"header is not UTF-8 (byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates(path), parse_constant=_no_constant(path))
    except FileFormatError:
        raise
    except (ValueError, RecursionError) as e:
        raise _bad(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _bad(path, "__metadata__ must map strings to strings")
    if len(header) > max_tensors:
        raise _bad(path, f"header lists {len(header)} tensors, more than the {max_tensors} allowed")
    data_size = size - 8 - n
    tensors, spans = {}, []
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"tensor {key!r}: entry must hold exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BITS:
            raise _bad(path, f"tensor {key!r}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(type(d) is int and 0 <= d < 2 ** 53 for d in shape)):
            raise _bad(path, f"tensor {key!r}: shape {shape!r} must be a list of at most {MAX_NDIM} sizes >= 0")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and 0 <= o <= data_size for o in offsets) or offsets[0] > offsets[1]):
            raise _bad(path, f"tensor {key!r}: data_offsets {offsets!r} are not a range inside the {data_size} data "
                             "bytes (truncated?)")
        nbytes = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8
        if offsets[1] - offsets[0] != nbytes:
            raise _bad(path, f"tensor {key!r}: shape {shape} of {dtype} needs {nbytes} bytes, data_offsets give "
                             f"{offsets[1] - offsets[0]}")
        tensors[key] = (tuple(shape), dtype)
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    end = 0
    for begin, stop, key in spans:
        if begin != end:
            raise _bad(path, f"tensor {key!r} starts at byte {begin} of the data, expected {end} (overlapping or "
                             "gapped data)")
        end = stop
    if end != data_size:
        raise _bad(path, f"the tensors cover {end} of the {data_size} data bytes")
    return Header(path, tensors, metadata, 8 + n, {key: (begin, stop) for begin, stop, key in spans})


def _no_constant(where):
    def hook(name):
        raise FileFormatError(f"{where}: {name} is not a JSON value")
    return hook


# ----------------------------------------------------------------------------- paths named by files

def safe_name(name, where, what="path"):
    """Check a relative path taken from a file: no absolute path, drive, '..', backslash or NUL."""
    if not isinstance(name, str) or not name:
        raise FileFormatError(f"{where}: {what} {name!r} must be a non-empty string")
    parts = name.replace("\\", "/").split("/")
    if (name.startswith(("/", "\\")) or "\0" in name or "\\" in name or ".." in parts
            or (len(name) > 1 and name[1] == ":") or os.path.isabs(name)):
        raise UnsafePathError(f"{where}: {what} {name!r} leaves the repo folder (a relative path inside it, without "
                              "'..', is needed)")
    return name


def _roots(root):
    real = os.path.realpath(root)
    roots = [real]
    # a Hub cache snapshot (models--o--n/snapshots/<rev>) links its files to the repo's own blobs folder
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    return roots


def contained(root, path, where, what="path"):
    """`path` (inside local folder `root`) once links are resolved, or UnsafePathError."""
    real = os.path.realpath(path)
    for r in _roots(root):
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return path
    raise UnsafePathError(f"{where}: {what} {path!r} resolves to {real!r}, outside the repo folder "
                          f"{os.path.realpath(root)!r}")


# ----------------------------------------------------------------------------- JSON

def _depth(obj, limit, where):
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            raise FileFormatError(f"{where}: nested more than {limit} levels deep")
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)


def _infinity_only(where):
    def hook(name):
        if name in ("Infinity", "-Infinity"):
            return float(name.replace("Infinity", "inf"))
        raise FileFormatError(f"{where}: {name} is not a JSON value")
    return hook


def _finite_float(where):
    def parse(s):
        v = float(s)
        if not math.isfinite(v):
            raise FileFormatError(f"{where}: number {s[:40]} is out of range (not a finite float)")
        return v
    return parse


def read_json_file(path, max_bytes=MAX_JSON_BYTES, max_depth=MAX_JSON_DEPTH):
    """Parse a JSON file strictly: at most `max_bytes`, `max_depth` levels, UTF-8, finite numbers."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise FileFormatError(f"{path}: {size} bytes, more than the {max_bytes} bytes a JSON file may have here")
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except IsADirectoryError:
        raise FileFormatError(f"{path} is a folder, not a JSON file") from None
    except OSError as e:
        raise FileFormatError(f"{path} cannot be read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path} is not valid JSON: not UTF-8 (byte {e.start})") from None
    try:  # Infinity stays (diffusers writes DPM's lambda_min_clipped = -inf so); NaN is refused
        obj = json.loads(text, parse_constant=_infinity_only(path), parse_float=_finite_float(path))
    except FileFormatError:
        raise
    except RecursionError:
        raise FileFormatError(f"{path} is not valid JSON: nested too deep") from None
    except ValueError as e:  # JSONDecodeError, and ints longer than Python converts
        raise FileFormatError(f"{path} is not valid JSON: {e}") from None
    _depth(obj, max_depth, path)
    return obj
