"""minidiff.distill.lcm_lora, the LCM-LoRA trainer: its boundary scalings and DDIM solver against diffusers'
LCMScheduler and DDIMScheduler; a few steps reduce the loss (SD, SDXL, an LCM UNet with a guidance embedding,
the EMA target); resume equals uninterrupted; the written file loads in diffusers and in minidiff and draws the
same image; the command's errors come before any work."""
import argparse
import os

import pytest
import torch

from minidiff import lora
from minidiff.distill import lcm_lora
from minidiff.models.unet import UNet2DConditionModel
from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline
from minidiff.schedulers import DDPMScheduler
from minidiff.schedulers.common import train_schedule

if __name__ != "__main__":  # the torchrun worker at the end needs neither (each import costs it seconds)
    import diffusers
    from tests.utils import assert_same_image, build_lora_sd, build_lora_sdxl, gen, seeded_


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """The tiny seeded SD 1.x and SDXL pipelines of tests/utils.py, saved once in the Hub layout."""
    return {"sd": build_lora_sd(str(tmp_path_factory.mktemp("sd"))),
            "sdxl": build_lora_sdxl(str(tmp_path_factory.mktemp("sdxl")))}


@pytest.fixture
def sd_repo(repos):
    return repos["sd"]


def scheduler_config(**kw):
    return DDPMScheduler(**kw).cfg


def diffusers_to_ours(config):
    return DDPMScheduler.from_config(dict(config)).cfg


def toy_data(n=6, channels=4, size=8, tokens=5, width=32, seed=0, sdxl=False):
    """Smooth random latents and text conditions, encoded once, as the trainer reads them."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, channels, 2, 2, generator=g)
    mean = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    cond = {"prompt_embeds": torch.randn(n, tokens, width, generator=g)}
    uncond = {"prompt_embeds": torch.zeros(1, tokens, width)}
    if sdxl:
        cond["text_embeds"] = torch.randn(n, 32, generator=g)
        cond["time_ids"] = torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(n, 1)
        uncond["text_embeds"] = torch.zeros(1, 32)
    return lcm_lora.LatentData(mean, torch.full_like(mean, 0.05), cond, uncond)


def fixed_loss(unet, data, config, scheduler_cfg, seed=123):
    """The distillation loss of one fixed batch (same items, timesteps, noise): a measure that does not move."""
    g = torch.Generator().manual_seed(seed)
    latents, cond = data.sample(8, g)
    acp = train_schedule(scheduler_cfg)[1]
    grid, skip = lcm_lora.ddim_grid(1000, config.num_ddim_timesteps), config.jump()
    t = grid[torch.randint(config.num_ddim_timesteps, (8,), generator=g)]
    noise = torch.randn(latents.shape, generator=g)
    guidance = torch.full((8,), 4.0)
    scalings = lcm_lora.LCMScheduler(timestep_scaling=config.timestep_scaling)
    a, a_prev = lcm_lora.alpha_at(acp, t), lcm_lora.alpha_at(acp, t - skip)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    pt = scheduler_cfg.prediction_type
    emb = None
    if unet.config.time_cond_proj_dim:
        emb = lcm_lora.guidance_scale_embedding(guidance - 1, unet.config.time_cond_proj_dim)
    with torch.no_grad():
        x_prev = lcm_lora.teacher_solve(unet, x_t, t, cond, data.uncond, guidance, acp, skip, config.solver_steps, pt)
        target = lcm_lora.consistency(unet, x_prev, (t - skip).clamp(min=0), a_prev, cond, pt, scalings, emb)
        target = torch.where((t - skip >= 0).view(-1, 1, 1, 1), target, x_prev)
        pred = lcm_lora.consistency(unet, x_t, t, a, cond, pt, scalings, emb)
    return lcm_lora.distill_loss(pred, target, "l2", config.huber_c).item()


def quiet(*a, **k):
    pass


# ----------------------------------------------------------------------------- the formulas against diffusers

def test_boundary_scalings_match_diffusers_lcm_scheduler():
    ref = diffusers.LCMScheduler(timestep_scaling=10.0)
    scalings = lcm_lora.LCMScheduler(timestep_scaling=10.0)
    t = torch.tensor([0, 1, 19, 259, 499, 999])
    ours = scalings.boundary_scalings(t.float())
    for i, step in enumerate(t.tolist()):
        c_skip, c_out = ref.get_scalings_for_boundary_condition_discrete(step)
        assert abs(float(ours[0][i]) - float(c_skip)) <= 1e-6 * max(1.0, abs(float(c_skip)))
        assert abs(float(ours[1][i]) - float(c_out)) <= 1e-6
    assert float(ours[0][0]) == 1.0 and float(ours[1][0]) == 0.0  # the identity at t = 0: the chain's anchor


class FakeUNet(torch.nn.Module):
    """A model whose output depends on x, t and the text: enough to check the solver's arithmetic."""

    def forward(self, x, t, encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None):
        text = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        out = 0.3 * torch.tanh(x) + 0.1 * (t.float() / 1000).view(-1, 1, 1, 1) + 0.2 * text
        return type("Out", (), {"sample": out})()


@pytest.mark.parametrize("prediction_type, skip, solver_steps", [("epsilon", 20, 1), ("v_prediction", 60, 3)])
def test_teacher_ddim_path_matches_diffusers_ddim_scheduler(prediction_type, skip, solver_steps):
    kw = dict(prediction_type=prediction_type, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
              set_alpha_to_one=True, clip_sample=False, rescale_betas_zero_snr=prediction_type == "v_prediction")
    ref = diffusers.DDIMScheduler(**kw, timestep_spacing="leading", steps_offset=0)
    ref.set_timesteps(1000 // (skip // solver_steps))
    ours_cfg = diffusers_to_ours(diffusers.DDPMScheduler(**{k: v for k, v in kw.items() if k != "set_alpha_to_one"}).config)
    acp = train_schedule(ours_cfg)[1]
    assert torch.allclose(acp, ref.alphas_cumprod, rtol=0, atol=1e-7)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([19, 39, 259, 999])
    x = torch.randn(4, 4, 8, 8, generator=g)
    cond = {"prompt_embeds": torch.randn(4, 3, 8, generator=g)}
    uncond = {"prompt_embeds": torch.randn(1, 3, 8, generator=g)}
    guidance = torch.tensor([1.0, 3.0, 5.0, 7.5])
    unet = FakeUNet()
    ours = lcm_lora.teacher_solve(unet, x, t, cond, uncond, guidance, acp, skip, solver_steps, prediction_type)
    for i in range(4):  # diffusers' DDIM steps with guidance, item by item, stopping at the clean end
        xi, s = x[i:i + 1], int(t[i])
        for _ in range(solver_steps):
            if s < 0:
                break
            ts = torch.tensor([s])
            c = unet(xi, ts, cond["prompt_embeds"][i:i + 1]).sample
            u = unet(xi, ts, uncond["prompt_embeds"]).sample
            xi = ref.step(u + guidance[i] * (c - u), s, xi, eta=0.0).prev_sample
            s -= skip // solver_steps
        assert torch.allclose(ours[i:i + 1], xi, rtol=0, atol=2e-5), (i, (ours[i:i + 1] - xi).abs().max())


# ----------------------------------------------------------------------------- training


def sd_unet(repo, **config):
    unet = UNet2DConditionModel.from_pretrained(repo, subfolder="unet")
    if config:
        cfg = dict(unet.config.__dict__, **config)
        grown = UNet2DConditionModel(type(unet.config)(**cfg))
        grown.load_state_dict(unet.state_dict(), strict=False)
        seeded_(grown.time_embedding.cond_proj, seed=4, std=0.05)
        unet = grown
    return unet


# A well-posed few-step check: with skip=999 on a 4-point grid every target is the guided teacher's own DDIM
# solution (the chain's anchored first link), so the LoRA regresses onto a fixed target. On these seeded random
# models Adam at 1e-4 for 20 steps lowers the loss of a fixed batch by ~9% (measured; deterministic for the
# seeds); larger rates overshoot. The bootstrapped links (the target = the student at t - skip) are covered by
# the bundled model's run (README).
FEW_STEPS = dict(steps=20, batch=4, lr=1e-4, rank=8, loss="l2", num_ddim_timesteps=4, skip=999)


def test_a_few_steps_reduce_the_loss(sd_repo):
    sched = scheduler_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    unet = sd_unet(sd_repo)
    data = toy_data(n=2)
    config = lcm_lora.LCMDistillConfig(**FEW_STEPS, seed=1, guidance=4.0)
    _, losses = lcm_lora.train(unet, sched, data, config, log=quiet)
    trained = fixed_loss(unet, data, config, sched)
    lora.disable_lora(unet)
    base = fixed_loss(unet, data, config, sched)
    assert len(losses) == 20 and all(map(torch.isfinite, torch.tensor(losses)))
    assert trained < 0.95 * base, (base, trained)


def test_sdxl_lcm_unet_path_runs_and_reduces_the_loss(repos):
    """SDXL conditions (text_embeds, time_ids) and an LCM UNet's guidance embedding (time_cond_proj_dim, w = 3)."""
    sched = scheduler_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    unet = sd_unet(repos["sdxl"], time_cond_proj_dim=8)
    data = toy_data(n=2, width=64, sdxl=True)
    config = lcm_lora.LCMDistillConfig(**FEW_STEPS, seed=2, guidance=4.0)
    lcm_lora.train(unet, sched, data, config, log=quiet)
    trained = fixed_loss(unet, data, config, sched)
    lora.disable_lora(unet)
    assert trained < 0.95 * fixed_loss(unet, data, config, sched)


def test_ema_target_with_decay_0_is_the_student_itself(sd_repo):
    sched = scheduler_config()
    config = dict(steps=2, batch=2, lr=1e-3, rank=2, skip=100, seed=4, guidance=None)
    _, own = lcm_lora.train(sd_unet(sd_repo), sched, toy_data(), lcm_lora.LCMDistillConfig(**config), log=quiet)
    _, ema0 = lcm_lora.train(sd_unet(sd_repo), sched, toy_data(),
                             lcm_lora.LCMDistillConfig(**config, target="ema", ema_decay=0.0), log=quiet)
    _, ema9 = lcm_lora.train(sd_unet(sd_repo), sched, toy_data(),
                             lcm_lora.LCMDistillConfig(**config, target="ema", ema_decay=0.9), log=quiet)
    assert own == ema0 and own[0] == ema9[0] and own[1:] != ema9[1:]


def test_resume_equals_uninterrupted(sd_repo, tmp_path):
    sched = scheduler_config()
    config = lcm_lora.LCMDistillConfig(steps=4, batch=2, lr=1e-3, rank=2, skip=200, solver_steps=2, seed=3,
                                       target="ema", checkpoint_every=2, guidance=None)
    whole, losses = lcm_lora.train(sd_unet(sd_repo), sched, toy_data(), config, log=quiet)
    out = str(tmp_path / "run")
    _, first = lcm_lora.train(sd_unet(sd_repo), sched, toy_data(), config, out=out, stop_after=2, log=quiet)
    assert not os.path.exists(os.path.join(out, lcm_lora.LORA_FILE))  # stopped early: no LoRA file yet
    resumed, rest = lcm_lora.train(sd_unet(sd_repo), sched, toy_data(), config, out=out, resume=True, log=quiet)
    assert first + rest == losses
    for path in whole:
        assert torch.equal(whole[path].down, resumed[path].down) and torch.equal(whole[path].up, resumed[path].up)


def test_written_lora_loads_in_diffusers_and_minidiff_with_the_same_image(sd_repo, tmp_path):
    sched = scheduler_config()
    unet = sd_unet(sd_repo)
    config = lcm_lora.LCMDistillConfig(steps=4, batch=2, lr=2e-2, rank=4, alpha=2.0, seed=5, save_dtype="float32",
                                       guidance=3.0)
    out = str(tmp_path / "lora")
    lcm_lora.train(unet, sched, toy_data(), config, out=out, log=quiet)
    path = os.path.join(out, lcm_lora.LORA_FILE)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_repo, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    ours = StableDiffusionPipeline.from_pretrained(sd_repo)
    ours.set_progress_bar_config(disable=True)
    from minidiff.schedulers import LCMScheduler
    ours.scheduler = LCMScheduler.from_config(dict(ref.scheduler.config))
    kw = dict(prompt="a photo of a cat", num_inference_steps=2, guidance_scale=1.0, output_type="np")
    plain = ours(**kw, generator=gen(0)).images
    ref.load_lora_weights(out, weight_name=lcm_lora.LORA_FILE)
    ours.load_lora_weights(path)
    a, b = ours(**kw, generator=gen(0)).images, ref(**kw, generator=gen(0)).images
    assert_same_image(a, b, max_diff=1)  # uint8 pixels within 1 (the project's image tolerance)
    assert abs(a - plain).max() > 2 / 255, "the trained LoRA does not change the image: the test would prove nothing"
    # minidiff's UNet with the file loaded computes what the trainer's LoRA computed
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert torch.allclose(ours.unet(x, t, text).sample, unet(x, t, text).sample, atol=1e-5)


def ddp_run(repo):
    """3 steps of a global batch of 4 (the same run in one process and in two)."""
    config = lcm_lora.LCMDistillConfig(steps=3, batch=4, lr=1e-3, rank=2, skip=100, seed=6, guidance=None)
    adapters, _ = lcm_lora.train(sd_unet(repo), scheduler_config(), toy_data(), config, log=quiet)
    return lcm_lora.diffusers_state_dict(adapters)


def test_two_gloo_processes_equal_one_with_the_same_global_batch(sd_repo, tmp_path):
    import subprocess
    import sys
    from safetensors.torch import load_file
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "ddp.safetensors")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.abspath(__file__), sd_repo, out], env=env, capture_output=True, text=True,
                          timeout=180)  # this file is the worker (its __main__ below)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, single = load_file(out), ddp_run(sd_repo)
    assert single.keys() == ddp.keys()
    # The gradient sums round differently, and Adam's first steps are ~lr x sign(gradient), so an element whose
    # gradient is ~0 may move differently: at most 5% of the farthest Adam can move an element (lr x steps); the
    # LoRA's up matrices (zero at the start) moved that far.
    reach = 1e-3 * 3
    for k, v in single.items():
        assert (ddp[k] - v).abs().max() <= 0.05 * reach, (k, (ddp[k] - v).abs().max())
    assert max(v.abs().max() for k, v in single.items() if "lora_B" in k) > 0.5 * reach


def test_the_shipped_small_students_lcm_lora_draws_as_in_diffusers(tmp_path):
    """assets/shapes-sd-small-lcm-lora (this trainer, the bundled recipe, on the small student): diffusers and
    minidiff draw the same 4-step LCM picture (uint8 within 1), and `minidiff generate --model small --lcm` runs."""
    from minidiff.assets import LORA_FILE, MODEL_DIR, SMALL_LORA_DIR, SMALL_UNET_DIR
    from minidiff.cli import main
    from minidiff.schedulers import LCMScheduler
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        MODEL_DIR, unet=diffusers.UNet2DConditionModel.from_pretrained(SMALL_UNET_DIR, subfolder="unet"),
        safety_checker=None)
    theirs.load_lora_weights(SMALL_LORA_DIR, weight_name=LORA_FILE)
    theirs.scheduler = diffusers.LCMScheduler.from_config(theirs.scheduler.config)
    ours = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    ours.unet = UNet2DConditionModel.from_pretrained(SMALL_UNET_DIR, subfolder="unet")
    ours.load_lora_weights(SMALL_LORA_DIR)
    ours.scheduler = LCMScheduler.from_config(dict(ours.scheduler.config))
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a small red circle on the left, blue background"] * 2, num_inference_steps=4,
              guidance_scale=1.0, output_type="np")
    assert_same_image(ours(**kw, generator=gen(3)).images, theirs(**kw, generator=gen(3)).images, max_diff=1)
    main(["generate", "a red circle on a blue background", "--model", "small", "--lcm", "--out",
          str(tmp_path / "small-lcm.png")])
    assert os.path.getsize(tmp_path / "small-lcm.png") > 0


# ----------------------------------------------------------------------------- the command


def parse(*argv):
    p = argparse.ArgumentParser()
    lcm_lora.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("argv, message", [
    (("--guidance", "5", "--w-min", "3"), "not both"),
    (("--loss", "l1"), "loss='l1'"),
    (("--skip", "30", "--solver-steps", "4"), "solver_steps=4"),
    (("--target", "teacher"), "target='teacher'"),
    (("--rank", "0"), "rank=0"),
    (("--data", "/no/such/folder"), "--data"),
])
def test_command_errors_before_any_work(sd_repo, tmp_path, argv, message):
    from minidiff.cli import main
    with pytest.raises(SystemExit, match=message):
        main(["distill", "lcm-lora", "--model", sd_repo, "--out", str(tmp_path / "o"), *argv])
    assert not os.path.exists(tmp_path / "o")
    with pytest.raises(SystemExit, match="model_index.json"):
        lcm_lora.run(parse("--model", str(tmp_path), "--out", str(tmp_path / "o")))


def test_command_trains_on_a_folder_and_writes_the_lora(sd_repo, tmp_path):
    from PIL import Image
    folder = tmp_path / "data"
    folder.mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (16, 16), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} photo")
    out = tmp_path / "lora"
    lcm_lora.run(parse("--model", sd_repo, "--out", str(out), "--data", str(folder), "--steps", "2", "--batch", "2",
                       "--rank", "2", "--checkpoint-every", "1"))
    assert os.path.isfile(out / lcm_lora.LORA_FILE) and os.path.isfile(out / lcm_lora.STATE_DIR / "cache.safetensors")
    unet = UNet2DConditionModel.from_pretrained(sd_repo, subfolder="unet")
    report = lora.load_lora_weights({"unet": unet}, str(out / lcm_lora.LORA_FILE), verbose=False)
    assert report.modules["unet"] == len(lcm_lora.target_names(UNet2DConditionModel.from_pretrained(sd_repo,
                                                                                                    subfolder="unet")))


if __name__ == "__main__":  # the torchrun worker of the 2-process test
    import sys
    from safetensors.torch import save_file
    from minidiff.distill import parallel
    parallel.init()
    torch.set_num_threads(1)
    state = ddp_run(sys.argv[1])
    if parallel.is_main():
        save_file(state, sys.argv[2])
    parallel.cleanup()
