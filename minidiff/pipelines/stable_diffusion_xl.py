"""SDXL (base, refiner, Turbo, SSD-1B/Vega): text-to-image and image-to-image.

What SDXL adds to Stable Diffusion: two text encoders whose penultimate hidden states are concatenated
(768 + 1280 wide), a pooled embedding from the second, and micro-conditioning: the original size, crop
corner and target size (or, for the refiner, an aesthetic score) embedded and added to the time embedding.
The denoising loop is Stable Diffusion's.
"""
import torch

from ..errors import ArgumentError
from ..device import latent_dtype
from ..lora_layers import call_scale, scaled
from ..schedulers.common import randn_tensor
from ..prompts import (check_syntax, encode_windows, expand_prompt, pad_to_same_length, pad_windows, plain_ids,
                       prompt_windows, warn_truncated)
from .arguments import callback_inputs, check_arguments, prompt_batch, steps_of
from .common import PipelineOutput
from .steps import preprocess_image, retrieve_timesteps
from .stable_diffusion import StableDiffusionPipeline, refuse_unsupported


def _as_list(p, batch):
    return [p] * batch if isinstance(p, str) else list(p)


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    vae_upcast = True  # the SDXL VAE overflows in float16: its config's force_upcast runs it in float32
    component_names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler",
                       "image_encoder", "feature_extractor")
    optional_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "image_encoder",
                           "feature_extractor")
    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True,
                 requires_aesthetics_score=False, add_watermarker=None):
        # No invisible watermark: diffusers adds one only when its optional package is installed.
        refuse_unsupported(type(self).__name__, image_encoder=image_encoder, feature_extractor=feature_extractor)
        if add_watermarker:
            raise ValueError(f"{type(self).__name__}: add_watermarker=True is not supported by minidiff (no "
                             "invisible watermark): pass add_watermarker=False or leave it out")
        self.vae, self.text_encoder, self.text_encoder_2 = vae, text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2, self.unet, self.scheduler = tokenizer, tokenizer_2, unet, scheduler
        self.image_encoder = self.feature_extractor = None
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.requires_aesthetics_score = requires_aesthetics_score
        self._offload_device = None
        self._progress_disable = False

    def extra_config(self):
        return {"force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
                "requires_aesthetics_score": self.requires_aesthetics_score}

    # ---- prompt ---------------------------------------------------------------------------------
    def _encoders(self):
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        pairs = [(t, e) for t, e in pairs if e is not None]
        if not pairs or any(t is None for t, _ in pairs):
            raise ArgumentError("this pipeline has no text encoders/tokenizers: pass prompt_embeds and "
                             "pooled_prompt_embeds (see encode_prompt)")
        return pairs

    def _embed_xl(self, texts_per_encoder, clip_skip=None, lora_scale=None, prompt_syntax=None, warn=False):
        """Penultimate (or clip_skip-deeper) hidden states of each encoder, concatenated; pooled from the last.
        prompt_syntax="a1111": long, weighted prompts, the same number of windows for both encoders."""
        device = self._execution_device
        pairs = self._encoders()
        # zipped with the encoders present: a refiner (second encoder only) reads `prompt`, as in diffusers
        texts_per_encoder = [[expand_prompt(t, tok) for t in texts]
                             for texts, (tok, _) in zip(texts_per_encoder, pairs)]
        a1111 = check_syntax(prompt_syntax) == "a1111"
        if a1111:
            windows = [[prompt_windows(tok, t) for t in texts] for texts, (tok, _) in zip(texts_per_encoder, pairs)]
            n = max(len(w) for per_encoder in windows for w in per_encoder)
            windows = [pad_windows(w, tok, n) for w, (tok, _) in zip(windows, pairs)]
        hidden, pooled = [], None
        for i, (texts, (tok, enc)) in enumerate(zip(texts_per_encoder, pairs)):
            if warn and not a1111:
                warn_truncated(tok, texts)

            def encode(ids):
                with self._on_device(enc), scaled(enc, lora_scale):
                    out = enc(ids.to(device), output_hidden_states=True)
                # CLIPTextModelWithProjection gives text_embeds first
                hidden_state = out.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)]
                return hidden_state, out[0] if out[0].ndim == 2 else None
            h, p = encode_windows(encode, windows[i]) if a1111 else encode(plain_ids(tok, texts))
            hidden.append(h)
            pooled = p if p is not None else pooled
        return torch.cat(hidden, dim=-1), pooled

    @torch.no_grad()
    def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt=1,
                      do_classifier_free_guidance=True, negative_prompt=None, negative_prompt_2=None,
                      prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_pooled_prompt_embeds=None, lora_scale=None, clip_skip=None, prompt_syntax=None):
        """(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds),
        repeated for num_images_per_prompt; the negatives are None without guidance. prompt_syntax="a1111"
        reads A1111's long and weighted prompts (minidiff/prompts.py)."""
        device = device or self._execution_device
        batch = prompt_batch(prompt, prompt_embeds)
        if prompt_embeds is None:
            prompt = _as_list(prompt, batch)
            prompt_2 = _as_list(prompt_2 or prompt, batch)
            # zipped with the encoders present: a refiner (second encoder only) reads `prompt`, as in diffusers
            prompt_embeds, pooled_prompt_embeds = self._embed_xl([prompt, prompt_2], clip_skip, lora_scale, prompt_syntax,
                                                                 warn=True)
        elif pooled_prompt_embeds is None:
            raise ArgumentError("prompt_embeds were passed without pooled_prompt_embeds: pass both (encode_prompt "
                             "returns them)")
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None and self.force_zeros_for_empty_prompt:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
            else:
                negative_prompt = negative_prompt or ""
                negative_prompt_2 = negative_prompt_2 or negative_prompt
                neg, neg2 = _as_list(negative_prompt, batch), _as_list(negative_prompt_2, batch)
                if len(neg) != batch or len(neg2) != batch:
                    raise ArgumentError(f"negative_prompt has {len(neg)} entries but prompt has {batch}")
                negative_prompt_embeds, negative_pooled_prompt_embeds = self._embed_xl(
                    [neg, neg2], lora_scale=lora_scale, prompt_syntax=prompt_syntax)
        elif do_classifier_free_guidance and negative_pooled_prompt_embeds is None:
            raise ArgumentError("negative_prompt_embeds were passed without negative_pooled_prompt_embeds")
        if do_classifier_free_guidance and negative_prompt_embeds.shape[1] != prompt_embeds.shape[1]:
            cond_short = prompt_embeds.shape[1] < negative_prompt_embeds.shape[1]  # long prompts: empty windows
            empty = self._embed_xl([[""], [""]], clip_skip if cond_short else None, lora_scale)[0]
            prompt_embeds, negative_prompt_embeds = pad_to_same_length(prompt_embeds, negative_prompt_embeds, empty)
        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype

        def rep(x):
            return None if x is None else x.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, 0)

        if not do_classifier_free_guidance:
            negative_prompt_embeds = negative_pooled_prompt_embeds = None
        return rep(prompt_embeds), rep(negative_prompt_embeds), rep(pooled_prompt_embeds), rep(negative_pooled_prompt_embeds)

    # ---- micro-conditioning -----------------------------------------------------------------------
    def _time_ids(self, ids, pooled_dim, dtype):
        expected = self.unet.add_embedding.linear_1.in_features
        passed = self.unet.config.addition_time_embed_dim * len(ids) + pooled_dim
        if expected != passed:
            hint = ""
            if abs(expected - passed) == self.unet.config.addition_time_embed_dim:
                hint = (" (a refiner-style UNet takes an aesthetic score instead of the target size: set "
                        f"requires_aesthetics_score={expected < passed} on the pipeline)")
            raise ArgumentError(f"the UNet's add_embedding takes {expected} features but the time ids {list(ids)} and "
                             f"the pooled embedding ({pooled_dim}) make {passed}{hint}")
        return torch.tensor([list(ids)], dtype=dtype)

    def _pooled_dim(self, pooled):
        return self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else int(pooled.shape[-1])

    def _unet_inputs(self, cond, uncond, pooled, neg_pooled, time_ids, neg_time_ids, n, guided):
        device = self._execution_device
        if guided:
            embeds = torch.cat([uncond, cond])
            text_embeds = torch.cat([neg_pooled, pooled])
            time_ids = torch.cat([neg_time_ids.repeat(n, 1), time_ids.repeat(n, 1)])
        else:
            embeds, text_embeds, time_ids = cond, pooled, time_ids.repeat(n, 1)
        return embeds.to(device), {"text_embeds": text_embeds.to(device), "time_ids": time_ids.to(device)}

    @staticmethod
    def _cut_end(timesteps, denoising_end, num_train_timesteps):
        """Keep the steps above the `denoising_end` fraction: the base model's half of a base-to-refiner run."""
        if denoising_end is None:
            return timesteps
        if not (isinstance(denoising_end, float) and 0 < denoising_end < 1):
            raise ArgumentError(f"denoising_end={denoising_end!r} must be a float in (0, 1)")
        cutoff = int(round(num_train_timesteps - denoising_end * num_train_timesteps))
        return timesteps[:int((timesteps >= cutoff).sum())]

    # ---- text-to-image ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, height=None, width=None, num_inference_steps=50, timesteps=None,
                 denoising_end=None, guidance_scale=5.0, negative_prompt=None, negative_prompt_2=None,
                 num_images_per_prompt=1, eta=0.0, generator=None, latents=None, prompt_embeds=None,
                 negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 output_type="pil", return_dict=True, cross_attention_kwargs=None, guidance_rescale=0.0,
                 original_size=None, crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None, clip_skip=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=None, sigmas=None, prompt_syntax=None):
        check_arguments(self, locals())  # every argument's type and range, before any work
        height, width = self.default_size(height, width)
        batch = self._check(prompt, height, width, steps_of(num_inference_steps, timesteps, sigmas),
                            num_images_per_prompt, generator, negative_prompt, prompt_embeds, negative_prompt_embeds,
                            output_type)
        tensor_inputs = callback_inputs(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._clip_skip = clip_skip
        device = self._execution_device
        guided = self._guided(guidance_scale)
        original_size = tuple(original_size or (height, width))
        target_size = tuple(target_size or (height, width))

        cond, uncond, pooled, neg_pooled = self.encode_prompt(
            prompt, prompt_2, device, num_images_per_prompt, guided, negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            clip_skip=clip_skip, lora_scale=call_scale(cross_attention_kwargs), prompt_syntax=prompt_syntax)

        retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        n = batch * num_images_per_prompt
        latents = self.prepare_latents(n, height, width, latent_dtype(cond.dtype), generator, latents)

        pooled_dim = self._pooled_dim(pooled)
        time_ids = self._time_ids(original_size + tuple(crops_coords_top_left) + target_size, pooled_dim, cond.dtype)
        neg_time_ids = time_ids
        if negative_original_size is not None and negative_target_size is not None:
            neg_time_ids = self._time_ids(tuple(negative_original_size) + tuple(negative_crops_coords_top_left)
                                          + tuple(negative_target_size), pooled_dim, cond.dtype)
        embeds, added = self._unet_inputs(cond, uncond, pooled, neg_pooled, time_ids, neg_time_ids, n, guided)

        ts = self._cut_end(self.scheduler.timesteps, denoising_end, self.scheduler.config.num_train_timesteps)
        self.scheduler.set_begin_index(0)
        latents = self._denoise(latents, ts, embeds, guidance_scale, guidance_rescale, generator, eta,
                                cross_attention_kwargs, added, callback_on_step_end, tensor_inputs, uncond)
        images = self._decode(latents, output_type, generator)
        return PipelineOutput(images) if return_dict else (images,)


class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLPipeline):
    """Image-to-image, and the refiner's half of a base-to-refiner run (`denoising_start` on the base's latents)."""

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, requires_aesthetics_score=False,
                 force_zeros_for_empty_prompt=True, add_watermarker=None):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                         requires_aesthetics_score=requires_aesthetics_score)

    def _start(self, num_inference_steps, strength, denoising_start):
        """The timesteps to run, from `strength` or from the `denoising_start` fraction (refiner hand-off)."""
        sched = self.scheduler
        if denoising_start is None:
            t_start = max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)
            sched.set_begin_index(t_start * sched.order)
            return sched.timesteps[t_start * sched.order:]
        cutoff = int(round(sched.config.num_train_timesteps * (1 - denoising_start)))
        steps = int((sched.timesteps < cutoff).sum())
        if sched.order == 2 and steps % 2 == 0:  # a second-order step must not be split
            steps += 1
        t_start = len(sched.timesteps) - steps
        sched.set_begin_index(t_start)
        return sched.timesteps[t_start:]

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_2=None, image=None, strength=0.3, num_inference_steps=50, timesteps=None,
                 denoising_start=None, denoising_end=None, guidance_scale=5.0, negative_prompt=None,
                 negative_prompt_2=None, num_images_per_prompt=1, eta=0.0, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, output_type="pil", return_dict=True,
                 cross_attention_kwargs=None, guidance_rescale=0.0, original_size=None, crops_coords_top_left=(0, 0),
                 target_size=None, negative_original_size=None, negative_crops_coords_top_left=(0, 0),
                 negative_target_size=None, aesthetic_score=6.0, negative_aesthetic_score=2.5, clip_skip=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=None, sigmas=None, prompt_syntax=None):
        check_arguments(self, locals())  # every argument's type and range, before any work
        if image is None:
            raise ArgumentError("image-to-image needs `image` (an image, or the base pipeline's latents)")
        if not 0 <= strength <= 1:
            raise ArgumentError(f"strength={strength!r} must be in [0, 1]")
        for name, v in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if v is not None and not (isinstance(v, float) and 0 < v < 1):
                raise ArgumentError(f"{name}={v!r} must be a float in (0, 1)")
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise ArgumentError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}")
        batch = self._check(prompt, None, None, steps_of(num_inference_steps, timesteps, sigmas),
                            num_images_per_prompt, generator, negative_prompt, prompt_embeds, negative_prompt_embeds,
                            output_type)
        tensor_inputs = callback_inputs(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._clip_skip = clip_skip
        device = self._execution_device
        guided = self._guided(guidance_scale)

        cond, uncond, pooled, neg_pooled = self.encode_prompt(
            prompt, prompt_2, device, num_images_per_prompt, guided, negative_prompt, negative_prompt_2,
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            clip_skip=clip_skip, lora_scale=call_scale(cross_attention_kwargs), prompt_syntax=prompt_syntax)
        x = preprocess_image(image, self.vae_scale_factor, latent_channels=self.vae.config.latent_channels)

        _, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        ts = self._start(num_inference_steps, strength, denoising_start)
        if len(ts) == 0:
            raise ArgumentError(f"strength={strength} with num_inference_steps={num_inference_steps} leaves no step to run")
        n = batch * num_images_per_prompt
        if latents is None:
            latents = self.image_latents(x, n, generator, cond.dtype)
            if denoising_start is None:  # the refiner continues the base's noisy latents as they are
                noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=cond.dtype)
                latents = self.scheduler.add_noise(latents, noise, ts[:1].repeat(n))

        height, width = (s * self.vae_scale_factor for s in latents.shape[-2:])
        original_size = tuple(original_size or (height, width))
        target_size = tuple(target_size or (height, width))
        neg_original_size = tuple(negative_original_size or original_size)
        neg_target_size = tuple(negative_target_size or target_size)
        crops = tuple(crops_coords_top_left)
        if self.requires_aesthetics_score:
            ids = original_size + crops + (aesthetic_score,)
            neg_ids = neg_original_size + tuple(negative_crops_coords_top_left) + (negative_aesthetic_score,)
        else:  # as diffusers: the negative ids reuse the positive crop corner here
            ids = original_size + crops + target_size
            neg_ids = neg_original_size + crops + neg_target_size
        pooled_dim = self._pooled_dim(pooled)
        time_ids = self._time_ids(ids, pooled_dim, cond.dtype)
        neg_time_ids = self._time_ids(neg_ids, pooled_dim, cond.dtype)
        embeds, added = self._unet_inputs(cond, uncond, pooled, neg_pooled, time_ids, neg_time_ids, n, guided)

        ts = self._cut_end(ts, denoising_end, self.scheduler.config.num_train_timesteps)
        latents = self._denoise(latents, ts, embeds, guidance_scale, guidance_rescale, generator, eta,
                                cross_attention_kwargs, added, callback_on_step_end, tensor_inputs, uncond)
        images = self._decode(latents, output_type, generator)
        return PipelineOutput(images) if return_dict else (images,)
