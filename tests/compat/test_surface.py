"""The diffusers surface issue 13 lists, checked one behaviour at a time. Where diffusers' own test suite has
the idea (tests/pipelines/test_pipelines_common.py, tests/pipelines/test_pipelines_auto.py, tests/lora/utils.py,
tests/others/test_dependencies...), the test says so; the expected numbers are diffusers' (or diffusers itself)."""
import logging
import os
import time

import diffusers
import numpy as np
import pytest
import torch
import transformers

import minidiff
from minidiff import (AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline,
                      StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)
from minidiff.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback
from minidiff.assets import MODEL_DIR
from utils import assert_same_image

FAST = dict(num_inference_steps=3, guidance_scale=4.0)


@pytest.fixture(scope="module")
def pipe():
    p = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    p.set_progress_bar_config(disable=True)
    return p


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


# ---- pipeline surface ---------------------------------------------------------------------------------

def test_to_takes_every_form_diffusers_takes():
    p = StableDiffusionPipeline.from_pretrained(MODEL_DIR)  # its own models: the casts below are lossy
    assert p.to(torch.float16) is p and p.dtype == torch.float16 and p.unet.dtype == p.vae.dtype == torch.float16
    p.to("cpu", torch.bfloat16)
    assert p.text_encoder.dtype == torch.bfloat16
    p.to(torch_device="cpu", torch_dtype=torch.float32)
    assert p.dtype == torch.float32 and p.device == torch.device("cpu")
    with pytest.raises(TypeError, match="pass a device"):
        p.to(3.5)


def test_config_repr_and_components_as_diffusers(pipe):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert tuple(pipe.config[name]) == tuple(ref.config[name]), name
    assert pipe.config.requires_safety_checker is False
    text = repr(pipe)
    assert text.startswith("StableDiffusionPipeline {") and '"UNet2DConditionModel"' in text
    # diffusers' test_components_function: the components rebuild the same pipeline
    assert set(pipe.components) >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    again = StableDiffusionPipeline(**pipe.components)
    a = pipe("a red circle", generator=gen(), output_type="np", **FAST).images
    b = again("a red circle", generator=gen(), output_type="np", **FAST).images
    assert np.array_equal(a, b)


def test_outputs_index_and_return_dict_false(pipe):
    # diffusers' test_dict_tuple_outputs_equivalent
    out = pipe("a red circle", generator=gen(), output_type="np", **FAST)
    tup = pipe("a red circle", generator=gen(), output_type="np", return_dict=False, **FAST)
    assert np.array_equal(out[0], out.images) and np.array_equal(out["images"], out.images)
    assert np.array_equal(tup[0], out.images)


def test_auto_pipelines_pick_the_task_class_and_share_models():
    # diffusers' test_pipelines_auto: from_pretrained per task, from_pipe both ways with the same models
    t2i = AutoPipelineForText2Image.from_pretrained(MODEL_DIR)
    assert type(t2i) is StableDiffusionPipeline
    i2i = AutoPipelineForImage2Image.from_pipe(t2i)
    assert type(i2i) is StableDiffusionImg2ImgPipeline and i2i.unet is t2i.unet and i2i.vae is t2i.vae
    back = AutoPipelineForText2Image.from_pipe(i2i)
    assert type(back) is StableDiffusionPipeline and dict(back.config) == dict(t2i.config)
    assert type(DiffusionPipeline.from_pretrained(MODEL_DIR)) is StableDiffusionPipeline
    assert type(StableDiffusionImg2ImgPipeline.from_pipe(t2i)) is StableDiffusionImg2ImgPipeline
    with pytest.raises(TypeError, match="enable_pag"):
        AutoPipelineForText2Image.from_pipe(t2i, enable_pag=True)
    with pytest.raises(TypeError):
        AutoPipelineForText2Image()


def test_save_pretrained_variant_is_read_by_diffusers(pipe, tmp_path):
    pipe.save_pretrained(tmp_path, variant="fp16", safe_serialization=True)
    assert os.path.isfile(tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert os.path.isfile(tmp_path / "text_encoder" / "model.fp16.safetensors")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path, variant="fp16")
    ref.set_progress_bar_config(disable=True)
    a = pipe("a red circle", generator=gen(), **FAST).images
    b = ref("a red circle", generator=gen(), **FAST).images
    assert_same_image(a, b)
    with pytest.raises(ValueError, match="only .safetensors"):
        pipe.save_pretrained(tmp_path / "x", safe_serialization=False)


def test_custom_timesteps_without_num_inference_steps(pipe):
    # (custom sigmas: the schedulers_euler_sigmas snippet, on SDXL)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    ref.set_progress_bar_config(disable=True)
    ts = [999, 600, 250]
    a = pipe("a blue square", timesteps=ts, num_inference_steps=None, generator=gen(), guidance_scale=4.0).images
    b = ref("a blue square", timesteps=ts, num_inference_steps=None, generator=gen(), guidance_scale=4.0).images
    assert_same_image(a, b)
    assert pipe.num_timesteps == 3


# ---- callbacks (diffusers' test_callback_inputs, test_callback_cfg, test_pipeline_interrupt) ---------------

def test_callback_gets_only_the_tensors_it_asks_for(pipe):
    seen = []

    def callback(p, i, t, kwargs):
        seen.append(sorted(kwargs))
        assert p.num_timesteps == 3 and p.do_classifier_free_guidance and p.guidance_scale == 4.0
        return kwargs

    pipe("a red circle", callback_on_step_end=callback, output_type="latent",
         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **FAST)
    assert seen == [["latents", "prompt_embeds"]] * 3
    pipe("a red circle", callback_on_step_end=callback, output_type="latent", **FAST)
    assert seen[-1] == ["latents"]  # the default, as diffusers'
    with pytest.raises(ValueError, match="add_time_ids"):
        pipe("a red circle", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["add_time_ids"], **FAST)


def test_callback_changing_guidance_scale_is_used(pipe):
    # diffusers' test_callback_cfg: +1 per step; the final scale is the first plus the number of steps
    def callback(p, i, t, kwargs):
        p._guidance_scale += 1.0
        return kwargs

    pipe("a red circle", callback_on_step_end=callback, output_type="latent", **FAST)
    assert pipe.guidance_scale == FAST["guidance_scale"] + pipe.num_timesteps


def test_interrupt_stops_the_loop_at_that_step(pipe):
    # diffusers' test_pipeline_interrupt: the interrupted run's latents are the full run's at that step
    steps, stop = 6, 2
    kept = {}

    def record(p, i, t, kwargs):
        kept[i] = kwargs["latents"].clone()
        return kwargs

    pipe("a red circle", num_inference_steps=steps, generator=gen(), output_type="latent", callback_on_step_end=record)
    calls = []

    def interrupt(p, i, t, kwargs):
        calls.append(i)
        if i == stop:
            p._interrupt = True
        return kwargs

    out = pipe("a red circle", num_inference_steps=steps, generator=gen(), output_type="latent",
               callback_on_step_end=interrupt).images
    assert calls == [0, 1, 2] and torch.equal(out, kept[stop])
    assert pipe.interrupt  # as in diffusers, it stays set until the next call


def test_cfg_cutoff_callbacks_match_diffusers(pipe):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    ref.set_progress_bar_config(disable=True)
    ours = pipe("a red circle", generator=gen(), num_inference_steps=10, callback_on_step_end=MultiPipelineCallbacks(
        [SDCFGCutoffCallback(cutoff_step_ratio=0.4)])).images
    cb = diffusers.callbacks.MultiPipelineCallbacks([diffusers.callbacks.SDCFGCutoffCallback(cutoff_step_ratio=0.4)])
    theirs = ref("a red circle", generator=gen(), num_inference_steps=10, callback_on_step_end=cb).images
    assert_same_image(ours, theirs)
    assert pipe.guidance_scale == 0.0 and not pipe.do_classifier_free_guidance
    with pytest.raises(ValueError, match="exactly one"):
        SDCFGCutoffCallback(cutoff_step_ratio=0.5, cutoff_step_index=2)


def test_pipeline_vae_slicing_and_tiling_switch_the_vae(pipe):
    pipe.enable_vae_slicing()
    pipe.enable_vae_tiling()
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    pipe.disable_vae_slicing()
    pipe.disable_vae_tiling()
    assert not pipe.vae.use_slicing and not pipe.vae.use_tiling


# ---- loading arguments ---------------------------------------------------------------------------------

def test_loading_arguments_honoured_or_refused():
    p = StableDiffusionPipeline.from_pretrained(MODEL_DIR, torch_dtype={"unet": torch.float16, "default": torch.bfloat16},
                                                use_safetensors=True, low_cpu_mem_usage=False, device_map="cpu",
                                                safety_checker=None, requires_safety_checker=False)
    assert p.unet.dtype == torch.float16 and p.vae.dtype == p.text_encoder.dtype == torch.bfloat16
    p = StableDiffusionPipeline.from_pretrained(MODEL_DIR, torch_dtype={"vae": torch.float16})
    assert p.vae.dtype == torch.float16 and p.unet.dtype == torch.float32  # diffusers' default for the rest
    with pytest.raises(ValueError, match="device_map='balanced' is not supported"):
        StableDiffusionPipeline.from_pretrained(MODEL_DIR, device_map="balanced")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        StableDiffusionPipeline.from_pretrained(MODEL_DIR, use_safetensors=False)
    with pytest.raises(ValueError, match="safety_checker"):
        StableDiffusionPipeline.from_pretrained(MODEL_DIR, safety_checker=object())
    with pytest.raises(ValueError, match="not components"):
        StableDiffusionPipeline.from_pretrained(MODEL_DIR, torch_dtype={"transformer": torch.float16})
    with pytest.raises(TypeError, match="quantization_config"):
        StableDiffusionPipeline.from_pretrained(MODEL_DIR, quantization_config={})


def test_hub_download_options_reach_the_cache(hub_cache, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    p = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", cache_dir=hub_cache,
                                                revision="main", local_files_only=True, token=False)
    assert p.unet.config.in_channels == 8
    unet = minidiff.UNet2DConditionModel.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                         subfolder="unet", cache_dir=hub_cache, variant="fp16")
    assert unet.in_channels == unet.config.in_channels == 8  # diffusers' deprecated attribute still reads


# ---- offline and errors --------------------------------------------------------------------------------

def test_offline_repo_id_fails_at_once_in_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(OSError) as e:
        DiffusionPipeline.from_pretrained("someone/not-cached")
    message = str(e.value)
    assert time.perf_counter() - start < 2 and "\n" not in message
    assert "someone/not-cached" in message and "HF_HUB_OFFLINE=1" in message and "local folder" in message


def test_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    import minidiff.weights.hub as hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(OSError, match="cannot be reached") as e:
        StableDiffusionPipeline.from_pretrained("someone/not-cached")
    assert time.perf_counter() - start < 2 and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["./models/sd15", "/no/such/place", "~/sd15", "tests/no-such-model", "a/b/c"])
def test_path_like_names_are_never_hub_ids(name, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: pytest.fail("looked up on the Hub"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        StableDiffusionPipeline.from_pretrained(name)


def test_cli_errors_are_one_line_and_verbose_shows_traceback(tmp_path, capsys):
    import subprocess
    import sys
    out = str(tmp_path / "x.png")
    missing = subprocess.run([sys.executable, "-m", "minidiff", "generate", "a cat", "--lora", "no/such.safetensors",
                              "--out", out], capture_output=True, text=True)
    assert missing.returncode != 0 and "no/such.safetensors: no such file" in missing.stderr
    bad = [sys.executable, "-m", "minidiff", "generate", "a cat", "--model", "./no-such-folder", "--out", out]
    one = subprocess.run(bad, capture_output=True, text=True)
    assert one.returncode != 0 and "Traceback" not in one.stderr
    assert one.stderr.strip().count("\n") == 0 and "no such folder" in one.stderr and "--verbose" in one.stderr
    verbose = subprocess.run(bad + ["--verbose"], capture_output=True, text=True)
    assert "Traceback" in verbose.stderr


# ---- tokenizer -----------------------------------------------------------------------------------------

def test_tokenizer_built_from_files_as_transformers_builds_it():
    vocab, merges = (os.path.join(MODEL_DIR, "tokenizer", n) for n in ("vocab.json", "merges.txt"))
    ours = minidiff.CLIPTokenizer(vocab, merges, model_max_length=77)
    ref = transformers.CLIPTokenizer(vocab, merges, model_max_length=77)
    texts = ["a red circle and a blue square", "an orange triangle, small", "A Green Star!"]
    for t in texts:
        assert ours(t).input_ids == ref(t).input_ids
    ids = ref(texts, padding="max_length", max_length=16).input_ids
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    assert ours.decode(ids[0]) == ref.decode(ids[0])
    assert ours.model_max_length == ref.model_max_length == 77


def test_long_prompt_warns_with_the_dropped_words_as_diffusers(pipe, caplog):
    prompt = " ".join(["a red circle"] * 30) + " and finally a purple star"
    ref = diffusers.StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    ref.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING):
        pipe(prompt, output_type="latent", num_inference_steps=1)
        ours = [r.getMessage() for r in caplog.records if r.name.startswith("minidiff")]
        caplog.clear()
        diffusers.utils.logging.enable_propagation()
        try:
            ref(prompt, output_type="latent", num_inference_steps=1)
        finally:
            diffusers.utils.logging.disable_propagation()
        theirs = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(ours) == 1 and "purple star" in ours[0]
    assert set(ours) == set(theirs)


# ---- helpers -------------------------------------------------------------------------------------------

def test_load_image_and_grid_as_diffusers(tmp_path, doc_urls):
    from PIL import Image

    from hub_repos import doc_image
    im = doc_image().convert("L").convert("RGB").rotate(0)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees
    im.save(tmp_path / "x.jpg", exif=exif)
    for source in (str(tmp_path / "x.jpg"), "https://example.com/a.png"):
        a, b = minidiff.utils.load_image(source), diffusers.utils.load_image(source)
        assert a.mode == b.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    grid = minidiff.utils.make_image_grid([doc_image(), im, doc_image(), im], rows=2, cols=2, resize=32)
    ref = diffusers.utils.make_image_grid([doc_image(), im, doc_image(), im], rows=2, cols=2, resize=32)
    assert np.array_equal(np.asarray(grid), np.asarray(ref))
    with pytest.raises(ValueError, match="neither a file"):
        minidiff.utils.load_image(str(tmp_path / "missing.png"))


# ---- LoRA ----------------------------------------------------------------------------------------------

def test_block_weights_expand_as_diffusers():
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    from minidiff.lora import block_weights
    unet = diffusers.UNet2DConditionModel.from_pretrained(MODEL_DIR, subfolder="unet")
    ours_unet = minidiff.UNet2DConditionModel.from_pretrained(MODEL_DIR, subfolder="unet")
    for scales in ({"down": 0.9, "up": {"block_1": [0.4, 0.8]}}, {"mid": 0.3}, {"down": {"block_0": 0.2}, "up": 0.7},
                   {"down": {"block_1": [0.1]}, "mid": [0.5], "up": {"block_2": 0.25}}):
        theirs = _maybe_expand_lora_scales(unet, [scales])[0]
        assert block_weights(ours_unet, scales) == pytest.approx(theirs), scales
    with pytest.raises(ValueError, match="2 transformers, got 3"):
        block_weights(ours_unet, {"up": {"block_1": [1, 2, 3]}})
