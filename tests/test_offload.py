"""Issue 19: sequential CPU offload (each submodule on the execution device only for its own forward),
its undo, and the accelerator check at the call. The device stand-in is the CPU: a spy on
offload.place records every move, so placement is checked without a GPU."""
import numpy as np
import pytest
import torch

from minidiff import StableDiffusionPipeline, offload
from utils import build_sd, gen

KW = dict(prompt="a boat", num_inference_steps=2, height=32, width=32, output_type="np")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd15-offload"))
    build_sd(folder)
    return folder


def pipe_at(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sequential_offload_places_one_layer_at_a_time_same_image_and_undoes(folder, monkeypatch):
    plain = pipe_at(folder)(**KW, generator=gen(8)).images
    pipe = pipe_at(folder)
    pipe.enable_sequential_cpu_offload(device="cpu")
    on_device, worst, moves, worst_set = set(), [0], [], []
    real_place = offload.place

    def spy(module, device):
        # in: to the execution device (a torch.device); out: home ("cpu"); track how many are in at once
        if offload._owns_tensors(module):
            (on_device.add if isinstance(device, torch.device) else on_device.discard)(module)
        if len(on_device) > worst[0]:
            worst[0], worst_set[:] = len(on_device), [type(m).__name__ for m in on_device]
        moves.append(module)
        real_place(module, device)
    monkeypatch.setattr(offload, "place", spy)
    images = pipe(**KW, generator=gen(8)).images
    np.testing.assert_array_equal(images, plain)
    used = [pipe.unet, pipe.text_encoder, pipe.vae.decoder, pipe.vae.post_quant_conv]  # txt2img runs no encoder
    owners = {m for model in used for m in model.modules() if next(m.parameters(recurse=False), None) is not None}
    assert owners <= set(moves)  # every layer with weights was moved in for its forward (and out again)
    assert not on_device  # all back home
    # the first call learns which children run; from the second on, a layer (with its never-called children)
    worst[0] = 0
    np.testing.assert_array_equal(pipe(**KW, generator=gen(8)).images, plain)
    assert 1 <= worst[0] <= 2, worst_set
    pipe.remove_all_hooks()
    moves.clear()
    np.testing.assert_array_equal(pipe(**KW, generator=gen(8)).images, plain)
    assert not moves  # undone: no hook moves anything


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
@pytest.mark.parametrize("method", ["enable_sequential_cpu_offload", "enable_model_cpu_offload"])
def test_offload_without_accelerator_fails_at_the_call(folder, method):
    pipe = pipe_at(folder)
    with pytest.raises(RuntimeError, match=rf"{method}\(device='cuda'\): no cuda device is available here"):
        getattr(pipe, method)()
    assert pipe._offload_device is None and not getattr(pipe, "_offload_hooks", None)  # nothing changed
