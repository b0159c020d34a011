"""The one helper module of the tests: tolerances and image comparisons stated once, seeded small models
built by minidiff alone, tokenizer folders (the real CLIP vocabulary and a tiny one), tiny diffusers pipelines
saved in the Hub layout (SD, SDXL, and the smaller ones the LoRA tests use), the Würstchen weight boost, and the
schedulers' loop harness. Test files import from here and never from each other."""
import gzip
import importlib.util
import inspect
import json
import os

import diffusers
import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from minidiff import lora
from minidiff.models import clip, unet, vae
from minidiff.pipelines.stable_diffusion import StableDiffusionPipeline
from minidiff.pipelines.stable_diffusion_xl import StableDiffusionXLPipeline
from minidiff.models.paella_vq import PaellaVQModel, PaellaVQModelConfig
from minidiff.models.taesd import AutoencoderTiny, AutoencoderTinyConfig
from minidiff.models.wuerstchen_diffnext import WuerstchenDiffNeXt, WuerstchenDiffNeXtConfig
from minidiff.models.wuerstchen_prior import WuerstchenPrior, WuerstchenPriorConfig


def assert_close(ours, ref, rel=1e-4, name="output"):
    """Max abs error within `rel` of the reference's scale (max |ref|), the project's fp32 tolerance."""
    ours, ref = torch.as_tensor(ours).float(), torch.as_tensor(ref).float()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    scale = ref.abs().max().clamp_min(1e-12)
    err = (ours - ref).abs().max()
    assert err <= rel * scale, f"{name}: max abs error {err.item():.3g} > {rel} x scale {scale.item():.3g}"


def seeded_(module, seed=0, std=0.05):
    """Fill every parameter with seeded random values (diffusers' inits leave many at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # norm scales around 1, everything else around 0
            base = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * std + base)
    return module


# ---- small models of every kind, built by minidiff alone: `model, run = unet_sd()`; run() is one forward


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SDXL = dict(UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=[2, 4], use_linear_projection=True, transformer_layers_per_block=[1, 2],
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
CLIP = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16)
IDS = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(0))


def unet_sd():
    m = unet.UNet2DConditionModel(unet.UNet2DConditionConfig(**UNET))
    return m, lambda: m(rand(2, 4, 16, 16), 10, rand(2, 7, 32)).sample


def unet_sdxl():
    m = unet.UNet2DConditionModel(unet.UNet2DConditionConfig(**SDXL))
    extra = {"text_embeds": rand(2, 32), "time_ids": rand(2, 6).abs() * 100}
    return m, lambda: m(rand(2, 4, 16, 16), torch.tensor([10, 500]), rand(2, 7, 32), added_cond_kwargs=extra).sample


def autoencoder_kl():
    m = vae.AutoencoderKL(vae.AutoencoderKLConfig(block_out_channels=(16, 32), norm_num_groups=8,
                                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                                  up_block_types=("UpDecoderBlock2D",) * 2))
    return m, lambda: m(rand(1, 3, 32, 32).tanh()).sample


def autoencoder_tiny():
    m = AutoencoderTiny(AutoencoderTinyConfig(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4))
    return m, lambda: m(rand(1, 3, 32, 32).tanh()).sample


def clip_text():
    m = clip.CLIPTextModel(clip.CLIPTextConfig(**CLIP))
    return m, lambda: m(IDS).last_hidden_state  # causal attention, no mask


def clip_text_projection():
    m = clip.CLIPTextModelWithProjection(clip.CLIPTextConfig(**CLIP, hidden_act="gelu"))
    return m, lambda: m(IDS, attention_mask=(torch.arange(9) < 7).long().expand(2, 9)).text_embeds  # padding mask


def wuerstchen_prior():
    m = WuerstchenPrior(WuerstchenPriorConfig(c_in=4, c=32, c_cond=16, c_r=8, depth=2, nhead=4))
    return m, lambda: m(rand(2, 4, 6, 6), rand(2).sigmoid(), rand(2, 5, 16))


def wuerstchen_diffnext():
    m = WuerstchenDiffNeXt(WuerstchenDiffNeXtConfig(c_cond=16, c_hidden=[16, 32], nhead=[-1, 4], blocks=[1, 1],
                                                    level_config=["CT", "CTA"], inject_effnet=[False, True],
                                                    effnet_embd=4, clip_embd=16, c_r=8))
    return m, lambda: m(rand(2, 4, 16, 16), rand(2).sigmoid(), rand(2, 4, 6, 6), rand(2, 5, 16))


def paella_vq():
    m = PaellaVQModel(PaellaVQModelConfig(embed_dim=32, bottleneck_blocks=2, num_vq_embeddings=16))
    return m, lambda: m(rand(1, 3, 32, 32).sigmoid()).sample


# ---- tokenizer folders: the real CLIP vocabulary (from open-clip-torch)


def clip_bpe_files():
    """vocab and merges as CLIP builds them from its merges file (open_clip / OpenAI SimpleTokenizer)."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None, ("open-clip-torch is not installed; it ships CLIP's BPE merges: "
                              "pip install --no-deps open-clip-torch")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == len(vocab)
    return {t: i for i, t in enumerate(vocab)}, merges


def write_tokenizer(folder, vocab, merges, pad_token):
    """A Hub tokenizer folder: SD 1.x style (legacy special_tokens_map.json) or SDXL tokenizer_2 style
    (added_tokens_decoder, pad "!")."""
    os.makedirs(folder)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer", "pad_token": pad_token}
    if pad_token == "!":
        config["clean_up_tokenization_spaces"] = True
        config["added_tokens_decoder"] = {
            "0": {"content": "!", **special, "normalized": False, "special": True},
            "49406": {"content": "<|startoftext|>", **special, "special": True},
            "49407": {"content": "<|endoftext|>", **special, "special": True}}
        config.update(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    else:
        for key, content in (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"),
                             ("unk_token", "<|endoftext|>")):
            config[key] = {"__type": "AddedToken", "content": content, **special}
        with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token": {"content": "<|startoftext|>", **special},
                       "eos_token": {"content": "<|endoftext|>", **special},
                       "unk_token": {"content": "<|endoftext|>", **special}, "pad_token": pad_token}, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


# ---- tiny diffusers pipelines in the Hub layout, for the pipeline tests (the real CLIP vocabulary)


_BPE = None


def bpe():
    global _BPE
    if _BPE is None:
        _BPE = clip_bpe_files()
    return _BPE


def text_encoder(hidden=32, projection=False, act="quick_gelu", eos=2, layers=3, seed=0):
    cfg = transformers.CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=4, max_position_embeddings=77, vocab_size=49408,
                                      hidden_act=act, projection_dim=hidden, bos_token_id=49406, eos_token_id=eos,
                                      pad_token_id=1)
    model = transformers.CLIPTextModelWithProjection(cfg) if projection else transformers.CLIPTextModel(cfg)
    return seeded_(model, seed, std=0.1).eval()


def tokenizer_folder(folder, pad="<|endoftext|>"):
    vocab, merges = bpe()
    write_tokenizer(folder, vocab, merges, pad)
    return transformers.CLIPTokenizer.from_pretrained(folder)


SD_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
               norm_num_groups=8)
SD_VAE = dict(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def build_sd(folder, unet=None, scheduler=None, vae=None, seed=0, te_kwargs=None):
    """Save a tiny diffusers StableDiffusionPipeline at `folder`; returns the diffusers pipeline."""
    os.makedirs(folder, exist_ok=True)
    unet_model = seeded_(diffusers.UNet2DConditionModel(**{**SD_UNET, **(unet or {})}), seed, std=0.05).eval()
    vae_model = seeded_(diffusers.AutoencoderKL(**{**SD_VAE, **(vae or {})}), seed + 1, std=0.05).eval()
    sched = scheduler or diffusers.PNDMScheduler.from_config(SD15_SCHEDULER)
    tok = tokenizer_folder(os.path.join(folder, "_tok"))
    pipe = diffusers.StableDiffusionPipeline(vae=vae_model, text_encoder=text_encoder(**(te_kwargs or {})),
                                             tokenizer=tok, unet=unet_model, scheduler=sched, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    # the reference is read back from disk, as minidiff's is (the saved scheduler config lists every key)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SDXL_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                 cross_attention_dim=64, norm_num_groups=8)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                      prediction_type="epsilon", use_karras_sigmas=False)


def build_sdxl(folder, unet=None, scheduler=None, seed=0, refiner=False, force_zeros=True):
    """Save a tiny diffusers SDXL pipeline (two encoders 32 + 32 wide, pooled 32) at `folder`.

    refiner=True: second encoder only, aesthetic-score time ids (5 ids), the img2img class."""
    os.makedirs(folder, exist_ok=True)
    cfg = {**SDXL_UNET, **(unet or {})}
    if refiner:
        cfg.update(cross_attention_dim=32, projection_class_embeddings_input_dim=8 * 5 + 32)
    unet_model = seeded_(diffusers.UNet2DConditionModel(**cfg), seed, std=0.05).eval()
    vae_model = seeded_(diffusers.AutoencoderKL(**SD_VAE, force_upcast=True, scaling_factor=0.13025), seed + 1,
                        std=0.05).eval()
    sched = scheduler or diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER)
    te2 = text_encoder(projection=True, act="gelu", eos=2, seed=seed + 3)
    tok2 = tokenizer_folder(os.path.join(folder, "_tok2"), pad="!")
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae_model, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tok2, unet=unet_model,
            scheduler=sched, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    else:
        te1 = text_encoder(seed=seed + 2)
        tok1 = tokenizer_folder(os.path.join(folder, "_tok1"))
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae_model, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=unet_model,
            scheduler=sched, force_zeros_for_empty_prompt=force_zeros)
    pipe.save_pretrained(folder)
    pipe = type(pipe).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def assert_same_image(ours, ref, max_diff=1):
    """uint8 pixels (as PIL or [0, 1] arrays) differ by at most `max_diff`."""
    a = np.stack([np.asarray(i) for i in ours]) if isinstance(ours, list) else np.round(np.asarray(ours) * 255)
    b = np.stack([np.asarray(i) for i in ref]) if isinstance(ref, list) else np.round(np.asarray(ref) * 255)
    assert a.shape == b.shape, f"image shape {a.shape} vs diffusers {b.shape}"
    diff = np.abs(a.astype(np.int32) - b.astype(np.int32)).max()
    assert diff <= max_diff, f"pixels differ by up to {diff} (allowed {max_diff})"
    assert a.std() > 1, "degenerate image: the comparison would prove nothing"


# ---- smaller diffusers pipelines and LoRA files, for the LoRA tests (a tiny vocabulary)

LORA_UNET_SD = dict(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=32,
               block_out_channels=(16, 32, 32), layers_per_block=2, attention_head_dim=2,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
LORA_UNET_SDXL = dict(LORA_UNET_SD, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 use_linear_projection=True, attention_head_dim=[1, 2, 4], transformer_layers_per_block=[1, 1, 2],
                 cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8)


def write_tiny_tokenizer(folder, pad="<|endoftext|>"):
    """A CLIP tokenizer folder with a tiny vocabulary: the 2 x 256 byte symbols, a few merges, the specials last
    (so that the end-of-text id is the largest, as the legacy pooling rule needs)."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    merges = ["p h", "o t", "ph ot", "phot o</w>", "c a", "ca t</w>"]
    vocab = chars + [c + "</w>" for c in chars] + ["ph", "ot", "phot", "photo</w>", "ca", "cat</w>"]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "pad_token": pad, "do_lower_case": True,
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
    return transformers.CLIPTokenizer.from_pretrained(folder), len(vocab)


def tiny_text_encoder(vocab, projection=False, seed=0):
    cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37, projection_dim=32,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                      eos_token_id=2, bos_token_id=vocab - 2, pad_token_id=1)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return seeded_(cls(cfg).eval(), seed=seed, std=0.1)


def tiny_vae():
    return seeded_(diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                           norm_num_groups=4, sample_size=16, layers_per_block=1).eval(), seed=3)


def build_lora_sd(folder, scheduler=None, pipeline_class=None, **unet_kw):
    """A seeded diffusers SD 1.x pipeline saved in the Hub layout at `folder` (16 x 16 images)."""
    tok, n = write_tiny_tokenizer(os.path.join(folder, "_tokenizer"))
    unet = seeded_(diffusers.UNet2DConditionModel(**{**LORA_UNET_SD, **unet_kw}).eval(), seed=1)
    cls = pipeline_class or diffusers.StableDiffusionPipeline
    pipe = cls(vae=tiny_vae(), text_encoder=tiny_text_encoder(n), tokenizer=tok, unet=unet,
               scheduler=scheduler or diffusers.EulerDiscreteScheduler(), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_lora_sdxl(folder):
    tok, n = write_tiny_tokenizer(os.path.join(folder, "_tokenizer"))
    tok2, _ = write_tiny_tokenizer(os.path.join(folder, "_tokenizer_2"), pad="!")
    unet = seeded_(diffusers.UNet2DConditionModel(**LORA_UNET_SDXL).eval(), seed=2)
    pipe = diffusers.StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(n),
                                               text_encoder_2=tiny_text_encoder(n, projection=True, seed=5),
                                               tokenizer=tok, tokenizer_2=tok2, unet=unet,
                                               scheduler=diffusers.EulerDiscreteScheduler())
    pipe.save_pretrained(folder)
    return folder


def ref_load(pipe, path, **kw):
    """diffusers' load_lora_weights, offline: a folder and the file's name."""
    pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), **kw)


def load_both(repo, xl=False):
    ref_cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    ours_cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    ref, ours = ref_cls.from_pretrained(repo), ours_cls.from_pretrained(repo)
    ref.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    return ref, ours


# LoRA files

def lora_pair(module, rank, g, std=0.1):
    """Seeded (down, up) for a Linear or (LoCon) Conv2d: k x k down with the layer's kernel, 1 x 1 up."""
    if isinstance(module, torch.nn.Conv2d):
        return (torch.randn(rank, module.in_channels, *module.kernel_size, generator=g) * std,
                torch.randn(module.out_channels, rank, 1, 1, generator=g) * std)
    return (torch.randn(rank, module.in_features, generator=g) * std,
            torch.randn(module.out_features, rank, generator=g) * std)


def targets(model):
    return [n for n, m in model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]


def kohya(model, prefix, names, rank=4, alpha=None, seed=0, file_names=None):
    """kohya keys `prefix + name with "_"` (or the given `file_names`), `.lora_down/.lora_up/.alpha`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, name in enumerate(names):
        key = prefix + (file_names[i] if file_names else name).replace(".", "_")
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = lora_pair(model.get_submodule(name), rank, g)
        if alpha is not None:
            sd[key + ".alpha"] = torch.tensor(float(alpha))
    return sd


def peft(model, prefix, names, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        sd[f"{prefix}.{name}.lora_A.weight"], sd[f"{prefix}.{name}.lora_B.weight"] = lora_pair(
            model.get_submodule(name), rank, g)
    return sd


def save(sd, path, metadata=None):
    meta = {"format": "pt"}
    if metadata:
        meta[lora.METADATA_KEY] = json.dumps(metadata)
    save_file(sd, path, metadata=meta)
    return path


# comparisons

def unet_inputs(unet, batch=2):
    g = torch.Generator().manual_seed(7)
    cfg = unet.config
    kw = dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor([10.0, 700.0]),
              encoder_hidden_states=torch.randn(batch, 7, cfg.cross_attention_dim, generator=g))
    if cfg.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g),
                                   "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * batch)}
    return kw


@torch.no_grad()
def unet_out(pipe):
    return pipe.unet(**unet_inputs(pipe.unet), return_dict=False)[0]


@torch.no_grad()
def text_out(encoder):
    bos, eos = encoder.config.vocab_size - 2, encoder.config.vocab_size - 1
    ids = torch.tensor([[bos, 5, 90, 300, 511, 12, 3, eos, eos, eos]])
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def compare_models(ref, ours, text_encoders=("text_encoder",)):
    assert_close(unet_out(ours), unet_out(ref), name="unet")
    for name in text_encoders:
        for i, (o, r) in enumerate(zip(text_out(getattr(ours, name)), text_out(getattr(ref, name)))):
            assert_close(o, r, name=f"{name} output {i}")


def images(pipe, **kw):
    kw = {"prompt": "a photo of a cat", "num_inference_steps": 3, "output_type": "np",
          "generator": torch.Generator().manual_seed(0), **kw}
    return np.asarray(pipe(**kw).images)


def assert_same_array(ours, ref):
    a, b = (np.round(np.asarray(x) * 255).astype(np.int16) for x in (ours, ref))
    assert a.shape == b.shape
    diff = np.abs(a - b).max()
    assert diff <= 1, f"images differ by up to {diff} / 255"


def lora_effect(pipe, fn):
    """How much the LoRA changes `fn(pipe)`: it must, or the comparison would prove nothing."""
    with_lora = fn(pipe)
    pipe.disable_lora()
    without = fn(pipe)
    pipe.enable_lora()
    return (with_lora - without).abs().max() / without.abs().max()


# ---- Würstchen


def conditioned_(model, seed, boost=0.2):
    """seeded_ weights, with the conditioning paths (text mappers, attention, effnet mappers) turned up: at
    seeded_'s scale the text barely moves the output, and a swapped guidance order would go unnoticed."""
    seeded_(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    paths = ("attention", "kv_mapper", "cond_mapper", "clip_mapper", "effnet_mappers")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and any(k in name for k in paths):
                p.copy_(torch.randn(p.shape, generator=g) * boost)
    return model.eval()


def record_latent_path(monkeypatch):
    """Record each call of the VAE's way between latents and pixels (name, upcast); AutoencoderKL.encode or
    .decode called from anywhere else fails the test."""
    from minidiff.models.vae import Autoencoder, AutoencoderKL
    calls, depth = [], [0]

    def recorded(name):
        real = getattr(Autoencoder, name)

        def fn(self, *args, upcast=True, **kwargs):
            calls.append((name, upcast))
            depth[0] += 1
            try:
                return real(self, *args, upcast=upcast, **kwargs)
            finally:
                depth[0] -= 1
        return fn

    def guarded(name):
        real = getattr(AutoencoderKL, name)

        def fn(self, *args, **kwargs):
            assert depth[0], f"AutoencoderKL.{name} was called outside image_to_latents / latents_to_image"
            return real(self, *args, **kwargs)
        return fn

    for name in ("image_to_latents", "latents_to_image"):
        monkeypatch.setattr(Autoencoder, name, recorded(name))
    for name in ("encode", "decode"):
        monkeypatch.setattr(AutoencoderKL, name, guarded(name))
    return calls


# ---------------------------------------------------------------------------------------------
# Schedulers: a fake model and a pipeline's loop, run on minidiff's and diffusers' schedulers side by side


def fake_unet(x, t):
    """A deterministic stand-in for the UNet: a smooth function of the sample and the timestep."""
    return torch.sin(1.3 * x + float(t) / 250.0) * 0.8 + 0.1 * x


def start_sample(seed=0, dtype=torch.float32):
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed)).to(dtype)


def run_loop(sched, x, timesteps=None, seed=None, **step_kwargs):
    """A pipeline's loop (a generator goes to schedulers whose step takes one); returns the step outputs."""
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    g = torch.Generator().manual_seed(seed) if seed is not None and takes_generator else None
    outs = []
    for t in (sched.timesteps if timesteps is None else timesteps):
        eps = fake_unet(sched.scale_model_input(x, t), t)
        kw = dict(step_kwargs, **({"generator": g} if g is not None else {}))
        out = sched.step(eps, t, x, **kw)
        outs.append(out)
        x = out.prev_sample
    return outs


def compare_loop(a, b, x, fields=("prev_sample", "pred_original_sample"), rel=0.0, **kw):
    """Same timesteps (values and dtype) and the same output at every step: bit-exact by default, since the
    schedulers do the same float operations as diffusers."""
    assert a.timesteps.dtype == b.timesteps.dtype, (a.timesteps.dtype, b.timesteps.dtype)
    assert torch.equal(a.timesteps, b.timesteps), (a.timesteps, b.timesteps)
    if hasattr(b, "sigmas"):
        assert torch.equal(a.sigmas, b.sigmas), (a.sigmas, b.sigmas)
    assert_close(torch.as_tensor(a.init_noise_sigma), torch.as_tensor(b.init_noise_sigma), name="init_noise_sigma")
    x = x * b.init_noise_sigma
    outs_a, outs_b = run_loop(a, x, **kw), run_loop(b, x, **kw)
    assert len(outs_a) == len(outs_b) > 0
    for i, (oa, ob) in enumerate(zip(outs_a, outs_b)):
        for f in fields:
            assert_close(getattr(oa, f), getattr(ob, f), rel=rel, name=f"step {i} {f}")
    return outs_a
