"""Issue 19: layerwise casting (an fp16 file kept as it is, each layer cast to fp32 / bf16 for its own forward)
gives the same output, bit for bit, as casting every weight up front; the weights stay the file's fp16 tensors
between calls; LoRA composes; offload is refused. (Its memory is measured in bench/memory.py.)"""
import os

import numpy as np
import pytest
import torch

from minidiff import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel, layerwise_casting
import utils
from utils import build_lora_sd, build_lora_sdxl, gen, kohya, save, targets

KW = dict(prompt="a boat", num_inference_steps=2, height=16, width=16, output_type="np")


def fp16_copy(folder, cls):
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float16)
    pipe.save_pretrained(folder + "-fp16")
    return folder + "-fp16"


@pytest.fixture(scope="module")
def sd16(tmp_path_factory):
    return fp16_copy(build_lora_sd(str(tmp_path_factory.mktemp("sd"))), StableDiffusionPipeline)


@pytest.fixture(scope="module")
def sdxl16(tmp_path_factory):
    return fp16_copy(build_lora_sdxl(str(tmp_path_factory.mktemp("sdxl"))), StableDiffusionXLPipeline)


def pipes(folder, compute, cls=StableDiffusionPipeline):
    """(weights cast up front, layerwise casting from the fp16 file) at `compute`."""
    up = cls.from_pretrained(folder, torch_dtype=compute)
    lw = cls.from_pretrained(folder, torch_dtype=torch.float16)
    lw.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=compute)
    for p in (up, lw):
        p.set_progress_bar_config(disable=True)
    return up, lw


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def stored(model):
    """{name: (dtype, data_ptr)} of the weights of the layers that layerwise casting keeps stored."""
    state = model._layerwise_state
    return {n: (p.dtype, p.data_ptr()) for m in state.hooked for n, p in m.named_parameters(recurse=False)}


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_same_image_as_cast_up_front_and_weights_stay_the_files(sd16, compute):
    up, lw = pipes(sd16, compute)
    before = stored(lw.unet)
    assert before and all(d == torch.float16 for d, _ in before.values())
    assert lw.unet.dtype == compute and lw.dtype == compute  # what pipelines cast their inputs to
    assert lw.unet.conv_norm_out.weight.dtype == compute  # norms (not stored layers): compute dtype once
    np.testing.assert_array_equal(lw(**KW, generator=gen(3)).images, up(**KW, generator=gen(3)).images)
    assert stored(lw.unet) == before  # between calls: the same fp16 tensors (the file's pages), no copy kept
    lw.disable_layerwise_casting()
    assert all(p.dtype == compute for p in lw.unet.parameters()) and not lw.unet._forward_pre_hooks
    np.testing.assert_array_equal(lw(**KW, generator=gen(3)).images, up(**KW, generator=gen(3)).images)


def test_sdxl_unet_model_level(sdxl16):
    up = UNet2DConditionModel.from_pretrained(sdxl16, subfolder="unet")  # float32 up front
    lw = UNet2DConditionModel.from_pretrained(sdxl16, subfolder="unet", torch_dtype=torch.float16)
    lw.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    with torch.no_grad():
        torch.testing.assert_close(lw(x, 500, c, added_cond_kwargs=added).sample,
                                   up(x, 500, c, added_cond_kwargs=added).sample, rtol=0, atol=0)


def test_lora_loaded_after_enabling_and_unloaded(sd16, tmp_path):
    up, lw = pipes(sd16, torch.float32)
    sd = kohya(up.unet, "lora_unet_", targets(up.unet), alpha=4.0)
    sd.update(kohya(up.text_encoder, "lora_te_", targets(up.text_encoder), alpha=4.0, seed=1))
    path = save(sd, str(tmp_path / "lora.safetensors"))  # float32 LoRA tensors: they load in the compute dtype
    plain = up(**KW, generator=gen(4)).images
    for p in (up, lw):
        p.load_lora_weights(path, adapter_name="a")
    with_lora = up(**KW, generator=gen(4)).images
    assert np.abs(with_lora - plain).max() > 1e-3  # the LoRA changes the image
    np.testing.assert_array_equal(lw(**KW, generator=gen(4)).images, with_lora)
    layer = lw.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.weight.dtype == torch.float16 and layer in lw.unet._layerwise_state.hooked
    assert layer.adapters["a"].down.dtype == torch.float32
    weights_file = os.path.join(sd16, "unet", "diffusion_pytorch_model.safetensors")
    on_disk = read_bytes(weights_file)
    for p in (up, lw):  # fused into the stored fp16 weight (the mapped file's pages, copied on write): rounded
        p.fuse_lora()
    fused = lw(**KW, generator=gen(4)).images
    # measured 2.2e-4 (fp16 rounding of W + BA)
    assert np.abs(fused - up(**KW, generator=gen(4)).images).max() < 1e-3 and layer.weight.dtype == torch.float16
    for p in (up, lw):
        p.unfuse_lora()
    np.testing.assert_array_equal(lw(**KW, generator=gen(4)).images, with_lora)  # unfuse is exact
    assert read_bytes(weights_file) == on_disk  # the file itself never written
    for p in (up, lw):
        p.unload_lora_weights()
    np.testing.assert_array_equal(lw(**KW, generator=gen(4)).images, plain)
    assert not any(getattr(m, "is_lora_layer", False) for m in lw.unet._layerwise_state.hooked)


def test_offload_and_layerwise_casting_refuse_each_other(sd16):
    pipe = StableDiffusionPipeline.from_pretrained(sd16, torch_dtype=torch.float16)
    pipe.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    for method in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        with pytest.raises(RuntimeError, match=rf"{method}: layerwise casting is on"):
            getattr(pipe, method)(device="cpu")
    pipe.disable_layerwise_casting()
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(RuntimeError, match="CPU offload is on"):
        pipe.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"compute_dtype=torch.int8\): a floating torch.dtype"):
        layerwise_casting.enable_layerwise_casting(pipe.unet, torch.float16, torch.int8)


@pytest.mark.parametrize("builder", [utils.unet_sd, utils.unet_sdxl, utils.autoencoder_kl, utils.autoencoder_tiny,
                                     utils.clip_text, utils.clip_text_projection, utils.wuerstchen_prior,
                                     utils.wuerstchen_diffnext, utils.paella_vq], ids=lambda b: b.__name__)
@torch.no_grad()
def test_every_model_same_output_as_cast_up_front(builder):
    model, run = builder()
    utils.seeded_(model).eval().half()  # the weights an fp16 file holds (eval: no dropout)
    want = run_of(model.float(), run)  # cast up front
    model.half()  # exact: every value is an fp16 value
    model.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    assert any(p.dtype == torch.float16 for p in model.parameters())
    torch.testing.assert_close(run_of(model, run), want, rtol=0, atol=0)


def run_of(model, run):
    out = run()
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
