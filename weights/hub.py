"""Find a model's files: a local folder in the Hub layout, or a Hub repo id through huggingface_hub's cache.

Only the files a model needs are fetched: its config and the weights of the chosen variant
(a sharded checkpoint's index and its shards). HF_HUB_OFFLINE=1 and local paths need no network.
"""
import os

from .safe import check_pickle, contained, read_json_file, safe_name

WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def is_local(repo_or_path):
    return os.path.isdir(repo_or_path) or os.path.isfile(repo_or_path)


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
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    try:
        return hf_hub_download(repo_or_path, filename, subfolder=subfolder or None)
    except (EntryNotFoundError, LocalEntryNotFoundError) as e:
        if required:
            where = f"{repo_or_path}/{subfolder + '/' if subfolder else ''}{filename}"
            raise FileNotFoundError(f"{where} could not be found on the Hub or in the local cache ({type(e).__name__})") from e
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
