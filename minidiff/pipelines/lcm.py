"""Latent Consistency Models (Luo et al. 2023): text-to-image in 1-8 steps with an LCM-distilled SD 1.x UNet
(e.g. SimianLuo/LCM_Dreamshaper_v7), as diffusers' LatentConsistencyModelPipeline.

What differs from Stable Diffusion: the guidance scale w is not applied by a second, unconditional UNet pass
but given to the UNet as an embedding of w - 1 (the UNet's `time_cond_proj_dim`), so each step is one UNet
pass on the prompt alone (no negative prompt). Each LCMScheduler step maps the latents to a clean estimate
(`denoised`) and noises it again to the next timestep; the image is decoded from the last `denoised`.
"""
import torch

from ..errors import ArgumentError
from ..lora_layers import call_scale, scaled
from ..finite import check_step
from .arguments import callback_inputs, check_arguments
from .common import PipelineOutput
from .stable_diffusion import StableDiffusionPipeline


class LatentConsistencyModelPipeline(StableDiffusionPipeline):
    component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor")
    rewrites_old_scheduler_configs = False
    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds", "w_embedding"]

    @property
    def do_classifier_free_guidance(self):
        return False  # the guidance scale enters as an embedding: one UNet pass per step

    @torch.no_grad()
    def __call__(self, prompt=None, height=None, width=None, num_inference_steps=4, original_inference_steps=None,
                 timesteps=None, guidance_scale=8.5, num_images_per_prompt=1, generator=None, latents=None,
                 prompt_embeds=None, output_type="pil", return_dict=True, cross_attention_kwargs=None, clip_skip=None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=None, prompt_syntax=None):
        check_arguments(self, locals())  # every argument's type and range, before any work
        if not hasattr(self.scheduler, "boundary_scalings"):
            raise ArgumentError(f"LatentConsistencyModelPipeline needs an LCMScheduler (it decodes the scheduler's "
                             f"denoised sample), got {type(self.scheduler).__name__}: set pipe.scheduler = "
                             "LCMScheduler.from_config(pipe.scheduler.config)")
        height, width = self.default_size(height, width)
        steps = len(timesteps) if timesteps else num_inference_steps
        batch = self._check(prompt, height, width, steps, num_images_per_prompt, generator, None, prompt_embeds,
                            None, output_type)
        tensor_inputs = callback_inputs(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._guidance_scale, self._clip_skip, self._cross_attention_kwargs = guidance_scale, clip_skip, cross_attention_kwargs
        device = self._execution_device
        lora_scale = call_scale(cross_attention_kwargs)

        cond, _ = self.encode_prompt(prompt, device, num_images_per_prompt, False, prompt_embeds=prompt_embeds,
                                     lora_scale=lora_scale, clip_skip=clip_skip, prompt_syntax=prompt_syntax)

        if timesteps:
            self.scheduler.set_timesteps(device=device, original_inference_steps=original_inference_steps,
                                         timesteps=timesteps)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device,
                                         original_inference_steps=original_inference_steps)
        n = batch * num_images_per_prompt
        latents = self.prepare_latents(n, height, width, cond.dtype, generator, latents)

        # the guidance scale enters as an embedding of w = guidance_scale - 1 (None for a UNet without one,
        # e.g. SD with an LCM-LoRA: then there is no guidance at all)
        w_embedding = self._timestep_cond(guidance_scale, n, latents.dtype)
        denoised = latents
        self._num_timesteps = len(self.scheduler.timesteps)
        self._interrupt = False
        with self._on_device(self.unet) as unet, scaled(unet, lora_scale):
            for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                if self._interrupt:
                    continue
                latents = latents.to(cond.dtype)
                model_pred = unet(latents, t, encoder_hidden_states=cond, timestep_cond=w_embedding,
                                  cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]
                latents, denoised = self.scheduler.step(model_pred, t, latents, generator=generator, return_dict=False)
                if callback_on_step_end is not None:
                    offered = {"latents": latents, "denoised": denoised, "prompt_embeds": cond,
                               "w_embedding": w_embedding}
                    out = callback_on_step_end(self, i, t, {k: offered[k] for k in tensor_inputs}) or {}
                    latents = out.get("latents", latents)
                    denoised = out.get("denoised", denoised)
                    cond = out.get("prompt_embeds", cond)
                    w_embedding = out.get("w_embedding", w_embedding)
                check_step(denoised, unet, i, len(self.scheduler.timesteps), self.modules(), guidance_scale)

        images = self._decode(denoised.to(cond.dtype), output_type, generator)
        return PipelineOutput(images) if return_dict else (images, None)
