"""minidiff's CLIPTokenizer vs transformers' CLIPTokenizer (slow, what diffusers loads) and
CLIPTokenizerFast, on the real CLIP BPE vocabulary that open-clip-torch ships."""
import itertools
import os
import random

import pytest
import torch
import transformers

from minidiff.tokenizer import CLIPTokenizer
from utils import clip_bpe_files, write_tokenizer

BASE = [
    "a photo of an astronaut riding a horse on mars",
    "A majestic lion jumping from a big stone at night",
    "portrait of a woman, highly detailed, 8k, trending on artstation, by greg rutkowski",
    "(masterpiece:1.2), best quality, [lowres], {blurry}, ((cat))",
    "cyberpunk city street at night; neon signs & rain -- cinematic",
    "it's a dog's life, isn't it? we'll see, they've said, I'm sure you'd agree",
    "IT'S ALL CAPS, DON'T SHOUT",
    "numbers: 1234567890, 3.14159, -42, 1e-5, 2024/01/31, 50%",
    "email me@example.com or visit https://huggingface.co/models?sort=downloads#top",
    "café crème brûlée, naïve façade, jalapeño, smörgåsbord, Ærøskøbing",
    "Straße, İstanbul, ﬁne ﬀ ligatures, Ⅻ ① ² ½",
    "emoji 🐱🚀 🔥🔥 👍🏽 🇫🇷 ok ❤️",
    "quotes “curly” ‘single’ «guillemets» — dashes – and … ellipsis",
    "under_score snake_case CamelCase kebab-case dot.separated",
    "   leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs\nand\nnew\n\nlines\r\nwindows",
    "non-breaking\u00a0space, thin\u2009space, ideographic\u3000space, line\u2028separator",
    "!!! ??? ... ,,, ;;; ::: ''' \"\"\" ```",
    "wow!! hello! what?! yes!!!",
    "<|startoftext|>already has specials<|endoftext|>",
    "<|ENDOFTEXT|> upper-case special, x<|EndOfText|>y",
    "a<|endoftext|>b <|endoftext|><|endoftext|>",
    "tokens like </w> and <w> and <unk> and [PAD]",
    "math ∑∫√∞ ≠ ≤ ≥ ± × ÷ → ⇒ ∀∃",
    "русский текст, ελληνικά, עברית, العربية, हिन्दी, ไทย",
    "한국어 텍스트, にほんご カタカナ",
    "combining: e\u0301 a\u0300 n\u0303 o\u0308 (decomposed accents)",
    "x",
    "I",
    "'s 't 're 've 'm 'll 'd",
]
# where transformers' slow and fast tokenizers disagree (slow spaces CJK ideographs apart, drops
# control characters, lower-cases a final sigma in context); minidiff follows the slow one
SLOW_ONLY = [
    "中文字 漢字テスト 水墨画",
    "ΟΔΟΣ ΣΟΦΟΣ Σ",
    "control\x00chars\x07here\x1b[0m and \ufffd replacement",
    "zero\u200bwidth\u200djoiner\ufeffbom, family 👩\u200d👩\u200d👧",
    "private use \ue000 and soft\u00adhyphen",
    "!<|ENDOFTEXT|> upper-case special after punctuation",
]


def make_prompts():
    rng = random.Random(0)
    out = list(BASE)
    out += [p.upper() for p in BASE] + [p.title() for p in BASE[:10]]
    out += ["  ".join(p.split()) + "\n\n" for p in BASE[:10]]
    out += [p + suffix for p, suffix in itertools.product(BASE, ["!", "?!", ".", " :)", " 🙂", "!!!!", " 123"])]
    words = " ".join(BASE).split()
    for n in (1, 2, 5, 20, 60, 120):  # up to several times longer than 77 tokens
        for _ in range(4):
            out.append(" ".join(rng.choice(words) for _ in range(n)))
    chars = "aeiouxyz ,.!?'-0123456789éüßñ🙂\n\t"
    out += ["".join(rng.choice(chars) for _ in range(rng.randint(1, 60))) for _ in range(60)]
    out += [" ".join(BASE) * 3, "", " ", "\n", "!", "!!", "<|endoftext|>"]
    return out


PROMPTS = make_prompts()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A pipeline-style folder with tokenizer/ (pad <|endoftext|>) and tokenizer_2/ (pad "!")."""
    root = tmp_path_factory.mktemp("clip_repo")
    vocab, merges = clip_bpe_files()
    write_tokenizer(os.path.join(root, "tokenizer"), vocab, merges, "<|endoftext|>")
    write_tokenizer(os.path.join(root, "tokenizer_2"), vocab, merges, "!")
    return root


@pytest.fixture(scope="module")
def tokenizers(repo):
    out = {}
    for sub in ("tokenizer", "tokenizer_2"):
        out[sub] = (CLIPTokenizer.from_pretrained(repo, subfolder=sub),
                    transformers.CLIPTokenizer.from_pretrained(repo, subfolder=sub),
                    transformers.CLIPTokenizerFast.from_pretrained(repo, subfolder=sub))
    return out


SUBS = ["tokenizer", "tokenizer_2"]


@pytest.mark.parametrize("sub", SUBS)
def test_ids_match_transformers(tokenizers, sub):
    ours, slow, fast = tokenizers[sub]
    assert len(PROMPTS) > 300
    for p in PROMPTS + SLOW_ONLY:
        assert ours(p).input_ids == slow(p).input_ids, f"slow tokenizer differs on {p!r}"
    for p in PROMPTS:
        assert ours(p).input_ids == fast(p).input_ids, f"fast tokenizer differs on {p!r}"
    # the disagreements minidiff resolves the slow tokenizer's way are real (with pad "!", "!<|..."
    # is cut at the "!" by both)
    differ = [p for p in SLOW_ONLY if slow(p).input_ids != fast(p).input_ids]
    assert len(differ) == len(SLOW_ONLY) - (sub == "tokenizer_2")


@pytest.mark.parametrize("sub", SUBS)
def test_padding_and_truncation(tokenizers, sub):
    ours, slow, _ = tokenizers[sub]
    assert ours.model_max_length == slow.model_max_length == 77
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == \
        (slow.pad_token_id, slow.bos_token_id, slow.eos_token_id)
    assert ours.pad_token_id == (49407 if sub == "tokenizer" else 0)
    batch = PROMPTS[:40] + PROMPTS[-60:]
    o = ours(batch, padding="max_length", max_length=ours.model_max_length, truncation=True, return_tensors="pt")
    r = slow(batch, padding="max_length", max_length=slow.model_max_length, truncation=True, return_tensors="pt")
    assert o.input_ids.dtype == torch.long and o.input_ids.shape == (len(batch), 77)
    assert torch.equal(o.input_ids, r.input_ids) and torch.equal(o.attention_mask, r.attention_mask)
    long = o.input_ids[o.attention_mask.sum(1) == 77]
    assert len(long) > 0 and (long[:, -1] == ours.eos_token_id).all()  # truncation keeps eos last

    for kwargs in ({"padding": "longest"}, {"padding": True, "return_tensors": "pt"}, {"padding": False},
                   {"max_length": 10}, {"padding": "max_length", "max_length": 20, "truncation": True},
                   {"padding": "max_length", "max_length": 8}, {"truncation": True}):
        o, r = ours(batch, **kwargs), slow(batch, **kwargs)
        ids_o, ids_r = o["input_ids"], r["input_ids"]
        if torch.is_tensor(ids_r):
            assert torch.equal(ids_o, ids_r) and torch.equal(o.attention_mask, r.attention_mask), kwargs
        else:
            assert ids_o == ids_r and o.attention_mask == r.attention_mask, kwargs
    single = ours("a cat", padding="max_length", max_length=77)
    assert single.input_ids == slow("a cat", padding="max_length", max_length=77).input_ids
    assert isinstance(single.input_ids[0], int) and sum(single.attention_mask) == 4
    with pytest.raises(ValueError, match="different lengths cannot make one tensor"):
        ours(["a", "a b c"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"padding='maximum'"):
        ours("a", padding="maximum")


@pytest.mark.parametrize("sub", SUBS)
def test_decode(tokenizers, sub):
    ours, slow, _ = tokenizers[sub]
    ids = slow(PROMPTS[:60], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == slow.batch_decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours("a photo of a cat!").input_ids, skip_special_tokens=True) == \
        slow.decode(slow("a photo of a cat!").input_ids, skip_special_tokens=True)


def test_tokenizer_json_only(tmp_path, tokenizers):
    """A folder with only tokenizer.json (transformers 5 writes no vocab.json/merges.txt) loads alike."""
    ours, slow, fast = tokenizers["tokenizer_2"]
    fast.save_pretrained(tmp_path / "tok", legacy_format=False)
    assert not (tmp_path / "tok" / "vocab.json").exists() and (tmp_path / "tok" / "tokenizer.json").exists()
    from_json = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert from_json.pad_token_id == 0
    for p in PROMPTS[::3] + SLOW_ONLY:
        assert from_json(p).input_ids == slow(p).input_ids, p


def test_missing_files(tmp_path, repo):
    with pytest.raises(FileNotFoundError, match=r"need vocab.json and merges.txt, or tokenizer.json .*"
                                                r"subfolder='tokenizer'"):
        CLIPTokenizer.from_pretrained(repo)


@pytest.mark.parametrize("sub", SUBS)
def test_save_pretrained(tmp_path, tokenizers, sub):
    """Our saved folder reads back, in minidiff and in transformers, to the same tokenizer."""
    ours, slow, _ = tokenizers[sub]
    ours.save_pretrained(tmp_path / "saved")
    again = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path / "saved")
    assert again.pad_token_id == theirs.pad_token_id == slow.pad_token_id
    assert again.model_max_length == theirs.model_max_length == 77
    batch = PROMPTS[::4] + SLOW_ONLY
    kwargs = {"padding": "max_length", "max_length": 77, "truncation": True}
    expected = slow(batch, **kwargs).input_ids
    assert again(batch, **kwargs).input_ids == expected
    assert theirs(batch, **kwargs).input_ids == expected
