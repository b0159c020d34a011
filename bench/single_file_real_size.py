"""Real-size single files against diffusers' from_single_file (an opt-in check, too heavy for the test suite).

    python bench/single_file_real_size.py sd1|sd2|sdxl|sdxl_refiner [--cache DIR]

Writes once (under --cache) a random-weight fp16 single file with the family's real shapes, by the test suite's
converter (tests/test_single_file.py), and a diffusers folder of the family's configs; then loads the file with
minidiff (no config: family and configs from the tensors) and with diffusers (config= that folder) and checks
that every tensor is equal, and reports both load times. Sizes: SD 1.5 2.1 GB, SD 2.x 2.6 GB, SDXL 6.9 GB.
"""
import argparse, json, os, sys, time, torch
torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import minidiff
from minidiff.weights.config import config_from_dict
from minidiff.weights.single_file import FAMILIES, clip_tokenizer
from test_single_file import unet_to_ldm, vae_to_ldm, clip_to_openclip
ap = argparse.ArgumentParser()
ap.add_argument("family", choices=sorted(FAMILIES))
ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "minidiff-single-file"))
args = ap.parse_args()
family = args.family
fam = FAMILIES[family]
os.makedirs(args.cache, exist_ok=True)
F, D = os.path.join(args.cache, f"{family}.safetensors"), os.path.join(args.cache, f"cfg_{family}")
pred = "v_prediction" if family == "sd2" else "epsilon"
unet_cfg = dict(fam["unet"], **fam.get(pred, {}).get("unet", {}))
vae_cfg = dict(fam["vae"], **fam.get(pred, {}).get("vae", {}))
sched_name, sched_cfg = fam.get(pred, {}).get("scheduler") or fam["scheduler"]
encoders = {n: c for n, c in (("text_encoder", minidiff.CLIPTextModel), ("text_encoder_2", minidiff.CLIPTextModelWithProjection)) if n in fam}
if not os.path.exists(F):
    with torch.device("meta"):
        sd = unet_to_ldm(minidiff.UNet2DConditionModel(config_from_dict(minidiff.UNet2DConditionModel.config_class, unet_cfg)).state_dict(), unet_cfg)
        sd.update(vae_to_ldm(minidiff.AutoencoderKL(config_from_dict(minidiff.AutoencoderKL.config_class, vae_cfg)).state_dict()))
        te = {n: c(config_from_dict(c.config_class, fam[n])).state_dict() for n, c in encoders.items()}
    if family == "sd1":
        sd.update({"cond_stage_model.transformer." + k: v for k, v in te["text_encoder"].items()})
    elif family == "sd2":
        sd.update(clip_to_openclip(te["text_encoder"], "cond_stage_model.model.", extra_layer=True))
        sd["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024, device="meta")
    elif family == "sdxl":
        sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in te["text_encoder"].items()})
        sd.update(clip_to_openclip(te["text_encoder_2"], "conditioner.embedders.1.model."))
    else:
        sd.update(clip_to_openclip(te["text_encoder_2"], "conditioner.embedders.0.model."))
    g = torch.Generator().manual_seed(0)
    out = {k: (torch.randn(v.shape, generator=g, dtype=torch.float16) * 0.02) for k, v in sd.items()}
    from safetensors.torch import save_file
    save_file(out, F + ".part"); del out
    os.replace(F + ".part", F)  # an interrupted write is rebuilt, not read as done
    print("wrote", F)
if not os.path.isdir(D):
    comps = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", sched_name]}
    for sub, cls, cfg in (("unet", "UNet2DConditionModel", unet_cfg), ("vae", "AutoencoderKL", vae_cfg)):
        os.makedirs(f"{D}/{sub}"); json.dump(dict(cfg, _class_name=cls), open(f"{D}/{sub}/config.json", "w"))
    for n, c in encoders.items():
        os.makedirs(f"{D}/{n}"); json.dump(dict(fam[n], architectures=[c.__name__], model_type="clip_text_model"), open(f"{D}/{n}/config.json", "w"))
        tok = "tokenizer" if n == "text_encoder" else "tokenizer_2"
        clip_tokenizer(fam["tokenizer_pad"][tok]).save_pretrained(f"{D}/{tok}")
        comps[n], comps[tok] = ["transformers", c.__name__], ["transformers", "CLIPTokenizer"]
    os.makedirs(f"{D}/scheduler"); json.dump(dict(sched_cfg, _class_name=sched_name), open(f"{D}/scheduler/scheduler_config.json", "w"))
    CLS = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}
    json.dump(dict(comps, _class_name=CLS[family], **fam["pipeline"]), open(f"{D}/model_index.json", "w"))
import diffusers
cls = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
       "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}[family]
t = time.perf_counter(); ours = getattr(minidiff, cls).from_single_file(F, torch_dtype=torch.float16); t_ours = time.perf_counter() - t
t = time.perf_counter(); ref = getattr(diffusers, cls).from_single_file(F, config=D, local_files_only=True, torch_dtype=torch.float16); t_ref = time.perf_counter() - t
print(f"{family} fp16 load: minidiff {t_ours:.1f} s, diffusers {t_ref:.1f} s")
n, bad = 0, []
for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
    r = getattr(ref, name, None)
    if r is None: continue
    o = getattr(ours, name).state_dict()
    for k, v in r.state_dict().items():
        if "position_ids" in k: continue
        n += 1
        if not torch.equal(v, o[k]): bad.append(f"{name}.{k}")
print(f"{n} tensors compared, {len(bad)} differ", bad[:3])
print("scheduler", type(ours.scheduler).__name__, ours.scheduler.config["prediction_type"], "vs", type(ref.scheduler).__name__, ref.scheduler.config["prediction_type"])
print(ours.single_file_report)
