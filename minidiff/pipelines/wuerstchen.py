"""Würstchen v2: text-to-image in three stages (warp-ai/wuerstchen-prior + warp-ai/wuerstchen).

Stage C, the prior, turns the prompt (CLIP bigG text states) into a 16-channel image embedding 42.67x
smaller than the image (24x24 for 1024x1024). Stage B, the decoder, turns that embedding plus the
prompt (CLIP H text states) into 4-channel VQGAN latents 10.67x larger than the embedding; stage A,
the VQGAN, decodes them to pixels. Both diffusion stages run the same continuous-time DDPM loop over
t in [1, 0] with classifier-free guidance as torch.lerp(uncond, cond, scale). Same calls, same random
draws as diffusers: one generator runs through the prior's draws and then the decoder's.
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ArgumentError, FileFormatError
from ..finite import check_output, check_step
from ..models.base import ModelOutput
from ..schedulers.ddpm_wuerstchen import DEFAULT_STAGE_C_TIMESTEPS
from ..weights.config import AttrDict
from ..weights.hub import read_json, resolve_file
from .arguments import check_arguments, check_batch, check_latents, check_negative, negative_list, prompt_batch
from .common import DiffusionPipeline, PipelineOutput
from .steps import initial_latents, numpy_to_pil, step_callback

__all__ = ["DEFAULT_STAGE_C_TIMESTEPS", "WuerstchenCombinedPipeline", "WuerstchenDecoderPipeline",
           "WuerstchenPriorPipeline", "WuerstchenPriorPipelineOutput"]


@dataclass
class WuerstchenPriorPipelineOutput(ModelOutput):
    """The prior's result: `.image_embeddings` (B, 16, h, w), what the decoder takes."""
    image_embeddings: object


# ---- shared steps -----------------------------------------------------------------------------------

def encode_text(pipe, texts, device):
    """CLIP last hidden state of `texts`, padded to the tokenizer's length; the padding is masked out
    (the Würstchen stages were trained with masked text, unlike Stable Diffusion)."""
    if pipe.text_encoder is None or pipe.tokenizer is None:
        raise ArgumentError(f"{type(pipe).__name__} has no text encoder/tokenizer: pass prompt_embeds instead of prompts")
    tokens = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    with pipe._on_device(pipe.text_encoder) as te:
        return te(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)).last_hidden_state


def guide(prediction, scale):
    """Classifier-free guidance on a [cond, uncond] batch (diffusers' order for Würstchen), written as lerp
    so the rounding is diffusers' too."""
    cond, uncond = prediction.chunk(2)
    return torch.lerp(uncond, cond, scale)


def check_schedule(num_inference_steps, timesteps, steps_name, timesteps_name):
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ArgumentError(f"{steps_name}={num_inference_steps!r} must be an integer >= 1 "
                         f"(to give explicit times pass {timesteps_name}=[1.0, ..., 0.0])")
    if timesteps is None:
        return
    ts = [float(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    if len(ts) < 2:
        raise ArgumentError(f"{timesteps_name} has {len(ts)} entries; the sampler steps from each time to the next, "
                         "so it needs at least 2 (e.g. [1.0, 0.0])")
    if any(not 0 <= t <= 1 for t in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
        raise ArgumentError(f"{timesteps_name}={ts} must be strictly decreasing times in [0, 1] (ending at 0 "
                         "for a clean result, e.g. DEFAULT_STAGE_C_TIMESTEPS)")


def set_schedule(scheduler, num_inference_steps, timesteps, device):
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps, device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.timesteps


# ---- stage C ----------------------------------------------------------------------------------------

class WuerstchenPriorPipeline(DiffusionPipeline):
    """Prompt -> stage C image embedding `.image_embeddings` (B, c_in, ceil(H / 42.67), ceil(W / 42.67))."""

    component_names = ("tokenizer", "text_encoder", "prior", "scheduler")
    optional_components = ("tokenizer", "text_encoder")

    def __init__(self, tokenizer, text_encoder, prior, scheduler, latent_mean=42.0, latent_std=1.0,
                 resolution_multiple=42.67):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior, scheduler=scheduler)
        self.config = AttrDict(latent_mean=latent_mean, latent_std=latent_std, resolution_multiple=resolution_multiple)

    def extra_config(self):
        return dict(self.config)

    def embedding_size(self, height, width):
        """Stage C latent size for an image of height x width pixels."""
        m = self.config.resolution_multiple
        return math.ceil(height / m), math.ceil(width / m)

    @torch.no_grad()
    def encode_prompt(self, device, num_images_per_prompt, do_classifier_free_guidance, prompt=None,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None):
        """(prompt_embeds, negative_prompt_embeds): CLIP bigG last hidden states, each repeated for
        num_images_per_prompt; the negative side is None without guidance."""
        batch = prompt_batch(prompt, prompt_embeds)
        if prompt_embeds is None:
            prompt_embeds = encode_text(self, [prompt] if isinstance(prompt, str) else list(prompt), device)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.prior.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                negative_prompt_embeds = encode_text(self, negative_list(negative_prompt, batch), device)
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        else:
            negative_prompt_embeds = None
        return prompt_embeds, negative_prompt_embeds

    def check_inputs(self, prompt, height, width, num_inference_steps, timesteps, negative_prompt, prompt_embeds,
                     negative_prompt_embeds, num_images_per_prompt, generator, output_type=None, latents=None,
                     steps_name="num_inference_steps", timesteps_name="timesteps"):
        """Every error the prior can raise, before any work; returns the number of prompts."""
        batch = prompt_batch(prompt, prompt_embeds)
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ArgumentError(f"{name}={v!r} must be a positive integer (pixels)")
        check_schedule(num_inference_steps, timesteps, steps_name, timesteps_name)
        check_batch(num_images_per_prompt, generator, batch * num_images_per_prompt)
        check_negative(batch, negative_prompt, negative_prompt_embeds, prompt_embeds)
        if output_type is not None and output_type not in ("pt", "np", "latent"):
            raise ArgumentError(f"output_type={output_type!r}: the prior returns embeddings, use 'pt' or 'np'")
        check_latents(latents, self.latent_shape(batch * num_images_per_prompt, height, width))
        return batch

    def latent_shape(self, n, height, width):
        return (n, self.prior.config.c_in, *self.embedding_size(height, width))

    @torch.no_grad()
    def __call__(self, prompt=None, height=1024, width=1024, num_inference_steps=60, timesteps=None,
                 guidance_scale=8.0, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                 num_images_per_prompt=1, generator=None, latents=None, output_type="pt", return_dict=True,
                 callback_on_step_end=None):
        check_arguments(self, locals())  # every argument's type and range, before any work
        batch = self.check_inputs(prompt, height, width, num_inference_steps, timesteps, negative_prompt,
                                  prompt_embeds, negative_prompt_embeds, num_images_per_prompt, generator,
                                  output_type, latents)
        device = self._execution_device
        guided = guidance_scale > 1

        cond, uncond = self.encode_prompt(device, num_images_per_prompt, guided, prompt, negative_prompt,
                                          prompt_embeds, negative_prompt_embeds)
        text = torch.cat([cond, uncond]) if guided else cond  # [cond, uncond], unlike Stable Diffusion
        dtype = text.dtype

        shape = self.latent_shape(batch * num_images_per_prompt, height, width)
        ts = set_schedule(self.scheduler, num_inference_steps, timesteps, device)
        latents = initial_latents(shape, generator, device, dtype, latents, self.scheduler)

        with self._on_device(self.prior) as prior:
            for i, t in enumerate(self.progress_bar(ts[:-1], desc="prior")):
                ratio = t.expand(latents.shape[0]).to(dtype)
                x, r = (torch.cat([latents] * 2), torch.cat([ratio] * 2)) if guided else (latents, ratio)
                pred = prior(x, r=r, c=text)
                if guided:
                    pred = guide(pred, guidance_scale)
                latents = self.scheduler.step(pred, ratio, latents, generator=generator).prev_sample
                latents = step_callback(callback_on_step_end, self, i, t, latents)
                check_step(latents, prior, i, len(ts) - 1, self.modules(), guidance_scale)

        # back to the scale of the EfficientNet features stage B was trained on (as diffusers writes it)
        latents = latents * self.config.latent_mean - self.config.latent_std
        if output_type == "np":
            latents = latents.cpu().float().numpy()
        return WuerstchenPriorPipelineOutput(latents) if return_dict else (latents,)


# ---- stages B and A ---------------------------------------------------------------------------------

class WuerstchenDecoderPipeline(DiffusionPipeline):
    """Stage C embedding + prompt -> image: DiffNeXt denoises VQGAN latents, the VQGAN decodes them."""

    component_names = ("tokenizer", "text_encoder", "decoder", "scheduler", "vqgan")

    def __init__(self, tokenizer, text_encoder, decoder, scheduler, vqgan, latent_dim_scale=10.67):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, decoder=decoder, scheduler=scheduler,
                         vqgan=vqgan)
        self.config = AttrDict(latent_dim_scale=latent_dim_scale)

    def extra_config(self):
        return dict(self.config)

    def latent_size(self, embedding_height, embedding_width):
        """Stage B latent size for a stage C embedding of that size (truncated, as diffusers does)."""
        s = self.config.latent_dim_scale
        return int(embedding_height * s), int(embedding_width * s)

    def check_latent_size(self, embedding_height, embedding_width, hint=""):
        cfg = self.decoder.config
        multiple = cfg.patch_size * 2 ** (len(cfg.c_hidden) - 1)
        h, w = self.latent_size(embedding_height, embedding_width)
        if h % multiple or w % multiple or h == 0 or w == 0:
            raise ArgumentError(f"an image embedding of {embedding_height}x{embedding_width} gives decoder latents of "
                             f"{h}x{w}, but the decoder needs multiples of {multiple} (patch {cfg.patch_size} x "
                             f"{len(cfg.c_hidden) - 1} downsamplings){hint}")

    @torch.no_grad()
    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None):
        """(prompt states, negative states or None): CLIP H last hidden states, each prompt repeated
        num_images_per_prompt times."""
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        cond = encode_text(self, texts, device).repeat_interleave(num_images_per_prompt, dim=0)
        uncond = None
        if do_classifier_free_guidance:
            uncond = encode_text(self, negative_list(negative_prompt, len(texts)), device)
            uncond = uncond.repeat_interleave(num_images_per_prompt, dim=0)
        return cond, uncond

    def check_inputs(self, prompt, num_inference_steps, timesteps, negative_prompt, num_images_per_prompt,
                     generator, output_type, embeddings_shape, latents=None, steps_name="num_inference_steps",
                     timesteps_name="timesteps", size_hint=""):
        """Every error the decoder can raise, before any work, for image embeddings of `embeddings_shape`."""
        if isinstance(prompt, str):
            n_prompts = 1
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            n_prompts = len(prompt)
        else:
            raise ArgumentError(f"prompt must be a string or a non-empty list of strings (\"\" for none), got {prompt!r}")
        if len(embeddings_shape) != 4 or embeddings_shape[1] != self.decoder.config.effnet_embd:
            raise ArgumentError(f"image_embeddings of shape {tuple(embeddings_shape)}: the decoder takes (batch, "
                             f"{self.decoder.config.effnet_embd}, h, w), the prior's `.image_embeddings`")
        b = embeddings_shape[0]
        if b % n_prompts:
            raise ArgumentError(f"{n_prompts} prompts for {b} image embeddings: pass one prompt, one per embedding, "
                             "or one per group of embeddings (the prior's num_images_per_prompt)")
        check_schedule(num_inference_steps, timesteps, steps_name, timesteps_name)
        check_batch(num_images_per_prompt, generator, b * num_images_per_prompt)
        check_negative(n_prompts, negative_prompt)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ArgumentError(f"output_type={output_type!r}: use 'pil', 'np', 'pt' or 'latent'")
        self.check_latent_size(embeddings_shape[2], embeddings_shape[3], size_hint)
        check_latents(latents, self.latent_shape(b * num_images_per_prompt, *embeddings_shape[2:]))
        return n_prompts

    def latent_shape(self, n, embedding_height, embedding_width):
        return (n, self.decoder.config.c_in, *self.latent_size(embedding_height, embedding_width))

    @torch.no_grad()
    def __call__(self, image_embeddings, prompt=None, num_inference_steps=12, timesteps=None, guidance_scale=0.0,
                 negative_prompt=None, num_images_per_prompt=1, generator=None, latents=None, output_type="pil",
                 return_dict=True, callback_on_step_end=None):
        """As diffusers, return_dict=False returns the images themselves, not a tuple."""
        check_arguments(self, locals())  # every argument's type and range, before any work
        if isinstance(image_embeddings, (list, tuple)):
            image_embeddings = torch.cat(list(image_embeddings), dim=0)
        if isinstance(image_embeddings, np.ndarray):
            image_embeddings = torch.from_numpy(image_embeddings)
        if not isinstance(image_embeddings, torch.Tensor):
            raise ArgumentError(f"image_embeddings must be a tensor or numpy array (the prior's output), "
                             f"got {type(image_embeddings).__name__}")
        n_prompts = self.check_inputs(prompt, num_inference_steps, timesteps, negative_prompt, num_images_per_prompt,
                                      generator, output_type, tuple(image_embeddings.shape), latents)
        device, dtype = self._execution_device, self.decoder.dtype
        guided = guidance_scale > 1
        n = image_embeddings.shape[0] * num_images_per_prompt

        # each prompt serves its consecutive group of embeddings (all of them for a single prompt)
        cond, uncond = self.encode_prompt(prompt, device, n // n_prompts, guided, negative_prompt)
        text = (torch.cat([cond, uncond]) if guided else cond).to(dtype)
        effnet = image_embeddings.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        # the unconditional half sees no image embedding either
        effnet = torch.cat([effnet, torch.zeros_like(effnet)]) if guided else effnet

        shape = self.latent_shape(n, *image_embeddings.shape[2:])
        ts = set_schedule(self.scheduler, num_inference_steps, timesteps, device)
        latents = initial_latents(shape, generator, device, dtype, latents, self.scheduler)

        with self._on_device(self.decoder) as decoder:
            for i, t in enumerate(self.progress_bar(ts[:-1], desc="decoder")):
                ratio = t.expand(latents.shape[0]).to(dtype)
                x, r = (torch.cat([latents] * 2), torch.cat([ratio] * 2)) if guided else (latents, ratio)
                pred = decoder(x, r=r, effnet=effnet, clip=text)
                if guided:
                    pred = guide(pred, guidance_scale)
                latents = self.scheduler.step(pred, ratio, latents, generator=generator).prev_sample
                latents = step_callback(callback_on_step_end, self, i, t, latents)
                check_step(latents, decoder, i, len(ts) - 1, self.modules(), guidance_scale)

        images = latents if output_type == "latent" else self.decode(latents, output_type)
        return PipelineOutput(images) if return_dict else images

    @torch.no_grad()
    def decode(self, latents, output_type="pil"):
        """Stage A: VQGAN latents -> images in [0, 1], decoded without snapping to the codebook."""
        with self._on_device(self.vqgan) as vqgan:
            images = vqgan.latents_to_image(latents)
        images = check_output(images, f"{type(self.vqgan).__name__}.decode", self.modules())
        if output_type == "pt":
            return images
        images = images.permute(0, 2, 3, 1).cpu().float().numpy()
        return images if output_type == "np" else numpy_to_pil(images)


# ---- all three --------------------------------------------------------------------------------------

PRIOR_PREFIX = "prior_"


def prior_repo_from_card(repo_or_path):
    """The prior repo a decoder repo names in its README.md metadata (`prior: [warp-ai/wuerstchen-prior]`),
    which is how diffusers connects the two; None if there is none."""
    path = resolve_file(repo_or_path, "README.md", required=False)
    if path is None:
        return None
    from huggingface_hub import metadata_load
    prior = (metadata_load(path) or {}).get("prior")
    if isinstance(prior, (list, tuple)):
        prior = prior[0] if prior else None
    return prior


class WuerstchenCombinedPipeline(DiffusionPipeline):
    """Prompt -> image: the prior pipeline, then the decoder pipeline with the same generator.

    Build it with `from_pretrained("warp-ai/wuerstchen")` (the decoder repo; the prior repo comes from its
    model card, or `prior_repo=`), from a folder saved by `save_pretrained`, or `from_pipes(prior, decoder)`.
    """

    component_names = ("tokenizer", "text_encoder", "decoder", "scheduler", "vqgan",
                       "prior_tokenizer", "prior_text_encoder", "prior_prior", "prior_scheduler")

    def __init__(self, tokenizer, text_encoder, decoder, scheduler, vqgan, prior_tokenizer, prior_text_encoder,
                 prior_prior, prior_scheduler, latent_dim_scale=10.67, prior_latent_mean=42.0, prior_latent_std=1.0,
                 prior_resolution_multiple=42.67):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, decoder=decoder, scheduler=scheduler,
                         vqgan=vqgan, prior_tokenizer=prior_tokenizer, prior_text_encoder=prior_text_encoder,
                         prior_prior=prior_prior, prior_scheduler=prior_scheduler)
        self.prior_pipe = WuerstchenPriorPipeline(prior_tokenizer, prior_text_encoder, prior_prior, prior_scheduler,
                                                  latent_mean=prior_latent_mean, latent_std=prior_latent_std,
                                                  resolution_multiple=prior_resolution_multiple)
        self.decoder_pipe = WuerstchenDecoderPipeline(tokenizer, text_encoder, decoder, scheduler, vqgan,
                                                      latent_dim_scale=latent_dim_scale)

    @classmethod
    def from_pipes(cls, prior_pipe, decoder_pipe):
        """Combine a WuerstchenPriorPipeline and a WuerstchenDecoderPipeline (their models are shared)."""
        return cls(**decoder_pipe.components, **decoder_pipe.config,
                   **{PRIOR_PREFIX + k: v for k, v in prior_pipe.components.items()},
                   **{PRIOR_PREFIX + k: v for k, v in prior_pipe.config.items()})

    @classmethod
    def from_pretrained(cls, repo_or_path, torch_dtype=None, variant=None, device=None, allow_pickle=False,
                        prior_repo=None, **kwargs):
        """Load from the decoder repo plus the prior repo (`prior_repo`, else the one its README.md names),
        or from one folder holding both (prior_* components, as save_pretrained writes).

        Keyword arguments prefixed `prior_` (`prior_text_encoder=...`) go to the prior pipeline."""
        repo_or_path = os.fspath(repo_or_path)
        index = read_json(repo_or_path, "model_index.json")
        load = dict(torch_dtype=torch_dtype, variant=variant, device=device, allow_pickle=allow_pickle)
        if prior_repo is None and PRIOR_PREFIX + "prior" in index:
            return super().from_pretrained(repo_or_path, **load, **kwargs)
        prior_repo = prior_repo or prior_repo_from_card(repo_or_path)
        if prior_repo is None:
            raise FileFormatError(f"{os.path.join(repo_or_path, 'model_index.json')} has no prior_* components and its "
                             "README.md names no `prior` repo: pass prior_repo='warp-ai/wuerstchen-prior' "
                             "(or a local folder)")
        prior_kwargs = {k[len(PRIOR_PREFIX):]: v for k, v in kwargs.items() if k.startswith(PRIOR_PREFIX)}
        decoder_kwargs = {k: v for k, v in kwargs.items() if not k.startswith(PRIOR_PREFIX)}
        prior = WuerstchenPriorPipeline.from_pretrained(prior_repo, **load, **prior_kwargs)
        decoder = WuerstchenDecoderPipeline.from_pretrained(repo_or_path, **load, **decoder_kwargs)
        return cls.from_pipes(prior, decoder)

    def extra_config(self):
        return {**self.decoder_pipe.config, **{PRIOR_PREFIX + k: v for k, v in self.prior_pipe.config.items()}}

    def enable_model_cpu_offload(self, device="cuda"):
        """Each model sits on `device` only while it works: the prior's text encoder, the prior, the decoder's
        text encoder, the decoder, the VQGAN, one after the other."""
        super().enable_model_cpu_offload(device)
        self.prior_pipe.enable_model_cpu_offload(device)
        self.decoder_pipe.enable_model_cpu_offload(device)

    def enable_sequential_cpu_offload(self, device="cuda"):
        self.prior_pipe.enable_sequential_cpu_offload(device)  # the pipes run the models: they hold the hooks
        self.decoder_pipe.enable_sequential_cpu_offload(device)

    def remove_all_hooks(self):
        super().remove_all_hooks()
        for pipe in (getattr(self, "prior_pipe", None), getattr(self, "decoder_pipe", None)):
            if pipe is not None:
                pipe.remove_all_hooks()

    def set_progress_bar_config(self, disable=False, **kw):
        super().set_progress_bar_config(disable, **kw)
        self.prior_pipe.set_progress_bar_config(disable, **kw)
        self.decoder_pipe.set_progress_bar_config(disable, **kw)

    @torch.no_grad()
    def __call__(self, prompt=None, height=512, width=512, prior_num_inference_steps=60, prior_timesteps=None,
                 prior_guidance_scale=4.0, num_inference_steps=12, decoder_timesteps=None, decoder_guidance_scale=0.0,
                 negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, num_images_per_prompt=1,
                 generator=None, latents=None, output_type="pil", return_dict=True, prior_callback_on_step_end=None,
                 callback_on_step_end=None):
        """As diffusers, return_dict=False returns the images themselves, not a tuple."""
        check_arguments(self, locals())  # every argument's type and range, before any work
        prior, decoder = self.prior_pipe, self.decoder_pipe
        # every check of both stages before any work
        batch = prior.check_inputs(prompt, height, width, prior_num_inference_steps, prior_timesteps,
                                   negative_prompt if negative_prompt_embeds is None else None, prompt_embeds,
                                   negative_prompt_embeds, num_images_per_prompt, generator, None, latents,
                                   "prior_num_inference_steps", "prior_timesteps")
        embedding_shape = prior.latent_shape(batch * num_images_per_prompt, height, width)
        decoder_prompt = prompt if prompt is not None else ""
        decoder.check_inputs(decoder_prompt, num_inference_steps, decoder_timesteps, negative_prompt, 1, generator,
                             output_type, embedding_shape, None, "num_inference_steps", "decoder_timesteps",
                             f" (height={height}, width={width}: try multiples of 128, e.g. 1024x1536)")

        embeddings = prior(prompt=prompt if prompt_embeds is None else None, height=height, width=width,
                           num_inference_steps=prior_num_inference_steps, timesteps=prior_timesteps,
                           guidance_scale=prior_guidance_scale,
                           negative_prompt=negative_prompt if negative_prompt_embeds is None else None,
                           prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                           num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
                           output_type="pt", callback_on_step_end=prior_callback_on_step_end).image_embeddings
        return decoder(embeddings, prompt=decoder_prompt, num_inference_steps=num_inference_steps,
                       timesteps=decoder_timesteps, guidance_scale=decoder_guidance_scale,
                       negative_prompt=negative_prompt, generator=generator, output_type=output_type,
                       return_dict=return_dict, callback_on_step_end=callback_on_step_end)
