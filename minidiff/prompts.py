"""Prompts as text encoders read them: plain text (diffusers' way) or A1111's long, weighted prompts.

Plain (the library's default, as diffusers): the prompt is tokenized, cut to the tokenizer's 77 tokens
(with a warning naming what was cut) and encoded once.

A1111 (`prompt_syntax="a1111"`, the CLI's default), as the AUTOMATIC1111 web UI reads a prompt:
  - weights: `(word)` x1.1, `((word))` x1.21, `(word:1.3)`, `[word]` /1.1, `\\(` `\\)` `\\[` `\\]` `\\\\` for
    the literal characters; an unclosed bracket weighs to the end of the prompt;
  - windows: the tokens are cut into windows of 75 (the tokenizer's model_max_length - 2), each encoded
    as its own 77-token sequence with its start and end tokens; `BREAK` closes a window early; a window
    that fills up within 20 tokens of a comma is cut after the comma instead (A1111's comma backtrack);
    a multi-vector textual inversion embedding is not split across two windows. The windows' hidden
    states are concatenated (77 x n tokens for the UNet's cross-attention); SDXL's pooled vector is the
    first window's; the negative prompt (or the shorter of the two) is padded with empty-prompt windows;
  - each token's hidden state is multiplied by its weight, then the window is rescaled so that its mean
    is what it was before weighting (A1111's "Original" emphasis);
  - A1111's extra-network tags (`<lora:name:0.8>`) are taken out of the text, with a warning: minidiff
    loads LoRAs with load_lora_weights, not from the prompt.
A prompt without weights that fits one window gives exactly the plain embedding.

Both read a loaded multi-vector textual inversion token `t` as `t t_1 ... t_n`, as diffusers does (`expand_prompt`).
"""
import logging
import re
import warnings

import torch

logger = logging.getLogger("minidiff")

SYNTAXES = (None, "plain", "a1111")
COMMA_BACKTRACK = 20  # A1111's default comma_padding_backtrack

# A1111's attention tokens: escapes, brackets, a ":weight)" closing, plain runs, a lone ":".
ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's <lora:name:weight>, <hypernet:...>
UP, DOWN = 1.1, 1 / 1.1


def check_syntax(prompt_syntax):
    if prompt_syntax not in SYNTAXES:
        raise ValueError(f"prompt_syntax={prompt_syntax!r}: use None or 'plain' (diffusers' plain text, cut at 77 "
                         "tokens) or 'a1111' (long prompts, (word:1.2) weights, BREAK)")
    return "a1111" if prompt_syntax == "a1111" else "plain"


def parse_prompt_attention(text):
    """[[text, weight], ...] of an A1111 prompt; a BREAK is the entry ["BREAK", -1].

    Neighbouring pieces of equal weight are merged; an empty prompt is [["", 1.0]].
    """
    pieces = []
    round_open, square_open = [], []

    def scale(start, m):
        for p in pieces[start:]:
            if p[1] != -1:  # a BREAK inside brackets stays a BREAK
                p[1] *= m

    for m in ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            scale(round_open.pop(), UP)
        elif token == "]" and square_open:
            scale(square_open.pop(), DOWN)
        else:  # plain text, or a bracket/weight with nothing to close: text as written
            for i, part in enumerate(BREAK.split(token)):
                if i:
                    pieces.append(["BREAK", -1])
                pieces.append([part, 1.0])
    for start in round_open:
        scale(start, UP)
    for start in square_open:
        scale(start, DOWN)

    merged = []
    for text_, w in pieces:
        if merged and merged[-1][1] == w and w != -1:
            merged[-1][0] += text_
        elif text_ or w == -1:
            merged.append([text_, w])
    return merged or [["", 1.0]]


def prompt_windows(tokenizer, text):
    """A1111's windows of a prompt: [(ids, weights)], each model_max_length (77) long: start, up to 75 tokens,
    end, padding."""
    tags = EXTRA_NETWORK.findall(text)
    if tags:
        warnings.warn(f"the prompt names A1111 extra networks ({', '.join(f'<{k}:{v}>' for k, v in tags)}): they are "
                      "left out of the prompt and not loaded (load LoRAs with load_lora_weights, or --lora)",
                      stacklevel=2)
        text = EXTRA_NETWORK.sub("", text)
    window = tokenizer.model_max_length - 2  # 75 for CLIP: the tokens of a window, without start and end
    comma = tokenizer.vocab.get(",</w>")  # A1111 cuts a full window after the last comma
    groups = embedding_lengths(tokenizer)
    windows, ids, weights = [], [], []
    last_comma = -1

    def close():
        nonlocal ids, weights, last_comma
        pad = window - len(ids)
        windows.append(([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
                        [1.0, *weights, 1.0] + [1.0] * pad))
        ids, weights, last_comma = [], [], -1

    for piece, w in parse_prompt_attention(text):
        if w == -1:
            close()
            continue
        for token in tokenizer.encode_plain(piece):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == window and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # the words after the last comma move to the next window
                moved_ids, moved_w = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved_ids, moved_w
            if len(ids) == window or (token in groups and len(ids) + groups[token] > window):
                close()  # a full window; or a multi-vector embedding that fits whole in the next one only
            ids.append(token)
            weights.append(w)
    if ids or not windows:
        close()
    return windows


# ---- textual inversion tokens in a prompt (loading them: textual_inversion.py) ------------------------
def user_tokens(tokenizer):
    """The tokens added beyond the tokenizer's vocabulary that are not special: textual inversion tokens
    (also after a save/load), in id order."""
    added, base = getattr(tokenizer, "added_tokens", {}), len(getattr(tokenizer, "vocab", ()))
    return [t for t, v in sorted(added.items(), key=lambda kv: kv[1]["id"]) if not v.get("special") and v["id"] >= base]


def expand_prompt(text, tokenizer):
    """diffusers' maybe_convert_prompt: each multi-vector token in `text` becomes `token token_1 ... token_n`."""
    added = set(user_tokens(tokenizer))
    if not any(t + "_1" in added for t in added):
        return text
    for token in set(tokenizer.tokenize(text)):
        if token in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            text = text.replace(token, replacement)
    return text


def embedding_lengths(tokenizer):
    """{id of a multi-vector textual inversion token: its number of vectors} (token, token_1, ...)."""
    loaded = set(user_tokens(tokenizer))
    out = {}
    for t in loaded:
        n = 1
        while f"{t}_{n}" in loaded:
            n += 1
        if n > 1:
            out[tokenizer.convert_tokens_to_ids(t)] = n
    return out


def pad_windows(batch_windows, tokenizer, n):
    """Each prompt's window list padded to `n` windows with the empty prompt's window."""
    empty = prompt_windows(tokenizer, "")[0]
    return [w + [empty] * (n - len(w)) for w in batch_windows]


def weigh(hidden, weights):
    """A1111's emphasis on one encoder's windows: hidden (W, 77, C) times per-token weights (W, 77), each
    window rescaled to its mean before weighting."""
    if bool((weights == 1).all()):
        return hidden
    weights = weights.to(hidden.device, hidden.dtype)
    before = hidden.float().mean(dim=(1, 2), keepdim=True)
    weighted = hidden * weights[..., None]
    after = weighted.float().mean(dim=(1, 2), keepdim=True)
    return (weighted.float() * (before / after)).to(hidden.dtype)


def encode_windows(encode, batch_windows):
    """Hidden states (B, 77 n, C) and the first window's pooled vector (B, P) or None.

    encode(ids (B n, 77)) -> (hidden (B n, 77, C), pooled (B n, P) or None); batch_windows: per prompt, n windows.
    """
    b, n = len(batch_windows), len(batch_windows[0])
    ids = torch.tensor([w[0] for ws in batch_windows for w in ws])
    weights = torch.tensor([w[1] for ws in batch_windows for w in ws])
    hidden, pooled = encode(ids)
    hidden = weigh(hidden, weights)
    hidden = hidden.reshape(b, n * hidden.shape[1], hidden.shape[2])
    if pooled is not None:
        pooled = pooled.reshape(b, n, -1)[:, 0]
    return hidden, pooled


def plain_ids(tokenizer, texts):
    """diffusers' plain prompt: ids padded/cut to model_max_length, with a warning naming what was cut."""
    limit = tokenizer.model_max_length
    for t in texts:
        ids = tokenizer.encode_plain(t)
        if len(ids) > limit - 2:
            cut = tokenizer.decode(ids[limit - 2:])
            warnings.warn(f"the prompt is longer than the {limit} tokens CLIP reads; this part was cut: {cut!r} "
                          "(prompt_syntax='a1111' encodes long prompts in windows)", stacklevel=4)
    return tokenizer(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids


def pad_to_same_length(cond, uncond, empty):
    """The shorter of cond/uncond (B, 77 n, C) padded with the empty prompt's window `empty` (1, 77, C)."""
    if uncond is None or cond.shape[1] == uncond.shape[1]:
        return cond, uncond

    def grow(x, length):
        extra = (length - x.shape[1]) // empty.shape[1]
        pad = empty.to(x.device, x.dtype).expand(x.shape[0], -1, -1).repeat(1, extra, 1)
        return torch.cat([x, pad], dim=1)

    length = max(cond.shape[1], uncond.shape[1])
    if cond.shape[1] % empty.shape[1] or uncond.shape[1] % empty.shape[1]:
        raise ValueError(f"prompt embeddings of {cond.shape[1]} and negative ones of {uncond.shape[1]} tokens "
                         f"cannot be padded to the same number of {empty.shape[1]}-token windows")
    return grow(cond, length), grow(uncond, length)


def warn_truncated(tokenizer, texts):
    """diffusers' warning for prompts longer than the text encoder's context: it names the dropped words."""
    limit = tokenizer.model_max_length
    removed = []
    for text in texts:
        ids = tokenizer(text, truncation=False).input_ids
        if len(ids) > limit:
            removed.append(tokenizer.decode(ids[limit - 1:-1]))
    if removed:
        logger.warning("The following part of your input was truncated because CLIP can only handle sequences up "
                       f"to {limit} tokens: {removed}")
