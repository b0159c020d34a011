"""Stage 1: train the bundled model's autoencoder (an AutoencoderKL, 64x64x3 pixels <-> 8x8x8 latents).

    python -m minidiff.toy.train_vae            # writes minidiff/assets/shapes-sd/vae/

Loss: L1 + L2 on the pixels of drawn images plus a small KL term, which keeps the posterior's noise
from collapsing so the decoder learns to tolerate slightly-off latents (what a diffusion model
produces). The drawn world has flat colours and sharp edges only: no perceptual or GAN loss is needed.
At the end the latents' scale is measured and stored as `scaling_factor`, as Stable Diffusion does
(diffusion runs on unit-variance latents).
"""
import argparse
import os

import numpy as np
import torch

from ..models.vae import AutoencoderKL
from . import evaluate, shapes
from .common import MODEL_DIR, SEED_SELF_CHECK, SEED_VAE_DATA, Progress, build, cosine_lr, setup

# Four levels (downsampling x8, as Stable Diffusion's) with 8 latent channels instead of 4: an 8x8 latent keeps the
# UNet cheap, the extra channels keep the edges sharp. Few channels: the decoder runs once per image.
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 8,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 1.0,  # measured after training
    "force_upcast": False,
    # no attention: the model is then purely convolutional, so training on crops is training on images
    "mid_block_add_attention": False,
}
FACTOR = 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)  # pixels per latent, per side


def edge_loss(y, x):
    """L1 between the images' horizontal and vertical differences: weighs the few edge pixels, where a
    flat-colour picture's shape information lives, as much as the many flat ones."""
    dx = lambda im: im[..., :, 1:] - im[..., :, :-1]
    dy = lambda im: im[..., 1:, :] - im[..., :-1, :]
    return (dx(y) - dx(x)).abs().mean() + (dy(y) - dy(x)).abs().mean()


def kl_divergence(posterior):
    """KL(q(z|x) || N(0, 1)) per latent element, averaged."""
    return 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()


@torch.no_grad()
def latent_scale(vae, images, batch=256):
    """1 / std of the posterior means over `images`: the factor that gives unit-variance latents."""
    zs = [vae.encode(shapes.to_tensor(images[i:i + batch])).latent_dist.mean for i in range(0, len(images), batch)]
    return 1.0 / torch.cat(zs).std().item()


@torch.no_grad()
def reconstruction_report(vae, n=500):
    """PSNR and the evaluator's accuracy on reconstructions of held-out drawn images."""
    images, _, scenes = shapes.dataset(n, SEED_SELF_CHECK + 1)
    x = shapes.to_tensor(images)
    y = torch.cat([vae(x[i:i + 100]).sample for i in range(0, n, 100)]).clamp(-1, 1)
    mse = ((y - x) / 2).pow(2).mean().item()
    recon = ((y + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    acc = evaluate.score(recon, scenes)
    return -10 * np.log10(mse), acc


def train(steps=3000, batch=32, lr=2e-3, kl_weight=1e-4, edge_weight=1.0, n_images=20000, crop=32, seed=0, threads=2, out=MODEL_DIR):
    setup(seed, threads)
    print(f"[vae] drawing {n_images} training images (seed {SEED_VAE_DATA})", flush=True)
    images, _, _ = shapes.dataset(n_images, SEED_VAE_DATA)
    vae = build(AutoencoderKL, VAE_CONFIG).train()
    # Start with a nearly deterministic encoder (posterior std ~0.02 instead of 1): with unit noise on
    # tiny initial means the decoder would see pure noise and learn nothing for hundreds of steps.
    with torch.no_grad():
        vae.quant_conv.bias[VAE_CONFIG["latent_channels"]:] = -8.0
    print(f"[vae] AutoencoderKL {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters; "
          f"{steps} steps of {batch}", flush=True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    progress = Progress("vae", steps)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        idx = torch.randint(n_images, (batch,), generator=g).numpy()
        # a random crop (one offset per batch, a multiple of FACTOR so latents stay aligned): 4x cheaper than
        # whole images, and a convolutional autoencoder learns the same edges and flat colours from it
        top, left = (FACTOR * torch.randint((shapes.RESOLUTION - crop) // FACTOR + 1, (2,), generator=g)).tolist()
        x = shapes.to_tensor(images[idx, top:top + crop, left:left + crop])
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample(g)).sample
        rec = (y - x).abs().mean() + (y - x).pow(2).mean() + edge_weight * edge_loss(y, x)
        kl = kl_divergence(posterior)
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(step, opt.param_groups[0]["lr"], loss=loss.item(), rec=rec.item(), kl=kl.item())

    vae.eval()
    vae.config.scaling_factor = round(latent_scale(vae, images[:2048]), 5)
    psnr, acc = reconstruction_report(vae)
    print(f"[vae] done in {progress.elapsed() / 60:.1f} min; final loss {progress.last['loss']:.4f} "
          f"(rec {progress.last['rec']:.4f}); scaling_factor {vae.config.scaling_factor}; held-out PSNR "
          f"{psnr:.1f} dB; evaluator on reconstructions: colour {acc['colour']:.1%}, shape {acc['shape']:.1%}",
          flush=True)
    folder = os.path.join(out, "vae")
    vae.save_pretrained(folder)
    print(f"[vae] wrote {folder}", flush=True)
    return vae


def main():
    p = argparse.ArgumentParser(description="Stage 1 of the bundled model: the autoencoder.")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--edge-weight", type=float, default=1.0)
    p.add_argument("--images", type=int, default=20000, help="size of the drawn training set")
    p.add_argument("--crop", type=int, default=32, help="side of the random training crops (64: whole images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=MODEL_DIR, help="model folder (Hub layout); vae/ is written inside")
    a = p.parse_args()
    train(a.steps, a.batch, a.lr, a.kl_weight, a.edge_weight, a.images, a.crop, a.seed, a.threads, a.out)


if __name__ == "__main__":
    main()
