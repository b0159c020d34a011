"""Textual inversion (Gal et al. 2022): new words whose input embeddings were learnt for a concept.

An embedding file holds, for one token, one or more vectors of the text encoder's width. Loading adds the
token to the tokenizer (with `token_1`, `token_2`, ... for the further vectors of a multi-vector
embedding) and the vectors as new rows of the text encoder's token embedding; a prompt naming `token`
is read as `token token_1 ...`, as diffusers does (`expand_prompt`, in prompts.py).

File forms, told apart by their keys:
  - diffusers' `learned_embeds.safetensors` (or `.bin`): {token: vector (d,) or (n, d)};
  - A1111 `.pt` (a pickle: allow_pickle=True): {"string_to_param": {"*": (n, d)}, "name": ...};
  - A1111 `.safetensors`: {"emb_params": (n, d)}, the token is the file's name (A1111's trigger word);
  - SDXL: {"clip_l": (n, 768), "clip_g": (n, 1280)}, one set per text encoder.
Every check (width, token already known, a file for the other model family) runs before anything is
added, and names the file and the token.
"""
import os

import torch
import torch.nn as nn

from .errors import FileFormatError
# the tokens a prompt names, expanded: prompts.py (also reachable here, as before)
from .prompts import expand_prompt, user_tokens  # noqa: F401
from .weights.hub import PICKLE_SUFFIXES, is_local, resolve_file
from .weights.safe import check_pickle, read_safetensors_header

DEFAULT_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
SDXL_KEYS = ("clip_l", "clip_g")  # first and second text encoder


# ----------------------------------------------------------------------------- reading files

def resolve_embedding_file(source, weight_name=None, subfolder=None):
    source = os.fspath(source)
    if os.path.isfile(source):
        return source
    if weight_name is not None:
        return resolve_file(source, weight_name, subfolder)
    for name in DEFAULT_NAMES:
        path = resolve_file(source, name, subfolder, required=False)
        if path is not None:
            return path
    if is_local(source):
        folder = os.path.join(source, subfolder or "")
        found = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", *PICKLE_SUFFIXES)))
        if len(found) == 1:
            return os.path.join(folder, found[0])
        raise FileNotFoundError(f"{folder} has no {' or '.join(DEFAULT_NAMES)} and {len(found)} other weight files "
                                f"({', '.join(found) or 'none'}): pass weight_name=... to pick one")
    raise FileNotFoundError(f"{source}: no {' or '.join(DEFAULT_NAMES)} found; pass weight_name=...")


def read_embedding_file(path, allow_pickle=False):
    """The file's contents, by what its bytes are (not its name): safetensors, or a torch pickle when allowed."""
    kind = check_pickle(path, allow_pickle)
    if kind == "safetensors":
        from safetensors.torch import load_file
        read_safetensors_header(path)  # checked before safetensors maps it
        return load_file(path)
    try:  # an A1111 .pt nests its tensors in dicts: torch.load itself, weights only
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FileFormatError(f"{path}: torch.load(weights_only=True) refused or failed ({type(e).__name__}): "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e


def vectors_of(state, where, token, stem):
    """(token, vectors) of one embedding: vectors is an (n, d) tensor, or {"clip_l": ..., "clip_g": ...}."""
    if isinstance(state, torch.Tensor):
        if token is None:
            raise ValueError(f"{where}: a bare tensor names no token: pass token=...")
        return token, _matrix(state, where, token)
    if not isinstance(state, dict):
        raise ValueError(f"{where}: expected a dict of tensors, got {type(state).__name__}")
    if any(k in state for k in SDXL_KEYS):
        missing = [k for k in SDXL_KEYS if k not in state]
        if missing:
            raise ValueError(f"{where}: an SDXL embedding needs both {' and '.join(SDXL_KEYS)}; {missing} missing")
        token = token or stem
        return token, {k: _matrix(state[k], where, token) for k in SDXL_KEYS}
    if "string_to_param" in state:  # A1111 .pt
        params = state["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError(f"{where}: string_to_param should hold one tensor, has {list(params)}")
        token = token or state.get("name") or stem
        return token, _matrix(next(iter(params.values())), where, token)
    if "emb_params" in state:  # A1111 .safetensors: the file name is the trigger word
        token = token or stem
        return token, _matrix(state["emb_params"], where, token)
    if len(state) == 1:  # diffusers: {token: vector}
        file_token, value = next(iter(state.items()))
        token = token or file_token
        return token, _matrix(value, where, token)
    raise ValueError(f"{where}: not a textual inversion embedding (keys {sorted(state)[:8]}): expected "
                     "{token: vector}, 'string_to_param', 'emb_params', or 'clip_l' + 'clip_g'")


def _matrix(t, where, token):
    if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2) or t.numel() == 0:
        raise ValueError(f"{where}: the embedding of {token!r} is not a vector or a matrix of vectors "
                         f"({getattr(t, 'shape', type(t).__name__)})")
    return t.detach().reshape(-1, t.shape[-1]).float()


# ----------------------------------------------------------------------------- the pipeline operations

def _pairs(pipe):
    """[(tokenizer, text encoder, SDXL key)] of a pipeline's text encoders."""
    pairs = [(pipe.tokenizer, pipe.text_encoder, "clip_l")]
    if hasattr(pipe, "text_encoder_2"):
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2, "clip_g"))
    pairs = [p for p in pairs if p[1] is not None and p[0] is not None]
    if not pairs:
        raise ValueError("this pipeline has no text encoder and tokenizer to load a textual inversion into")
    return pairs


def _token_embedding(encoder):
    return encoder.text_model.embeddings.token_embedding


def load_textual_inversion(pipe, pretrained_model_name_or_path, token=None, weight_name=None, allow_pickle=False,
                           subfolder=None, tokenizer=None, text_encoder=None):
    """Add one embedding (a file, folder, repo, state dict or tensor), or a list of them with a list of tokens.

    On SDXL an embedding with `clip_l` and `clip_g` goes into both encoders; `tokenizer=` and `text_encoder=`
    name one encoder instead (diffusers' two-call form, e.g. `state_dict["clip_g"]` into text_encoder_2).
    """
    sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) \
        else [pretrained_model_name_or_path]
    tokens = token if isinstance(token, list) else [token] * len(sources)
    if len(tokens) != len(sources):
        raise ValueError(f"{len(sources)} embeddings but {len(tokens)} tokens: pass one token per embedding")
    if (tokenizer is None) != (text_encoder is None):
        raise ValueError("pass both tokenizer= and text_encoder= (the pair to load into), or neither")
    pairs = [(tokenizer, text_encoder, None)] if tokenizer is not None else _pairs(pipe)

    plans, seen = [], set()  # (tokenizer, encoder, [names], (n, d) vectors, where), all checked before any change
    for source, tok in zip(sources, tokens):
        if isinstance(source, (dict, torch.Tensor)):
            where, state, stem = "the embedding state dict", source, None
        else:
            where = resolve_embedding_file(source, weight_name, subfolder)
            state, stem = read_embedding_file(where, allow_pickle), os.path.splitext(os.path.basename(where))[0]
        tok, vectors = vectors_of(state, where, tok, stem)
        if isinstance(vectors, dict) and pairs[0][2] is None:
            raise ValueError(f"{where}: an SDXL embedding (clip_l + clip_g) for {tok!r} with one text_encoder= "
                             "given: pass its state_dict['clip_l'] or state_dict['clip_g'] for that encoder")
        if isinstance(vectors, dict) and len(pairs) == 1 and pairs[0][2] == "clip_l":
            raise ValueError(f"{where}: an SDXL embedding (clip_l + clip_g) for {tok!r}, but this pipeline has one "
                             "text encoder (SD 1.x/2.x): load it into an SDXL pipeline")
        if not isinstance(vectors, dict) and len(pairs) > 1:
            raise ValueError(f"{where}: a single-encoder embedding (width {vectors.shape[1]}) for {tok!r}, but this "
                             "SDXL pipeline has two text encoders: SDXL embeddings hold clip_l and clip_g (or pass "
                             "tokenizer= and text_encoder= to load it into one encoder)")
        for tkz, enc, key in pairs:
            v = vectors[key] if isinstance(vectors, dict) else vectors
            names = [tok] + [f"{tok}_{i}" for i in range(1, v.shape[0])]
            width = _token_embedding(enc).embedding_dim
            if v.shape[1] != width:
                raise ValueError(f"{where}: the embedding of {tok!r}{f' ({key})' if key else ''} has width "
                                 f"{v.shape[1]}, but the text encoder's token embeddings have width {width} "
                                 "(an embedding made for another model?)")
            for name in names:
                if name in tkz.get_vocab() or (id(tkz), name) in seen:
                    raise ValueError(f"{where}: token {name!r} is already in the tokenizer's vocabulary: pass "
                                     "token=... with another name, or unload_textual_inversion() first")
                seen.add((id(tkz), name))
            plans.append((tkz, enc, names, v))

    for tkz, enc, names, v in plans:
        tkz.add_tokens(names)
        ids = tkz.convert_tokens_to_ids(names)
        emb = _token_embedding(enc)
        rows = max(max(ids) + 1, emb.num_embeddings)
        if rows > emb.num_embeddings:
            _resize(enc, rows)
        with torch.no_grad():
            emb.weight[ids] = v.to(emb.weight.device, emb.weight.dtype)
    return [names for _, _, names, _ in plans]


def _resize(encoder, rows, keep=None):
    """The token embedding grown to `rows` (new rows zero), or cut to the rows `keep` lists."""
    emb = _token_embedding(encoder)
    w = emb.weight.detach()
    if keep is not None:
        new = w[keep].clone()
    else:
        new = torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])
    emb.weight = nn.Parameter(new, requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = new.shape[0]
    encoder.config.vocab_size = new.shape[0]


def unload_textual_inversion(pipe, tokens=None, tokenizer=None, text_encoder=None):
    """Remove the textual inversion tokens (all, or those named, with their `_1`... vectors) and their rows."""
    pairs = [(tokenizer, text_encoder, None)] if tokenizer is not None else _pairs(pipe)
    wanted = None if tokens is None else [tokens] if isinstance(tokens, str) else list(tokens)
    for tkz, enc, _ in pairs:
        loaded = user_tokens(tkz)
        if wanted is None:
            gone = list(loaded)
        else:
            gone = [t for t in loaded if t in wanted or any(t.startswith(w + "_") and t[len(w) + 1:].isdigit()
                                                           for w in wanted)]
        if not gone:
            continue
        ids = set(tkz.convert_tokens_to_ids(gone))
        keep = [i for i in range(_token_embedding(enc).num_embeddings) if i not in ids]
        _resize(enc, None, keep)
        tkz.remove_tokens(gone)
