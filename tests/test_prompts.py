"""Long and weighted prompts (minidiff/prompts.py): A1111's parser examples, windows against a hand-built
reference from minidiff's own text encoder calls, compel for long unweighted prompts, and the pipelines."""
import copy
import warnings

import pytest
import torch

from minidiff import StableDiffusionPipeline, StableDiffusionXLPipeline
from minidiff.prompts import parse_prompt_attention, prompt_windows
from utils import assert_close, assert_same_image, build_sd, build_sdxl, gen

# A1111's documented examples (modules/prompt_parser.py docstring), then BREAK as its parser gives it.
A1111_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
    ("hello BREAK world", [["hello", 1.0], ["BREAK", -1], ["world", 1.0]]),
    ("((word))", [["word", 1.1 * 1.1]]),
    ("[word]", [["word", 1 / 1.1]]),
    ("(word:1.3)", [["word", 1.3]]),
    ("a \\(b\\) \\\\ c", [["a (b) \\ c", 1.0]]),
    ("", [["", 1.0]]),
]

WORDS = ("red blue green cat dog house tree river hill sky sun moon star boat car road bird fish city "
         "night day snow rain wind fire").split()


def long_prompt(n, start=0):
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


@pytest.mark.parametrize("text,expected", A1111_EXAMPLES)
def test_parser_matches_a1111_examples(text, expected):
    got = parse_prompt_attention(text)
    assert [p[0] for p in got] == [p[0] for p in expected]
    assert [p[1] for p in got] == pytest.approx([p[1] for p in expected], rel=1e-12)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd_prompts"))
    ref = build_sd(folder)
    ours = StableDiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ref, ours


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sdxl_prompts"))
    ref = build_sdxl(folder)
    ours = StableDiffusionXLPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return ref, ours


def hand_windows(tok, ids):
    """Reference windows: 75 ids each, with start and end tokens, padded with the pad token."""
    out = []
    for i in range(0, max(len(ids), 1), 75):
        chunk = ids[i:i + 75]
        out.append([tok.bos_token_id, *chunk, tok.eos_token_id] + [tok.pad_token_id] * (75 - len(chunk)))
    return torch.tensor(out)


def test_windows_and_weights_against_a_hand_built_reference(sd):
    _, ours = sd
    tok, te = ours.tokenizer, ours.text_encoder
    text = long_prompt(100)
    ids = tok.encode_plain(text)
    assert len(ids) == 100
    # unweighted: two windows, hidden states concatenated
    ref = te(hand_windows(tok, ids))[0].reshape(1, 2 * 77, -1)
    assert_close(ours.encode_prompt(text, prompt_syntax="a1111")[0], ref, name="long prompt")
    # weighted: words 3..5 at 1.5, word 80 at 1/1.1; each window scaled, then its mean restored
    words = text.split()
    weighted = " ".join(words[:3]) + " (" + " ".join(words[3:6]) + ":1.5) " + " ".join(words[6:80]) + \
        " [" + words[80] + "] " + " ".join(words[81:])
    w = torch.ones(2, 77)
    w[0, 1 + 3:1 + 6] = 1.5
    w[1, 1 + 80 - 75] = 1 / 1.1
    h = te(hand_windows(tok, ids))[0]
    scaled = h * w[..., None]
    scaled = scaled * (h.mean(dim=(1, 2), keepdim=True) / scaled.mean(dim=(1, 2), keepdim=True))
    assert_close(ours.encode_prompt(weighted, prompt_syntax="a1111")[0], scaled.reshape(1, 154, -1), name="weights")
    # the negative prompt is padded with windows of the empty prompt
    cond, uncond = ours.encode_prompt(text, negative_prompt="blurry", prompt_syntax="a1111")
    assert cond.shape == uncond.shape == (1, 154, h.shape[-1])
    empty = te(hand_windows(tok, []))[0]
    assert_close(uncond[:, 77:], empty, name="padding window")
    assert_close(uncond[:, :77], te(hand_windows(tok, tok.encode_plain("blurry")))[0], name="negative window")


def test_batches_pad_to_the_longest_prompt(sd, sdxl):
    _, ours = sd
    te, tok = ours.text_encoder, ours.tokenizer
    cond, uncond = ours.encode_prompt(["a cat", long_prompt(100)], num_images_per_prompt=2,
                                      negative_prompt=["fog", "rain"], prompt_syntax="a1111")
    assert cond.shape == uncond.shape == (4, 154, 32)
    assert_close(cond[1, 77:], te(hand_windows(tok, []))[0][0], name="batch padding window")
    assert_close(cond[2], te(hand_windows(tok, tok.encode_plain(long_prompt(100))))[0].reshape(154, -1), name="row")
    _, xl = sdxl  # prompt_2 longer than prompt: both encoders get its number of windows
    c, n, p, _ = xl.encode_prompt("a cat", prompt_2=long_prompt(160), negative_prompt="fog", prompt_syntax="a1111")
    assert c.shape == n.shape == (1, 231, 64) and p.shape == (1, 32)


def test_break_and_comma_backtrack(sd):
    _, ours = sd
    tok = ours.tokenizer
    short = copy.copy(tok)  # a tokenizer (and text encoder) of 20 positions, as the bundled model has: 18 a window
    short.model_max_length = 20
    windows = prompt_windows(short, long_prompt(30))
    assert [len(w[0]) for w in windows] == [20, 20] and windows[1][0][1:13] == tok.encode_plain(long_prompt(30))[18:]
    windows = prompt_windows(tok, "a red cat BREAK a blue dog")
    assert len(windows) == 2
    assert windows[1][0][:5] == [tok.bos_token_id, *tok.encode_plain("a blue dog"), tok.eos_token_id]
    # 70 words, a comma, 10 more: the window fills within 20 tokens of the comma and is cut after it
    text = long_prompt(70) + ", " + long_prompt(10, start=3)
    (first, _), (second, _) = prompt_windows(tok, text)
    assert first[71] == tok.get_vocab()[",</w>"] and first[72] == tok.eos_token_id
    assert second[1:11] == tok.encode_plain(long_prompt(10, start=3))


def test_a_multi_vector_embedding_is_not_split_across_windows(tmp_path, sd):
    from safetensors.torch import save_file
    from minidiff.textual_inversion import expand_prompt
    _, ours = sd
    tok = ours.tokenizer
    save_file({"<style>": torch.randn(3, 32)}, str(tmp_path / "learned_embeds.safetensors"))
    ours.load_textual_inversion(str(tmp_path))
    try:
        words = long_prompt(74)
        first, second = prompt_windows(tok, expand_prompt(words + " <style> cat", tok))
        assert first[0][1:76] == [*tok.encode_plain(words), tok.eos_token_id]  # closed after 74 tokens
        assert second[0][1:5] == [*tok.convert_tokens_to_ids(["<style>", "<style>_1", "<style>_2"]),
                                  *tok.encode_plain("cat")]
    finally:
        ours.unload_textual_inversion()


def test_extra_network_tags_are_taken_out_with_a_warning(sd):
    tok = sd[1].tokenizer
    with pytest.warns(UserWarning, match=r"<lora:detail:0.6>.*not loaded"):
        windows = prompt_windows(tok, "a cat <lora:detail:0.6>, (sunset:1.2)")
    assert windows == prompt_windows(tok, "a cat , (sunset:1.2)")


def test_short_unweighted_prompt_is_the_plain_embedding(sd, sdxl):
    ref, ours = sd
    a = ours.encode_prompt("a castle on a hill", negative_prompt="fog", prompt_syntax="a1111")
    b = ref.encode_prompt("a castle on a hill", "cpu", 1, True, negative_prompt="fog")
    for x, y in zip(a, b):
        assert_close(x, y, name="sd")
    ref, ours = sdxl
    a = ours.encode_prompt("a castle on a hill", negative_prompt="fog", prompt_syntax="a1111")
    b = ref.encode_prompt("a castle on a hill", device="cpu", negative_prompt="fog")
    for x, y in zip(a, b):
        assert_close(x, y, name="sdxl")


def test_plain_prompts_are_cut_at_77_with_a_warning(sd):
    ref, ours = sd
    text = long_prompt(90)
    with pytest.warns(UserWarning, match="cut"):
        a = ours.encode_prompt(text, do_classifier_free_guidance=False)[0]
    assert_close(a, ref.encode_prompt(text, "cpu", 1, False)[0], name="truncated prompt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.encode_prompt("a short prompt", do_classifier_free_guidance=False)
    with pytest.raises(ValueError, match="prompt_syntax"):
        ours.encode_prompt("x", prompt_syntax="compel")


def test_long_prompts_match_compel_and_diffusers_image(sd):
    from compel import Compel
    from compel.embeddings_provider import SplitLongTextMode
    ref, ours = sd
    text, negative = long_prompt(120), "blurry"
    compel = Compel(tokenizer=ref.tokenizer, text_encoder=ref.text_encoder, truncate_long_prompts=False,
                    split_long_text_mode=SplitLongTextMode.BRUTAL)
    c, n = compel.pad_conditioning_tensors_to_same_length([compel(text), compel(negative)])
    mine, mine_neg = ours.encode_prompt(text, negative_prompt=negative, prompt_syntax="a1111")
    assert mine.shape == c.shape == (1, 154, c.shape[-1])
    assert_close(mine, c, name="compel prompt")
    assert_close(mine_neg, n, name="compel negative")
    kw = dict(num_inference_steps=3, height=32, width=32, output_type="np")
    a = ours(text, negative_prompt=negative, prompt_syntax="a1111", generator=gen(0), **kw).images
    b = ref(prompt_embeds=c, negative_prompt_embeds=n, generator=gen(0), **kw).images
    assert_same_image(a, b)


def test_sdxl_windows_pooled_from_the_first(sdxl):
    _, ours = sdxl
    text = long_prompt(80) + " (" + long_prompt(3) + ":1.2)"
    cond, uncond, pooled, neg_pooled = ours.encode_prompt(text, negative_prompt="fog", prompt_syntax="a1111")
    assert cond.shape == uncond.shape == (1, 154, 64)
    ids = ours.tokenizer.encode_plain(long_prompt(80) + " " + long_prompt(3))
    parts, pooled_ref = [], None
    for tok, enc in ((ours.tokenizer, ours.text_encoder), (ours.tokenizer_2, ours.text_encoder_2)):
        out = enc(hand_windows(tok, ids), output_hidden_states=True)
        h = out.hidden_states[-2]
        w = torch.ones(2, 77)
        w[1, 1 + 80 - 75:1 + 83 - 75] = 1.2
        s = h * w[..., None]
        parts.append((s * (h.mean(dim=(1, 2), keepdim=True) / s.mean(dim=(1, 2), keepdim=True))).reshape(1, 154, -1))
        if out[0].ndim == 2:
            pooled_ref = out[0][:1]
    assert_close(cond, torch.cat(parts, dim=-1), name="sdxl windows")
    assert_close(pooled, pooled_ref, name="pooled from the first window")
    image = ours(text, prompt_syntax="a1111", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=gen(0)).images
    assert image.shape == (1, 32, 32, 3)
