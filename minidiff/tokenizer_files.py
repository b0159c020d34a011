"""Tokenizer files checked as they are read: every error names the file and what in it is wrong.

vocab.json must map strings to distinct ids in [0, 2**24); merges.txt must hold pairs of tokens; special
tokens must be strings (or AddedToken dicts holding one); model_max_length must be a positive integer.
`check_fits` compares a tokenizer with the text encoder it feeds: every id it can produce must have a row
in the encoder's embedding, and its length must fit the encoder's position embeddings.
"""
import os

from .errors import FileFormatError, TokenizerFileError
from .weights.safe import read_json_file

MAX_ID = 1 << 24
MAX_TOKENIZER_FILE = 64 << 20  # the largest tokenizer.json files published are ~35 MB


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
