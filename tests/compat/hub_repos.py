"""A Hugging Face cache holding tiny models under the real repo ids the documented snippets name, so that a
snippet runs unchanged offline (HF_HUB_OFFLINE=1) on both diffusers and minidiff.

The cache has the Hub's layout (models--owner--name/refs/main -> snapshots/<commit>/...). The SD 1.5 id holds
the bundled shapes model (its float16 files double as the fp16 variant); the SDXL ids hold tiny seeded
diffusers models (base with fp16 variant files beside the float32 ones, and a refiner); the LCM-LoRA id holds
the bundled model's LCM-LoRA.
"""
import json
import os
import shutil

import diffusers
import torch

import utils as pipes
from minidiff.assets import LORA_DIR, MODEL_DIR

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"
LCM = "SimianLuo/LCM_Dreamshaper_v7"
# other repo ids the docs name, served by the same tiny models
SD_LIKE = ("Lykon/dreamshaper-7", "ptx0/pseudo-journey-v2")
SDXL_LIKE = ("SG161222/RealVisXL_V4.0",)


def _snapshot(cache, repo):
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(COMMIT)
    snap = os.path.join(root, "snapshots", COMMIT)
    os.makedirs(os.path.dirname(snap), exist_ok=True)
    return snap


def _bundled_sd(snap):
    shutil.copytree(MODEL_DIR, snap)
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        os.symlink(os.path.join(snap, sub, stem + ".safetensors"), os.path.join(snap, sub, stem + ".fp16.safetensors"))


# SDXL's block layout (attention in down blocks 1-2 and up blocks 0-1, more transformers deeper), tiny
SDXL_UNET = dict(block_out_channels=(16, 32, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                 "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2))


def _sdxl(snap, refiner=False):
    work = snap + ".build"
    pipe = pipes.build_sdxl(work, refiner=refiner, unet=SDXL_UNET)
    shutil.rmtree(work)
    pipe.save_pretrained(snap)
    pipe.to(torch.float16).save_pretrained(snap, variant="fp16")


def _lcm(snap):
    """The bundled model with an LCM-distilled-style UNet: the bundled UNet's weights plus a seeded guidance
    embedding projection (time_cond_proj_dim), an LCMScheduler, the LatentConsistencyModelPipeline class."""
    _bundled_sd(snap)
    unet = diffusers.UNet2DConditionModel.from_pretrained(MODEL_DIR, subfolder="unet")
    lcm = diffusers.UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": 32})
    missing, _ = lcm.load_state_dict(unet.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"], missing
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lcm.time_embedding.cond_proj.weight.copy_(torch.randn(lcm.time_embedding.cond_proj.weight.shape, generator=g) * 0.02)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        os.remove(os.path.join(snap, "unet", name))
    lcm.save_pretrained(os.path.join(snap, "unet"))
    lcm.to(torch.float16).save_pretrained(os.path.join(snap, "unet"), variant="fp16")
    sched = diffusers.LCMScheduler.from_pretrained(MODEL_DIR, subfolder="scheduler")
    sched.save_pretrained(os.path.join(snap, "scheduler"))
    index_path = os.path.join(snap, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index.update(_class_name="LatentConsistencyModelPipeline", scheduler=["diffusers", "LCMScheduler"])
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)


# LoRA repos for SDXL the docs name: (repo, weight file), each a seeded LoRA on the UNet's attention and both
# text encoders of the tiny SDXL, in the diffusers/PEFT form save_lora_weights writes
SDXL_LORAS = (("ostris/super-cereal-sdxl-lora", "cereal_box_sdxl_v1.safetensors"),
              ("ostris/ikea-instructions-lora-sdxl", "ikea_instructions_xl_v1_5.safetensors"),
              ("lordjia/by-feng-zikai", "fengzikai_v1.0_XL.safetensors"),
              ("latent-consistency/lcm-lora-sdxl", "pytorch_lora_weights.safetensors"),
              ("TheLastBen/Papercut_SDXL", "papercut.safetensors"))


def _sdxl_lora(snap, base, weight_name, seed):
    from peft import LoraConfig, get_peft_model_state_dict
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, model, targets in (("unet", pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"]),
                                 ("text_encoder", pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"]),
                                 ("text_encoder_2", pipe.text_encoder_2, ["q_proj", "k_proj", "v_proj", "out_proj"])):
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
        sd = get_peft_model_state_dict(model)
        layers[name] = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in sd.items()}
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        snap, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], weight_name=weight_name)


def build_cache(cache):
    """Write every repo into `cache` (a HF_HUB_CACHE folder); returns {repo id: snapshot folder}."""
    made = {}
    for repo, build in ((SD15, _bundled_sd), (SDXL, _sdxl), (REFINER, lambda s: _sdxl(s, refiner=True)),
                        (LCM_LORA, lambda s: shutil.copytree(LORA_DIR, s)), (LCM, _lcm)):
        snap = _snapshot(cache, repo)
        build(snap)
        made[repo] = snap
    for seed, (repo, weight_name) in enumerate(SDXL_LORAS):
        snap = _snapshot(cache, repo)
        _sdxl_lora(snap, made[SDXL], weight_name, seed)
        made[repo] = snap
    for like, source in [(r, SD15) for r in SD_LIKE] + [(r, SDXL) for r in SDXL_LIKE]:
        snap = _snapshot(cache, like)
        os.symlink(made[source], snap)
        made[like] = snap
    return made


def doc_image(size=64):
    """What the snippets' image URLs serve here: a drawn picture (warm background, a disc and a square)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (size, size), (200, 150, 90))
    d = ImageDraw.Draw(im)
    d.ellipse((8, 8, 36, 36), fill=(30, 60, 200))
    d.rectangle((34, 30, 58, 58), fill=(230, 230, 40))
    return im


def serve_doc_urls(setattr_):
    """Make http(s) image URLs answer with doc_image() in both libraries (diffusers reads them with requests,
    minidiff with urllib); `setattr_` is monkeypatch.setattr (or plain setattr). Returns the PNG bytes."""
    import io
    import urllib.request

    import requests
    buf = io.BytesIO()
    doc_image().save(buf, format="PNG")
    data = buf.getvalue()

    class Response(io.BytesIO):
        status_code = 200
        content = data

        def __init__(self):
            super().__init__(data)
            self.raw = io.BytesIO(data)

        def raise_for_status(self):
            pass

    setattr_(requests, "get", lambda url, *a, **k: Response())
    setattr_(urllib.request, "urlopen", lambda url, *a, **k: Response())
    return data
