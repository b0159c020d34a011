"""Textual inversion against diffusers' load_textual_inversion: token ids, prompt embeddings, images; the
A1111 and SDXL file forms; loud errors; unload."""
import diffusers
import pytest
import torch
from safetensors.torch import save_file

from minidiff import StableDiffusionPipeline, StableDiffusionXLPipeline
from minidiff.textual_inversion import expand_prompt
from utils import assert_close, assert_same_image, build_sd, build_sdxl, gen

KW = dict(num_inference_steps=3, height=32, width=32, output_type="np")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd_ti"))
    build_sd(folder)
    return folder


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sdxl_ti"))
    build_sdxl(folder)
    return folder


def both(folder, xl=False):
    ref_cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    ref = ref_cls.from_pretrained(folder, **({} if xl else {"safety_checker": None}))
    ours = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_pretrained(folder)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


def vectors(n, width=32, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def test_diffusers_file_multi_vector_matches_diffusers(tmp_path, sd_folder):
    ref, ours = both(sd_folder)
    path = str(tmp_path / "learned_embeds.safetensors")
    save_file({"<cat-toy>": vectors(3)}, path)
    ref.load_textual_inversion(str(tmp_path))
    assert ours.load_textual_inversion(str(tmp_path)) == [["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]]
    prompt = "a <cat-toy> on a table"
    assert expand_prompt(prompt, ours.tokenizer) == ref.maybe_convert_prompt(prompt, ref.tokenizer)
    ids = ours.tokenizer(expand_prompt(prompt, ours.tokenizer)).input_ids
    assert ids == ref.tokenizer(ref.maybe_convert_prompt(prompt, ref.tokenizer)).input_ids
    assert len(ours.tokenizer) == len(ref.tokenizer)
    for a, b in zip(ours.encode_prompt(prompt, negative_prompt="<cat-toy>"),
                    ref.encode_prompt(prompt, "cpu", 1, True, negative_prompt="<cat-toy>")):
        assert_close(a, b, name="prompt embeddings")
    assert_same_image(ours(prompt, generator=gen(0), **KW).images, ref(prompt, generator=gen(0), **KW).images)
    # saved with the pipeline, the tokens and vectors come back (multi-vector expansion included)
    ours.save_pretrained(str(tmp_path / "saved"))
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "saved"))
    assert_close(again.encode_prompt(prompt)[0], ours.encode_prompt(prompt)[0], name="saved and reloaded")
    # a token no embedding defines is just text
    plain = ours.encode_prompt("a <dog-toy>", do_classifier_free_guidance=False)[0]
    assert_close(plain, ref.encode_prompt("a <dog-toy>", "cpu", 1, False)[0], name="unknown token")
    # unload: back to the base vocabulary and embeddings, as diffusers
    before = ref.text_encoder.get_input_embeddings().weight.shape[0] - 3
    ref.unload_textual_inversion()
    ours.unload_textual_inversion()
    assert len(ours.tokenizer) == len(ref.tokenizer) == before
    assert ours.text_encoder.text_model.embeddings.token_embedding.weight.shape[0] == before
    for a, b in zip(ours.encode_prompt(prompt), ref.encode_prompt(prompt, "cpu", 1, True)):
        assert_close(a, b, name="after unload")


def test_a1111_files_and_pickles(tmp_path, sd_folder):
    ref, ours = both(sd_folder)
    pt = str(tmp_path / "style.pt")
    torch.save({"string_to_param": {"*": vectors(2, seed=1)}, "string_to_token": {"*": 265}, "name": "mystyle",
                "step": 1000}, pt)
    with pytest.raises(ValueError, match="allow_pickle"):
        ours.load_textual_inversion(pt)
    ours.load_textual_inversion(pt, allow_pickle=True)  # the token is the embedding's name, as in diffusers
    ref.load_textual_inversion(pt)
    emb = str(tmp_path / "badhands.safetensors")
    save_file({"emb_params": vectors(1, seed=2)}, emb)
    ours.load_textual_inversion(emb)  # A1111's trigger word: the file name
    ref.load_textual_inversion(emb, token="badhands")
    prompt = "a portrait in mystyle, badhands"
    for a, b in zip(ours.encode_prompt(prompt), ref.encode_prompt(prompt, "cpu", 1, True)):
        assert_close(a, b, name="A1111 embeddings")
    ours.unload_textual_inversion("mystyle")  # by name, with its _1 vector
    assert "mystyle" not in ours.tokenizer.get_vocab() and "mystyle_1" not in ours.tokenizer.get_vocab()
    assert ours.tokenizer.convert_tokens_to_ids("badhands") == len(ours.tokenizer) - 1
    ref.unload_textual_inversion()
    ref.load_textual_inversion(emb, token="badhands")
    assert_close(ours.encode_prompt("badhands")[0], ref.encode_prompt("badhands", "cpu", 1, True)[0], name="kept one")


def test_sdxl_clip_l_and_clip_g_match_diffusers_two_calls(tmp_path, sdxl_folder):
    ref, ours = both(sdxl_folder, xl=True)
    state = {"clip_l": vectors(2, seed=3), "clip_g": vectors(2, seed=4)}
    path = str(tmp_path / "unaestheticXL.safetensors")
    save_file(state, path)
    ours.load_textual_inversion(path, token="unaestheticXL")
    ref.load_textual_inversion(state["clip_g"], token="unaestheticXL", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    ref.load_textual_inversion(state["clip_l"], token="unaestheticXL", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    prompt, negative = "a photo of a cat", "unaestheticXL, blurry"
    for tok_a, tok_b in ((ours.tokenizer, ref.tokenizer), (ours.tokenizer_2, ref.tokenizer_2)):
        assert tok_a(expand_prompt(negative, tok_a)).input_ids == tok_b(ref.maybe_convert_prompt(negative, tok_b)).input_ids
    for a, b in zip(ours.encode_prompt(prompt, negative_prompt=negative),
                    ref.encode_prompt(prompt, device="cpu", negative_prompt=negative)):
        assert_close(a, b, name="SDXL embeddings")
    assert_same_image(ours(prompt, negative_prompt=negative, generator=gen(0), **KW).images,
                      ref(prompt, negative_prompt=negative, generator=gen(0), **KW).images)


def test_loud_errors_name_file_and_token(tmp_path, sd_folder, sdxl_folder):
    _, ours = both(sd_folder)
    n = len(ours.tokenizer)
    wide = str(tmp_path / "wide.safetensors")
    save_file({"<wide>": vectors(1, width=48)}, wide)
    with pytest.raises(ValueError, match=r"wide\.safetensors.*'<wide>'.*width 48.*width 32"):
        ours.load_textual_inversion(wide)
    known = str(tmp_path / "known.safetensors")
    save_file({"cat</w>": vectors(1)}, known)
    with pytest.raises(ValueError, match=r"known\.safetensors.*'cat</w>' is already in the tokenizer"):
        ours.load_textual_inversion(known)
    xl = str(tmp_path / "xl.safetensors")
    save_file({"clip_l": vectors(1), "clip_g": vectors(1)}, xl)
    with pytest.raises(ValueError, match=r"xl\.safetensors.*SDXL embedding.*one text encoder"):
        ours.load_textual_inversion(xl, token="<xl>")
    ok = str(tmp_path / "ok.safetensors")
    save_file({"<ok>": vectors(1)}, ok)
    with pytest.raises(ValueError, match=r"'<ok>' is already"):  # a list is checked whole before any change
        ours.load_textual_inversion([ok, ok])
    assert len(ours.tokenizer) == n and ours.text_encoder.config.vocab_size == n  # nothing was added
    ours.load_textual_inversion(ok)
    with pytest.raises(ValueError, match=r"'<ok>' is already in the tokenizer"):
        ours.load_textual_inversion(ok)
    _, xl_pipe = both(sdxl_folder, xl=True)
    with pytest.raises(ValueError, match=r"ok\.safetensors.*single-encoder embedding.*'<ok>'.*two text encoders"):
        xl_pipe.load_textual_inversion(ok)
