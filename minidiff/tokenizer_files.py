"""Tokenizer files checked as they are read: every error names the file and what in it is wrong.

vocab.json must map strings to distinct ids in [0, 2**24); merges.txt must hold pairs of tokens; special
tokens must be strings (or AddedToken dicts holding one); model_max_length must be a positive integer.
`check_fits` compares a tokenizer with the text encoder it feeds: every id it can produce must have a row
in the encoder's embedding, and its length must fit the encoder's position embeddings.

`read_tokenizer_files` is CLIPTokenizer.from_pretrained's reading of a folder or repo; `converted_fast` the
`tokenizers` pipeline transformers makes of vocab.json + merges.txt when a repo has no tokenizer.json.
"""
import os

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

from .errors import FileFormatError, TokenizerFileError
from .weights.hub import resolve_file
from .weights.safe import read_json_file

MAX_ID = 1 << 24
MAX_TOKENIZER_FILE = 64 << 20  # the largest tokenizer.json files published are ~35 MB
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def read_tokenizer_files(repo_or_path, subfolder, use_fast):
    """(vocab, merges, CLIPTokenizer options) from vocab.json + merges.txt (or tokenizer.json) and
    tokenizer_config.json / special_tokens_map.json / added_tokens.json: the added tokens, the special tokens,
    model_max_length and, with use_fast, the `tokenizers` pipeline of tokenizer.json (or one converted)."""
    repo_or_path = os.fspath(repo_or_path)

    def optional_json(name):
        path = resolve_file(repo_or_path, name, subfolder, required=False)
        if path is None:
            return None
        obj = read_json_file(path, max_bytes=MAX_TOKENIZER_FILE)
        if not isinstance(obj, dict):
            raise TokenizerFileError(f"{path}: a JSON object is needed, found {type(obj).__name__}")
        return obj

    config = optional_json("tokenizer_config.json") or {}
    vocab_path = resolve_file(repo_or_path, "vocab.json", subfolder, required=False)
    merges_path = resolve_file(repo_or_path, "merges.txt", subfolder, required=False)
    added = {}
    if vocab_path and merges_path:
        vocab = read_vocab(vocab_path)
        merges = read_merges(merges_path)  # checked line by line, naming the file (tokenizer_files.py)
    else:
        fast = optional_json("tokenizer.json")
        if fast is None:
            where = os.path.join(repo_or_path, subfolder or "")
            hint = "" if subfolder else " (for a pipeline repo pass subfolder='tokenizer' or 'tokenizer_2')"
            raise FileNotFoundError(f"no CLIP tokenizer in {where}: need vocab.json and merges.txt, "
                                    f"or tokenizer.json{hint}")
        model = fast.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"{os.path.join(repo_or_path, subfolder or '', 'tokenizer.json')}: model type "
                             f"{model.get('type')!r} is not a BPE model; CLIPTokenizer needs CLIP's BPE")
        fast_path = os.path.join(repo_or_path, subfolder or "", "tokenizer.json")
        vocab = check_vocab(model.get("vocab"), fast_path)
        merges = model.get("merges")
        if not isinstance(merges, list):
            raise TokenizerFileError(f"{fast_path}: model.merges must be a list")
        merges = check_merges([m.split() if isinstance(m, str) else m for m in merges], fast_path)
        for t in fast.get("added_tokens", []):
            added[t["content"]] = {"id": t["id"], "lstrip": t.get("lstrip", False),
                                   "rstrip": t.get("rstrip", False), "special": t.get("special", False)}

    if "added_tokens_decoder" in config:
        for tid, t in config["added_tokens_decoder"].items():
            added[t["content"]] = {"id": int(tid), "lstrip": t.get("lstrip", False),
                                   "rstrip": t.get("rstrip", False), "special": t.get("special", False)}
    else:
        # older repos: special_tokens_map.json overrides tokenizer_config.json, added_tokens.json lists extras
        config.update({k: v for k, v in (optional_json("special_tokens_map.json") or {}).items() if v})
        for content, tid in (optional_json("added_tokens.json") or {}).items():
            added[content] = {"id": tid, "lstrip": False, "rstrip": False, "special": False}

    specials = {}
    for key, default in zip(SPECIAL_KEYS, ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>")):
        check_special(config.get(key, default), key, tokenizer_where(repo_or_path, subfolder))
        content, lstrip, rstrip = _token_content(config.get(key, default))
        specials[key] = content
        if content is not None and content not in added and (lstrip or rstrip):
            added[content] = {"id": None, "lstrip": lstrip, "rstrip": rstrip, "special": True}
    for t in config.get("additional_special_tokens") or []:
        content, lstrip, rstrip = _token_content(t)
        if content in added:
            added[content]["special"] = True
        elif content is not None:
            added[content] = {"id": None, "lstrip": lstrip, "rstrip": rstrip, "special": True}
    # a limit-less tokenizer (transformers' huge default) is CLIP's context length in practice
    where = tokenizer_where(repo_or_path, subfolder)
    max_len = check_max_length(config.get("model_max_length"), where)
    fast = None
    if use_fast:
        path = resolve_file(repo_or_path, "tokenizer.json", subfolder, required=False)
        fast = Tokenizer.from_file(path) if path else converted_fast(vocab, merges, specials["unk_token"], {
            **{t: {"lstrip": False, "rstrip": False, "special": True} for t in specials.values() if t}, **added})
    return vocab, merges, dict(**specials, model_max_length=max_len, added_tokens=added,
                               padding_side=config.get("padding_side", "right"),
                               clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
                               fast=fast)


def _token_content(value):
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content"), bool(value.get("lstrip")), bool(value.get("rstrip"))
    return value, False, False


def converted_fast(vocab, merges, unk_token, added_tokens):
    """The `tokenizers` pipeline transformers builds from vocab.json + merges.txt for CLIPTokenizerFast when
    a repo has no tokenizer.json (its convert_slow_tokenizer.CLIPConverter), without the post-processor:
    the special tokens around the text are added by CLIPTokenizer.__call__."""
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False, unk_token=str(unk_token)))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.add_special_tokens([AddedToken(t, lstrip=v["lstrip"], rstrip=v["rstrip"], normalized=False, special=True)
                            for t, v in added_tokens.items() if v.get("special")])
    tok.add_tokens([AddedToken(t, lstrip=v["lstrip"], rstrip=v["rstrip"]) for t, v in added_tokens.items()
                    if not v.get("special")])
    return tok


def read_vocab(path):
    try:
        vocab = read_json_file(path, max_bytes=MAX_TOKENIZER_FILE)
    except FileFormatError as e:
        raise TokenizerFileError(str(e)) from e
    return check_vocab(vocab, path)


def check_vocab(vocab, where):
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerFileError(f"{where}: the vocabulary must be a non-empty JSON object {{token: id}}, found "
                                 f"{type(vocab).__name__}")
    for token, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < MAX_ID:
            raise TokenizerFileError(f"{where}: token {token[:40]!r} has id {i!r}; ids must be integers in [0, {MAX_ID})")
    if len(set(vocab.values())) != len(vocab):
        raise TokenizerFileError(f"{where}: several tokens share one id")
    return vocab


def read_merges(path):
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TOKENIZER_FILE + 1)
    except OSError as e:
        raise TokenizerFileError(f"{path} cannot be read: {e.strerror or e}") from e
    if len(raw) > MAX_TOKENIZER_FILE:
        raise TokenizerFileError(f"{path}: more than {MAX_TOKENIZER_FILE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerFileError(f"{path} is not UTF-8 (byte {e.start})") from None
    lines = text.strip().split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return check_merges([line.split() for line in lines if line.strip()], path)


def check_merges(merges, where):
    for n, m in enumerate(merges):
        if not isinstance(m, (list, tuple)) or len(m) != 2 or not all(isinstance(t, str) for t in m):
            raise TokenizerFileError(f"{where}: merge {n + 1} is {m!r}; each merge is two tokens")
    return [tuple(m) for m in merges]


def check_special(value, key, where):
    content = value.get("content") if isinstance(value, dict) else value
    if (content is not None or isinstance(value, dict)) and not isinstance(content, str):
        raise TokenizerFileError(f"{where}: {key}={value!r} must be a token string (or an AddedToken with 'content')")


def check_max_length(value, where):
    """model_max_length as read: a positive integer; None or transformers' 'no limit' (> 1e12) means 77."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1e12):
        return 77
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TokenizerFileError(f"{where}: model_max_length={value!r} must be a positive integer (CLIP: 77); "
                                 "0 would drop every prompt")
    return value


def check_fits(tokenizer, text_encoder, where):
    """Raise if `tokenizer` can produce ids or lengths that `text_encoder` has no embedding for."""
    cfg = getattr(text_encoder, "config", None)
    vocab_size = getattr(cfg, "vocab_size", None)
    if vocab_size is None or not hasattr(tokenizer, "vocab"):
        return
    top = max(list(tokenizer.vocab.values()) + [v["id"] for v in tokenizer.added_tokens.values()])
    if top >= vocab_size:
        token = next((t for t, i in tokenizer.vocab.items() if i == top), None) or next(
            t for t, v in tokenizer.added_tokens.items() if v["id"] == top)
        raise TokenizerFileError(f"{where}: the tokenizer's token {token[:40]!r} has id {top}, beyond the text "
                                 f"encoder's vocabulary of {vocab_size} ids: a tokenizer of another model?")
    positions = getattr(cfg, "max_position_embeddings", None)
    if positions is not None and tokenizer.model_max_length > positions:
        raise TokenizerFileError(f"{where}: model_max_length={tokenizer.model_max_length} is more than the text "
                                 f"encoder's {positions} positions")


def tokenizer_where(repo_or_path, subfolder):
    return os.path.join(os.fspath(repo_or_path), subfolder or "")


PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("prior_tokenizer", "prior_text_encoder"))


def check_tokenizers_fit(components, where):
    """check_fits for each tokenizer / text encoder pair of a pipeline's components."""
    for tok, enc in PAIRS:
        if components.get(tok) is not None and components.get(enc) is not None:
            check_fits(components[tok], components[enc], f"{where} ({tok} / {enc})")
