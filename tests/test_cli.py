"""The command line: `python -m minidiff generate ...` writes a PNG with its parameters, refuses to overwrite."""
import subprocess
import sys

import pytest
import torch
from PIL import Image

from minidiff import StableDiffusionPipeline
from minidiff.cli import main
from utils import assert_same_image, build_sd


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cli_sd"))
    build_sd(folder)
    return folder


def test_generate_writes_png_with_parameters(model, tmp_path):
    out = tmp_path / "img.png"
    proc = subprocess.run([sys.executable, "-m", "minidiff", "generate", "a blue house", "--model", model,
                           "--steps", "2", "--guidance", "4", "--seed", "3", "--width", "32", "--height", "24",
                           "--negative", "fog", "--dtype", "float32", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "|####################|" in proc.stderr  # the progress bar reached the last step
    image = Image.open(out)
    assert image.size == (32, 24)
    params = image.text["parameters"]
    assert params.startswith("a blue house\nNegative prompt: fog\n")
    assert "Steps: 2" in params and "CFG scale: 4.0" in params and "Seed: 3" in params and model in params
    # same seed, same image as the library call (the subprocess may run more threads: 1 level apart at most)
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a blue house", negative_prompt="fog", num_inference_steps=2, guidance_scale=4.0, width=32, height=24,
               generator=torch.Generator().manual_seed(3)).images[0]
    assert_same_image([image.convert("RGB")], [ref])


def test_refuses_to_overwrite_and_bad_sizes(model, tmp_path):
    out = tmp_path / "exists.png"
    out.write_bytes(b"precious")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["generate", "x", "--model", model, "--out", str(out)])
    assert out.read_bytes() == b"precious"
    with pytest.raises(SystemExit, match="--width 30 must be a positive multiple of 8"):
        main(["generate", "x", "--model", model, "--width", "30", "--out", str(tmp_path / "a.png")])
    with pytest.raises(SystemExit, match="--steps 0"):
        main(["generate", "x", "--model", model, "--steps", "0", "--out", str(tmp_path / "a.png")])
    with pytest.raises(SystemExit, match="must end in .png"):
        main(["generate", "x", "--model", model, "--out", str(tmp_path / "a.jpg")])
