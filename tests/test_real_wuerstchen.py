"""Würstchen v2 in its real form (tests/real_layouts: c_in 16, c_r 64, the real model_index values, fast
tokenizers with tokenizer.json and CLIP's real vocabulary, the decoder's tokenizer from tokenizer.json
alone) with widths, depths, head counts, c_cond, effnet and CLIP widths other than test_wuerstchen_pipeline's.
The prior equals diffusers' WuerstchenPriorPipeline at 1e-4 of scale for the seed article's call
(DEFAULT_STAGE_C_TIMESTEPS, guidance 4, several images), evenly spaced steps, negative prompts and Chinese /
Japanese prompts; the decoder's images are within 1 uint8 level."""
import json
import os

import numpy as np
import pytest
import torch
import transformers
from diffusers import DDPMWuerstchenScheduler as RefScheduler
from diffusers import WuerstchenDecoderPipeline as RefDecoderPipe
from diffusers import WuerstchenPriorPipeline as RefPriorPipe
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel as RefVQ
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext import WuerstchenDiffNeXt as RefDiffNeXt
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior import WuerstchenPrior as RefPrior

import real_layouts as real
from minidiff.pipelines.wuerstchen import DEFAULT_STAGE_C_TIMESTEPS, WuerstchenDecoderPipeline, WuerstchenPriorPipeline
from minidiff.tokenizer import CLIPTokenizer
from utils import assert_close, bpe, conditioned_, seeded_, write_tokenizer

# the real c_in 16 and c_r 64; other widths than the other Würstchen tests (c 32, c_cond 32, c_r 16, 2 heads)
PRIOR = {**real.WUERSTCHEN_PRIOR, "c": 64, "c_cond": 40, "depth": 3, "nhead": 4}
DECODER = {**real.WUERSTCHEN_DECODER, "c_cond": 24, "clip_embd": 24, "c_hidden": [16, 32, 48, 48],
           "nhead": [-1, 2, 4, 6], "blocks": [1, 2, 1, 1]}
VQ = dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=1, embed_dim=16,
          latent_channels=4, num_vq_embeddings=32, scale_factor=0.3764)
CJK = ["一只猫坐在月球上", "月の上に座っている猫"]


def clip_text(hidden, heads, seed):
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=77,
                                      hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return seeded_(transformers.CLIPTextModel(cfg), seed=seed, std=0.1).eval()


def _model_index(folder, index):
    with open(os.path.join(folder, "model_index.json")) as f:
        saved = json.load(f)
    saved.update({k: v for k, v in index.items() if not k.startswith("_") or k == "_class_name"})
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(saved, f)


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("real_wuerstchen")
    vocab, merges = bpe()
    write_tokenizer(str(root / "slow"), vocab, merges, "<|endoftext|>")
    tok = transformers.CLIPTokenizerFast.from_pretrained(str(root / "slow"))
    prior = RefPriorPipe(tokenizer=tok, text_encoder=clip_text(40, 4, 1), scheduler=RefScheduler(),
                         prior=conditioned_(RefPrior(**{k: v for k, v in PRIOR.items() if k != "_class_name"}), 2))
    decoder = RefDecoderPipe(tokenizer=tok, text_encoder=clip_text(24, 3, 3), scheduler=RefScheduler(),
                             decoder=conditioned_(RefDiffNeXt(**{k: v for k, v in DECODER.items() if k != "_class_name"}), 4),
                             vqgan=seeded_(RefVQ(**VQ), seed=5).eval())
    prior_dir, decoder_dir = str(root / "wuerstchen-prior"), str(root / "wuerstchen")
    prior.save_pretrained(prior_dir)
    decoder.save_pretrained(decoder_dir)
    _model_index(prior_dir, real.WUERSTCHEN_PRIOR_MODEL_INDEX)
    _model_index(decoder_dir, real.WUERSTCHEN_DECODER_MODEL_INDEX)
    for name in ("vocab.json", "merges.txt"):  # the decoder's tokenizer from tokenizer.json alone
        os.remove(os.path.join(decoder_dir, "tokenizer", name))
    for p in (prior, decoder):
        p.set_progress_bar_config(disable=True)
    ours_prior = WuerstchenPriorPipeline.from_pretrained(prior_dir)
    ours_decoder = WuerstchenDecoderPipeline.from_pretrained(decoder_dir)
    for p in (ours_prior, ours_decoder):
        p.set_progress_bar_config(disable=True)
    return dict(ref_prior=prior, ref_decoder=decoder, prior=ours_prior, decoder=ours_decoder, root=root)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


PRIOR_CASES = {
    "seed article": dict(prompt="a photo of a cat", timesteps=DEFAULT_STAGE_C_TIMESTEPS, guidance_scale=4.0,
                         num_images_per_prompt=2, height=128, width=192),
    "4 steps": dict(prompt="a photo of a cat", num_inference_steps=4),
    "negative, guidance 3": dict(prompt=["a photo of a cat", "a dog"], negative_prompt=["blurry ugly", "bad"],
                                 guidance_scale=3.0, num_inference_steps=4),
    "chinese and japanese": dict(prompt=CJK, negative_prompt=["模糊", "ぼやけた"], num_inference_steps=3,
                                 num_images_per_prompt=2),
}


@pytest.mark.parametrize("case", sorted(PRIOR_CASES))
def test_prior_matches_diffusers(repos, case):
    kw = {"height": 128, "width": 128, **PRIOR_CASES[case]}
    want = repos["ref_prior"](**kw, generator=gen()).image_embeddings
    got = repos["prior"](**kw, generator=gen()).image_embeddings
    assert_close(got, want, name=case)


def test_tokenizers_are_transformers_fast_ones(repos):
    """Both repos' tokenizers (prior: tokenizer.json beside vocab/merges; decoder: tokenizer.json alone) give
    the fast tokenizer's ids, which differ from the slow BPE rules on CJK text."""
    ref = repos["ref_prior"].tokenizer
    slow = CLIPTokenizer.from_pretrained(repos["root"] / "slow")
    for pipe in (repos["prior"], repos["decoder"]):
        assert type(pipe.tokenizer).__name__ == "CLIPTokenizerFast"
        for text in CJK + ["a photo of a cat", ""]:
            assert pipe.tokenizer(text).input_ids == ref(text).input_ids, text
    assert any(slow(t).input_ids != ref(t).input_ids for t in CJK)


def test_decoder_matches_diffusers(repos):
    """Prior embeddings (16 channels, the decoder config's effnet_embd) into the decoder: same image."""
    emb = repos["ref_prior"](prompt=CJK[0], height=128, width=128, num_inference_steps=2,
                             generator=gen(1)).image_embeddings
    assert emb.shape[1] == DECODER["effnet_embd"] == 16
    kw = dict(prompt=CJK[0], negative_prompt="blurry", num_inference_steps=3, guidance_scale=2.0, output_type="np")
    want = repos["ref_decoder"](emb, **kw, generator=gen()).images
    got = repos["decoder"](image_embeddings=emb, **kw, generator=gen()).images
    assert_close(got, want, name="decoder images")
    diff = np.abs((np.asarray(got) * 255).round() - (np.asarray(want) * 255).round()).max()
    assert diff <= 1 and (np.asarray(got) * 255).std() > 1
