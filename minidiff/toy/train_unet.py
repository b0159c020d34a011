"""Stage 2: train the bundled model's text encoder and UNet, and write the whole pipeline folder.

    python -m minidiff.toy.train_unet           # needs stage 1's vae/; writes tokenizer/, text_encoder/,
                                                # unet/, scheduler/ and model_index.json

The recipe is Stable Diffusion's, scaled down: drawn images are encoded once by the stage-1 VAE
(posterior mean and std kept, a fresh latent sample drawn at every use), noised at a uniform random
timestep of the 1000-step scaled-linear schedule, and the UNet learns to undo the noise given the
CLIP text encoder's hidden states. 10% of captions are replaced by the empty prompt so that
classifier-free guidance works; the shipped weights are an exponential moving average.

Two departures from SD 1.5, both for plain backgrounds:
  - the schedule is rescaled to zero terminal SNR, with v-prediction and "trailing" timesteps (Lin et
    al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"). With SD's own schedule
    the noisiest training input still holds a trace of the image, enough for the model to read the
    background colour off the noise's mean instead of the prompt: sampling then picks a random one.
  - before the joint training, the text encoder alone learns for a few seconds to tell the scene's
    attributes (shape, colour, background, size, position) from its last token, through small linear
    heads that are then dropped. A causal encoder otherwise needs long joint training to learn that
    "purple" in "..., purple background" is the background's colour.

The tokenizer is CLIP's byte-level BPE with a vocabulary learned from the caption grammar: every
grammar word is one token, any other text still tokenizes (into characters).
"""
import argparse
import copy
import json
import os
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from ..models.clip import CLIPTextModel
from ..models.unet import UNet2DConditionModel
from ..models.vae import AutoencoderKL
from ..schedulers import EulerDiscreteScheduler
from ..schedulers.common import train_schedule
from ..tokenizer import BYTE_TO_CHAR, CLIPTokenizer
from . import shapes
from .common import MODEL_DIR, SEED_UNET_DATA, Progress, build, cosine_lr, setup

MAX_LENGTH = 20  # tokens per prompt with <|startoftext|> and <|endoftext|>; the longest caption needs 14
GUIDANCE_SCALE = 5.0
EULER_STEPS = 25

TEXT_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "projection_dim": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_LENGTH,
    "hidden_act": "quick_gelu",
    # vocab_size and the special token ids are filled in from the tokenizer
}

UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 8,  # the autoencoder's latent_channels
    "out_channels": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [64, 96, 96],
    "layers_per_block": 1,
    "cross_attention_dim": TEXT_CONFIG["hidden_size"],
    # read as the number of heads, as in SD 1.x configs: heads of 32 channels (SDPA on the CPU is slow with
    # narrow heads)
    "attention_head_dim": [2, 3, 3],
    "norm_num_groups": 16,
}

SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.39.0",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "v_prediction",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "trailing",  # the first step is t = 999, pure noise
    "steps_offset": 1,  # unused by trailing spacing; 1 keeps diffusers from warning
    "rescale_betas_zero_snr": True,
    "final_sigmas_type": "zero",
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.39.0",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


# --- tokenizer ----------------------------------------------------------------------------------

def bpe_merges(words):
    """Byte-pair merges learned on `words` until each is a single token (most frequent pair first,
    ties broken alphabetically, so the result is deterministic)."""
    spelled = {w: ["".join(BYTE_TO_CHAR[b] for b in c.encode()) for c in w[:-1]] + [w[-1] + "</w>"] for w in words}
    merges = []
    while True:
        pairs = Counter()
        for symbols in spelled.values():
            pairs.update(zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, symbols in spelled.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            spelled[w] = out


def build_tokenizer():
    """CLIP's layout: the 256 byte symbols, the same with </w>, the learned merges, then the two specials."""
    base = list(BYTE_TO_CHAR.values())
    merges = bpe_merges(shapes.caption_words())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab, merges, model_max_length=MAX_LENGTH)


def text_config(tokenizer):
    return {**TEXT_CONFIG, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def tokenize(tokenizer, texts):
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# --- data ---------------------------------------------------------------------------------------

@torch.no_grad()
def encode_dataset(vae, images, batch=250):
    """Posterior mean and std of every image, in diffusion units (times scaling_factor), as float16."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(shapes.to_tensor(images[i:i + batch])).latent_dist
        means.append((post.mean * vae.config.scaling_factor).half())
        stds.append((post.std * vae.config.scaling_factor).half())
    return torch.cat(means), torch.cat(stds)


def caption_ids(tokenizer, scenes):
    """Token ids of every caption template for every scene: (n_scenes, n_templates, MAX_LENGTH)."""
    per_template = [tokenize(tokenizer, [shapes.caption(s, template=k) for s in scenes])
                    for k in range(len(shapes.TEMPLATES))]
    return torch.stack(per_template, dim=1)


# --- diffusion ----------------------------------------------------------------------------------

def alphas_cumprod():
    """alpha_bar of every training step, by the library's schedule functions from the scheduler config the model
    ships with: Stable Diffusion's scaled-linear betas, rescaled to zero terminal SNR (Lin et al. 2023,
    Algorithm 1), so training and sampling read one schedule."""
    return train_schedule(EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).cfg)[1]


def v_target(latents, noise, a):
    """v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022); at t = 999 it is -x0."""
    return a.sqrt() * noise - (1 - a).sqrt() * latents


def low_noise_weight(snr, gamma=5.0):
    """Min-SNR-style clamp for the v loss: steps with SNR > gamma (little noise, little to learn) count
    (gamma + 1) / (SNR + 1); the noisy steps, where the picture is decided, keep weight 1."""
    return (gamma + 1) / (snr.clamp(min=gamma) + 1)


# --- text encoder warm-up -----------------------------------------------------------------------

def attribute_labels(scenes):
    """Per scene and caption template: class indices of (shape, colour, background, size, position), where
    a template that does not mention size or position gets the extra class "unsaid"."""
    cells = list(shapes.POSITIONS)
    labels = []
    for s in scenes:
        per_template = []
        for _, text in shapes.TEMPLATES:
            size = list(shapes.SIZES).index(s.size) if "{size}" in text else len(shapes.SIZES)
            pos = cells.index((s.row, s.col)) if "{position}" in text else len(cells)
            per_template.append([shapes.SHAPES.index(s.shape), list(shapes.COLOURS).index(s.colour),
                                 list(shapes.COLOURS).index(s.background), size, pos])
        labels.append(per_template)
    return torch.tensor(labels)


def warm_up_text_encoder(text_encoder, ids, labels, steps=300, batch=256, lr=2e-3, seed=0):
    """Train the text encoder to classify the scene's attributes from the final state of its last token."""
    sizes = (len(shapes.SHAPES), len(shapes.COLOURS), len(shapes.COLOURS), len(shapes.SIZES) + 1,
             len(shapes.POSITIONS) + 1)
    hidden = text_encoder.config.hidden_size
    heads = torch.nn.ModuleList(torch.nn.Linear(hidden, n) for n in sizes)
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    progress = Progress("text", steps, every=100)
    for step in range(steps):
        idx = torch.randint(len(ids), (batch,), generator=g)
        template = torch.randint(ids.shape[1], (batch,), generator=g)
        last = text_encoder(ids[idx, template])[0][:, -1]
        y = labels[idx, template]
        logits = [h(last) for h in heads]
        loss = sum(F.cross_entropy(z, y[:, k]) for k, z in enumerate(logits))
        acc = torch.stack([(z.argmax(-1) == y[:, k]).float().mean() for k, z in enumerate(logits)]).min()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(step, lr, loss=loss.item(), worst_accuracy=acc.item())


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def write_pipeline_files(out, tokenizer, text_encoder, unet, vae):
    """The whole folder in the Hub layout. Weights are stored in float16 (half the package's size; loaders
    cast them back to float32 unless asked otherwise, diffusers' as minidiff's), stage 1's VAE included."""
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    for name, model in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        copy.deepcopy(model).half().save_pretrained(os.path.join(out, name))
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)
    with open(os.path.join(out, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(MODEL_INDEX, f, indent=2)


def train(steps=2400, batch=64, lr=1e-3, n_images=20000, cfg_dropout=0.1, ema_decay=0.995, seed=0, threads=2,
          out=MODEL_DIR, eval_prompts=64):
    setup(seed, threads)
    vae = AutoencoderKL.from_pretrained(out, subfolder="vae")
    tokenizer = build_tokenizer()
    print(f"[unet] drawing {n_images} training images (seed {SEED_UNET_DATA}) and encoding them with the "
          f"stage-1 VAE", flush=True)
    images, _, scenes = shapes.dataset(n_images, SEED_UNET_DATA)
    means, stds = encode_dataset(vae, images)
    del images
    ids = caption_ids(tokenizer, scenes)
    empty = tokenize(tokenizer, [""])[0]
    template_p = torch.tensor([w for w, _ in shapes.TEMPLATES])

    text_encoder = build(CLIPTextModel, text_config(tokenizer)).train()
    warm_up_text_encoder(text_encoder, ids, attribute_labels(scenes), seed=seed)
    unet = build(UNet2DConditionModel, UNET_CONFIG).train()
    ema_text = build(CLIPTextModel, text_config(tokenizer)).eval().requires_grad_(False)
    ema_unet = build(UNet2DConditionModel, UNET_CONFIG).eval().requires_grad_(False)
    ema_text.load_state_dict(text_encoder.state_dict())
    ema_unet.load_state_dict(unet.state_dict())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    n_unet = sum(p.numel() for p in unet.parameters())
    print(f"[unet] CLIPTextModel {n_text / 1e6:.2f}M, UNet2DConditionModel {n_unet / 1e6:.2f}M parameters, "
          f"vocabulary {len(tokenizer)} tokens; {steps} steps of {batch}", flush=True)

    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    acp = alphas_cumprod()
    g = torch.Generator().manual_seed(seed)
    progress = Progress("unet", steps)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=200)
        idx = torch.randint(n_images, (batch,), generator=g)
        latents = means[idx].float() + stds[idx].float() * torch.randn(means[idx].shape, generator=g)
        template = torch.multinomial(template_p, batch, replacement=True, generator=g)
        input_ids = ids[idx, template]
        drop = torch.rand(batch, generator=g) < cfg_dropout
        input_ids = torch.where(drop[:, None], empty[None], input_ids)

        t = torch.randint(0, len(acp), (batch,), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        text = text_encoder(input_ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=text).sample
        per_sample = F.mse_loss(pred, v_target(latents, noise, a), reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * low_noise_weight(acp[t] / (1 - acp[t]))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # the average starts once the warm-up is over, with a shorter memory at first
        decay = min(ema_decay, (1 + step) / (10 + step))
        ema_update(ema_text, text_encoder, decay)
        ema_update(ema_unet, unet, decay)
        progress.update(step, opt.param_groups[0]["lr"], loss=loss.item(), mse=per_sample.mean().item())

    print(f"[unet] done in {progress.elapsed() / 60:.1f} min; final loss {progress.last['loss']:.4f} "
          f"(unweighted mse {progress.last['mse']:.4f})", flush=True)
    write_pipeline_files(out, tokenizer, ema_text, ema_unet, vae)
    print(f"[unet] wrote {out}", flush=True)
    if eval_prompts:
        from .bench import run_benchmark
        run_benchmark(out, n_prompts=eval_prompts, modes=("euler",), threads=threads)
    return ema_text, ema_unet


def main():
    p = argparse.ArgumentParser(description="Stage 2 of the bundled model: tokenizer, text encoder and UNet.")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--images", type=int, default=20000, help="size of the drawn training set")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="fraction of empty captions")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=MODEL_DIR, help="model folder (Hub layout) holding stage 1's vae/")
    p.add_argument("--eval-prompts", type=int, default=64, help="prompts of the quick benchmark at the end (0: none)")
    a = p.parse_args()
    train(a.steps, a.batch, a.lr, a.images, a.cfg_dropout, a.ema_decay, a.seed, a.threads, a.out, a.eval_prompts)


if __name__ == "__main__":
    main()
