"""CLIP's byte-level BPE tokenizer, read from a Hub repo's tokenizer/ folder.

It gives the ids of transformers' CLIPTokenizer, the Python tokenizer diffusers pipelines load, on
the path it takes when ftfy is not installed:

  1. the raw text is cut at the added tokens (<|startoftext|>, <|endoftext|>, the pad token, ...);
  2. each piece between them is cleaned: control characters dropped, whitespace unified, CJK
     ideographs spaced apart, NFC-normalised, lower-cased;
  3. CLIP's regex splits it into words (runs of letters, single digits, runs of other symbols,
     English contractions), each word's UTF-8 bytes are mapped to printable characters and
     BPE-merged with `</w>` marking the word's end;
  4. <|startoftext|> ... <|endoftext|> around it, truncation, padding.

Steps 1, 2 and 4 are plain Python; the regex and the BPE merges run in the `tokenizers` library.

`CLIPTokenizerFast` (what model_index.json names for the Würstchen repos, which ship `tokenizer.json`)
gives the ids of transformers' CLIPTokenizerFast instead: steps 1-3 are the `tokenizers` pipeline of
tokenizer.json (or, without one, the pipeline transformers converts vocab.json + merges.txt into). It
differs from the slow rules on CJK text (no spacing of ideographs), control characters and accents.
"""
import json
import os
import re
import unicodedata
from functools import lru_cache

from tokenizers import Regex, models, pre_tokenizers

from .errors import MinidiffError, TokenizerFileError
from .tokenizer_files import read_merges, read_tokenizer_files, read_vocab, tokenizer_where
from .weights.config import AttrDict

# Words as CLIP cuts them. The two special tokens are kept whole when cleaning makes them appear
# (e.g. "<|ENDOFTEXT|>" lower-cased); the contractions are matched case-insensitively.
WORD_PATTERN = r"""(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
INLINE_SPECIALS = ("<|startoftext|>", "<|endoftext|>")

# CLIP's BPE was trained on at most 49152 tokens: 256 bytes x 2 (with/without </w>), the merges, 2 specials.
MAX_MERGES = 49152 - 256 - 2


def byte_to_char():
    """GPT-2's reversible map of the 256 byte values to printable unicode characters.

    Printable latin-1 bytes stand for themselves; the others (controls, space, soft hyphen...) are
    moved to code points 256 and up, in byte order, so that no BPE symbol is whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _is_cjk(cp):
    # CJK Unified Ideographs and their extensions / compatibility blocks (BERT's definition)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def clean_text(text):
    """transformers' ftfy-less cleanup: what CLIP's BPE sees of a piece of raw text."""
    out = []
    for ch in text:
        if ch in "\t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif ch in "\x00\ufffd" or unicodedata.category(ch).startswith("C"):
            continue  # control, format, unassigned, private-use characters are dropped
        elif _is_cjk(ord(ch)):
            out.append(f" {ch} ")  # each ideograph is its own word
        else:
            out.append(ch)
    text = unicodedata.normalize("NFC", "".join(out))
    # str.split() also splits on the non-Zs whitespace (line separators); whole words are lower-cased
    # so that Greek final sigma comes out as Python's str.lower gives it
    return " ".join(text.split()).lower()


class BatchEncoding(AttrDict):
    """{"input_ids": ..., "attention_mask": ...} whose keys also read as attributes, as in transformers."""


class CLIPTokenizer:
    use_fast = False  # CLIPTokenizerFast: tokenize with tokenizer.json's pipeline (see the module docstring)

    def __init__(self, vocab_file, merges_file, errors="replace", unk_token="<|endoftext|>",
                 bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                 model_max_length=77, added_tokens=None, padding_side="right", clean_up_tokenization_spaces=False,
                 fast=None):
        """vocab_file, merges_file: the paths of vocab.json and merges.txt, as transformers'
        CLIPTokenizer(vocab_file, merges_file, ...) takes them, or already read: {token: id} and
        [(left, right)] by rank. added_tokens: {content: {"id", "lstrip", "rstrip", "special"}} for tokens cut
        out of the raw text before cleanup (the special tokens are added to it). Bytes that are not UTF-8
        decode as U+FFFD (transformers' errors="replace", the only mode). `fast`: a `tokenizers.Tokenizer`
        (tokenizer.json) that then does steps 1-3."""
        if errors != "replace":
            raise ValueError(f"CLIPTokenizer: errors={errors!r} is not supported (only 'replace')")
        vocab = read_vocab(vocab_file) if isinstance(vocab_file, (str, os.PathLike)) else vocab_file
        merges = read_merges(merges_file) if isinstance(merges_file, (str, os.PathLike)) else merges_file
        self._fast = fast
        if fast is not None:  # its own truncation/padding settings would cut the text before ours
            fast.no_truncation()
            fast.no_padding()
        self.vocab = dict(vocab)
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.merges = [tuple(m) for m in merges][:MAX_MERGES]
        self._bpe = models.BPE(vocab=self.vocab, merges=self.merges, unk_token=unk_token, end_of_word_suffix="</w>",
                               continuing_subword_prefix="", fuse_unk=False)
        self._splitter = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True)

        self.added_tokens = {k: dict(v) for k, v in (added_tokens or {}).items()}
        for tok in (bos_token, eos_token, unk_token, pad_token):
            if tok is not None:
                entry = self.added_tokens.setdefault(tok, {"id": None, "lstrip": False, "rstrip": False})
                entry["special"] = True
        # tokens missing from the vocabulary get the next free ids, as transformers appends them
        next_id = max([len(self.vocab)] + [v["id"] + 1 for v in self.added_tokens.values() if v["id"] is not None])
        for tok, entry in self.added_tokens.items():
            if entry["id"] is None:
                entry["id"] = self.vocab.get(tok)
            if entry["id"] is None:
                entry["id"], next_id = next_id, next_id + 1
        self._index_added()
        self._word_ids = lru_cache(maxsize=65536)(self._word_ids_uncached)

    def _index_added(self):
        self.special_tokens = {t for t, v in self.added_tokens.items() if v.get("special")}
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.id_to_token.update({v["id"]: t for t, v in self.added_tokens.items()})
        # longest first, so that a token containing another one wins
        names = sorted(self.added_tokens, key=len, reverse=True)
        self._added_split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")") if names else None

    def add_tokens(self, tokens):
        """Add tokens cut out of the raw text whole (textual inversion), each with the next free id, as
        transformers' add_tokens; returns how many were new."""
        new = [t for t in dict.fromkeys(tokens) if t not in self.added_tokens and t not in self.vocab]
        for t in new:
            self.added_tokens[t] = {"id": max(self.id_to_token) + 1, "lstrip": False, "rstrip": False, "special": False}
            self.id_to_token[self.added_tokens[t]["id"]] = t
        self._index_added()
        return len(new)

    def remove_tokens(self, tokens):
        """Remove added (non-special) tokens; the added tokens after them move down to keep the ids dense."""
        gone = sorted(self.added_tokens.pop(t)["id"] for t in tokens)
        for v in self.added_tokens.values():
            v["id"] -= sum(g < v["id"] for g in gone)
        self._index_added()

    # ---- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, repo_or_path, subfolder=None, use_fast=None):
        """Read vocab.json + merges.txt (or tokenizer.json) and tokenizer_config.json /
        special_tokens_map.json from a local folder or a Hub repo (e.g. subfolder="tokenizer_2").
        use_fast (default: the class's; True for CLIPTokenizerFast) tokenizes as transformers' fast tokenizer.
        Malformed files raise TokenizerFileError naming the file or folder (tokenizer_files.py)."""
        try:
            return cls._from_files(repo_or_path, subfolder, use_fast)
        except (MinidiffError, FileNotFoundError):
            raise
        except Exception as e:  # a malformed entry in the config files, or the BPE library refusing them
            where = tokenizer_where(repo_or_path, subfolder)
            raise TokenizerFileError(f"{where}: the tokenizer files do not make a tokenizer "
                                     f"({type(e).__name__}: {e})") from e

    @classmethod
    def _from_files(cls, repo_or_path, subfolder=None, use_fast=None):
        vocab, merges, options = read_tokenizer_files(repo_or_path, subfolder,
                                                      cls.use_fast if use_fast is None else use_fast)
        return cls(vocab, merges, **options)

    def save_pretrained(self, folder):
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, the files
        transformers' CLIPTokenizer reads too."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                    "pad_token": self.pad_token}
        added = {str(v["id"]): {"content": t, "lstrip": v["lstrip"], "rstrip": v["rstrip"], "normalized": False,
                                "single_word": False, "special": bool(v.get("special"))}
                 for t, v in sorted(self.added_tokens.items(), key=lambda kv: kv[1]["id"])}
        config = {"tokenizer_class": "CLIPTokenizer", **specials, "added_tokens_decoder": added,
                  "model_max_length": self.model_max_length, "padding_side": self.padding_side,
                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces, "errors": "replace"}
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump(specials, f, indent=2, ensure_ascii=False)
        if self._fast is not None:
            self._fast.save(os.path.join(folder, "tokenizer.json"))

    # ---- ids -------------------------------------------------------------------------------------

    bos_token_id = property(lambda self: self._special_id(self.bos_token))
    eos_token_id = property(lambda self: self._special_id(self.eos_token))
    pad_token_id = property(lambda self: self._special_id(self.pad_token))
    unk_token_id = property(lambda self: self._special_id(self.unk_token))

    def _special_id(self, token):
        return None if token is None else self.added_tokens[token]["id"]

    @property
    def all_special_ids(self):
        return sorted({self.added_tokens[t]["id"] for t in self.special_tokens})

    @property
    def vocab_size(self):
        return len(self.vocab)

    def __len__(self):
        return len(set(self.vocab.values()) | {v["id"] for v in self.added_tokens.values()})

    def get_vocab(self):
        return {**self.vocab, **{t: v["id"] for t, v in self.added_tokens.items()}}

    def _word_ids_uncached(self, word):
        if word in INLINE_SPECIALS and word in self.vocab:
            return (self.vocab[word],)
        symbols = "".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8"))
        return tuple(t.id for t in self._bpe.tokenize(symbols))

    def _split_added(self, text):
        """Raw text -> [(piece, is_added_token)], honouring an added token's lstrip/rstrip."""
        if self._added_split is None:
            return [(text, False)]
        parts = self._added_split.split(text)
        out = []
        for i, part in enumerate(parts):
            if i % 2 == 1:
                out.append((part, True))
                continue
            if i > 0 and self.added_tokens[parts[i - 1]]["rstrip"]:
                part = part.lstrip()
            if i + 1 < len(parts) and self.added_tokens[parts[i + 1]]["lstrip"]:
                part = part.rstrip()
            out.append((part, False))
        return out

    def encode_plain(self, text):
        """Ids of `text` without <|startoftext|> / <|endoftext|> around it."""
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        ids = []
        for piece, is_added in self._split_added(text):
            if is_added:
                ids.append(self.added_tokens[piece]["id"])
            elif piece:
                for word, _ in self._splitter.pre_tokenize_str(clean_text(piece)):
                    ids.extend(self._word_ids(word))
        return ids

    def tokenize(self, text):
        return [self.id_to_token[i] for i in self.encode_plain(text)]

    def convert_tokens_to_ids(self, tokens):
        def one(t):
            return self.added_tokens[t]["id"] if t in self.added_tokens else self.vocab.get(t, self.unk_token_id)
        return one(tokens) if isinstance(tokens, str) else [one(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        return self.id_to_token.get(ids) if isinstance(ids, int) else [self.id_to_token.get(int(i)) for i in ids]

    def encode(self, text, add_special_tokens=True):
        ids = self.encode_plain(text)
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def __call__(self, text, padding=False, truncation=None, max_length=None, return_tensors=None,
                 add_special_tokens=True, return_attention_mask=True):
        """Tokenize a string or a list of strings, as transformers' tokenizer(...) does.

        padding: False / "do_not_pad", True / "longest", or "max_length" (max_length or model_max_length).
        truncation: True cuts each sequence to max_length (or model_max_length), keeping
        <|endoftext|> last; None truncates only when max_length is given without padding.
        return_tensors: None (lists) or "pt" (int64 tensors of shape (batch, length)).
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"CLIPTokenizer: text must be a str or a list of str, got {type(text).__name__}")
        padding = {True: "longest", False: None, "do_not_pad": None}.get(padding, padding)
        if padding not in (None, "longest", "max_length"):
            raise ValueError(f"CLIPTokenizer: padding={padding!r}; use False, True, 'longest' or 'max_length'")
        if truncation is None:
            truncation = max_length is not None and padding is None
        elif truncation not in (True, False, "longest_first", "only_first", "do_not_truncate"):
            raise ValueError(f"CLIPTokenizer: truncation={truncation!r}; use True or False")
        truncation = truncation not in (False, "do_not_truncate")
        limit = max_length if max_length is not None else self.model_max_length

        n_special = 2 if add_special_tokens else 0
        batch = []
        for t in texts:
            ids = self.encode_plain(t)
            if truncation:
                ids = ids[:max(limit - n_special, 0)]
            batch.append([self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids)
        masks = [[1] * len(ids) for ids in batch]

        target = {"longest": max((len(ids) for ids in batch), default=0), "max_length": limit}.get(padding)
        if target is not None:
            if self.pad_token_id is None:
                raise ValueError("CLIPTokenizer: padding was asked for but this tokenizer has no pad token")
            for ids, mask in zip(batch, masks):
                n = target - len(ids)
                if n > 0:
                    left = self.padding_side == "left"
                    ids[:] = [self.pad_token_id] * n + ids if left else ids + [self.pad_token_id] * n
                    mask[:] = [0] * n + mask if left else mask + [0] * n

        if return_tensors == "pt":
            import torch
            if len({len(ids) for ids in batch}) > 1:
                raise ValueError("CLIPTokenizer: sequences of different lengths cannot make one tensor; "
                                 "pass padding='longest' or padding='max_length'")
            input_ids, attention_mask = torch.tensor(batch, dtype=torch.long), torch.tensor(masks, dtype=torch.long)
        elif return_tensors is None:
            input_ids, attention_mask = (batch[0], masks[0]) if single else (batch, masks)
        else:
            raise ValueError(f"CLIPTokenizer: return_tensors={return_tensors!r}; use None or 'pt'")
        out = BatchEncoding(input_ids=input_ids)
        if return_attention_mask:
            out["attention_mask"] = attention_mask
        return out

    # ---- decoding --------------------------------------------------------------------------------

    def _symbols_to_text(self, tokens):
        data = bytearray(CHAR_TO_BYTE[c] for c in "".join(tokens) if c in CHAR_TO_BYTE)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        """Text of `ids` (best effort: word boundaries come back as single spaces, case is lost)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        parts, run = [], []
        for i in ids:
            tok = self.id_to_token.get(int(i))
            if tok is None or (skip_special_tokens and tok in self.special_tokens):
                continue
            if tok in self.added_tokens and tok not in self.special_tokens:
                # user-added tokens are not byte-mapped: decode the run before them and keep them whole
                if run:
                    text = self._symbols_to_text(run)
                    if text:
                        parts.append(text)
                    run = []
                parts.append(tok)
            else:
                run.append(tok)
        if run:
            parts.append(self._symbols_to_text(run))
        text = " ".join(parts)
        cleanup = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if cleanup:
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]


class CLIPTokenizerFast(CLIPTokenizer):
    """transformers' CLIPTokenizerFast: the ids of tokenizer.json's `tokenizers` pipeline (Würstchen repos)."""
    use_fast = True
