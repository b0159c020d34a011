"""Würstchen v2 prior, decoder and combined pipelines against diffusers 0.39 on tiny seeded models
saved in the Hub layout (fast tokenizers, the "wuerstchen" library name, the decoder repo's model card
naming the prior repo)."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from diffusers import DDPMWuerstchenScheduler as RefScheduler
from diffusers import WuerstchenCombinedPipeline as RefCombined
from diffusers import WuerstchenDecoderPipeline as RefDecoderPipe
from diffusers import WuerstchenPriorPipeline as RefPriorPipe
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel as RefVQ
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext import WuerstchenDiffNeXt as RefDiffNeXt
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior import WuerstchenPrior as RefPrior

import minidiff.pipelines.wuerstchen as wpipe
from minidiff.pipelines.wuerstchen import (DEFAULT_STAGE_C_TIMESTEPS, WuerstchenCombinedPipeline,
                                           WuerstchenDecoderPipeline, WuerstchenPriorPipeline)
from tests.utils import assert_close, conditioned_, seeded_

MAX_LEN = 16
WORDS = "a photo of cat dog on the moon blurry ugly red blue car".split()
PRIOR = dict(c_in=4, c=32, c_cond=32, c_r=16, depth=2, nhead=2, dropout=0.1)
DIFFNEXT = dict(c_in=4, c_out=4, c_r=16, patch_size=2, c_cond=16, c_hidden=[8, 16, 32, 32], nhead=[-1, 2, 4, 4],
                blocks=[1, 1, 1, 1], level_config=["CT", "CTA", "CTA", "CTA"], inject_effnet=[False, True, True, True],
                effnet_embd=4, clip_embd=24, kernel_size=3, dropout=0.1)
VQ = dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=1, embed_dim=16,
          latent_channels=4, num_vq_embeddings=32, scale_factor=0.3764)
# 128x256 pixels: a 3x6 stage C embedding, 32x64 stage B latents, a 128x256 image
H, W = 128, 256


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny ops on a loaded 2-core machine: a second intra-op thread costs ~10 ms of waiting per op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_bpe(folder):
    """A tiny CLIP BPE vocabulary: the 512 byte symbols, merges that spell WORDS, the two specials."""
    symbols = list(bytes_to_unicode().values())
    vocab, merges = symbols + [s + "</w>" for s in symbols], []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizerFast(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                                          model_max_length=MAX_LEN)


def text_encoder(hidden, seed):
    cfg = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=MAX_LEN, hidden_act="gelu")
    return seeded_(transformers.CLIPTextModel(cfg), seed=seed, std=0.1).eval()


def hubify(folder, names):
    """Rewrite model_index.json class/library names as the Hub repos have them."""
    path = os.path.join(folder, "model_index.json")
    index = json.load(open(path))
    index.update(names)
    json.dump(index, open(path, "w"))


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("wuerstchen")
    tok = write_bpe(root / "bpe")
    ref_prior = RefPriorPipe(tokenizer=tok, text_encoder=text_encoder(32, 1), scheduler=RefScheduler(),
                             prior=conditioned_(RefPrior(**PRIOR), seed=2))
    ref_decoder = RefDecoderPipe(tokenizer=tok, text_encoder=text_encoder(24, 3), scheduler=RefScheduler(),
                                 decoder=conditioned_(RefDiffNeXt(**DIFFNEXT), seed=4),
                                 vqgan=seeded_(RefVQ(**VQ), seed=5).eval())
    prior_dir, decoder_dir = str(root / "wuerstchen-prior"), str(root / "wuerstchen")
    ref_prior.save_pretrained(prior_dir)
    ref_decoder.save_pretrained(decoder_dir)
    hubify(prior_dir, {"prior": ["wuerstchen", "WuerstchenPrior"], "tokenizer": ["transformers", "CLIPTokenizerFast"]})
    hubify(decoder_dir, {"decoder": ["wuerstchen", "WuerstchenDiffNeXt"], "vqgan": ["wuerstchen", "PaellaVQModel"],
                         "tokenizer": ["transformers", "PreTrainedTokenizerFast"]})
    for name in ("vocab.json", "merges.txt"):  # the decoder's tokenizer from tokenizer.json alone
        os.remove(os.path.join(decoder_dir, "tokenizer", name))
    with open(os.path.join(decoder_dir, "README.md"), "w") as f:  # how diffusers finds the prior repo
        f.write(f"---\nlicense: mit\nprior:\n- {prior_dir}\n---\n# Würstchen decoder\n")
    for p in (ref_prior, ref_decoder):
        p.set_progress_bar_config(disable=True)
    return dict(prior_dir=prior_dir, decoder_dir=decoder_dir, ref_prior=ref_prior, ref_decoder=ref_decoder)


@pytest.fixture(scope="module")
def combined(repos):
    pipe = WuerstchenCombinedPipeline.from_pretrained(repos["decoder_dir"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def to_uint8(images):
    return (np.asarray(images) * 255).round().astype(np.int16)


PRIOR_ARGS = dict(prompt=["a photo of a cat", "a dog on the moon"], negative_prompt=["blurry", "ugly red car"],
                  height=H, width=W, timesteps=[1.0, 0.8, 0.45, 0.2, 0.0], guidance_scale=4.0, num_images_per_prompt=2)


def test_prior_matches_diffusers(repos):
    ours = WuerstchenPriorPipeline.from_pretrained(repos["prior_dir"])
    ours.set_progress_bar_config(disable=True)
    assert ours.config.latent_mean == 42.0 and ours.config.resolution_multiple == 42.67
    want = repos["ref_prior"](**PRIOR_ARGS, generator=gen()).image_embeddings
    got = ours(**PRIOR_ARGS, generator=gen()).image_embeddings
    assert got.shape == (4, 4, 3, 6)
    assert_close(got, want, name="image_embeddings")
    # no guidance, evenly spaced steps, numpy out, a list of generators (one per image)
    # (sizes off the 42.67 grid round up: 100x230 -> 3x6)
    kw = dict(prompt="a red car", height=100, width=230, num_inference_steps=3, guidance_scale=1.0, output_type="np")
    want = repos["ref_prior"](**kw, generator=[gen(1), gen(2)], num_images_per_prompt=2).image_embeddings
    got = ours(**kw, generator=[gen(1), gen(2)], num_images_per_prompt=2, return_dict=False)[0]
    assert isinstance(got, np.ndarray) and got.shape == (2, 4, 3, 6)
    assert_close(got, want, name="image_embeddings (no CFG)")
    # precomputed text states and given latents
    embeds = torch.randn(1, MAX_LEN, 32)
    latents = torch.randn(1, 4, 3, 6)
    kw = dict(prompt_embeds=embeds, negative_prompt_embeds=-embeds, latents=latents, height=H, width=W,
              num_inference_steps=2, guidance_scale=3.0)
    assert_close(ours(**kw, generator=gen()).image_embeddings,
                 repos["ref_prior"](**kw, generator=gen()).image_embeddings, name="image_embeddings (embeds)")


def test_1024x1536_sizes(repos, combined):
    """The real resolution: a 24x36 embedding, 256x384 decoder latents (checked, not run: tiny CPU budget)."""
    kw = dict(prompt="a cat", height=1024, width=1536, num_inference_steps=1, guidance_scale=1.0)
    got = combined.prior_pipe(**kw, generator=gen()).image_embeddings
    assert got.shape == (1, 4, 24, 36)
    assert_close(got, repos["ref_prior"](**kw, generator=gen()).image_embeddings, name="1024x1536 embeddings")
    assert combined.decoder_pipe.latent_size(24, 36) == (256, 384)
    assert combined.decoder_pipe.latent_size(1, 2) == (10, 21)  # truncated, as diffusers does
    combined.decoder_pipe.check_latent_size(24, 36)


COMBINED_ARGS = dict(prompt="a photo of a cat on the moon", negative_prompt="blurry ugly", height=H, width=W,
                     prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS, prior_guidance_scale=4.0, num_inference_steps=3,
                     decoder_guidance_scale=2.0, num_images_per_prompt=2)


def reference_combined(repos):
    p, d = repos["ref_prior"], repos["ref_decoder"]
    ref = RefCombined(tokenizer=d.tokenizer, text_encoder=d.text_encoder, decoder=d.decoder, scheduler=d.scheduler,
                      vqgan=d.vqgan, prior_tokenizer=p.tokenizer, prior_text_encoder=p.text_encoder,
                      prior_prior=p.prior, prior_scheduler=p.scheduler)
    ref.set_progress_bar_config(disable=True)
    return ref


def test_combined_matches_diffusers(repos, combined):
    assert len(DEFAULT_STAGE_C_TIMESTEPS) == 30
    want = reference_combined(repos)(**COMBINED_ARGS, generator=gen(), output_type="np").images
    got = combined(**COMBINED_ARGS, generator=gen(), output_type="np").images
    assert got.shape == (2, H, W, 3)
    diff = np.abs(to_uint8(got) - to_uint8(want))
    assert diff.max() <= 1, f"uint8 pixels differ by up to {diff.max()}"
    assert to_uint8(got).std() > 5  # a real image, not a flat one
    pil = combined(**COMBINED_ARGS, generator=gen()).images
    assert len(pil) == 2 and pil[0].size == (W, H)
    assert np.abs(np.asarray(pil[1]).astype(np.int16) - to_uint8(want)[1]).max() <= 1
    # the generator's stream runs on from the prior into the decoder: the decoder's draws depend on it
    latent = combined(**{**COMBINED_ARGS, "num_images_per_prompt": 1}, generator=gen(), output_type="latent").images
    ref_latent = reference_combined(repos)(**{**COMBINED_ARGS, "num_images_per_prompt": 1}, generator=gen(),
                                           output_type="latent").images
    assert_close(latent, ref_latent, name="decoder latents")


def test_decoder_matches_diffusers(repos, combined):
    ref, ours = repos["ref_decoder"], combined.decoder_pipe
    emb = torch.randn(2, 4, 3, 6)
    kw = dict(prompt="a blue car", num_inference_steps=2, guidance_scale=3.0, negative_prompt="red")
    want = ref(emb, **kw, generator=gen(), output_type="pt").images
    got = ours(image_embeddings=emb, **kw, generator=gen(), output_type="pt").images
    assert_close(got, want, name="decoder images")
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, round(float(t), 4)))
        return {"latents": tensors["latents"]}
    got = ours(emb.numpy(), **kw, generator=gen(), output_type="pt", return_dict=False,  # diffusers: bare images
               callback_on_step_end=callback)
    assert_close(got, want, name="decoder images (numpy embeddings)")
    assert seen == [(0, 1.0), (1, 0.5)]
    # several prompts, one per embedding, and several images per embedding, which diffusers' decoder cannot
    # run (it takes one prompt, one image each): with a generator per image, row 2i+j is embedding i with
    # prompt i alone, drawn from generator 2i+j
    prompts = ["a blue car", "a dog"]
    got = ours(emb, prompt=prompts, num_inference_steps=2, guidance_scale=3.0, num_images_per_prompt=2,
               generator=[gen(k) for k in range(4)], output_type="latent").images
    assert got.shape == (4, 4, 32, 64)
    for k in range(4):
        want = ref(emb[k // 2:k // 2 + 1], prompt=prompts[k // 2], num_inference_steps=2, guidance_scale=3.0,
                   generator=gen(k), output_type="latent").images
        assert_close(got[k:k + 1], want, name=f"decoder latents, row {k}")


def fresh_combined(repos):
    pipe = WuerstchenCombinedPipeline.from_pipes(
        WuerstchenPriorPipeline.from_pretrained(repos["prior_dir"]),
        WuerstchenDecoderPipeline.from_pretrained(repos["decoder_dir"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_offload_same_image_and_one_stage_at_a_time(repos, combined):
    want = combined(**COMBINED_ARGS, generator=gen(), output_type="pt").images
    pipe = fresh_combined(repos)
    pipe.enable_model_cpu_offload(device="cpu")
    moves = []
    for name, model in pipe.components.items():
        if isinstance(model, torch.nn.Module):
            model.to = (lambda to, name: lambda *a, **k: (moves.append((name, str(a[0]) if a else k)), to(*a, **k))[1]
                        )(model.to, name)
    got = pipe(**COMBINED_ARGS, generator=gen(), output_type="pt").images
    assert torch.equal(got, want)
    # each model goes to the execution device and back before the next one comes
    order = [name for name, where in moves[::2]]
    assert all(where == "cpu" for _, where in moves), moves
    assert order == ["prior_text_encoder"] * 2 + ["prior_prior"] + ["text_encoder"] * 2 + ["decoder", "vqgan"], order
    assert [name for name, _ in moves[1::2]] == order


def test_sequential_offload_same_image_and_undo(repos, combined):
    """Issue 19: submodule-by-submodule offload through both pipes gives the same image; remove_all_hooks undoes it."""
    want = combined(**COMBINED_ARGS, generator=gen(), output_type="pt").images
    pipe = fresh_combined(repos)
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert pipe.prior_pipe._offload_hooks and pipe.decoder_pipe._offload_hooks
    assert torch.equal(pipe(**COMBINED_ARGS, generator=gen(), output_type="pt").images, want)
    pipe.remove_all_hooks()
    assert not pipe.prior_pipe._offload_hooks and not pipe.decoder_pipe._offload_hooks
    assert pipe.prior_pipe._offload_device is None and pipe.decoder_pipe._offload_device is None


def test_save_and_reload(tmp_path, combined):
    combined.save_pretrained(tmp_path / "combined")
    index = json.load(open(tmp_path / "combined" / "model_index.json"))
    assert index["_class_name"] == "WuerstchenCombinedPipeline" and index["prior_latent_mean"] == 42.0
    again = WuerstchenCombinedPipeline.from_pretrained(tmp_path / "combined")
    again.set_progress_bar_config(disable=True)
    kw = dict(COMBINED_ARGS, prior_timesteps=None, prior_num_inference_steps=2, num_inference_steps=2)
    assert torch.equal(again(**kw, generator=gen(), output_type="pt").images,
                       combined(**kw, generator=gen(), output_type="pt").images)


def test_missing_prior_repo(tmp_path, repos):
    import shutil
    shutil.copytree(repos["decoder_dir"], tmp_path / "dec")
    os.remove(tmp_path / "dec" / "README.md")
    with pytest.raises(ValueError, match="names no `prior` repo: pass prior_repo="):
        WuerstchenCombinedPipeline.from_pretrained(tmp_path / "dec")
    pipe = WuerstchenCombinedPipeline.from_pretrained(tmp_path / "dec", prior_repo=repos["prior_dir"])
    assert pipe.prior_prior.config.c == 32


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=0), r"height=0 must be a positive integer"),
    (dict(width=-128), r"width=-128 must be a positive integer"),
    (dict(height=200), r"embedding of 5x6 gives decoder latents of 53x64, but the decoder needs multiples of 16"),
    (dict(prior_num_inference_steps=0), r"prior_num_inference_steps=0 must be an integer >= 1"),
    (dict(num_inference_steps=0), r"num_inference_steps=0 must be an integer >= 1"),
    (dict(prior_timesteps=[0.0, 0.5, 1.0]), r"prior_timesteps=.* must be strictly decreasing"),
    (dict(decoder_timesteps=[1.0]), r"decoder_timesteps has 1 entries"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), r"negative_prompt has 1 entries but prompt has 2"),
    (dict(generator=[torch.Generator()] * 3), r"3 generators were passed for a batch of 2"),
    (dict(num_images_per_prompt=0), r"num_images_per_prompt=0 must be an integer >= 1"),
    (dict(output_type="jpg"), r"output_type='jpg'"),
    (dict(latents=torch.randn(1, 4, 3, 6)), r"latents have shape \(1, 4, 3, 6\), expected \(2, 4, 3, 6\)"),
    (dict(prompt=None), r"pass `prompt` or `prompt_embeds`"),
])
def test_input_errors_before_work(monkeypatch, combined, kwargs, message):
    def no_work(*a, **k):
        raise AssertionError("work started before the inputs were checked")
    monkeypatch.setattr(wpipe, "encode_text", no_work)
    with pytest.raises(ValueError, match=message):
        combined(**{**COMBINED_ARGS, "prior_timesteps": None, **kwargs})


def test_decoder_input_errors(combined):
    dec = combined.decoder_pipe
    with pytest.raises(ValueError, match=r"takes \(batch, 4, h, w\)"):
        dec(torch.randn(1, 16, 3, 6), prompt="a")
    with pytest.raises(ValueError, match=r"2 prompts for 3 image embeddings"):
        dec(torch.randn(3, 4, 3, 6), prompt=["a", "b"])
    with pytest.raises(ValueError, match=r"prompt must be a string"):
        dec(torch.randn(1, 4, 3, 6))
