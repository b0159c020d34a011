"""Stage 3: distil an LCM-LoRA from the bundled model, so that 4 LCM steps draw what 25 Euler steps do.

    python -m minidiff.toy.train_lcm_lora      # needs stages 1-2; writes
                                               # minidiff/assets/shapes-sd-lcm-lora/pytorch_lora_weights.safetensors

Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Algorithm 1; LCM-LoRA,
Luo et al. 2023b) by the library's trainer, minidiff.distill.lcm_lora, with the stage-2 model as teacher and
this recipe:
  1. noise a training latent to t, one of 50 evenly spaced "skipping" timesteps (t = 19, 39, ..., 999);
  2. the teacher (a v-prediction model), with classifier-free guidance at the scale Euler uses (5), solves the
     probability-flow ODE from t to t - 240 (TEACHER_SKIP) in 3 DDIM steps (the paper's solver Psi may be
     any ODE solver; a few DDIM steps keep a long jump accurate);
  3. the student (teacher + LoRA) maps x_t to a clean latent through the consistency parametrisation
     f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t), and the target is the same function, without
     gradient, at the teacher's x_{t-240} (f at t < 0 is the identity, so the chain is anchored at 0);
  4. a pseudo-Huber loss (c = 0.001) pulls the two together.
Only the LoRA matrices train (rank 16, alpha 16, on the 128 layers the published LCM-LoRAs cover); the guidance
scale is baked in, so the LoRA runs with guidance 1, no unconditional pass. The data are this world's drawn
pictures (seed SEED_LCM_DATA), a caption template drawn per step, the text encoded per step.
The shipped file was written by this stage before the trainer moved into the library, in kohya's format
(`lora_unet_<module>.lora_down.weight`); the library writes diffusers' form (`unet.<module>.lora_A.weight`);
minidiff's and diffusers' load_lora_weights read both.
"""
import argparse

import torch

from ..distill import lcm_lora
from ..models.clip import CLIPTextModel
from ..models.unet import UNet2DConditionModel
from ..models.vae import AutoencoderKL
from ..schedulers import EulerDiscreteScheduler
from ..tokenizer import CLIPTokenizer
from . import shapes
from .common import LORA_DIR, MODEL_DIR, SEED_LCM_DATA, cosine_lr, setup
from .train_unet import GUIDANCE_SCALE, SCHEDULER_CONFIG, caption_ids, encode_dataset, tokenize

DDIM_STEPS = 50  # the grid of training timesteps: LCMScheduler's original_inference_steps
# How far the teacher jumps: 12 grid points. The consistency target is bootstrapped one jump at a time from
# t < 0, so with the paper's jump of one grid point (20) the information needs 50 links to reach t = 999, and a
# short CPU run leaves the noisy end unlearnt (measured: colour right in 62% of 4-step images; with a jump of
# 100, 83%). A jump of 240 makes the chain 999 -> 759 -> 519 -> 279 -> 39 -> clean: 4 links, and LCMScheduler's
# 4-step timesteps (999, 759, 499, 259) sit on it. The teacher covers the jump in TEACHER_SUBSTEPS guided DDIM
# steps, so its path is as accurate as a 12-step DDIM sampler's.
TEACHER_SKIP = 240
TEACHER_SUBSTEPS = 3
TIMESTEP_SCALING = 10.0  # LCMScheduler's timestep_scaling: the boundary condition's sharpness
HUBER_C = 0.001


class ShapesTrainingData:
    """The trainer's data: each step draws images (posterior mean + std x noise), a caption template per image
    and encodes the captions, all from the trainer's generator."""

    def __init__(self, means, stds, ids, text_encoder, uncond):
        self.means, self.stds, self.ids, self.text_encoder = means, stds, ids, text_encoder
        self.template_p = torch.tensor([w for w, _ in shapes.TEMPLATES])
        self.uncond = {"prompt_embeds": uncond}

    def sample(self, n, g):
        idx = torch.randint(len(self.means), (n,), generator=g)
        latents = self.means[idx].float() + self.stds[idx].float() * torch.randn(self.means[idx].shape, generator=g)
        template = torch.multinomial(self.template_p, n, replacement=True, generator=g)
        with torch.no_grad():
            text = self.text_encoder(self.ids[idx, template])[0]
        return latents, {"prompt_embeds": text}


def recipe(steps=1800, batch=32, lr=1e-3, rank=16, guidance=GUIDANCE_SCALE, seed=0, **overrides):
    """The bundled LoRA's settings for the library trainer."""
    return lcm_lora.LCMDistillConfig(
        steps=steps, batch=batch, lr=lr, weight_decay=0.0, rank=rank, alpha=rank, num_ddim_timesteps=DDIM_STEPS,
        skip=TEACHER_SKIP, solver_steps=TEACHER_SUBSTEPS, guidance=guidance, loss="huber", huber_c=HUBER_C,
        timestep_scaling=TIMESTEP_SCALING, target="self", seed=seed, save_dtype="float16", **overrides)


def load_data(model, tokenizer, text_encoder, n_images):
    print(f"[lcm] drawing {n_images} images (seed {SEED_LCM_DATA}) and encoding them", flush=True)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    images, _, scenes = shapes.dataset(n_images, SEED_LCM_DATA)
    means, stds = encode_dataset(vae, images)
    with torch.no_grad():
        uncond = text_encoder(tokenize(tokenizer, [""]))[0]
    return ShapesTrainingData(means, stds, caption_ids(tokenizer, scenes), text_encoder, uncond)


def train(steps=1800, batch=32, lr=1e-3, rank=16, n_images=10000, guidance=GUIDANCE_SCALE, seed=0, threads=2,
          model=MODEL_DIR, out=LORA_DIR, eval_prompts=64, resume=False, checkpoint_every=0, stop_after=None):
    setup(seed, threads)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    data = load_data(model, tokenizer, text_encoder, n_images)
    config = recipe(steps, batch, lr, rank, guidance, seed, log_every=50, checkpoint_every=checkpoint_every)
    schedule = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG).cfg  # the teacher's: v-prediction, zero SNR
    _, losses = lcm_lora.train(unet, schedule, data, config, out=out, resume=resume, stop_after=stop_after,
                               lr_schedule=lambda step: cosine_lr(step, steps, lr, warmup=100))
    if eval_prompts and out is not None and len(losses) and stop_after is None:
        from .bench import run_benchmark
        run_benchmark(model, n_prompts=eval_prompts, modes=("lcm",), lora_dir=out, threads=threads)
    return losses


def main():
    p = argparse.ArgumentParser(description="Stage 3 of the bundled model: the LCM-LoRA.")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--images", type=int, default=10000, help="size of the drawn training set")
    p.add_argument("--guidance", type=float, default=GUIDANCE_SCALE, help="the teacher's guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=MODEL_DIR, help="the stage-2 model folder (the teacher)")
    p.add_argument("--out", default=LORA_DIR)
    p.add_argument("--eval-prompts", type=int, default=64, help="prompts of the quick benchmark at the end (0: none)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="keep a checkpoint in --out/lcm-state/ every N steps")
    p.add_argument("--resume", action="store_true", help="continue from --out/lcm-state/")
    p.add_argument("--stop-after", type=int, default=None, help="end after this many steps (resume later)")
    a = p.parse_args()
    train(a.steps, a.batch, a.lr, a.rank, a.images, a.guidance, a.seed, a.threads, a.model, a.out, a.eval_prompts,
          a.resume, a.checkpoint_every, a.stop_after)


if __name__ == "__main__":
    main()
