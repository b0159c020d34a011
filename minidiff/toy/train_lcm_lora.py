"""Stage 3: distil an LCM-LoRA from the bundled model, so that 4 LCM steps draw what 25 Euler steps do.

    python -m minidiff.toy.train_lcm_lora      # needs stages 1-2; writes
                                               # minidiff/assets/shapes-sd-lcm-lora/pytorch_lora_weights.safetensors

Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Algorithm 1; LCM-LoRA,
Luo et al. 2023b) with the stage-2 model as teacher:
  1. noise a training latent to t, one of 50 evenly spaced "skipping" timesteps (t = 19, 39, ..., 999);
  2. the teacher (a v-prediction model), with classifier-free guidance at the scale Euler uses, solves the
     probability-flow ODE from t to t - 240 (TEACHER_SKIP) in 3 DDIM steps (the paper's solver Psi may be
     any ODE solver; a few DDIM steps keep a long jump accurate);
  3. the student (teacher + LoRA) maps x_t to a clean latent through the consistency parametrisation
     f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t), and the target is the same function, without
     gradient, at the teacher's x_{t-240} (f at t < 0 is the identity, so the chain is anchored at 0);
  4. a pseudo-Huber loss pulls the two together.
Only the LoRA matrices train (the teacher is the frozen base layers); the guidance scale is baked in,
so the LoRA runs with guidance 1, no unconditional pass. The LoRA covers the layers the published
LCM-LoRAs cover and is saved in their kohya format (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`,
`.alpha`), which minidiff's and diffusers' load_lora_weights both read.
"""
import argparse
import copy
import math
import os

import torch
import torch.nn as nn

from ..models.clip import CLIPTextModel
from ..models.unet import UNet2DConditionModel
from ..models.vae import AutoencoderKL
from ..schedulers import LCMScheduler
from ..schedulers.common import predict_eps, predict_x0
from ..tokenizer import CLIPTokenizer
from . import shapes
from .common import LORA_DIR, LORA_FILE, MODEL_DIR, SEED_LCM_DATA, Progress, cosine_lr, setup
from .train_unet import GUIDANCE_SCALE, alphas_cumprod, caption_ids, encode_dataset, tokenize

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
LCM_SCHEDULE = LCMScheduler(timestep_scaling=TIMESTEP_SCALING)  # (its sigma_data is 0.5, as LCM's)
HUBER_C = 0.001
# the layers the published LCM-LoRAs adapt (module names end with these)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
           "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")


# --- a trainable LoRA layer ---------------------------------------------------------------------
# minidiff/lora.py loads and applies LoRA files (adapters kept as fixed buffers); training needs the
# two matrices as parameters, which is all this small wrapper adds.

class TrainableLoRA(nn.Module):
    """base(x) + (alpha / rank) * up(down(x)), with `up` starting at zero so training starts at the base."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:  # LoCon: a k x k down convolution with the base's stride and padding, a 1 x 1 up
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x)) * self.scale


def add_lora(unet, rank, alpha):
    """Wrap every targeted Linear/Conv2d of `unet` in place; returns {module path: TrainableLoRA}."""
    names = [n for n, m in unet.named_modules()
             if type(m) in (nn.Linear, nn.Conv2d) and any(n == t or n.endswith("." + t) for t in TARGETS)]
    layers = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = unet.get_submodule(parent)
        layers[name] = TrainableLoRA(getattr(owner, child), rank, alpha)
        setattr(owner, child, layers[name])
    return layers


def lora_state_dict(layers, alpha):
    """The kohya-format file contents: module path with '_' for '.', prefixed lora_unet_."""
    sd = {}
    for name, layer in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[key + ".lora_down.weight"] = layer.down.weight.detach().contiguous().clone()
        sd[key + ".lora_up.weight"] = layer.up.weight.detach().contiguous().clone()
        sd[key + ".alpha"] = torch.tensor(float(alpha))
    return sd


# --- consistency distillation -------------------------------------------------------------------

def boundary_scalings(t):
    """c_skip, c_out of the consistency function at timesteps t: the LCMScheduler's own, shaped for a batch."""
    c_skip, c_out = LCM_SCHEDULE.boundary_scalings(t.float())
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def x0_and_eps(v, x, a):
    """Clean latent and noise from the teacher's v-prediction (the schedulers' formulas)."""
    return predict_x0("v_prediction", v, x, a), predict_eps("v_prediction", v, x, a)


def alpha_at(acp, t):
    """alpha_bar at integer timesteps t; 1 (clean) where t < 0."""
    return torch.where(t >= 0, acp[t.clamp(min=0)], torch.ones(())).view(-1, 1, 1, 1)


@torch.no_grad()
def teacher_solve(teacher, x, t, uncond, text, guidance, acp):
    """The guided teacher's DDIM path from x at t to t - TEACHER_SKIP, in TEACHER_SUBSTEPS equal steps.
    Samples whose path reaches t < 0 early stop there: x is then the clean latent."""
    step = TEACHER_SKIP // TEACHER_SUBSTEPS
    for k in range(TEACHER_SUBSTEPS):
        s, s_next = t - k * step, t - (k + 1) * step
        a, a_next = alpha_at(acp, s), alpha_at(acp, s_next)
        v_u, v_c = teacher(torch.cat([x, x]), torch.cat([s, s]).clamp(min=0),
                           encoder_hidden_states=torch.cat([uncond.expand(len(x), -1, -1), text])).sample.chunk(2)
        x0, eps = x0_and_eps(v_u + guidance * (v_c - v_u), x, a)
        x = torch.where((s >= 0).view(-1, 1, 1, 1), a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps, x)
    return x


def consistency(unet, x, t, a, text):
    """f(x, t) = c_skip(t) x + c_out(t) x0(x, t): the student's (or the target's) estimate of the clean latent."""
    c_skip, c_out = boundary_scalings(t)
    x0, _ = x0_and_eps(unet(x, t, encoder_hidden_states=text).sample, x, a)
    return c_skip * x + c_out * x0


def train(steps=1800, batch=32, lr=1e-3, rank=16, n_images=10000, guidance=GUIDANCE_SCALE, seed=0, threads=2,
          model=MODEL_DIR, out=LORA_DIR, eval_prompts=64):
    setup(seed, threads)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").requires_grad_(False)
    teacher = UNet2DConditionModel.from_pretrained(model, subfolder="unet").requires_grad_(False)
    print(f"[lcm] drawing {n_images} images (seed {SEED_LCM_DATA}) and encoding them", flush=True)
    images, _, scenes = shapes.dataset(n_images, SEED_LCM_DATA)
    means, stds = encode_dataset(vae, images)
    del images, vae
    ids = caption_ids(tokenizer, scenes)
    template_p = torch.tensor([w for w, _ in shapes.TEMPLATES])
    with torch.no_grad():
        uncond = text_encoder(tokenize(tokenizer, [""]))[0]

    student = copy.deepcopy(teacher)
    alpha = rank  # scale alpha / rank = 1
    layers = add_lora(student, rank, alpha)
    params = [p for layer in layers.values() for p in (layer.down.weight, layer.up.weight)]
    for p in params:
        p.requires_grad_(True)
    print(f"[lcm] LoRA rank {rank} on {len(layers)} layers, {sum(p.numel() for p in params) / 1e6:.2f}M "
          f"parameters; teacher guidance {guidance}; {steps} steps of {batch}", flush=True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    acp = alphas_cumprod()
    skip = len(acp) // DDIM_STEPS
    grid = torch.arange(1, DDIM_STEPS + 1) * skip - 1  # 19, 39, ..., 999
    g = torch.Generator().manual_seed(seed)
    progress = Progress("lcm", steps)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=100)
        idx = torch.randint(len(means), (batch,), generator=g)
        latents = means[idx].float() + stds[idx].float() * torch.randn(means[idx].shape, generator=g)
        template = torch.multinomial(template_p, batch, replacement=True, generator=g)
        with torch.no_grad():
            text = text_encoder(ids[idx, template])[0]

        t = grid[torch.randint(DDIM_STEPS, (batch,), generator=g)]
        t_prev = t - TEACHER_SKIP  # < 0 for the first grid points: there the target is the clean latent itself
        a, a_prev = alpha_at(acp, t), alpha_at(acp, t_prev)
        noise = torch.randn(latents.shape, generator=g)
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise

        x_prev = teacher_solve(teacher, x_t, t, uncond, text, guidance, acp)
        with torch.no_grad():
            # the target: the student's own consistency function one jump later (at t_prev < 0: x_prev)
            target = consistency(student, x_prev, t_prev.clamp(min=0), a_prev, text)
            target = torch.where((t_prev >= 0).view(-1, 1, 1, 1), target, x_prev)

        pred = consistency(student, x_t, t, a, text)
        loss = (((pred - target) ** 2 + HUBER_C ** 2).sqrt() - HUBER_C).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        progress.update(step, opt.param_groups[0]["lr"], loss=loss.item())

    print(f"[lcm] done in {progress.elapsed() / 60:.1f} min; final loss {progress.last['loss']:.4f}", flush=True)
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LORA_FILE)
    # stored in float16, as the published LCM-LoRAs are; loaders cast it to the model's dtype
    save_file({k: v.half() for k, v in lora_state_dict(layers, alpha).items()}, path, metadata={"format": "pt"})
    print(f"[lcm] wrote {path}", flush=True)
    if eval_prompts:
        from .bench import run_benchmark
        run_benchmark(model, n_prompts=eval_prompts, modes=("lcm",), lora_dir=out, threads=threads)


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
    a = p.parse_args()
    train(a.steps, a.batch, a.lr, a.rank, a.images, a.guidance, a.seed, a.threads, a.model, a.out, a.eval_prompts)


if __name__ == "__main__":
    main()
