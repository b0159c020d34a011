"""LCM-LoRA: latent consistency distillation of a LoRA (Luo et al. 2023, "Latent Consistency Models",
Algorithm 1; "LCM-LoRA", Luo et al. 2023b), for SD 1.x/2.x and SDXL UNets, in one process or under torchrun.

One step, for a batch of latents z and text conditions c:
  1. pick a timestep t from the DDIM grid t_k = k * (N // num_ddim_timesteps) - 1 (k = 1..num_ddim_timesteps,
     N the teacher's training timesteps) and noise z to x_t;
  2. the teacher (the same UNet with the LoRA switched off) with classifier-free guidance at scale g solves the
     probability-flow ODE from t to t - skip in `solver_steps` DDIM steps (the paper's solver Psi);
     g is fixed (`guidance`) or drawn per item as 1 + w, w ~ U[w_min, w_max] (the script's w: the guided output is
     cond + w (cond - uncond), i.e. a pipeline's guidance_scale of 1 + w);
  3. the student (UNet + LoRA) maps x_t to a clean latent through the consistency function
     f(x, t) = c_skip(t) x + c_out(t) x0(x, t) (LCMScheduler's boundary scalings); the target is the same function,
     without gradient, at the teacher's x_{t - skip}, computed by the student itself (LCM-LoRA's choice) or by an
     EMA of its LoRA (`target="ema"`); where t - skip < 0 the chain is anchored: the target is the clean x itself;
  4. a pseudo-Huber loss sqrt(d^2 + c^2) - c (or L2) pulls the two together; AdamW steps the LoRA matrices only.
Where the UNet has `time_cond_proj_dim` (an LCM UNet) the student and the target get the guidance embedding of
w = g - 1 (as LatentConsistencyModelPipeline feeds it); otherwise the guidance is baked into the LoRA and the LoRA
runs at guidance 1. SDXL UNets get `text_embeds` / `time_ids` through the data's conditions.

Choices where diffusers' train_lcm_distill_lora_*.py differ or are silent: the teacher may jump more than one grid
point (`skip`, default N // num_ddim_timesteps = the script's topk) in several DDIM steps; the chain ends at a clean
latent (alpha = 1, LCMScheduler's set_alpha_to_one) rather than at alphas_cumprod[0]; guidance is applied to the
model output before it is turned into x0 and noise (the same in exact arithmetic: the conversions are linear).
The LoRA is PEFT's (kaiming-uniform down, zero up, the same draws from torch's generator) on the modules the
published LCM-LoRAs adapt, written in diffusers' form (`unet.<module>.lora_A.weight`, rank and alpha in the file's
`lora_adapter_metadata`), which minidiff's and diffusers' load_lora_weights both read.
"""
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import lora
from ..prepack import is_plain_layer
from ..schedulers.common import predict_eps, predict_x0, train_schedule
from ..schedulers.lcm import LCMScheduler
from ..pipelines.common import guidance_scale_embedding
from . import parallel

# the layers the published LCM-LoRAs (and diffusers' LCM-LoRA scripts) adapt: module names ending with these
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
           "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
ADAPTER = "lcm"
LORA_FILE = "pytorch_lora_weights.safetensors"
STATE_DIR = "lcm-state"  # under --out: the data cache and the checkpoint


@dataclass
class LCMDistillConfig:
    """The settings of one run; names follow diffusers' train_lcm_distill_lora_sd_wds.py where it has them."""
    steps: int = 1000
    batch: int = 8  # the global batch (all processes together)
    lr: float = 1e-4
    warmup: int = 0  # linear warm-up steps of the constant schedule (used when no lr_schedule is given)
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    rank: int = 64
    alpha: float = None  # LoRA alpha (None: = rank, scale 1)
    targets: tuple = TARGETS
    num_ddim_timesteps: int = 50
    skip: int = None  # timesteps the teacher jumps per link (None: N // num_ddim_timesteps)
    solver_steps: int = 1  # DDIM steps the teacher takes per jump
    guidance: float = None  # a fixed guidance scale (pipeline convention); None: draw w in [w_min, w_max]
    w_min: float = 5.0
    w_max: float = 15.0
    loss: str = "huber"  # "huber" (pseudo-Huber) or "l2"
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    target: str = "self"  # "self" (LCM-LoRA) or "ema"
    ema_decay: float = 0.95
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0  # 0: no checkpoints
    save_dtype: str = "float16"  # the written LoRA's dtype (published LCM-LoRAs are float16)

    def check(self, num_train_timesteps=1000):
        """Every setting that can be wrong, before any work: ValueError naming the argument and value."""
        def bad(name, why):
            raise ValueError(f"LCMDistillConfig {name}={getattr(self, name)!r} (--{name.replace('_', '-')}): {why}")
        for name in ("steps", "batch", "rank", "num_ddim_timesteps", "solver_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "use a whole number >= 1")
        if self.num_ddim_timesteps > num_train_timesteps:
            bad("num_ddim_timesteps", f"at most the teacher's {num_train_timesteps} training timesteps")
        skip = self.jump(num_train_timesteps)
        if not isinstance(skip, int) or not 1 <= skip < num_train_timesteps:
            bad("skip", f"use a whole number of timesteps in [1, {num_train_timesteps - 1}]")
        if skip % self.solver_steps:
            bad("solver_steps", f"must divide skip={skip} (the teacher's DDIM steps are equal)")
        if self.loss not in ("huber", "l2"):
            bad("loss", "use 'huber' or 'l2'")
        if self.target not in ("self", "ema"):
            bad("target", "use 'self' (the student, as LCM-LoRA) or 'ema'")
        if self.guidance is not None and not (math.isfinite(self.guidance) and self.guidance >= 1):
            bad("guidance", "a guidance scale >= 1 (1 = no guidance)")
        if self.guidance is None and not (0 <= self.w_min <= self.w_max and math.isfinite(self.w_max)):
            bad("w_min", f"need 0 <= w_min <= w_max (w_max={self.w_max})")
        for name in ("lr", "huber_c", "timestep_scaling", "max_grad_norm"):
            if not getattr(self, name) > 0:
                bad(name, "use a positive number")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", "use a number in [0, 1)")
        if self.save_dtype not in ("float16", "float32", "bfloat16"):
            bad("save_dtype", "use float16, bfloat16 or float32")

    def jump(self, num_train_timesteps=1000):
        return self.skip if self.skip is not None else num_train_timesteps // self.num_ddim_timesteps


# ----------------------------------------------------------------------------- the trainable LoRA

def target_names(unet, targets=TARGETS):
    """Module paths of the plain Linear/Conv2d layers of `unet` whose names end with one of `targets`."""
    return [n for n, m in unet.named_modules()
            if is_plain_layer(m) and any(n == t or n.endswith("." + t) for t in targets)]


def peft_init(module, rank):
    """(down, up) initialised as PEFT does (init_lora_weights=True): both built as layers (their default init
    draws from torch's generator), then down kaiming-uniform, up zero, so training starts at the base model."""
    if isinstance(module, nn.Linear):
        down = nn.Linear(module.in_features, rank, bias=False)
        up = nn.Linear(rank, module.out_features, bias=False)
    else:  # LoCon: a k x k down convolution with the base's stride and padding, a 1 x 1 up
        down = nn.Conv2d(module.in_channels, rank, module.kernel_size, module.stride, module.padding, bias=False)
        up = nn.Conv2d(rank, module.out_channels, 1, bias=False)
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    nn.init.zeros_(up.weight)
    return down.weight.data, up.weight.data


def add_trainable_lora(unet, rank, alpha=None, targets=TARGETS, name=ADAPTER):
    """Freeze `unet` and add adapter `name` (minidiff.lora's layers, the ops seam's lora_linear/lora_conv2d) to
    every targeted layer, its down/up as trainable Parameters. Returns {module path: adapter}, in module order."""
    unet.requires_grad_(False)
    alpha = rank if alpha is None else alpha
    adapters = {}
    for path in target_names(unet, targets):
        base = unet.get_submodule(path)
        down, up = (m.to(device=base.weight.device, dtype=base.weight.dtype) for m in peft_init(base, rank))
        layer = lora._wrap(unet, path)
        adapter = lora.LoRAAdapter(down, up, None, alpha / rank)
        adapter.down, adapter.up = nn.Parameter(down), nn.Parameter(up)  # buffers -> trainable Parameters
        layer.adapters[name] = adapter
        layer.adapter_weights[name] = 1.0
        adapters[path] = adapter
    if not adapters:
        raise ValueError(f"lcm-lora: no layer of the UNet matches the LoRA targets {list(targets)}")
    lora._activate({"unet": unet}, [name], [1.0])
    return adapters


def lora_parameters(adapters):
    return [p for a in adapters.values() for p in (a.down, a.up)]


def diffusers_state_dict(adapters, dtype=torch.float32):
    """The LoRA in diffusers' (PEFT) form: unet.<module>.lora_A.weight (down), .lora_B.weight (up)."""
    sd = {}
    for path, a in adapters.items():
        sd[f"unet.{path}.lora_A.weight"] = a.down.detach().to(dtype).contiguous().clone()
        sd[f"unet.{path}.lora_B.weight"] = a.up.detach().to(dtype).contiguous().clone()
    return sd


def save_lora(adapters, folder, rank, alpha, dtype=torch.float16):
    """Write pytorch_lora_weights.safetensors as diffusers' save_lora_weights does (rank and alpha in the
    header's lora_adapter_metadata); returns its path."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    meta = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": sorted(adapters),
            "unet.rank_pattern": {}, "unet.alpha_pattern": {}}  # the LoraConfig fields diffusers reads back
    path = os.path.join(folder, LORA_FILE)
    save_file(diffusers_state_dict(adapters, dtype), path,
              metadata={"format": "pt", lora.METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)})
    return path


# ----------------------------------------------------------------------------- the consistency distillation

def ddim_grid(num_train_timesteps, num_ddim_timesteps):
    """The skipping timesteps t_k = k * (N // n) - 1, k = 1..n (LCMScheduler's original_inference_steps grid)."""
    return torch.arange(1, num_ddim_timesteps + 1) * (num_train_timesteps // num_ddim_timesteps) - 1


def alpha_at(acp, t):
    """alpha_bar at integer timesteps t, shaped for a batch; 1 (clean) where t < 0."""
    return torch.where(t >= 0, acp[t.clamp(min=0)], torch.ones((), device=acp.device)).view(-1, 1, 1, 1)


def ddim_step(x0, eps, a_next):
    """DDIM (eta = 0): x_next = sqrt(a_next) x0 + sqrt(1 - a_next) eps."""
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def unet_output(unet, x, t, cond, w_embedding=None):
    """The UNet's prediction for conditions {prompt_embeds, [text_embeds, time_ids]} (SDXL: the added ones)."""
    added = {k: cond[k] for k in ("text_embeds", "time_ids")} if "text_embeds" in cond else None
    return unet(x, t, encoder_hidden_states=cond["prompt_embeds"], timestep_cond=w_embedding,
                added_cond_kwargs=added).sample


def guided_pair(cond, uncond):
    """[uncond; cond] batched for one guided teacher call; uncond rows (batch 1) broadcast to the batch."""
    n = len(cond["prompt_embeds"])
    return {k: torch.cat([uncond[k].expand(n, *cond[k].shape[1:]) if k in uncond else cond[k], cond[k]])
            for k in cond}


@torch.no_grad()
def teacher_solve(unet, x, t, cond, uncond, guidance, acp, skip, solver_steps, prediction_type):
    """The guided teacher's DDIM path from x at t to t - skip in `solver_steps` equal steps (the LoRA off).
    Items whose path reaches t < 0 early stop there: x is then the clean latent."""
    pair, step = guided_pair(cond, uncond), skip // solver_steps
    g = guidance.view(-1, 1, 1, 1)
    with adapters_off(unet):
        for k in range(solver_steps):
            s, s_next = t - k * step, t - (k + 1) * step
            a, a_next = alpha_at(acp, s), alpha_at(acp, s_next)
            out_u, out_c = unet_output(unet, torch.cat([x, x]), torch.cat([s, s]).clamp(min=0), pair).chunk(2)
            out = out_u + g * (out_c - out_u)
            x0, eps = predict_x0(prediction_type, out, x, a), predict_eps(prediction_type, out, x, a)
            x = torch.where((s >= 0).view(-1, 1, 1, 1), ddim_step(x0, eps, a_next), x)
    return x


class adapters_off:
    """Inside the block the UNet runs without its LoRA: the teacher."""

    def __init__(self, unet):
        self.layers = lora.lora_layers(unet)

    def __enter__(self):
        self.was = [layer.enabled for layer in self.layers]
        for layer in self.layers:
            layer.enabled = False

    def __exit__(self, *exc):
        for layer, enabled in zip(self.layers, self.was):
            layer.enabled = enabled


def consistency(unet, x, t, a, cond, prediction_type, scalings, w_embedding=None):
    """f(x, t) = c_skip(t) x + c_out(t) x0(x, t): the student's (or the target's) estimate of the clean latent."""
    c_skip, c_out = scalings.boundary_scalings(t.float())
    x0 = predict_x0(prediction_type, unet_output(unet, x, t, cond, w_embedding), x, a)
    return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0


def distill_loss(pred, target, kind, c):
    if kind == "l2":
        return F.mse_loss(pred.float(), target.float())
    return (((pred - target) ** 2 + c ** 2).sqrt() - c).mean()


def constant_lr(base, warmup):
    return lambda step: base * min(1.0, (step + 1) / warmup) if warmup else base


# ----------------------------------------------------------------------------- checkpoints

class TrainState(nn.Module):
    """What a checkpoint holds besides the optimizer and the generator: the LoRA matrices and the EMA target.
    Written and read by blocks.py's save_checkpoint / load_checkpoint (safetensors + JSON, no pickle)."""

    def __init__(self, params, ema=None):
        super().__init__()
        self.lora = nn.ParameterList(params)  # the same Parameter objects: loading restores them in place
        for i, e in enumerate(ema or []):
            self.register_buffer(f"ema{i}", e)


# ----------------------------------------------------------------------------- the loop

def train(unet, scheduler_config, data, config, out=None, resume=False, stop_after=None, lr_schedule=None,
          log=print):
    """Distil an LCM-LoRA into `unet` (modified in place: it gains the trainable adapter "lcm").

    `scheduler_config`: the teacher's scheduler config (betas, prediction_type); `data`: an object with
    `sample(n, generator) -> (latents, cond)` for a global batch of n (cond: prompt_embeds, and for SDXL text_embeds
    and time_ids) and `uncond` (the same keys, batch 1: the unconditional side of guidance). `lr_schedule(step)`
    gives the learning rate (default: constant after `config.warmup`). With `out` and `config.checkpoint_every`,
    out/lcm-state/ holds the latest checkpoint; `resume` continues from it; `stop_after` ends after that many steps (a
    time-boxed run, resumed later). Under torchrun every process draws the whole global batch from the same
    generator and takes its shard (parallel.py). Returns (adapters, the global batch's loss at every step run).
    """
    from .blocks import load_checkpoint, save_checkpoint
    N = scheduler_config.num_train_timesteps
    config.check(N)
    prediction_type = scheduler_config.prediction_type
    rank, world = parallel.init()
    rows = parallel.shard(config.batch, rank, world)  # the batch must split evenly: an error before any work
    state_dir = None if out is None else os.path.join(out, STATE_DIR)
    with torch.random.fork_rng():  # the LoRA's initial values come from the seed, as PEFT's from torch's generator
        torch.manual_seed(config.seed)
        adapters = add_trainable_lora(unet, config.rank, config.alpha, config.targets)
    alpha = config.rank if config.alpha is None else config.alpha
    params = lora_parameters(adapters)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    lr_schedule = lr_schedule or constant_lr(config.lr, config.warmup)
    ema = [p.detach().clone() for p in params] if config.target == "ema" else None
    if ema is not None:  # the target network: a second adapter holding the EMA of the LoRA
        for (path, a), down, up in zip(adapters.items(), ema[0::2], ema[1::2]):
            unet.get_submodule(path).adapters["target"] = lora.LoRAAdapter(down, up, None, alpha / config.rank)
            unet.get_submodule(path).adapter_weights["target"] = 1.0
    state = TrainState(params, ema)
    student = parallel.wrap(unet)
    device = next(unet.parameters()).device
    acp = train_schedule(scheduler_config)[1].to(device)  # betas with the zero-terminal-SNR rescale
    uncond = {k: v.to(device) for k, v in data.uncond.items()}
    grid, skip = ddim_grid(N, config.num_ddim_timesteps), config.jump(N)
    scalings = LCMScheduler(timestep_scaling=config.timestep_scaling, num_train_timesteps=N)
    time_cond = getattr(unet.config, "time_cond_proj_dim", None)
    g = torch.Generator().manual_seed(config.seed)
    start = 0
    if resume and state_dir and os.path.isfile(os.path.join(state_dir, "checkpoint.safetensors")):
        start = load_checkpoint(state_dir, state, optimizer, g)
        if parallel.is_main():
            log(f"[lcm-lora] resumed at step {start} from {state_dir}")
    if parallel.is_main():
        w = config.guidance if config.guidance is not None else f"1 + U[{config.w_min}, {config.w_max}]"
        log(f"[lcm-lora] LoRA rank {config.rank} (alpha {alpha}) on {len(adapters)} layers, "
            f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters; {config.steps} steps of {config.batch}"
            f"{f' on {world} processes' if world > 1 else ''}; teacher jump {skip} in {config.solver_steps} DDIM "
            f"steps; guidance {w}{'' if time_cond else ' (baked in)'}; {config.loss} loss; target {config.target}")
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    losses, began, window = [], time.perf_counter(), []
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule(step)
        latents, cond = data.sample(config.batch, g)
        t = grid[torch.randint(config.num_ddim_timesteps, (config.batch,), generator=g)]
        noise = torch.randn(latents.shape, generator=g)
        if config.guidance is not None:
            guidance = torch.full((config.batch,), float(config.guidance))
        else:
            guidance = 1 + config.w_min + (config.w_max - config.w_min) * torch.rand(config.batch, generator=g)
        latents, noise, t, guidance = (x[rows].to(device) for x in (latents, noise, t, guidance))
        cond = {k: v[rows].to(device) for k, v in cond.items()}
        w_embedding = guidance_scale_embedding(guidance - 1, time_cond) if time_cond else None

        t_prev = t - skip  # < 0 for the first grid points: there the target is the clean latent itself
        a, a_prev = alpha_at(acp, t), alpha_at(acp, t_prev)
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
        x_prev = teacher_solve(unet, x_t, t, cond, uncond, guidance, acp, skip, config.solver_steps,
                               prediction_type)
        with torch.no_grad():
            if ema is not None:
                lora._activate({"unet": unet}, ["target"], [1.0])
            target = consistency(unet, x_prev, t_prev.clamp(min=0), a_prev, cond, prediction_type, scalings,
                                 w_embedding)
            target = torch.where((t_prev >= 0).view(-1, 1, 1, 1), target, x_prev)
            if ema is not None:
                lora._activate({"unet": unet}, [ADAPTER], [1.0])
        pred = consistency(student, x_t, t, a, cond, prediction_type, scalings, w_embedding)
        loss = distill_loss(pred, target, config.loss, config.huber_c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.mul_(config.ema_decay).add_(p.detach(), alpha=1 - config.ema_decay)
        losses.append(parallel.all_mean(loss).item())
        window.append(losses[-1])
        done = step + 1
        if parallel.is_main() and (done % config.log_every == 0 or done == end):
            elapsed = time.perf_counter() - began
            eta = elapsed / (done - start) * (config.steps - done)
            log(f"[lcm-lora] step {done:5d}/{config.steps}  loss {sum(window) / len(window):.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  {elapsed / 60:5.1f} min elapsed, {eta / 60:4.1f} min to go")
            window = []
        if state_dir and config.checkpoint_every and (done % config.checkpoint_every == 0 or done == end):
            if parallel.is_main():
                save_checkpoint(state_dir, state, optimizer, done, g)
            parallel.barrier()
    if out is not None and end == config.steps and parallel.is_main():
        path = save_lora(adapters, out, config.rank, alpha, getattr(torch, config.save_dtype))
        log(f"[lcm-lora] done in {(time.perf_counter() - began) / 60:.1f} min; wrote {path}")
    parallel.barrier()
    return adapters, losses


# ----------------------------------------------------------------------------- data and the command line

class LatentData:
    """Latents (posterior mean and std, in diffusion units) and text conditions encoded once (data.py's cache):
    each step draws items and mean + std x noise from the trainer's generator."""

    def __init__(self, mean, std, cond, uncond):
        self.mean, self.std, self.cond, self.uncond = mean, std, cond, uncond

    def sample(self, n, g):
        idx = torch.randint(len(self.mean), (n,), generator=g)
        latents = self.mean[idx].float() + self.std[idx].float() * torch.randn(self.mean[idx].shape, generator=g)
        return latents, {k: v[idx].float() for k, v in self.cond.items()}


def add_arguments(p):
    """`minidiff distill lcm-lora` options (diffusers' script names where it has them)."""
    p.add_argument("--model", required=True, help="the teacher: an SD 1.x/2.x pipeline folder in the Hub layout")
    p.add_argument("--out", required=True, help="where pytorch_lora_weights.safetensors (and lcm-state/) go")
    p.add_argument("--data", default="shapes", help="'shapes', a folder of images with .txt captions, or a prompts file")
    p.add_argument("--images", type=int, default=2000, help="pictures drawn for --data shapes")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8, help="the global batch (a multiple of the processes)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--guidance", type=float, default=None, help="a fixed guidance scale baked into the LoRA")
    p.add_argument("--w-min", type=float, default=None, help="lowest w (guidance scale 1 + w); default 5")
    p.add_argument("--w-max", type=float, default=None, help="highest w; default 15")
    p.add_argument("--num-ddim-timesteps", type=int, default=50)
    p.add_argument("--skip", type=int, default=None, help="timesteps the teacher jumps (default 1000 // grid)")
    p.add_argument("--solver-steps", type=int, default=1, help="DDIM steps of the teacher per jump")
    p.add_argument("--loss", default="huber", help="huber (pseudo-Huber) or l2")
    p.add_argument("--huber-c", type=float, default=0.001)
    p.add_argument("--target", default="self", help="self (LCM-LoRA) or ema")
    p.add_argument("--ema-decay", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue from --out/lcm-state/")
    p.add_argument("--stop-after", type=int, default=None, help="end after this many steps (resume later)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")


def config_from_args(args):
    """The run's LCMDistillConfig, every value checked: errors before any work."""
    if args.guidance is not None and (args.w_min is not None or args.w_max is not None):
        raise ValueError(f"--guidance {args.guidance} with --w-min/--w-max: give a fixed guidance or a range, not both")
    config = LCMDistillConfig(
        steps=args.steps, batch=args.batch, lr=args.lr, rank=args.rank, alpha=args.alpha, guidance=args.guidance,
        w_min=5.0 if args.w_min is None else args.w_min, w_max=15.0 if args.w_max is None else args.w_max,
        num_ddim_timesteps=args.num_ddim_timesteps, skip=args.skip, solver_steps=args.solver_steps, loss=args.loss,
        huber_c=args.huber_c, target=args.target, ema_decay=args.ema_decay, seed=args.seed,
        checkpoint_every=args.checkpoint_every)
    config.check()
    return config


def check_arguments(args):
    from .data import check_source
    config = config_from_args(args)
    index = os.path.join(args.model, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"--model {args.model!r}: not a pipeline folder (no model_index.json)")
    with open(index, encoding="utf-8") as f:
        name = json.load(f).get("_class_name")
    if name not in ("StableDiffusionPipeline", "LatentConsistencyModelPipeline"):
        raise ValueError(f"--model {args.model!r}: a {name}; the command distils SD 1.x/2.x pipelines (SDXL: call "
                         "minidiff.distill.lcm_lora.train with text_embeds/time_ids conditions)")
    if os.path.isfile(args.out) or os.path.abspath(args.out) == os.path.abspath(args.model):
        raise ValueError(f"--out {args.out!r}: give a new folder (not a file, not the model's folder)")
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after {args.stop_after}: at least 1")
    check_source(args.data)
    return config


def run(args):
    """`minidiff distill lcm-lora`: teacher folder -> LoRA file in --out; under torchrun, one shard per process.
    A wrong argument or file is one line (SystemExit) before any work."""
    try:
        config = check_arguments(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"minidiff distill lcm-lora: {' '.join(str(e).split())}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        distill(args, config)
    finally:
        parallel.cleanup()


def distill(args, config):
    from ..pipelines.stable_diffusion import StableDiffusionPipeline
    from .data import cached
    parallel.init()
    say = print if parallel.is_main() else (lambda *a, **k: None)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    cache = cached(pipe, args.data, os.path.join(args.out, STATE_DIR), log=say, n_images=args.images, seed=args.seed)
    data = LatentData(cache["mean"], cache["std"], {"prompt_embeds": cache["text"]},
                      {"prompt_embeds": cache["uncond"].float()})
    if torch.cuda.is_available():
        pipe.unet.to(torch.device("cuda", torch.cuda.current_device()))
    train(pipe.unet, pipe.scheduler.cfg, data, config, out=args.out, resume=args.resume, stop_after=args.stop_after,
          log=say)
