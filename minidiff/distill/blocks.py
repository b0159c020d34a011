"""Block-removal knowledge distillation (BK-SDM; Segmind's SD-Small/Tiny): train a student UNet made by
`surgery.make_student` to match its teacher.

Loss per step, with weights (task, output, feature) = (1, 1, 1) by default, as the papers use:
  task     MSE(student(x_t, t, c), target): the teacher's prediction type (epsilon: the noise;
           v_prediction: v = sqrt(a) noise - sqrt(1 - a) x0; sample: x0)
  output   MSE(student(x_t, t, c), teacher(x_t, t, c))
  feature  sum over matched blocks of MSE(student block output, teacher block output): every down stage
           (its last resnet/attention pair's output, before the downsampler, so that a stage that lost its
           downsampler still matches), the mid block when both keep it, every up stage (its output)
Latents (posterior mean and std, a fresh sample each use) and text embeddings are encoded once
(data.py); a fraction `cfg_dropout` of captions is replaced by the empty prompt so that the student
keeps classifier-free guidance. Everything random comes from one seeded generator, drawn for the whole
global batch and sliced per process (parallel.py), so a run under torchrun equals one process with the
same global batch, and a resumed run equals the uninterrupted one (the checkpoint holds the student,
the optimizer, the step and the generator's state).
"""
import json
import math
import os
import shutil
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import parallel, surgery

STATE_DIR = "distill-state"  # under the output folder: the data cache and the checkpoint


# ----------------------------------------------------------------------------- the UNet with its block outputs

def unet_features(unet, sample, timestep, context):
    """(prediction, {block name: output}) of a minidiff UNet2DConditionModel (SD 1.x/2.x conditioning): its
    forward, keeping the blocks' outputs (`features=`, named as the UNet's modules)."""
    feats = {}
    return unet(sample, timestep, context, return_dict=False, features=feats)[0], feats


class FeatureUNet(nn.Module):
    """The student as one module returning (prediction, [matched block outputs]), so that DDP wraps it."""

    def __init__(self, unet, names):
        super().__init__()
        self.unet, self.names = unet, list(names)

    def forward(self, sample, timestep, context):
        pred, feats = unet_features(self.unet, sample, timestep, context)
        return pred, [feats[n] for n in self.names]


def check_unet(unet, where):
    c = unet.config
    if c.addition_embed_type is not None or c.class_embed_type is not None or c.center_input_sample:
        raise ValueError(f"{where}: the distillation trainer takes SD 1.x/2.x UNets conditioned on text only "
                         f"(addition_embed_type={c.addition_embed_type!r}, class_embed_type={c.class_embed_type!r}, "
                         f"center_input_sample={c.center_input_sample!r})")


# ----------------------------------------------------------------------------- one step

def target_of(prediction_type, latents, noise, a):
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    if prediction_type == "sample":
        return latents
    raise ValueError(f"scheduler prediction_type={prediction_type!r}: use 'epsilon', 'v_prediction' or 'sample'")


def draw_batch(cache, g, batch, n_timesteps, cfg_dropout):
    """Everything random of one step, for the whole global batch, from generator `g`."""
    n = cache["mean"].shape[0]
    idx = torch.randint(n, (batch,), generator=g)
    mean, std = cache["mean"][idx].float(), cache["std"][idx].float()
    latents = mean + std * torch.randn(mean.shape, generator=g)
    drop = torch.rand(batch, generator=g) < cfg_dropout
    text = torch.where(drop[:, None, None], cache["uncond"].float(), cache["text"][idx].float())
    t = torch.randint(0, n_timesteps, (batch,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    return latents, text, t, noise


def step_losses(student, teacher, names_teacher, latents, text, t, noise, acp, prediction_type):
    """(task, output, feature) losses of one (per-process) batch."""
    a = acp[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    with torch.no_grad():
        t_pred, t_feats = unet_features(teacher, noisy, t, text)
    s_pred, s_feats = student(noisy, t, text)
    task = F.mse_loss(s_pred.float(), target_of(prediction_type, latents, noise, a).float())
    output = F.mse_loss(s_pred.float(), t_pred.float())
    feature = sum(F.mse_loss(s.float(), t_feats[n].float()) for s, n in zip(s_feats, names_teacher))
    return task, output, feature


def lr_at(step, total, base, warmup):
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(total - warmup, 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(folder, student, opt, step, g):
    """student + optimizer + step + generator state, as safetensors and JSON (no pickle)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    tensors = {f"student.{k}": v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    state = opt.state_dict()
    for i, s in state["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    tensors["rng"] = g.get_state()
    save_file(tensors, os.path.join(folder, "checkpoint.safetensors.tmp"))
    os.replace(os.path.join(folder, "checkpoint.safetensors.tmp"), os.path.join(folder, "checkpoint.safetensors"))
    with open(os.path.join(folder, "checkpoint.json"), "w", encoding="utf-8") as f:
        json.dump({"step": step, "param_groups": state["param_groups"]}, f, indent=1)


def load_checkpoint(folder, student, opt, g):
    """The step a checkpoint was written at, with student, optimizer and generator restored."""
    from safetensors.torch import load_file
    path = os.path.join(folder, "checkpoint.safetensors")
    tensors = load_file(path)
    with open(os.path.join(folder, "checkpoint.json"), encoding="utf-8") as f:
        meta = json.load(f)
    student.load_state_dict({k[len("student."):]: v for k, v in tensors.items() if k.startswith("student.")})
    state = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    g.set_state(tensors["rng"])
    return meta["step"]


# ----------------------------------------------------------------------------- the loop

def train(student, teacher, plan, cache, alphas_cumprod, prediction_type, steps, batch=32, lr=2e-4,
          weights=(1.0, 1.0, 1.0), seed=0, cfg_dropout=0.1, warmup=50, state_dir=None, save_every=0,
          resume=False, stop_after=None, log_every=50, log=print):
    """Distil `teacher` into `student` (both minidiff UNets, `plan` from surgery) for `steps` steps of a
    global batch of `batch`; returns the last logged losses. In a process group each rank takes its
    slice of every global batch (parallel.shard). `state_dir` + `save_every`: checkpoints (rank 0);
    `resume`: continue from the checkpoint there; `stop_after`: end after that many steps (a time-boxed
    run, resumed later)."""
    rank, world = parallel.world()
    part = parallel.shard(batch, rank, world)
    check_unet(teacher, "teacher")
    device = next(student.parameters()).device
    teacher.eval().requires_grad_(False)
    pairs = surgery.block_pairs(plan, len(student.down_blocks))
    model = parallel.wrap(FeatureUNet(student.train(), [s for s, _ in pairs]))
    names_teacher = [t for _, t in pairs]
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    acp = alphas_cumprod.to(device)
    g = torch.Generator().manual_seed(seed)
    start = 0
    if resume and state_dir and os.path.isfile(os.path.join(state_dir, "checkpoint.safetensors")):
        start = load_checkpoint(state_dir, student, opt, g)
        log(f"[distill] resumed at step {start} from {state_dir}")
    elif resume:
        log(f"[distill] --resume: no checkpoint in {state_dir}; starting at step 0")
    w_task, w_out, w_feat = weights
    began, sums, count, last = time.perf_counter(), [0.0] * 4, 0, {}
    end = steps if stop_after is None else min(steps, start + stop_after)
    for step in range(start, end):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        latents, text, t, noise = (x[part].to(device) for x in draw_batch(cache, g, batch, len(acp), cfg_dropout))
        task, output, feature = step_losses(model, teacher, names_teacher, latents, text, t, noise, acp,
                                            prediction_type)
        loss = w_task * task + w_out * output + w_feat * feature
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        values = parallel.all_mean(torch.stack([loss, task, output, torch.as_tensor(feature)]).float()).tolist()
        sums = [s + v for s, v in zip(sums, values)]
        count += 1
        done = step + 1
        if done % log_every == 0 or done == end:
            elapsed = time.perf_counter() - began
            eta = elapsed / (done - start) * (steps - done)
            last = dict(zip(("loss", "task", "output", "feature"), (s / count for s in sums)))
            if parallel.is_main():
                log(f"[distill] step {done:5d}/{steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in last.items())
                    + f"  lr {opt.param_groups[0]['lr']:.2e}  {elapsed / 60:5.1f} min elapsed, {eta / 60:4.1f} min to go")
            sums, count = [0.0] * 4, 0
        if state_dir and save_every and (done % save_every == 0 or done == end):
            if parallel.is_main():
                save_checkpoint(state_dir, student, opt, done, g)
            parallel.barrier()
    return last


# ----------------------------------------------------------------------------- from a pipeline folder to a pipeline folder

def save_pipeline(teacher_dir, student, out, fp16=False):
    """The student as a whole pipeline folder in the Hub layout: the teacher's other parts copied (regular
    files only), the student's unet/ written (float16 if `fp16`)."""
    from ..weights.safe import read_json_file
    index = read_json_file(os.path.join(teacher_dir, "model_index.json"))
    os.makedirs(out, exist_ok=True)
    shutil.copyfile(os.path.join(teacher_dir, "model_index.json"), os.path.join(out, "model_index.json"))
    for name, value in index.items():
        if name.startswith("_") or name == "unet" or not isinstance(value, list) or value[0] is None:
            continue
        src, dst = os.path.join(teacher_dir, name), os.path.join(out, name)
        if not os.path.isdir(src) or os.path.islink(src):
            continue
        os.makedirs(dst, exist_ok=True)
        for f in os.listdir(src):
            path = os.path.join(src, f)
            if os.path.isfile(path) and not os.path.islink(path):
                shutil.copyfile(path, os.path.join(dst, f))
    unet = student
    if fp16:
        import copy
        unet = copy.deepcopy(student).half()
    unet.save_pretrained(os.path.join(out, "unet"))


def check_arguments(teacher, out, arch, drop, data, steps, batch, weights):
    """Every argument checked before any work; errors name the argument, the value and what is right."""
    from . import data as data_module
    if not os.path.isfile(os.path.join(teacher, "model_index.json")):
        raise ValueError(f"--teacher {teacher!r}: not a pipeline folder (no model_index.json); give a local "
                         "Stable Diffusion folder in the Hub layout")
    if not os.path.isfile(os.path.join(teacher, "unet", "config.json")):
        raise ValueError(f"--teacher {teacher!r}: no unet/config.json")
    from ..weights.safe import read_json_file
    surgery.student_config(read_json_file(os.path.join(teacher, "unet", "config.json")), arch, drop)
    data_module.check_source(data)
    if steps < 1:
        raise ValueError(f"--steps {steps}: must be at least 1")
    _, world = parallel.world()
    if batch < 1 or batch % world:
        raise ValueError(f"--batch {batch}: must be a positive multiple of the number of processes ({world})")
    if len(weights) != 3 or any(w < 0 for w in weights):
        raise ValueError(f"--weights {weights}: three non-negative numbers (task, output, feature)")
    if os.path.abspath(out) == os.path.abspath(teacher):
        raise ValueError(f"--out {out!r}: the teacher's own folder; give a new folder")


def distill(teacher, out, arch=None, drop=(), data="shapes", steps=1000, batch=32, lr=2e-4,
            weights=(1.0, 1.0, 1.0), seed=0, cfg_dropout=0.1, n_images=2000, resume=False, save_every=200,
            stop_after=None, fp16=False, log_every=50, log=print):
    """Teacher pipeline folder -> student pipeline folder `out` (Hub layout); the data cache and the
    checkpoint live in out/distill-state/. Returns (student, last losses)."""
    rank, world = parallel.init()  # first: the batch must split over the processes
    check_arguments(teacher, out, arch, drop, data, steps, batch, weights)
    from ..pipelines.stable_diffusion import StableDiffusionPipeline
    from ..schedulers.common import train_schedule
    from .data import cached
    say = log if parallel.is_main() else (lambda *a, **k: None)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    pipe = StableDiffusionPipeline.from_pretrained(teacher).to(device)
    pipe.set_progress_bar_config(disable=True)
    check_unet(pipe.unet, f"--teacher {teacher!r}")
    state_dir = os.path.join(out, STATE_DIR)
    cache = cached(pipe, data, state_dir, log=say, n_images=n_images, seed=seed)
    teacher_unet = pipe.unet.to(device)
    student, plan = surgery.make_student(teacher_unet, arch, drop)
    n_t = sum(p.numel() for p in teacher_unet.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    say(f"[distill] {arch or drop}: student {n_s / 1e6:.2f}M parameters, teacher {n_t / 1e6:.2f}M "
        f"({1 - n_s / n_t:.1%} fewer); {cache['mean'].shape[0]} items; {steps} steps of {batch} on {world} "
        f"process(es)")
    _, acp = train_schedule(pipe.scheduler.cfg)
    last = train(student, teacher_unet, plan, cache, acp, pipe.scheduler.cfg.prediction_type, steps, batch, lr,
                 weights, seed, cfg_dropout, state_dir=state_dir, save_every=save_every, resume=resume,
                 stop_after=stop_after, log_every=log_every, log=say)
    if parallel.is_main():
        save_pipeline(teacher, student.cpu(), out, fp16)
        say(f"[distill] wrote {out}")
    parallel.barrier()
    return student, last
