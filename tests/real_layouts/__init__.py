"""What is known of the real files of every Hub repo the README names, checked in so that tests build their
fixtures from it: tiny seeded models whose config.json is the real one with widths and depths shrunk
(`shrink_unet`, `shrink_vae`) and every other value kept, written in the real key forms.

Provenance, per value:
- "seen": copied verbatim from a public copy of the file. The SD 1.5, SD 2.1 and SDXL base / refiner JSON
  files below come from the public repository lllyasviel/stable-diffusion-webui-forge, commit dfdcbab6
  (2025-06-26), folder backend/huggingface/<repo>/ (FORGE below), which holds copies of the Hub files
  (vocab.json and merges.txt omitted here; the tests use the real CLIP BPE vocabulary from open-clip-torch).
- "inferred": written from a secondary source (named beside it): ComfyUI's model table
  (comfy/model_detection.py, `unet_config_from_diffusers_unet`: SSD_1B, Segmind_Vega), diffusers' own
  sources and docs, or /work/shared/context/CHECKPOINTS.md. Each such entry says so. An inferred value can
  be wrong in the real file; the code reads every config at load time and trusts no constant from here.

Key forms (not config values) are in KEY_FORMS, with the same provenance marks.
"""
import copy

FORGE = "github.com/lllyasviel/stable-diffusion-webui-forge@dfdcbab6/backend/huggingface"

# ---- runwayml/stable-diffusion-v1-5: verbatim from FORGE/runwayml/stable-diffusion-v1-5/<file> (seen)

SD15_MODEL_INDEX = {'_class_name': 'StableDiffusionPipeline',
 '_diffusers_version': '0.6.0',
 'feature_extractor': ['transformers', 'CLIPImageProcessor'],
 'safety_checker': ['stable_diffusion', 'StableDiffusionSafetyChecker'],
 'scheduler': ['diffusers', 'PNDMScheduler'],
 'text_encoder': ['transformers', 'CLIPTextModel'],
 'tokenizer': ['transformers', 'CLIPTokenizer'],
 'unet': ['diffusers', 'UNet2DConditionModel'],
 'vae': ['diffusers', 'AutoencoderKL']}

SD15_UNET = {'_class_name': 'UNet2DConditionModel',
 '_diffusers_version': '0.6.0',
 'act_fn': 'silu',
 'attention_head_dim': 8,
 'block_out_channels': [320, 640, 1280, 1280],
 'center_input_sample': False,
 'cross_attention_dim': 768,
 'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
 'downsample_padding': 1,
 'flip_sin_to_cos': True,
 'freq_shift': 0,
 'in_channels': 4,
 'layers_per_block': 2,
 'mid_block_scale_factor': 1,
 'norm_eps': 1e-05,
 'norm_num_groups': 32,
 'out_channels': 4,
 'sample_size': 64,
 'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D']}

SD15_VAE = {'_class_name': 'AutoencoderKL',
 '_diffusers_version': '0.6.0',
 'act_fn': 'silu',
 'block_out_channels': [128, 256, 512, 512],
 'down_block_types': ['DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D'],
 'in_channels': 3,
 'latent_channels': 4,
 'layers_per_block': 2,
 'norm_num_groups': 32,
 'out_channels': 3,
 'sample_size': 512,
 'up_block_types': ['UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D']}

SD15_SCHEDULER = {'_class_name': 'PNDMScheduler',
 '_diffusers_version': '0.6.0',
 'beta_end': 0.012,
 'beta_schedule': 'scaled_linear',
 'beta_start': 0.00085,
 'num_train_timesteps': 1000,
 'set_alpha_to_one': False,
 'skip_prk_steps': True,
 'steps_offset': 1,
 'trained_betas': None,
 'clip_sample': False}

SD15_TEXT_ENCODER = {'_name_or_path': 'openai/clip-vit-large-patch14',
 'architectures': ['CLIPTextModel'],
 'attention_dropout': 0.0,
 'bos_token_id': 0,
 'dropout': 0.0,
 'eos_token_id': 2,
 'hidden_act': 'quick_gelu',
 'hidden_size': 768,
 'initializer_factor': 1.0,
 'initializer_range': 0.02,
 'intermediate_size': 3072,
 'layer_norm_eps': 1e-05,
 'max_position_embeddings': 77,
 'model_type': 'clip_text_model',
 'num_attention_heads': 12,
 'num_hidden_layers': 12,
 'pad_token_id': 1,
 'projection_dim': 768,
 'torch_dtype': 'float32',
 'transformers_version': '4.22.0.dev0',
 'vocab_size': 49408}

# tokenizer/tokenizer_config.json and special_tokens_map.json: the values that matter (seen)
SD15_TOKENIZER = {'tokenizer_class': 'CLIPTokenizer',
 'model_max_length': 77,
 'do_lower_case': True,
 'tokenizer_config_pad_token': '<|endoftext|>',
 'special_tokens_map_pad_token': '<|endoftext|>',
 'files': ['merges.txt', 'special_tokens_map.json', 'tokenizer_config.json', 'vocab.json']}

# ---- stabilityai/stable-diffusion-2-1: verbatim from FORGE/stabilityai/stable-diffusion-2-1/<file> (seen)

SD21_MODEL_INDEX = {'_class_name': 'StableDiffusionPipeline',
 '_diffusers_version': '0.8.0',
 'feature_extractor': ['transformers', 'CLIPImageProcessor'],
 'requires_safety_checker': False,
 'safety_checker': [None, None],
 'scheduler': ['diffusers', 'DDIMScheduler'],
 'text_encoder': ['transformers', 'CLIPTextModel'],
 'tokenizer': ['transformers', 'CLIPTokenizer'],
 'unet': ['diffusers', 'UNet2DConditionModel'],
 'vae': ['diffusers', 'AutoencoderKL']}

SD21_UNET = {'_class_name': 'UNet2DConditionModel',
 '_diffusers_version': '0.10.0.dev0',
 'act_fn': 'silu',
 'attention_head_dim': [5, 10, 20, 20],
 'block_out_channels': [320, 640, 1280, 1280],
 'center_input_sample': False,
 'cross_attention_dim': 1024,
 'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
 'downsample_padding': 1,
 'dual_cross_attention': False,
 'flip_sin_to_cos': True,
 'freq_shift': 0,
 'in_channels': 4,
 'layers_per_block': 2,
 'mid_block_scale_factor': 1,
 'norm_eps': 1e-05,
 'norm_num_groups': 32,
 'num_class_embeds': None,
 'only_cross_attention': False,
 'out_channels': 4,
 'sample_size': 96,
 'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
 'use_linear_projection': True,
 'upcast_attention': True}

SD21_VAE = {'_class_name': 'AutoencoderKL',
 '_diffusers_version': '0.8.0',
 '_name_or_path': 'hf-models/stable-diffusion-v2-768x768/vae',
 'act_fn': 'silu',
 'block_out_channels': [128, 256, 512, 512],
 'down_block_types': ['DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D'],
 'in_channels': 3,
 'latent_channels': 4,
 'layers_per_block': 2,
 'norm_num_groups': 32,
 'out_channels': 3,
 'sample_size': 768,
 'up_block_types': ['UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D']}

SD21_SCHEDULER = {'_class_name': 'DDIMScheduler',
 '_diffusers_version': '0.8.0',
 'beta_end': 0.012,
 'beta_schedule': 'scaled_linear',
 'beta_start': 0.00085,
 'clip_sample': False,
 'num_train_timesteps': 1000,
 'prediction_type': 'v_prediction',
 'set_alpha_to_one': False,
 'skip_prk_steps': True,
 'steps_offset': 1,
 'trained_betas': None}

SD21_TEXT_ENCODER = {'_name_or_path': 'hf-models/stable-diffusion-v2-768x768/text_encoder',
 'architectures': ['CLIPTextModel'],
 'attention_dropout': 0.0,
 'bos_token_id': 0,
 'dropout': 0.0,
 'eos_token_id': 2,
 'hidden_act': 'gelu',
 'hidden_size': 1024,
 'initializer_factor': 1.0,
 'initializer_range': 0.02,
 'intermediate_size': 4096,
 'layer_norm_eps': 1e-05,
 'max_position_embeddings': 77,
 'model_type': 'clip_text_model',
 'num_attention_heads': 16,
 'num_hidden_layers': 23,
 'pad_token_id': 1,
 'projection_dim': 512,
 'torch_dtype': 'float32',
 'transformers_version': '4.25.0.dev0',
 'vocab_size': 49408}

# tokenizer/tokenizer_config.json and special_tokens_map.json: the values that matter (seen)
SD21_TOKENIZER = {'tokenizer_class': 'CLIPTokenizer',
 'model_max_length': 77,
 'do_lower_case': True,
 'tokenizer_config_pad_token': '<|endoftext|>',
 'special_tokens_map_pad_token': '!',
 'files': ['merges.txt', 'special_tokens_map.json', 'tokenizer_config.json', 'vocab.json']}

# ---- stabilityai/stable-diffusion-xl-base-1.0: verbatim from FORGE/stabilityai/stable-diffusion-xl-base-1.0/<file> (seen)

SDXL_BASE_MODEL_INDEX = {'_class_name': 'StableDiffusionXLPipeline',
 '_diffusers_version': '0.19.0.dev0',
 'force_zeros_for_empty_prompt': True,
 'add_watermarker': None,
 'scheduler': ['diffusers', 'EulerDiscreteScheduler'],
 'text_encoder': ['transformers', 'CLIPTextModel'],
 'text_encoder_2': ['transformers', 'CLIPTextModelWithProjection'],
 'tokenizer': ['transformers', 'CLIPTokenizer'],
 'tokenizer_2': ['transformers', 'CLIPTokenizer'],
 'unet': ['diffusers', 'UNet2DConditionModel'],
 'vae': ['diffusers', 'AutoencoderKL']}

SDXL_BASE_UNET = {'_class_name': 'UNet2DConditionModel',
 '_diffusers_version': '0.19.0.dev0',
 'act_fn': 'silu',
 'addition_embed_type': 'text_time',
 'addition_embed_type_num_heads': 64,
 'addition_time_embed_dim': 256,
 'attention_head_dim': [5, 10, 20],
 'block_out_channels': [320, 640, 1280],
 'center_input_sample': False,
 'class_embed_type': None,
 'class_embeddings_concat': False,
 'conv_in_kernel': 3,
 'conv_out_kernel': 3,
 'cross_attention_dim': 2048,
 'cross_attention_norm': None,
 'down_block_types': ['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'],
 'downsample_padding': 1,
 'dual_cross_attention': False,
 'encoder_hid_dim': None,
 'encoder_hid_dim_type': None,
 'flip_sin_to_cos': True,
 'freq_shift': 0,
 'in_channels': 4,
 'layers_per_block': 2,
 'mid_block_only_cross_attention': None,
 'mid_block_scale_factor': 1,
 'mid_block_type': 'UNetMidBlock2DCrossAttn',
 'norm_eps': 1e-05,
 'norm_num_groups': 32,
 'num_attention_heads': None,
 'num_class_embeds': None,
 'only_cross_attention': False,
 'out_channels': 4,
 'projection_class_embeddings_input_dim': 2816,
 'resnet_out_scale_factor': 1.0,
 'resnet_skip_time_act': False,
 'resnet_time_scale_shift': 'default',
 'sample_size': 128,
 'time_cond_proj_dim': None,
 'time_embedding_act_fn': None,
 'time_embedding_dim': None,
 'time_embedding_type': 'positional',
 'timestep_post_act': None,
 'transformer_layers_per_block': [1, 2, 10],
 'up_block_types': ['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
 'upcast_attention': None,
 'use_linear_projection': True}

SDXL_BASE_VAE = {'_class_name': 'AutoencoderKL',
 '_diffusers_version': '0.20.0.dev0',
 '_name_or_path': '../sdxl-vae/',
 'act_fn': 'silu',
 'block_out_channels': [128, 256, 512, 512],
 'down_block_types': ['DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D'],
 'force_upcast': True,
 'in_channels': 3,
 'latent_channels': 4,
 'layers_per_block': 2,
 'norm_num_groups': 32,
 'out_channels': 3,
 'sample_size': 1024,
 'scaling_factor': 0.13025,
 'up_block_types': ['UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D']}

SDXL_BASE_VAE_1_0 = {'_class_name': 'AutoencoderKL',
 '_diffusers_version': '0.19.0.dev0',
 'act_fn': 'silu',
 'block_out_channels': [128, 256, 512, 512],
 'down_block_types': ['DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D'],
 'force_upcast': True,
 'in_channels': 3,
 'latent_channels': 4,
 'layers_per_block': 2,
 'norm_num_groups': 32,
 'out_channels': 3,
 'sample_size': 1024,
 'scaling_factor': 0.13025,
 'up_block_types': ['UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D']}

SDXL_BASE_SCHEDULER = {'_class_name': 'EulerDiscreteScheduler',
 '_diffusers_version': '0.19.0.dev0',
 'beta_end': 0.012,
 'beta_schedule': 'scaled_linear',
 'beta_start': 0.00085,
 'clip_sample': False,
 'interpolation_type': 'linear',
 'num_train_timesteps': 1000,
 'prediction_type': 'epsilon',
 'sample_max_value': 1.0,
 'set_alpha_to_one': False,
 'skip_prk_steps': True,
 'steps_offset': 1,
 'timestep_spacing': 'leading',
 'trained_betas': None,
 'use_karras_sigmas': False}

SDXL_BASE_TEXT_ENCODER = {'architectures': ['CLIPTextModel'],
 'attention_dropout': 0.0,
 'bos_token_id': 0,
 'dropout': 0.0,
 'eos_token_id': 2,
 'hidden_act': 'quick_gelu',
 'hidden_size': 768,
 'initializer_factor': 1.0,
 'initializer_range': 0.02,
 'intermediate_size': 3072,
 'layer_norm_eps': 1e-05,
 'max_position_embeddings': 77,
 'model_type': 'clip_text_model',
 'num_attention_heads': 12,
 'num_hidden_layers': 12,
 'pad_token_id': 1,
 'projection_dim': 768,
 'torch_dtype': 'float16',
 'transformers_version': '4.32.0.dev0',
 'vocab_size': 49408}

SDXL_BASE_TEXT_ENCODER_2 = {'architectures': ['CLIPTextModelWithProjection'],
 'attention_dropout': 0.0,
 'bos_token_id': 0,
 'dropout': 0.0,
 'eos_token_id': 2,
 'hidden_act': 'gelu',
 'hidden_size': 1280,
 'initializer_factor': 1.0,
 'initializer_range': 0.02,
 'intermediate_size': 5120,
 'layer_norm_eps': 1e-05,
 'max_position_embeddings': 77,
 'model_type': 'clip_text_model',
 'num_attention_heads': 20,
 'num_hidden_layers': 32,
 'pad_token_id': 1,
 'projection_dim': 1280,
 'torch_dtype': 'float16',
 'transformers_version': '4.32.0.dev0',
 'vocab_size': 49408}

# tokenizer/tokenizer_config.json and special_tokens_map.json: the values that matter (seen)
SDXL_BASE_TOKENIZER = {'tokenizer_class': 'CLIPTokenizer',
 'model_max_length': 77,
 'do_lower_case': True,
 'tokenizer_config_pad_token': '<|endoftext|>',
 'special_tokens_map_pad_token': '<|endoftext|>',
 'files': ['merges.txt', 'special_tokens_map.json', 'tokenizer_config.json', 'vocab.json']}

# tokenizer_2/tokenizer_config.json and special_tokens_map.json: the values that matter (seen)
SDXL_BASE_TOKENIZER_2 = {'tokenizer_class': 'CLIPTokenizer',
 'model_max_length': 77,
 'do_lower_case': True,
 'tokenizer_config_pad_token': '!',
 'special_tokens_map_pad_token': '!',
 'files': ['merges.txt', 'special_tokens_map.json', 'tokenizer_config.json', 'vocab.json']}

# ---- stabilityai/stable-diffusion-xl-refiner-1.0: verbatim from FORGE/stabilityai/stable-diffusion-xl-refiner-1.0/<file> (seen)

SDXL_REFINER_MODEL_INDEX = {'_class_name': 'StableDiffusionXLImg2ImgPipeline',
 '_diffusers_version': '0.19.0.dev0',
 'force_zeros_for_empty_prompt': False,
 'add_watermarker': None,
 'requires_aesthetics_score': True,
 'scheduler': ['diffusers', 'EulerDiscreteScheduler'],
 'text_encoder': ['transformers', 'CLIPTextModelWithProjection'],
 'tokenizer': ['transformers', 'CLIPTokenizer'],
 'unet': ['diffusers', 'UNet2DConditionModel'],
 'vae': ['diffusers', 'AutoencoderKL']}

SDXL_REFINER_UNET = {'_class_name': 'UNet2DConditionModel',
 '_diffusers_version': '0.19.0.dev0',
 'act_fn': 'silu',
 'addition_embed_type': 'text_time',
 'addition_embed_type_num_heads': 64,
 'addition_time_embed_dim': 256,
 'attention_head_dim': [6, 12, 24, 24],
 'block_out_channels': [384, 768, 1536, 1536],
 'center_input_sample': False,
 'class_embed_type': None,
 'class_embeddings_concat': False,
 'conv_in_kernel': 3,
 'conv_out_kernel': 3,
 'cross_attention_dim': 1280,
 'cross_attention_norm': None,
 'down_block_types': ['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
 'downsample_padding': 1,
 'dual_cross_attention': False,
 'encoder_hid_dim': None,
 'encoder_hid_dim_type': None,
 'flip_sin_to_cos': True,
 'freq_shift': 0,
 'in_channels': 4,
 'layers_per_block': 2,
 'mid_block_only_cross_attention': None,
 'mid_block_scale_factor': 1,
 'mid_block_type': 'UNetMidBlock2DCrossAttn',
 'norm_eps': 1e-05,
 'norm_num_groups': 32,
 'num_attention_heads': None,
 'num_class_embeds': None,
 'only_cross_attention': False,
 'out_channels': 4,
 'projection_class_embeddings_input_dim': 2560,
 'resnet_out_scale_factor': 1.0,
 'resnet_skip_time_act': False,
 'resnet_time_scale_shift': 'default',
 'sample_size': 128,
 'time_cond_proj_dim': None,
 'time_embedding_act_fn': None,
 'time_embedding_dim': None,
 'time_embedding_type': 'positional',
 'timestep_post_act': None,
 'transformer_layers_per_block': 4,
 'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
 'upcast_attention': None,
 'use_linear_projection': True}

SDXL_REFINER_VAE = {'_class_name': 'AutoencoderKL',
 '_diffusers_version': '0.20.0.dev0',
 '_name_or_path': '../sdxl-vae/',
 'act_fn': 'silu',
 'block_out_channels': [128, 256, 512, 512],
 'down_block_types': ['DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D'],
 'force_upcast': True,
 'in_channels': 3,
 'latent_channels': 4,
 'layers_per_block': 2,
 'norm_num_groups': 32,
 'out_channels': 3,
 'sample_size': 1024,
 'scaling_factor': 0.13025,
 'up_block_types': ['UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D']}

SDXL_REFINER_VAE_1_0 = {'_class_name': 'AutoencoderKL',
 '_diffusers_version': '0.19.0.dev0',
 'act_fn': 'silu',
 'block_out_channels': [128, 256, 512, 512],
 'down_block_types': ['DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D', 'DownEncoderBlock2D'],
 'force_upcast': True,
 'in_channels': 3,
 'latent_channels': 4,
 'layers_per_block': 2,
 'norm_num_groups': 32,
 'out_channels': 3,
 'sample_size': 1024,
 'scaling_factor': 0.13025,
 'up_block_types': ['UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D']}

SDXL_REFINER_SCHEDULER = {'_class_name': 'EulerDiscreteScheduler',
 '_diffusers_version': '0.19.0.dev0',
 'beta_end': 0.012,
 'beta_schedule': 'scaled_linear',
 'beta_start': 0.00085,
 'clip_sample': False,
 'interpolation_type': 'linear',
 'num_train_timesteps': 1000,
 'prediction_type': 'epsilon',
 'sample_max_value': 1.0,
 'set_alpha_to_one': False,
 'skip_prk_steps': True,
 'steps_offset': 1,
 'timestep_spacing': 'leading',
 'trained_betas': None,
 'use_karras_sigmas': False}

SDXL_REFINER_TEXT_ENCODER = {'architectures': ['CLIPTextModelWithProjection'],
 'attention_dropout': 0.0,
 'bos_token_id': 0,
 'dropout': 0.0,
 'eos_token_id': 2,
 'hidden_act': 'gelu',
 'hidden_size': 1280,
 'initializer_factor': 1.0,
 'initializer_range': 0.02,
 'intermediate_size': 5120,
 'layer_norm_eps': 1e-05,
 'max_position_embeddings': 77,
 'model_type': 'clip_text_model',
 'num_attention_heads': 20,
 'num_hidden_layers': 32,
 'pad_token_id': 1,
 'projection_dim': 1280,
 'torch_dtype': 'float16',
 'transformers_version': '4.32.0.dev0',
 'vocab_size': 49408}

# tokenizer/tokenizer_config.json and special_tokens_map.json: the values that matter (seen)
SDXL_REFINER_TOKENIZER = {'tokenizer_class': 'CLIPTokenizer',
 'model_max_length': 77,
 'do_lower_case': True,
 'tokenizer_config_pad_token': '!',
 'special_tokens_map_pad_token': '!',
 'files': ['merges.txt', 'special_tokens_map.json', 'tokenizer_config.json', 'vocab.json']}

# ---- repos whose files were not seen: derived from the seen ones, each change marked with its source


def _derive(base, **changes):
    out = copy.deepcopy(base)
    out.update(changes)
    return out


# stable-diffusion-v1-5/stable-diffusion-v1-5 is the re-upload of runwayml/stable-diffusion-v1-5 (same files;
# inferred from the Hub's model card, which says it mirrors the deleted repo).
# stabilityai/stable-diffusion-2-1-base: SD 2.1 at 512 px, epsilon prediction, no attention upcast
# (inferred: diffusers' docs; the 768-v model needs upcast_attention for fp16, the base does not).
SD21_BASE_UNET = _derive(SD21_UNET, sample_size=64, upcast_attention=False)
SD21_BASE_SCHEDULER = {k: v for k, v in SD21_SCHEDULER.items() if k != "prediction_type"}  # epsilon (default)

# stabilityai/sd-vae-ft-mse and sd-vae-ft-ema: the SD 1.5 VAE config (inferred: CHECKPOINTS.md; the
# fine-tunes change weights only), fp32 file with the legacy attention names (CHECKPOINTS.md).
SD_VAE_FT = _derive(SD15_VAE, _diffusers_version="0.4.2")

# stabilityai/sdxl-turbo: SDXL base UNet at 512 px; EulerAncestral, trailing spacing (inferred:
# CHECKPOINTS.md and the model card: 1 step, guidance 0).
SDXL_TURBO_UNET = _derive(SDXL_BASE_UNET, sample_size=64)
SDXL_TURBO_SCHEDULER = _derive(SDXL_BASE_SCHEDULER, _class_name="EulerAncestralDiscreteScheduler",
                               timestep_spacing="trailing")
# stabilityai/sd-turbo: SD 2.1 UNet at 512 px; Euler (not ancestral), trailing (inferred: CHECKPOINTS.md).
SD_TURBO_UNET = _derive(SD21_UNET, sample_size=64)
SD_TURBO_SCHEDULER = _derive(SDXL_BASE_SCHEDULER, timestep_spacing="trailing")

# segmind/tiny-sd (from a copy of its config, CHECKPOINTS.md): 3 CrossAttn blocks each way, 1 layer per
# block, no mid block. segmind/small-sd: SD 1.5 with layers_per_block 1 (inferred from Segmind's
# training code, CHECKPOINTS.md).
TINY_SD_UNET = _derive(SD15_UNET, _diffusers_version="0.17.0", block_out_channels=[320, 640, 1280],
                       down_block_types=["CrossAttnDownBlock2D"] * 3, up_block_types=["CrossAttnUpBlock2D"] * 3,
                       layers_per_block=1, mid_block_type=None)
SMALL_SD_UNET = _derive(SD15_UNET, _diffusers_version="0.17.0", layers_per_block=1)

# segmind/SSD-1B and segmind/Segmind-Vega: SDXL base with a resnet-only middle block
# ("mid_block_type": "UNetMidBlock2D", CHECKPOINTS.md) and fewer transformer layers. The depths are
# inferred from ComfyUI's model table (comfy/model_detection.py, SSD_1B: transformer_depth
# [0, 0, 2, 2, 4, 4], transformer_depth_output [0, 0, 0, 1, 1, 2, 10, 4, 4], consumed from the end;
# Segmind_Vega: [0, 0, 1, 1, 2, 2] and [0, 0, 0, 1, 1, 1, 2, 2, 2]); the exact config text was not seen.
SSD_1B_UNET = _derive(SDXL_BASE_UNET, _diffusers_version="0.22.0.dev0", mid_block_type="UNetMidBlock2D",
                      transformer_layers_per_block=[1, 2, 4],
                      reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], 1])
VEGA_UNET = _derive(SDXL_BASE_UNET, _diffusers_version="0.24.0.dev0", mid_block_type="UNetMidBlock2D",
                    transformer_layers_per_block=[1, 1, 2], layers_per_block=2)

# SimianLuo/LCM_Dreamshaper_v7: SD 1.5 shape, time_cond_proj_dim 256, sample 96; LCMScheduler with
# original_inference_steps 50 (inferred: CHECKPOINTS.md and diffusers' LCM docs).
LCM_DREAMSHAPER_UNET = _derive(SD15_UNET, _diffusers_version="0.22.0.dev0", sample_size=96, time_cond_proj_dim=256)
LCM_SCHEDULER = {"_class_name": "LCMScheduler", "_diffusers_version": "0.22.0.dev0", "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                 "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
                 "original_inference_steps": 50, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
                 "sample_max_value": 1.0, "set_alpha_to_one": True, "steps_offset": 1, "thresholding": False,
                 "timestep_scaling": 10.0, "timestep_spacing": "leading", "trained_betas": None}
# latent-consistency/lcm-sdxl: the SDXL base UNet with time_cond_proj_dim 256 (a UNet-only repo; inferred).
LCM_SDXL_UNET = _derive(SDXL_BASE_UNET, _diffusers_version="0.22.0.dev0", time_cond_proj_dim=256)

# warp-ai/wuerstchen-prior and warp-ai/wuerstchen (inferred: CHECKPOINTS.md; configs not seen).
WUERSTCHEN_PRIOR = {"_class_name": "WuerstchenPrior", "c_in": 16, "c": 1536, "c_cond": 1280, "c_r": 64, "depth": 32,
                    "nhead": 24, "dropout": 0.1}
WUERSTCHEN_PRIOR_MODEL_INDEX = {"_class_name": "WuerstchenPriorPipeline", "latent_mean": 42.0, "latent_std": 1.0,
                                "resolution_multiple": 42.67, "prior": ["wuerstchen", "WuerstchenPrior"],
                                "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
                                "text_encoder": ["transformers", "CLIPTextModel"],
                                "tokenizer": ["transformers", "CLIPTokenizerFast"]}
WUERSTCHEN_DECODER = {"_class_name": "WuerstchenDiffNeXt", "c_in": 4, "c_out": 4, "c_r": 64, "patch_size": 2,
                      "c_cond": 1024, "c_hidden": [320, 640, 1280, 1280], "nhead": [-1, 10, 20, 20],
                      "blocks": [4, 4, 14, 4], "level_config": ["CT", "CTA", "CTA", "CTA"],
                      "inject_effnet": [False, True, True, True], "effnet_embd": 16, "clip_embd": 1024,
                      "kernel_size": 3, "dropout": 0.1}
WUERSTCHEN_DECODER_MODEL_INDEX = {"_class_name": "WuerstchenDecoderPipeline", "latent_dim_scale": 10.67,
                                  "decoder": ["wuerstchen", "WuerstchenDiffNeXt"],
                                  "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
                                  "text_encoder": ["transformers", "CLIPTextModel"],
                                  "tokenizer": ["transformers", "CLIPTokenizerFast"],
                                  "vqgan": ["wuerstchen", "PaellaVQModel"]}
WUERSTCHEN_SCHEDULER = {"_class_name": "DDPMWuerstchenScheduler", "s": 0.008, "scaler": 1.0}

# ---- key forms the real files use (beside the configs)
KEY_FORMS = {
    # seen: diffusers' _convert_deprecated_attention_blocks renames exactly these (modeling_utils.py);
    # which files carry them: CHECKPOINTS.md (SD 1.x/2.x fp32 VAE files, sd-vae-ft-mse/-ema).
    "vae_legacy_attention": {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"},
    # CHECKPOINTS.md: text encoders written by transformers < 4.31 carry this buffer
    "clip_position_ids": "text_model.embeddings.position_ids",
}

# The FORGE copy of the refiner keeps its one text encoder under text_encoder/ and tokenizer/, and its
# model_index.json names it so; the Hub repo names it text_encoder_2 / tokenizer_2 with text_encoder and
# tokenizer null (inferred: diffusers' SDXL docs and the refiner's loading code, CHECKPOINTS.md).
SDXL_REFINER_HUB_MODEL_INDEX = {k: v for k, v in SDXL_REFINER_MODEL_INDEX.items() if k not in ("text_encoder", "tokenizer")}
SDXL_REFINER_HUB_MODEL_INDEX.update(text_encoder=[None, None], tokenizer=[None, None],
                                    text_encoder_2=SDXL_REFINER_MODEL_INDEX["text_encoder"],
                                    tokenizer_2=SDXL_REFINER_MODEL_INDEX["tokenizer"])

# ---- per repo: which record holds each component, the variants each folder has, what is inferred
REPOS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": dict(
        model_index=SD15_MODEL_INDEX, unet=SD15_UNET, vae=SD15_VAE, scheduler=SD15_SCHEDULER,
        text_encoder=SD15_TEXT_ENCODER, tokenizer=SD15_TOKENIZER, vae_fp32_keys="vae_legacy_attention",
        variants={"fp16": ["unet", "vae", "text_encoder"], "non_ema": ["unet"]},
        inferred=["same files as runwayml/stable-diffusion-v1-5 (FORGE copy)"]),
    "stabilityai/stable-diffusion-2-1": dict(
        model_index=SD21_MODEL_INDEX, unet=SD21_UNET, vae=SD21_VAE, scheduler=SD21_SCHEDULER,
        text_encoder=SD21_TEXT_ENCODER, tokenizer=SD21_TOKENIZER, vae_fp32_keys="vae_legacy_attention",
        variants={"fp16": ["unet", "vae", "text_encoder"]}, inferred=[]),
    "stabilityai/stable-diffusion-2-1-base": dict(
        model_index=SD21_MODEL_INDEX, unet=SD21_BASE_UNET, vae=SD21_VAE, scheduler=SD21_BASE_SCHEDULER,
        text_encoder=SD21_TEXT_ENCODER, tokenizer=SD21_TOKENIZER, vae_fp32_keys="vae_legacy_attention",
        variants={"fp16": ["unet", "vae", "text_encoder"]},
        inferred=["unet sample_size 64, upcast_attention false", "scheduler prediction_type epsilon"]),
    "stabilityai/sd-vae-ft-mse": dict(vae=SD_VAE_FT, vae_fp32_keys="vae_legacy_attention", variants={},
                                      inferred=["config = SD 1.5 VAE config"]),
    "stabilityai/stable-diffusion-xl-base-1.0": dict(
        model_index=SDXL_BASE_MODEL_INDEX, unet=SDXL_BASE_UNET, vae=SDXL_BASE_VAE, scheduler=SDXL_BASE_SCHEDULER,
        text_encoder=SDXL_BASE_TEXT_ENCODER, text_encoder_2=SDXL_BASE_TEXT_ENCODER_2, tokenizer=SDXL_BASE_TOKENIZER,
        tokenizer_2=SDXL_BASE_TOKENIZER_2, variants={"fp16": ["unet", "vae", "text_encoder", "text_encoder_2"]},
        inferred=[]),
    "stabilityai/stable-diffusion-xl-refiner-1.0": dict(
        model_index=SDXL_REFINER_HUB_MODEL_INDEX, unet=SDXL_REFINER_UNET, vae=SDXL_REFINER_VAE,
        scheduler=SDXL_REFINER_SCHEDULER, text_encoder_2=SDXL_REFINER_TEXT_ENCODER, tokenizer_2=SDXL_REFINER_TOKENIZER,
        variants={"fp16": ["unet", "vae", "text_encoder_2"]},
        inferred=["model_index text_encoder_2/tokenizer_2 names (FORGE renamed them)"]),
    "stabilityai/sdxl-turbo": dict(
        model_index=_derive(SDXL_BASE_MODEL_INDEX, scheduler=["diffusers", "EulerAncestralDiscreteScheduler"]),
        unet=SDXL_TURBO_UNET, scheduler=SDXL_TURBO_SCHEDULER, vae=SDXL_BASE_VAE, text_encoder=SDXL_BASE_TEXT_ENCODER,
        text_encoder_2=SDXL_BASE_TEXT_ENCODER_2, tokenizer=SDXL_BASE_TOKENIZER, tokenizer_2=SDXL_BASE_TOKENIZER_2,
        inferred=["model_index, text encoders, tokenizers, vae = SDXL base's", "unet = SDXL base with sample_size 64",
                  "scheduler"]),
    "stabilityai/sd-turbo": dict(
        model_index=_derive(SD21_MODEL_INDEX, scheduler=["diffusers", "EulerDiscreteScheduler"]),
        unet=SD_TURBO_UNET, scheduler=SD_TURBO_SCHEDULER, vae=SD21_VAE, text_encoder=SD21_TEXT_ENCODER,
        tokenizer=SD21_TOKENIZER, vae_fp32_keys="vae_legacy_attention",
        inferred=["model_index, text encoder, tokenizer, vae = SD 2.1's", "unet = SD 2.1 with sample_size 64",
                  "scheduler", "legacy VAE key names"]),
    "segmind/tiny-sd": dict(unet=TINY_SD_UNET, inferred=["unet config (from a copy quoted in CHECKPOINTS.md)"]),
    "segmind/small-sd": dict(unet=SMALL_SD_UNET, inferred=["unet layers_per_block 1"]),
    "segmind/SSD-1B": dict(unet=SSD_1B_UNET, inferred=["transformer depths (ComfyUI's table)"]),
    "segmind/Segmind-Vega": dict(unet=VEGA_UNET, inferred=["transformer depths (ComfyUI's table)"]),
    "SimianLuo/LCM_Dreamshaper_v7": dict(unet=LCM_DREAMSHAPER_UNET, scheduler=LCM_SCHEDULER,
                                         inferred=["unet = SD 1.5 + time_cond_proj_dim 256", "scheduler"]),
    "latent-consistency/lcm-sdxl": dict(unet=LCM_SDXL_UNET, inferred=["unet = SDXL base + time_cond_proj_dim 256"]),
    "warp-ai/wuerstchen-prior": dict(model_index=WUERSTCHEN_PRIOR_MODEL_INDEX, prior=WUERSTCHEN_PRIOR,
                                     scheduler=WUERSTCHEN_SCHEDULER, tokenizer_json=True, inferred=["all configs"]),
    "warp-ai/wuerstchen": dict(model_index=WUERSTCHEN_DECODER_MODEL_INDEX, decoder=WUERSTCHEN_DECODER,
                               scheduler=WUERSTCHEN_SCHEDULER, tokenizer_json=True, inferred=["all configs"]),
}


# ---- shrinking: small widths and depths, every other value as in the real file


def _small_depth(v):
    """Transformer depth 0, 1 stay; deeper ones become 2 (keeps the per-layer pattern of SSD-1B)."""
    if isinstance(v, list):
        return [_small_depth(x) for x in v]
    return min(v, 2)


def shrink_unet(real, cross_attention_dim=32, pooled_dim=32, time_ids=None):
    """The real UNet config with widths 32/64/64/64, 2-head attention, depths <= 2, sample_size 8, text width
    `cross_attention_dim`, SDXL time-id width 8 (projection input = pooled + ids x 8). Keys are kept as
    the real file has them (a key the real file lacks stays absent, so the model's defaults apply)."""
    cfg = copy.deepcopy(real)
    n = len(cfg["down_block_types"])
    cfg["block_out_channels"] = [32, 64, 64, 64][:n]
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
    key = "num_attention_heads" if cfg.get("num_attention_heads") else "attention_head_dim"
    cfg[key] = [2] * n if isinstance(heads, list) else 2
    cfg["sample_size"] = 8
    cfg["cross_attention_dim"] = cross_attention_dim
    for k in ("transformer_layers_per_block", "reverse_transformer_layers_per_block"):
        if cfg.get(k) is not None:
            cfg[k] = _small_depth(cfg[k])
    if cfg.get("addition_embed_type") == "text_time":
        ids = time_ids or (cfg["projection_class_embeddings_input_dim"] - 1280) // cfg["addition_time_embed_dim"]
        cfg["addition_time_embed_dim"] = 8
        cfg["projection_class_embeddings_input_dim"] = pooled_dim + ids * 8
    return cfg


def shrink_vae(real):
    """The real VAE config with widths 32/32/64/64 (32 groups still divide them), sample_size 32."""
    cfg = copy.deepcopy(real)
    cfg["block_out_channels"] = [32, 32, 64, 64][:len(cfg["block_out_channels"])]
    cfg["sample_size"] = 32
    return cfg


def legacy_vae_state_dict(sd):
    """A state dict in the old fp32 VAE form: mid-block attention named query/key/value/proj_attn."""
    back = {v: k for k, v in KEY_FORMS["vae_legacy_attention"].items()}
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if ".attentions." in k and parts[-2] in ("to_q", "to_k", "to_v"):
            k = ".".join(parts[:-2] + [back[parts[-2]], parts[-1]])
        elif ".attentions." in k and k.rsplit(".", 3)[-3:-1] == ["to_out", "0"]:
            k = ".".join(parts[:-3] + ["proj_attn", parts[-1]])
        out[k] = v
    return out
