"""Block-removal distillation (minidiff/distill): the BK-SDM / Segmind students on the real SD 1.5 config,
the student in diffusers, the trainer's losses, resume, and a 2-process gloo run against one process."""
import os
import subprocess
import sys

import diffusers
import pytest
import torch

import real_layouts as real
from utils import assert_close, seeded_

from minidiff.distill import blocks, surgery
from minidiff.models.unet import UNet2DConditionModel
from minidiff.weights.config import config_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# BK-SDM's own student configs (Nota-NetsPresso/BK-SDM, src/unet_config/bk_{base,small,tiny}/config.json):
# the keys that differ from SD 1.x's
BK_SDM = {
    "bk-sdm-base": dict(layers_per_block=1, mid_block_type="UNetMidBlock2DCrossAttn",
                        block_out_channels=[320, 640, 1280, 1280],
                        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
    "bk-sdm-small": dict(layers_per_block=1, mid_block_type=None, block_out_channels=[320, 640, 1280, 1280],
                         down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                         up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
    "bk-sdm-tiny": dict(layers_per_block=1, mid_block_type=None, block_out_channels=[320, 640, 1280],
                        down_block_types=["CrossAttnDownBlock2D"] * 3, up_block_types=["CrossAttnUpBlock2D"] * 3),
}
# UNet parameters as published: BK-SDM's model card (0.58B, 0.49B, 0.33B, rounded to 0.01B) and Segmind's
# distill-sd README (torchinfo, exact: SD 1.5 859,520,964; sd_small 579,384,964; sd_tiny 323,384,964)
PAPER_B = {"bk-sdm-base": 0.58, "bk-sdm-small": 0.49, "bk-sdm-tiny": 0.33}
SEGMIND = {"sd_small": 579_384_964, "sd_tiny": 323_384_964}


def meta_unet(cfg):
    with torch.device("meta"):
        return UNet2DConditionModel(config_from_dict(UNet2DConditionModel.config_class, cfg, where="test"))


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_sd15_students_match_the_papers_block_lists_and_parameter_counts():
    assert count(meta_unet(real.SD15_UNET)) == 859_520_964
    for arch, expected in BK_SDM.items():
        cfg, _ = surgery.student_config(real.SD15_UNET, arch)
        for key, value in expected.items():
            assert cfg.get(key, "UNetMidBlock2DCrossAttn") == value, (arch, key)
        n = count(meta_unet(cfg))
        # the card rounds: small's 482.3M and tiny's 323.4M print as 0.49B and 0.33B (the whole-model figures,
        # 0.66B and 0.50B, agree with these counts); within the rounding step of 0.01B
        assert abs(n / 1e9 - PAPER_B[arch]) <= 0.0101, (arch, n)
        with torch.device("meta"):
            assert count(diffusers.UNet2DConditionModel.from_config(cfg)) == n  # diffusers builds the same student
    for arch, n in SEGMIND.items():
        assert count(meta_unet(surgery.student_config(real.SD15_UNET, arch)[0])) == n
    assert surgery.student_config(real.SD15_UNET, "sd_small")[0] == surgery.student_config(real.SD15_UNET, "bk-sdm-base")[0]


def test_weight_rules_are_bk_sdms_connections():
    # BK-SDM's copy_weight_from_teacher table, student prefix -> teacher prefix
    _, base = surgery.student_config(real.SD15_UNET, "bk-sdm-base")
    _, tiny = surgery.student_config(real.SD15_UNET, "bk-sdm-tiny")
    for plan, pairs in ((base, {"up_blocks.0.resnets.1.": "up_blocks.0.resnets.2.",
                                "up_blocks.2.attentions.1.": "up_blocks.2.attentions.2.",
                                "up_blocks.3.resnets.0.": "up_blocks.3.resnets.0.",
                                "down_blocks.1.attentions.0.": "down_blocks.1.attentions.0."}),
                        (tiny, {"up_blocks.0.resnets.0.": "up_blocks.1.resnets.0.",
                                "up_blocks.0.attentions.1.": "up_blocks.1.attentions.2.",
                                "up_blocks.0.upsamplers.": "up_blocks.1.upsamplers.",
                                "up_blocks.2.resnets.1.": "up_blocks.3.resnets.2."})):
        for student, teacher in pairs.items():
            assert surgery.teacher_key(student + "conv1.weight", plan) == teacher + "conv1.weight"
    with pytest.raises(ValueError, match="pairs.7"):
        surgery.student_config(real.SD15_UNET, drop=("pairs.7",))
    with pytest.raises(ValueError, match="equally wide"):  # SDXL: 640 -> 1280
        surgery.student_config(real.SDXL_BASE_UNET, "bk-sdm-tiny")
    with pytest.raises(ValueError, match="removes nothing"):
        surgery.student_config(dict(real.SD15_UNET, layers_per_block=1), "bk-sdm-base")


TINY = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32, 32], layers_per_block=2,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=16,
            attention_head_dim=2, norm_num_groups=8)


def tiny_teacher(seed=0):
    unet = UNet2DConditionModel(config_from_dict(UNet2DConditionModel.config_class, TINY, where="test"))
    return seeded_(unet, seed, std=0.1).eval()


def inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.tensor([10, 700][:b]), torch.randn(b, 5, 16, generator=g)


@pytest.mark.parametrize("arch, drop", [("bk-sdm-base", ()), ("bk-sdm-small", ()), ("bk-sdm-tiny", ()),
                                        (None, ("pairs.0", "inner_stage"))])  # a per-stage layers_per_block list
def test_student_loads_in_diffusers_with_the_same_output(arch, drop):
    teacher = tiny_teacher()
    student, plan = surgery.make_student(teacher, arch, drop)
    x, t, text = inputs()
    cfg, _ = surgery.student_config(TINY, arch, drop)
    ref = diffusers.UNet2DConditionModel.from_config(cfg).eval()
    ref.load_state_dict(student.state_dict(), strict=True)
    with torch.no_grad():
        ours = student(x, t, text).sample
        pred, feats = blocks.unet_features(student, x, t, text)
        assert_close(ours, ref(x, t, text).sample, name=arch)
    assert torch.equal(pred, ours)  # the trainer's forward is the UNet's
    names = [s for s, _ in surgery.block_pairs(plan, len(student.down_blocks))]
    assert set(names) <= set(feats) and ("mid_block" in names) == (arch in ("bk-sdm-base", None))
    # where the blocks remain, the weights are the teacher's (rule 2: the up stage's last pair)
    t_state = teacher.state_dict()
    key = f"up_blocks.{len(student.up_blocks) - 1}.resnets.1.conv1.weight"
    assert torch.equal(student.state_dict()[key], t_state[surgery.teacher_key(key, plan)])


def synthetic_cache(n=32, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {"mean": torch.randn(n, 4, 8, 8, generator=g).half(), "std": (0.1 * torch.rand(n, 4, 8, 8, generator=g)).half(),
            "text": torch.randn(n, 5, 16, generator=g).half(), "uncond": torch.zeros(1, 5, 16).half()}


ACP = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)


def run(steps, arch="bk-sdm-tiny", **kw):
    torch.manual_seed(0)
    teacher = tiny_teacher()
    student, plan = surgery.make_student(teacher, arch)
    last = blocks.train(student, teacher, plan, synthetic_cache(), ACP, "v_prediction", steps, batch=8, lr=1e-3,
                        warmup=2, log=lambda *a: None, **kw)
    return student, teacher, plan, last


def held_out_losses(student, teacher, plan):
    pairs = surgery.block_pairs(plan, len(student.down_blocks))
    model = blocks.FeatureUNet(student, [s for s, _ in pairs])
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        batch = blocks.draw_batch(synthetic_cache(), g, 32, len(ACP), 0.1)
        return [v.item() for v in blocks.step_losses(model, teacher, [t for _, t in pairs], *batch, ACP, "v_prediction")]


def test_a_few_steps_reduce_each_loss():
    teacher = tiny_teacher()
    student, plan = surgery.make_student(teacher, "bk-sdm-tiny")
    before = held_out_losses(student, teacher, plan)
    trained, teacher, plan, _ = run(40)
    after = held_out_losses(trained, teacher, plan)
    for name, b, a in zip(("task", "output", "feature"), before, after):
        assert a < 0.9 * b, f"{name} loss {b:.4g} -> {a:.4g}"


def test_resume_equals_uninterrupted(tmp_path):
    whole, *_ = run(6)
    run(6, state_dir=str(tmp_path), save_every=3, stop_after=3)  # interrupted after 3 steps
    resumed, *_ = run(6, state_dir=str(tmp_path), save_every=3, resume=True)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k  # bit-equal


def test_two_gloo_processes_equal_one_with_the_same_global_batch(tmp_path):
    from safetensors.torch import load_file
    out = str(tmp_path / "ddp.safetensors")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    # this file is the worker (its __main__ below); --standalone picks a free port
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.abspath(__file__), out], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_file(out)
    single, *_ = run(4)  # one process, batch 8 = 2 processes x 4
    for k, v in single.state_dict().items():
        assert_close(ddp[k], v, rel=1e-4, name=k)  # the gradient sums round differently


@pytest.mark.parametrize("args, message", [
    (["--teacher", "/no/such", "--arch", "bk-sdm-small"], "not a pipeline folder"),
    (["--arch", "bk-sdm-base"], "removes nothing"),  # the bundled model's stages hold one pair each
    (["--drop", "mid_block", "--data", "/no/such"], "--data"),
    (["--arch", "bk-sdm-small", "--batch", "0"], "--batch 0"),
])
def test_cli_errors_come_before_any_work(tmp_path, args, message):
    from minidiff.assets import MODEL_DIR
    from minidiff.cli import main
    argv = ["distill", "blocks", "--teacher", MODEL_DIR, "--out", str(tmp_path / "out"), *args]
    with pytest.raises(SystemExit, match=message):
        main(argv)
    assert not os.path.exists(tmp_path / "out")


def test_the_shipped_small_student_loads_in_diffusers_and_generates(tmp_path):
    from minidiff.assets import MODEL_DIR, SMALL_UNET_DIR
    from minidiff.cli import SMALL_NAME, main
    from minidiff.infotext import read_png_infotext
    ours = UNet2DConditionModel.from_pretrained(SMALL_UNET_DIR, subfolder="unet").eval()
    ref = diffusers.UNet2DConditionModel.from_pretrained(SMALL_UNET_DIR, subfolder="unet").eval()
    teacher = UNet2DConditionModel.from_pretrained(MODEL_DIR, subfolder="unet")
    assert ours.config.mid_block_type is None and count(ours) < count(teacher)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 20, 64, generator=g)
    with torch.no_grad():
        assert_close(ours(x, torch.tensor([999, 300]), text).sample, ref(x, torch.tensor([999, 300]), text).sample)
    out = tmp_path / "small.png"
    main(["generate", "a red circle on a blue background", "--model", "small", "--steps", "2", "--out", str(out)])
    assert SMALL_NAME in read_png_infotext(str(out))


def test_data_sources_folder_and_prompts(tmp_path):
    import numpy as np
    from PIL import Image

    from minidiff.assets import MODEL_DIR
    from minidiff.distill import data
    from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.fromarray(np.full((80, 96, 3), colour, np.uint8)).save(folder / f"{i}.png")  # resized, cropped to 64
        (folder / f"{i}.txt").write_text(f"picture {i}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue star on the left\n")
    for source, n, std_zero in ((str(folder), 2, False), (str(prompts), 2, True)):
        cache = data.build_cache(pipe, source, teacher_steps=2, log=lambda *a: None)
        assert cache["mean"].shape == (n, 8, 8, 8) and cache["text"].shape == (n, 20, 64)
        assert bool((cache["std"] == 0).all()) == std_zero
    assert not torch.equal(cache["text"][0], cache["text"][1])
    (folder / "1.txt").unlink()
    with pytest.raises(ValueError, match="no caption file"):
        data.check_source(str(folder))


def test_distill_writes_a_pipeline_that_diffusers_and_minidiff_load_alike(tmp_path):
    from utils import assert_same_image, build_sd, gen

    from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline
    teacher = str(tmp_path / "teacher")
    build_sd(teacher)  # a tiny diffusers SD pipeline (2 stages of 2 pairs, epsilon prediction)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = str(tmp_path / "student")
    student, last = blocks.distill(teacher, out, arch="bk-sdm-small", data=str(prompts), steps=2, batch=2,
                                   save_every=0, log=lambda *a: None)
    assert last["loss"] > 0 and student.config.mid_block_type is None
    ref = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ours = StableDiffusionPipeline.from_pretrained(out)
    ours.set_progress_bar_config(disable=True)
    assert ref.unet.config.layers_per_block == 1 and ref.unet.mid_block is None
    kw = dict(num_inference_steps=3, height=32, width=32, output_type="np")
    assert_same_image(ours("a cat", generator=gen(0), **kw).images, ref("a cat", generator=gen(0), **kw).images)


if __name__ == "__main__":  # the torchrun worker of the test above
    from safetensors.torch import save_file

    from minidiff.distill import parallel
    parallel.init()
    torch.set_num_threads(1)
    trained, *_ = run(4)
    if parallel.is_main():
        save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, sys.argv[1])
    parallel.cleanup()
