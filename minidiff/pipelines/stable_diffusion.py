"""Stable Diffusion 1.x / 2.x (and SD-Turbo, segmind small/tiny, LCM UNets): text-to-image and image-to-image.

The algorithm, top to bottom: encode the prompt with CLIP (and the negative prompt for classifier-free
guidance), draw Gaussian latents (or noise an encoded image up to `strength`), run the scheduler's loop
with the UNet, decode with the VAE. Same calls, same random draws as diffusers, so the same seed gives the
same image.
"""
import inspect

import torch

from ..errors import ArgumentError
from ..finite import check_step
from ..device import latent_dtype
from ..lora_layers import call_scale, scaled
from ..schedulers.common import randn_tensor
from ..prompts import (check_syntax, encode_windows, expand_prompt, pad_to_same_length, pad_windows, plain_ids,
                       prompt_windows, warn_truncated)
from .arguments import (callback_inputs, check_arguments, check_batch, check_negative, check_size_and_steps,
                        negative_list, prompt_batch, steps_of)
from .common import DiffusionPipeline, PipelineOutput
from .steps import (guidance_scale_embedding, initial_latents, postprocess, preprocess_image, repeat_to,
                    rescale_noise_cfg, retrieve_timesteps)
from ..loading import rewrite_old_scheduler_config


class StableDiffusionPipeline(DiffusionPipeline):
    # diffusers' SD pipelines run the VAE in its own dtype; its SDXL pipelines run a float16 VAE whose config
    # says force_upcast in float32 (see Autoencoder.image_to_latents / latents_to_image)
    vae_upcast = False
    component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor")
    optional_components = ("text_encoder", "tokenizer", "safety_checker", "feature_extractor")
    rewrites_old_scheduler_configs = True  # diffusers' LCM pipeline does not (see minidiff/loading.py)
    # what a step-end callback may ask for (callback_on_step_end_tensor_inputs), as in diffusers
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _interrupt = False
    _num_timesteps = None
    _guidance_scale = _guidance_rescale = _clip_skip = _cross_attention_kwargs = None

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False, image_encoder=None):
        refuse_unsupported(type(self).__name__, safety_checker=safety_checker, feature_extractor=feature_extractor,
                           image_encoder=image_encoder)
        if self.rewrites_old_scheduler_configs:  # steps_offset 0 / clip_sample true, as diffusers' SD pipelines
            scheduler = rewrite_old_scheduler_config(scheduler)
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                         safety_checker=None, feature_extractor=None)
        self.requires_safety_checker = requires_safety_checker

    def extra_config(self):
        return {"requires_safety_checker": self.requires_safety_checker}

    # ---- what callbacks read (diffusers' properties) ------------------------------------------------
    guidance_scale = property(lambda self: self._guidance_scale)
    guidance_rescale = property(lambda self: self._guidance_rescale)
    clip_skip = property(lambda self: self._clip_skip)
    cross_attention_kwargs = property(lambda self: self._cross_attention_kwargs)
    do_classifier_free_guidance = property(lambda self: self._guided(self._guidance_scale))
    num_timesteps = property(lambda self: self._num_timesteps)
    interrupt = property(lambda self: self._interrupt)

    @property
    def vae_scale_factor(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

    def default_size(self, height, width):
        """(height, width) in pixels, each defaulting to the UNet's sample_size."""
        side = self.unet.config.sample_size * self.vae_scale_factor
        return height or side, width or side

    # ---- prompt ---------------------------------------------------------------------------------
    def _embed(self, texts, clip_skip=None, lora_scale=None, prompt_syntax=None):
        """CLIP embeddings of a list of texts: last hidden state, or with clip_skip=k the hidden state k layers
        before the last, through the final layer norm. prompt_syntax="a1111": long, weighted prompts
        (minidiff/prompts.py)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ArgumentError("this pipeline has no text encoder/tokenizer: pass prompt_embeds (and "
                             "negative_prompt_embeds) instead of prompts")
        texts = [expand_prompt(t, self.tokenizer) for t in texts]  # multi-vector textual inversion tokens
        if check_syntax(prompt_syntax) == "plain":
            return self._encode_ids(plain_ids(self.tokenizer, texts), clip_skip, lora_scale)
        windows = [prompt_windows(self.tokenizer, t) for t in texts]
        windows = pad_windows(windows, self.tokenizer, max(map(len, windows)))
        return encode_windows(lambda ids: (self._encode_ids(ids, clip_skip, lora_scale), None), windows)[0]

    def _encode_ids(self, ids, clip_skip=None, lora_scale=None):
        device = self._execution_device
        with self._on_device(self.text_encoder) as te, scaled(te, lora_scale):
            if clip_skip is None:
                return te(ids.to(device))[0]
            hidden = te(ids.to(device), output_hidden_states=True).hidden_states[-(clip_skip + 1)]
            return te.text_model.final_layer_norm(hidden)

    @torch.no_grad()
    def encode_prompt(self, prompt, device=None, num_images_per_prompt=1, do_classifier_free_guidance=True,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, lora_scale=None,
                      clip_skip=None, prompt_syntax=None):
        """(prompt_embeds, negative_prompt_embeds), each repeated for num_images_per_prompt.

        The negative side is None without guidance. As in diffusers, clip_skip applies to the prompt only.
        prompt_syntax="a1111" reads A1111's long and weighted prompts (minidiff/prompts.py).
        """
        device = device or self._execution_device
        batch = prompt_batch(prompt, prompt_embeds)
        if prompt_embeds is None:
            texts = [prompt] if isinstance(prompt, str) else prompt
            if self.tokenizer is not None and check_syntax(prompt_syntax) != "a1111":
                warn_truncated(self.tokenizer, texts)
            prompt_embeds = self._embed(texts, clip_skip, lora_scale, prompt_syntax)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                negative_prompt_embeds = self._embed(negative_list(negative_prompt, batch), lora_scale=lora_scale,
                                                     prompt_syntax=prompt_syntax)
            if negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:  # long prompts: pad with empty windows
                cond_short = prompt_embeds.shape[1] < negative_prompt_embeds.shape[1]
                empty = self._embed([""], clip_skip if cond_short else None, lora_scale)
                prompt_embeds, negative_prompt_embeds = pad_to_same_length(prompt_embeds, negative_prompt_embeds, empty)
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    # ---- textual inversion: minidiff/textual_inversion.py does the work ---------------------------
    def load_textual_inversion(self, pretrained_model_name_or_path, token=None, weight_name=None, allow_pickle=False,
                               subfolder=None, tokenizer=None, text_encoder=None):
        """Add textual inversion embedding(s): diffusers', A1111's or SDXL's (clip_l + clip_g) files."""
        from .. import textual_inversion
        return textual_inversion.load_textual_inversion(self, pretrained_model_name_or_path, token, weight_name,
                                                        allow_pickle, subfolder, tokenizer, text_encoder)

    def unload_textual_inversion(self, tokens=None, tokenizer=None, text_encoder=None):
        from .. import textual_inversion
        textual_inversion.unload_textual_inversion(self, tokens, tokenizer, text_encoder)

    # ---- denoising ------------------------------------------------------------------------------
    def _guided(self, guidance_scale):
        # LCM-distilled UNets take the guidance scale as an embedding and need no unconditional pass.
        return guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    def _timestep_cond(self, guidance_scale, batch, dtype):
        dim = self.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        w = torch.full((batch,), guidance_scale - 1, dtype=torch.float32)
        return guidance_scale_embedding(w, dim).to(device=self._execution_device, dtype=dtype)

    def _denoise(self, latents, timesteps, embeds, guidance_scale, guidance_rescale, generator, eta,
                 cross_attention_kwargs, added_cond_kwargs=None, callback_on_step_end=None, tensor_inputs=("latents",),
                 negative_prompt_embeds=None):
        """The loop. A step-end callback may change the tensors it named, set `pipe._guidance_scale` (guidance
        off from the next step: the CFG cut-off callbacks) or `pipe._interrupt = True` (the remaining steps are
        skipped and the current latents decoded), as in diffusers."""
        self._guidance_scale, self._guidance_rescale = guidance_scale, guidance_rescale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        # bf16 weights: the latents and the scheduler's math stay fp32 between steps (device.latent_dtype)
        latents = latents.to(latent_dtype(latents.dtype))
        timestep_cond = self._timestep_cond(guidance_scale, latents.shape[0], self.unet.dtype)
        added = dict(added_cond_kwargs) if added_cond_kwargs else None
        # only the schedulers that draw noise take a generator; only DDIM takes eta
        accepted = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {k: v for k, v in (("generator", generator), ("eta", eta)) if k in accepted}
        # cross_attention_kwargs={"scale": s} scales the LoRA adapters for this call, as in diffusers
        with self._on_device(self.unet) as unet, scaled(unet, call_scale(cross_attention_kwargs)):
            for i, t in enumerate(self.progress_bar(timesteps)):
                if self._interrupt:
                    continue
                guided = self.do_classifier_free_guidance
                # guided, the latents go in once for both halves of `embeds`: the UNet runs what comes before the
                # text once and tiles it (UNet2DConditionModel.forward), the same as torch.cat([latents] * 2)
                x = self.scheduler.scale_model_input(latents, t).to(embeds.dtype)
                noise_pred = unet(x, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond,
                                  cross_attention_kwargs=cross_attention_kwargs,
                                  added_cond_kwargs=added, return_dict=False)[0].to(latents.dtype)
                if guided:
                    uncond, text = noise_pred.chunk(2)
                    noise_pred = uncond + self._guidance_scale * (text - uncond)
                    if guidance_rescale > 0:
                        noise_pred = rescale_noise_cfg(noise_pred, text, guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    offered = {"latents": latents, "prompt_embeds": embeds,
                               "negative_prompt_embeds": negative_prompt_embeds}
                    if added is not None:
                        offered.update(add_text_embeds=added["text_embeds"], add_time_ids=added["time_ids"])
                    out = callback_on_step_end(self, i, t, {k: offered[k] for k in tensor_inputs}) or {}
                    latents = out.get("latents", latents)
                    embeds = out.get("prompt_embeds", embeds)
                    if added is not None:
                        added["text_embeds"] = out.get("add_text_embeds", added["text_embeds"])
                        added["time_ids"] = out.get("add_time_ids", added["time_ids"])
                check_step(latents, unet, i, len(timesteps), self.modules(), self._guidance_scale)
        return latents

    def _decode(self, latents, output_type, generator=None):
        if output_type == "latent":
            return latents
        with self._on_device(self.vae) as vae:
            image = vae.latents_to_image(latents, upcast=self.vae_upcast)
        return postprocess(image, output_type)

    def _check(self, prompt, height, width, num_inference_steps, num_images_per_prompt, generator, negative_prompt,
               prompt_embeds, negative_prompt_embeds, output_type):
        batch = prompt_batch(prompt, prompt_embeds)
        check_batch(num_images_per_prompt, generator, batch * num_images_per_prompt)
        check_size_and_steps(height, width, num_inference_steps, self.vae_scale_factor)
        check_negative(batch, negative_prompt, negative_prompt_embeds, prompt_embeds)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ArgumentError(f"output_type={output_type!r}: use 'pil', 'np', 'pt' or 'latent'")
        return batch

    def prepare_latents(self, n, height, width, dtype, generator=None, latents=None):
        """The first latents of text-to-image (see steps.initial_latents)."""
        shape = (n, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return initial_latents(shape, generator, self._execution_device, dtype, latents, self.scheduler)

    def image_latents(self, image, n, generator, dtype):
        """The img2img input as diffusion latents, repeated to the batch of `n`: encoded by the VAE (with one
        generator per image from a list), or taken as they are when they are latents already."""
        image = image.to(device=self._execution_device, dtype=dtype)
        if image.shape[1] == self.vae.config.latent_channels:
            return repeat_to(image, n)
        if isinstance(generator, list):  # one generator per image of the batch: encode the batch
            image = repeat_to(image, n)
        with self._on_device(self.vae) as vae:
            return repeat_to(vae.image_to_latents(image, generator, upcast=self.vae_upcast), n)

    # ---- text-to-image --------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt=None, height=None, width=None, num_inference_steps=50, timesteps=None, sigmas=None,
                 guidance_scale=7.5, negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None,
                 latents=None, prompt_embeds=None, negative_prompt_embeds=None, output_type="pil", return_dict=True,
                 cross_attention_kwargs=None, guidance_rescale=0.0, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=None, prompt_syntax=None):
        check_arguments(self, locals())  # every argument's type and range, before any work
        height, width = self.default_size(height, width)
        batch = self._check(prompt, height, width, steps_of(num_inference_steps, timesteps, sigmas),
                            num_images_per_prompt, generator, negative_prompt, prompt_embeds, negative_prompt_embeds,
                            output_type)
        tensor_inputs = callback_inputs(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._clip_skip = clip_skip
        device = self._execution_device
        guided = self._guided(guidance_scale)

        cond, uncond = self.encode_prompt(prompt, device, num_images_per_prompt, guided, negative_prompt,
                                          prompt_embeds, negative_prompt_embeds, clip_skip=clip_skip,
                                          lora_scale=call_scale(cross_attention_kwargs), prompt_syntax=prompt_syntax)
        embeds = torch.cat([uncond, cond]) if guided else cond  # diffusers' batch order: [uncond, cond]

        ts, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        n = batch * num_images_per_prompt
        latents = self.prepare_latents(n, height, width, latent_dtype(cond.dtype), generator, latents)

        latents = self._denoise(latents, ts, embeds, guidance_scale, guidance_rescale, generator, eta,
                                cross_attention_kwargs, callback_on_step_end=callback_on_step_end,
                                tensor_inputs=tensor_inputs, negative_prompt_embeds=uncond)
        images = self._decode(latents, output_type, generator)
        return PipelineOutput(images) if return_dict else (images, None)


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """Image-to-image: encode the image, noise it to the timestep that `strength` picks, denoise from there."""

    @torch.no_grad()
    def __call__(self, prompt=None, image=None, strength=0.8, num_inference_steps=50, timesteps=None, sigmas=None,
                 guidance_scale=7.5, negative_prompt=None, num_images_per_prompt=1, eta=0.0, generator=None,
                 prompt_embeds=None, negative_prompt_embeds=None, output_type="pil", return_dict=True,
                 cross_attention_kwargs=None, guidance_rescale=0.0, clip_skip=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=None, prompt_syntax=None):
        check_arguments(self, locals())  # every argument's type and range, before any work
        if image is None:
            raise ArgumentError("image-to-image needs `image`")
        if not 0 <= strength <= 1:
            raise ArgumentError(f"strength={strength!r} must be in [0, 1]")
        batch = self._check(prompt, None, None, steps_of(num_inference_steps, timesteps, sigmas),
                            num_images_per_prompt, generator, negative_prompt, prompt_embeds, negative_prompt_embeds,
                            output_type)
        tensor_inputs = callback_inputs(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._clip_skip = clip_skip
        x = preprocess_image(image, self.vae_scale_factor, latent_channels=self.vae.config.latent_channels)
        device = self._execution_device
        guided = self._guided(guidance_scale)

        cond, uncond = self.encode_prompt(prompt, device, num_images_per_prompt, guided, negative_prompt,
                                          prompt_embeds, negative_prompt_embeds, clip_skip=clip_skip,
                                          lora_scale=call_scale(cross_attention_kwargs), prompt_syntax=prompt_syntax)
        embeds = torch.cat([uncond, cond]) if guided else cond

        _, steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        t_start = max(steps - min(int(steps * strength), steps), 0)
        ts = self.scheduler.timesteps[t_start * self.scheduler.order:]
        if len(ts) == 0:
            raise ArgumentError(f"strength={strength} with num_inference_steps={num_inference_steps} leaves no step to run")
        self.scheduler.set_begin_index(t_start * self.scheduler.order)

        n = batch * num_images_per_prompt
        init = self.image_latents(x, n, generator, cond.dtype)
        noise = randn_tensor(init.shape, generator=generator, device=device, dtype=cond.dtype)
        latents = self.scheduler.add_noise(init, noise, ts[:1].repeat(n))

        latents = self._denoise(latents, ts, embeds, guidance_scale, guidance_rescale, generator, eta,
                                cross_attention_kwargs, callback_on_step_end=callback_on_step_end,
                                tensor_inputs=tensor_inputs, negative_prompt_embeds=uncond)
        images = self._decode(latents, output_type, generator)
        return PipelineOutput(images) if return_dict else (images, None)


def refuse_unsupported(pipeline, **components):
    """minidiff runs no safety checker, feature extractor or IP-Adapter image encoder: None is the only value
    it takes for them (diffusers' safety_checker=None), anything else is refused rather than left unused."""
    given = [k for k, v in components.items() if v is not None]
    if given:
        raise ValueError(f"{pipeline}: {', '.join(given)} is not run by minidiff (no safety checker, no IP-Adapter): "
                         f"pass {given[0]}=None or leave it out")
