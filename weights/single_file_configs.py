"""The configs of the Stable Diffusion families, for single files that carry none (read offline, no Hub fetch).

Values are those of the families' reference repos (stable-diffusion-v1-5/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1 and -2-1-base, stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0),
which are also the repos diffusers' from_single_file fetches configs from. single_file.py replaces the
structural values (channels, depths, widths) with what the file's tensors say, so these supply what
tensors cannot tell: head counts, activations, scaling factors, schedulers, pipeline options.
"""

_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "trained_betas": None, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "clip_sample": False}

_CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
           "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
           "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
           "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}

_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu", "norm_num_groups": 32,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 512,
        "scaling_factor": 0.18215, "force_upcast": True}

_UNET_SD = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "mid_block_type": "UNetMidBlock2DCrossAttn",
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
            "mid_block_scale_factor": 1, "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 768,
            "attention_head_dim": 8, "use_linear_projection": False, "upcast_attention": False}

FAMILIES = {
    "sd1": {
        "name": "SD 1.x",
        "pipelines": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
        # SD 1.x: 8 heads whatever the width (attention_head_dim means the number of heads there)
        "head_channels": None,
        "unet": _UNET_SD,
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "tokenizer_pad": {"tokenizer": "<|endoftext|>"},
        "scheduler": ("PNDMScheduler", dict(_SCHEDULE, prediction_type="epsilon")),
        "pipeline": {},
    },
    "sd2": {
        "name": "SD 2.x",
        "pipelines": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
        "head_channels": 64,  # heads of 64 channels: [5, 10, 20, 20]
        "unet": dict(_UNET_SD, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                     use_linear_projection=True),
        # 768-v (stable-diffusion-2-1) and 512-base (-2-1-base) differ only here: nothing in the tensors tells them apart
        "v_prediction": {"unet": {"sample_size": 96, "upcast_attention": True}, "vae": {"sample_size": 768},
                         "scheduler": ("DDIMScheduler", dict(_SCHEDULE, prediction_type="v_prediction"))},
        "epsilon": {"unet": {"sample_size": 64, "upcast_attention": False}, "vae": {"sample_size": 512},
                    "scheduler": ("PNDMScheduler", dict(_SCHEDULE, prediction_type="epsilon"))},
        "vae": _VAE,
        # OpenCLIP ViT-H/14 without its last layer (the pipeline reads the penultimate one): 23 of 24
        "text_encoder": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "projection_dim": 512,
                         "num_hidden_layers": 23, "num_attention_heads": 16, "max_position_embeddings": 77,
                         "hidden_act": "gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
                         "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
        "tokenizer_pad": {"tokenizer": "!"},
        "scheduler": None,  # from "v_prediction" or "epsilon"
        "pipeline": {},
    },
    "sdxl": {
        "name": "SDXL base",
        "pipelines": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
        "head_channels": 64,  # [5, 10, 20]
        "unet": dict(_UNET_SD, sample_size=128, down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
                     up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"], block_out_channels=[320, 640, 1280],
                     cross_attention_dim=2048, attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                     use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816),
        "vae": dict(_VAE, sample_size=1024, scaling_factor=0.13025),
        "text_encoder": _CLIP_L,
        "text_encoder_2": {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
                           "projection_dim": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
                           "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                           "attention_dropout": 0.0, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
        "tokenizer_pad": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
        "scheduler": ("EulerDiscreteScheduler", dict(_SCHEDULE, prediction_type="epsilon", interpolation_type="linear",
                                                     timestep_spacing="leading", use_karras_sigmas=False,
                                                     sample_max_value=1.0)),
        "pipeline": {"force_zeros_for_empty_prompt": True},
        "time_ids": 6,  # original size, crop corner, target size
    },
    "sdxl_refiner": {
        "name": "SDXL refiner",
        "pipelines": ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline"),
        "head_channels": 64,  # [6, 12, 24, 24]
        "unet": dict(_UNET_SD, sample_size=128, down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"],
                     block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280,
                     attention_head_dim=[6, 12, 24, 24], transformer_layers_per_block=4, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2560),
        "vae": dict(_VAE, sample_size=1024, scaling_factor=0.13025),
        "text_encoder_2": {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
                           "projection_dim": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
                           "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                           "attention_dropout": 0.0, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
        "tokenizer_pad": {"tokenizer_2": "!"},
        "scheduler": ("EulerDiscreteScheduler", dict(_SCHEDULE, prediction_type="epsilon", interpolation_type="linear",
                                                     timestep_spacing="leading", use_karras_sigmas=False,
                                                     sample_max_value=1.0)),
        "pipeline": {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True},
        "time_ids": 5,  # original size, crop corner, aesthetic score
    },
}
