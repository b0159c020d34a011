"""The CLI's prompts: A1111 syntax by default (said in --help), recorded in the PNG's parameters, and
`--from-png` re-creating an image from the parameters minidiff or A1111 wrote."""
import pytest
import torch
from PIL import Image, PngImagePlugin

from minidiff import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
from minidiff.cli import main, parse_args
from minidiff.infotext import format_infotext, parse_infotext
from minidiff.samplers import scheduler_for
from utils import build_sd

A1111_INFOTEXT = """masterpiece, a (red:1.2) house
on a hill, [fog]
Negative prompt: blurry,
lowres
Steps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 4, Seed: 5, Size: 32x24, Model hash: 6ce0161689, \
Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: "detail: 62a1, style: 03ff", Version: v1.10.1"""


def test_parse_a1111_infotext():
    prompt, negative, s = parse_infotext(A1111_INFOTEXT)
    assert prompt == "masterpiece, a (red:1.2) house\non a hill, [fog]"
    assert negative == "blurry,\nlowres"
    assert s["Steps"] == "2" and s["Sampler"] == "Euler a" and s["CFG scale"] == "4" and s["Seed"] == "5"
    assert s["Size"] == "32x24" and s["Model"] == "v1-5-pruned-emaonly" and s["Clip skip"] == "2"
    assert s["Lora hashes"] == "detail: 62a1, style: 03ff"  # a quoted value keeps its commas
    # a prompt without a settings line is all prompt; minidiff's own text reads back as written
    assert parse_infotext("just a prompt") == ("just a prompt", "", {})
    text = format_infotext("a, b", "c", {"Steps": 3, "Model": "C:\\models\\x", "Seed": 1, "Skipped": None})
    assert parse_infotext(text) == ("a, b", "c", {"Steps": "3", "Model": "C:\\models\\x", "Seed": "1"})


def test_help_says_a1111_is_the_default(capsys):
    with pytest.raises(SystemExit):
        parse_args(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "A1111's syntax by default" in out and "'a1111' (the default)" in out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cli_prompts_sd"))
    build_sd(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


def library(pipe, prompt, seed, **kw):
    return pipe(prompt, num_inference_steps=2, guidance_scale=4.0, width=32, height=24,
                generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images[0]


def pixels(path):
    import numpy as np
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def as_uint8(x):
    import numpy as np
    return np.round(x * 255).astype(int)


def test_generate_reads_a1111_syntax_and_from_png_recreates_it(model, tmp_path):
    folder, pipe = model
    prompt = "a (blue:1.3) house BREAK [dark] sky" + " and trees" * 40
    out = tmp_path / "a.png"
    main(["generate", prompt, "--model", folder, "--steps", "2", "--guidance", "4", "--seed", "3", "--width", "32",
          "--height", "24", "--negative", "fog", "--dtype", "float32", "--out", str(out)])
    params = Image.open(out).text["parameters"]
    assert "Prompt syntax: a1111" in params and params.startswith(prompt + "\nNegative prompt: fog\n")
    ref = as_uint8(library(pipe, prompt, 3, negative_prompt="fog", prompt_syntax="a1111"))
    assert abs(pixels(out) - ref).max() <= 1
    plain = as_uint8(library(pipe, prompt, 3, negative_prompt="fog"))
    assert abs(plain - ref).max() > 1, "the A1111 reading made no difference: the test proves nothing"
    again = tmp_path / "again.png"
    main(["generate", "--from-png", str(out), "--out", str(again)])
    assert (pixels(again) == pixels(out)).all()
    assert Image.open(again).text["parameters"] == params
    # options given on the command line win over the PNG's
    other = tmp_path / "other.png"
    main(["generate", "--from-png", str(out), "--seed", "4", "--prompt-syntax", "plain", "--out", str(other)])
    assert "Seed: 4" in Image.open(other).text["parameters"]
    assert abs(pixels(other) - as_uint8(library(pipe, prompt, 4, negative_prompt="fog"))).max() <= 1


def test_from_an_a1111_png(model, tmp_path, capsys):
    folder, pipe = model
    png = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_INFOTEXT)
    Image.new("RGB", (32, 24)).save(png, pnginfo=info)
    with pytest.raises(SystemExit, match="model 'v1-5-pruned-emaonly'.*pass --model"):
        main(["generate", "--from-png", str(png), "--out", str(tmp_path / "x.png")])
    out = tmp_path / "again.png"
    main(["generate", "--from-png", str(png), "--model", folder, "--dtype", "float32", "--out", str(out)])
    assert "Sampler: Euler a" in Image.open(out).text["parameters"]
    prompt, negative, _ = parse_infotext(A1111_INFOTEXT)
    scheduler = pipe.scheduler
    pipe.scheduler = scheduler_for("Euler a", scheduler.config)
    try:
        ref = library(pipe, prompt, 5, negative_prompt=negative, prompt_syntax="a1111", clip_skip=1)
    finally:
        pipe.scheduler = scheduler
    assert abs(pixels(out) - as_uint8(ref)).max() <= 1
    # A1111 1.9+ writes the Karras schedule apart; a sampler minidiff lacks is an error, not another sampler
    karras = tmp_path / "karras.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4, Seed: 1, "
                                "Size: 32x24")
    Image.new("RGB", (32, 24)).save(karras, pnginfo=info)
    main(["generate", "--from-png", str(karras), "--model", folder, "--out", str(tmp_path / "k.png")])
    assert "Sampler: DPM++ 2M Karras" in Image.open(tmp_path / "k.png").text["parameters"]
    # minidiff's own PNG of a scheduler without an A1111 name (PNDM) re-creates with the model's scheduler
    own = tmp_path / "own.png"
    main(["generate", "a cat", "--model", folder, "--steps", "2", "--width", "32", "--height", "24", "--out", str(own)])
    assert "Sampler: PNDMScheduler" in Image.open(own).text["parameters"]
    main(["generate", "--from-png", str(own), "--out", str(tmp_path / "own2.png")])
    assert (pixels(tmp_path / "own2.png") == pixels(own)).all()
    assert "PNDMScheduler" not in capsys.readouterr().err  # the same scheduler: nothing to say
    # a sampler minidiff lacks is said, not silently ignored, and the model's own scheduler runs
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_INFOTEXT.replace("Sampler: Euler a", "Sampler: DPM fast"))
    Image.new("RGB", (32, 24)).save(png, pnginfo=info)
    main(["generate", "--from-png", str(png), "--model", folder, "--out", str(tmp_path / "fast.png")])
    assert "sampler 'DPM fast'" in capsys.readouterr().err
    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    with pytest.raises(SystemExit, match="has no 'parameters' text"):
        main(["generate", "--from-png", str(bare), "--out", str(tmp_path / "y.png")])
