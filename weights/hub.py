"""Find a model's files: a local folder in the Hub layout, or a Hub repo id through huggingface_hub's cache.

Only the files a model needs are fetched: its config and the weights of the chosen variant
(a sharded checkpoint's index and its shards). HF_HUB_OFFLINE=1 and local paths need no network.
"""
import contextlib
import contextvars
import os
import re
import socket

from .safe import check_pickle, contained, read_json_file, safe_name

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


# Hub download options of the from_pretrained call in progress (cache_dir, revision, token, local_files_only,
# force_download): set once by the pipeline or model, read by every file lookup below it.
_HUB_OPTIONS = contextvars.ContextVar("minidiff_hub_options", default={})
HUB_OPTION_NAMES = ("cache_dir", "revision", "token", "local_files_only", "force_download")


@contextlib.contextmanager
def hub_options(**options):
    """Download options for every Hub lookup inside the block (None values are left out)."""
    merged = {**_HUB_OPTIONS.get(), **{k: v for k, v in options.items() if v is not None}}
    token = _HUB_OPTIONS.set(merged)
    try:
        yield
    finally:
        _HUB_OPTIONS.reset(token)


def is_local(repo_or_path):
    return os.path.isdir(repo_or_path) or os.path.isfile(repo_or_path)


def looks_like_path(name):
    """A string meant as a folder, never a Hub repo id: starts with '.', '/', '~' (or a drive letter), has
    more than one '/', or its first part names a folder that exists here."""
    if name.startswith((".", "/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", name) or "\\" in name:
        return True
    parts = name.split("/")
    return len(parts) != 2 or not all(parts) or os.path.isdir(parts[0])


_HUB_REACHABLE = {}


def _hub_reachable():
    """Whether the Hub's host accepts a connection (checked once per process, 3 s at most): without a network,
    huggingface_hub retries for about 25 s before it reads its cache."""
    from huggingface_hub import constants
    from urllib.parse import urlparse
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if host not in _HUB_REACHABLE:
        try:
            socket.create_connection((host, port), timeout=3).close()
            _HUB_REACHABLE[host] = True
        except OSError:
            _HUB_REACHABLE[host] = False
    return _HUB_REACHABLE[host]


def _offline_error(repo, where, reason):
    from huggingface_hub import constants
    cache = _HUB_OPTIONS.get().get("cache_dir") or constants.HF_HUB_CACHE
    return OSError(f"{repo}: {reason}, and {where} is not in the offline cache ({cache}); download the repo once "
                   f"where the Hub can be reached (huggingface-cli download {repo}), or pass a local folder "
                   "in the Hub layout (with model_index.json, or config.json for one model)")


def resolve_file(repo_or_path, filename, subfolder=None, required=True):
    """Path of `subfolder/filename` in a local folder or a Hub repo; None if absent and not required."""
    repo_or_path = os.fspath(repo_or_path)
    if subfolder is not None:  # "" too: a component named "" in model_index.json
        safe_name(subfolder, repo_or_path, "subfolder")
    safe_name(filename, os.path.join(repo_or_path, subfolder or ""), "file name")
    if is_local(repo_or_path):
        path = os.path.join(repo_or_path, subfolder or "", filename)
        if os.path.lexists(path):
            contained(repo_or_path, path, os.path.join(repo_or_path, subfolder or ""), "file")
        if os.path.isfile(path):
            return path
        if required:
            raise FileNotFoundError(f"{path} not found (looked for {filename!r} in {repo_or_path!r}"
                                    f"{f', subfolder {subfolder!r}' if subfolder else ''})")
        return None
    if looks_like_path(repo_or_path):
        raise FileNotFoundError(f"no such folder: {repo_or_path} (a path, so it is not looked up on the Hub)")
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)
    options = dict(_HUB_OPTIONS.get())
    where = f"{subfolder + '/' if subfolder else ''}{filename}"
    offline = constants.HF_HUB_OFFLINE or options.get("local_files_only")
    reason = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "local_files_only=True was passed"
    if not offline and not _hub_reachable():
        offline, reason = True, f"the Hub ({constants.ENDPOINT}) cannot be reached from here"
    if offline:
        options["local_files_only"] = True
    try:
        return hf_hub_download(repo_or_path, filename, subfolder=subfolder or None, **options)
    except GatedRepoError as e:
        raise OSError(f"{repo_or_path} is a gated repo: accept its terms on the Hub and pass token=... "
                      "(or log in with `huggingface-cli login`)") from e
    except RepositoryNotFoundError as e:
        raise OSError(f"{repo_or_path} is not a Hub repo id (or it is private: pass token=...), and no local "
                      "folder has that name") from e
    except RevisionNotFoundError as e:
        raise OSError(f"{repo_or_path}: revision {options.get('revision')!r} does not exist") from e
    except LocalEntryNotFoundError as e:
        if offline:  # nothing in the cache: say so in one line, without huggingface_hub's retries
            if not required:
                return None
            raise _offline_error(repo_or_path, where, reason) from None
        if required:
            raise FileNotFoundError(f"{repo_or_path}/{where} could not be found on the Hub or in the local cache") from e
        return None
    except EntryNotFoundError as e:
        if required:
            raise FileNotFoundError(f"{repo_or_path}/{where} does not exist on the Hub ({type(e).__name__})") from e
        return None


def read_json(repo_or_path, filename, subfolder=None):
    """A JSON file of a repo, parsed strictly (bounded size and depth, UTF-8, finite numbers); a dict."""
    path = resolve_file(repo_or_path, filename, subfolder)
    obj = read_json_file(path)
    if not isinstance(obj, dict):
        from ..errors import FileFormatError
        raise FileFormatError(f"{path}: a JSON object {{...}} is needed, found a {type(obj).__name__}")
    return obj


def read_index(path):
    """The shard file names of a `.index.json` (its weight_map values), each a safe relative name."""
    from ..errors import FileFormatError
    index = read_json_file(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FileFormatError(f"{path}: a shard index needs a non-empty \"weight_map\" object {{key: shard file}}")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise FileFormatError(f"{path}: weight_map[{key!r}] = {shard!r} is not a file name")
        safe_name(shard, path, f"shard of {key!r}")
    return sorted(set(weight_map.values()))


def _variant_name(name, variant):
    # diffusers' variant naming: model.safetensors -> model.fp16.safetensors
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1) if "." in name else (name, "")
    return f"{stem}.{variant}.{ext}"


def resolve_weights(repo_or_path, weight_names, subfolder=None, variant=None, allow_pickle=False):
    """List of weight files for a model: one file, or the shards named by a `.index.json`.

    `weight_names` are stems such as "diffusion_pytorch_model" or "model"; a local path to a single
    .safetensors file is accepted as is. Pickle files (.bin, .ckpt) are refused unless allow_pickle.
    """
    repo_or_path = os.fspath(repo_or_path)
    if os.path.isfile(repo_or_path):
        _check_pickle(repo_or_path, allow_pickle)
        return [repo_or_path]
    tried = []
    exts = [".safetensors"] + ([".bin"] if allow_pickle else [])
    for ext in exts:
        for stem in weight_names:
            single = _variant_name(stem + ext, variant)
            index = _variant_name(stem + ext, variant) + ".index.json"
            # diffusers names sharded variants as stem.safetensors.index.fp16.json
            index_alt = f"{stem}{ext}.index.{variant}.json" if variant else None
            for name in (single, index, index_alt):
                if name is None:
                    continue
                tried.append(name)
                path = resolve_file(repo_or_path, name, subfolder, required=False)
                if path is None:
                    continue
                if name.endswith(".json"):
                    return [resolve_file(repo_or_path, s, subfolder) for s in read_index(path)]
                return [path]
    where = os.path.join(repo_or_path, subfolder or "")
    hint = ""
    if not allow_pickle:
        for stem in weight_names:
            if resolve_file(repo_or_path, _variant_name(stem + ".bin", variant), subfolder, required=False):
                hint = (f"; found a pickle file {stem}.bin, which is refused by default: pass allow_pickle=True "
                        "to read it (with torch.load(weights_only=True))")
                break
    if variant and not hint:
        hint = f"; variant={variant!r} was asked for: try variant=None"
    raise FileNotFoundError(f"no weights in {where}: tried {', '.join(tried)}{hint}")


def _check_pickle(path, allow_pickle):
    # decided by the file's first bytes, not its name (weights/safe.py)
    return check_pickle(path, allow_pickle)
