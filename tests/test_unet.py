"""minidiff's UNet2DConditionModel against diffusers' on small configs of each UNet family."""
import json
import os

import pytest
import torch

from minidiff.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from tests.utils import assert_close, seeded_

diffusers = pytest.importorskip("diffusers")

CROSS = 24
BASE = dict(sample_size=16, in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=CROSS,
            block_out_channels=(16, 32, 32), layers_per_block=2, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
XL_BLOCKS = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))

CONFIGS = {
    # SD 1.x: conv proj_in/out, attention_head_dim = 2 heads everywhere
    "sd1": dict(BASE),
    # SD 2.x: linear projections, per-block head counts, fp32-upcast attention
    "sd2": dict(BASE, use_linear_projection=True, attention_head_dim=[1, 2, 4], upcast_attention=True,
                flip_sin_to_cos=True, freq_shift=0),
    # segmind small/tiny-sd: one resnet per down block, no mid block, last down block with attention
    "segmind": dict(BASE, layers_per_block=1, mid_block_type=None,
                    down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3),
    # LCM: guidance embedding w added to the timestep's through time_embedding.cond_proj
    "lcm": dict(BASE, time_cond_proj_dim=8),
    # SDXL: text_time addition embedding (pooled 32 + 6 ids x 8), transformer depth per block, wide context
    "sdxl": dict(BASE, **XL_BLOCKS, use_linear_projection=True, attention_head_dim=[1, 2, 4],
                 transformer_layers_per_block=[1, 2, 3], cross_attention_dim=40, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
    # SSD-1B / Vega style: depth per block and layer, a different one on the way up (0 = projections only)
    "asymmetric": dict(BASE, **XL_BLOCKS, use_linear_projection=True, layers_per_block=[1, 2, 2],
                       transformer_layers_per_block=[[1], [1, 2], [2, 1]],
                       reverse_transformer_layers_per_block=[[2, 0, 1], [1, 1, 2], [1, 1, 1]],
                       cross_attention_dim=40, addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=32 + 6 * 8),
    # SDXL refiner: four levels, attention in the middle two, 5 ids (size, crop, aesthetic score)
    "refiner": dict(BASE, block_out_channels=(16, 16, 32, 32), attention_head_dim=[1, 2, 2, 4],
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    use_linear_projection=True, transformer_layers_per_block=2, cross_attention_dim=32,
                    addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 5 * 8),
    # rarer options: only_cross_attention per block, class embedding by projection, wider time MLP
    "options": dict(BASE, only_cross_attention=[True, False, False], class_embed_type="projection",
                    projection_class_embeddings_input_dim=12, time_embedding_dim=48, center_input_sample=True,
                    mid_block_scale_factor=2.0, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1),
}


def reference_and_ours(tmp_path, config, dtype=None):
    ref = seeded_(diffusers.UNet2DConditionModel(**config)).eval()
    ref.save_pretrained(tmp_path)
    return ref, UNet2DConditionModel.from_pretrained(tmp_path, torch_dtype=dtype)


def inputs(config, batch=2, size=16, tokens=7):
    g = torch.Generator().manual_seed(1)
    cross = config["cross_attention_dim"]
    kw = dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor([10.0, 500.0]),
              encoder_hidden_states=torch.randn(batch, tokens, cross, generator=g))
    if config.get("time_cond_proj_dim"):
        kw["timestep_cond"] = torch.randn(batch, config["time_cond_proj_dim"], generator=g)
    if config.get("addition_embed_type") == "text_time":
        n_ids = (config["projection_class_embeddings_input_dim"] - 32) // config["addition_time_embed_dim"]
        time_ids = torch.tensor([[512.0, 768.0, 0.0, 16.0, 1024.0, 1024.0][:n_ids]] * batch)
        if n_ids == 5:
            time_ids[:, -1] = 6.0  # aesthetic score
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": time_ids}
    if config.get("class_embed_type") == "projection":
        kw["class_labels"] = torch.randn(batch, config["projection_class_embeddings_input_dim"], generator=g)
    return kw


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(tmp_path, name):
    config = CONFIGS[name]
    ref, ours = reference_and_ours(tmp_path, config)
    assert set(ours.state_dict()) == set(ref.state_dict())
    kw = inputs(config)
    with torch.no_grad():
        expected = ref(**kw).sample
        got = ours(**kw).sample
    assert got.dtype == torch.float32
    assert_close(got, expected, name=name)
    assert ours.config.sample_size == 16 and ours.config.in_channels == 4


def test_timestep_forms_masks_and_outputs(tmp_path):
    config = CONFIGS["sd1"]
    ref, ours = reference_and_ours(tmp_path, config)
    kw = inputs(config)
    mask = torch.ones(2, 7)
    mask[0, 4:] = 0
    with torch.no_grad():
        expected = ref(**dict(kw, timestep=250)).sample
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250]), torch.tensor([250, 250])):
            got = ours(**dict(kw, timestep=t), cross_attention_kwargs={"scale": 0.5})
            assert_close(got.sample, expected, name=f"timestep {t!r}")
        out = ours(**kw, return_dict=False)
        assert isinstance(out, tuple) and len(out) == 1
        # a text mask changes the result, as it does in diffusers
        expected_masked = ref(**kw, encoder_attention_mask=mask).sample
        got_masked = ours(**kw, encoder_attention_mask=mask).sample
    assert_close(got_masked, expected_masked, name="encoder_attention_mask")
    assert (expected_masked - out[0]).abs().max() > 1e-4 * expected_masked.abs().max()


def test_odd_latent_size(tmp_path):
    # 18 -> 9 -> 5 on the way down: the up path must return to 9, then 18 (upsample_size)
    config = CONFIGS["sd2"]
    ref, ours = reference_and_ours(tmp_path, config)
    kw = inputs(config, size=18)
    with torch.no_grad():
        expected = ref(**kw).sample
        got = ours(**kw).sample
    assert got.shape == (2, 4, 18, 18)
    assert_close(got, expected)


def test_half_precision(tmp_path):
    config = CONFIGS["sdxl"]
    ref, ours16 = reference_and_ours(tmp_path, dict(config, upcast_attention=True), dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in ours16.parameters())
    assert ours16.dtype == torch.float16
    ours_bf16 = UNet2DConditionModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    kw = inputs(config)
    with torch.no_grad():
        expected = ref(**kw).sample
        bf16_kw = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
        bf16_kw["added_cond_kwargs"] = {k: v.bfloat16() for k, v in kw["added_cond_kwargs"].items()}
        got = ours_bf16(**bf16_kw).sample
    assert got.dtype == torch.bfloat16
    assert_close(got, expected, rel=0.05, name="bf16 output")


def test_num_attention_heads_overrides_attention_head_dim():
    config = UNet2DConditionConfig(**dict(BASE, attention_head_dim=8, num_attention_heads=[1, 2, 4]))
    with torch.device("meta"):
        model = UNet2DConditionModel(config)
    assert model.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 2
    assert model.up_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 2
    assert model.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 4


def write_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_unsupported_config_value(tmp_path):
    seeded_(diffusers.UNet2DConditionModel(**CONFIGS["sd1"])).save_pretrained(tmp_path)
    write_config(tmp_path, dual_cross_attention=True)
    with pytest.raises(ValueError, match="dual_cross_attention=True"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    write_config(tmp_path, dual_cross_attention=False, mid_block_type="UNetMidBlock2DSimpleCrossAttn")
    with pytest.raises(ValueError, match="mid_block_type='UNetMidBlock2DSimpleCrossAttn'"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    write_config(tmp_path, mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=[[1, 1], [1, 1], [1, 1]])
    with pytest.raises(ValueError, match="reverse_transformer_layers_per_block"):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_weights_not_fitting_config(tmp_path):
    seeded_(diffusers.UNet2DConditionModel(**CONFIGS["sd1"])).save_pretrained(tmp_path)
    write_config(tmp_path, cross_attention_dim=CROSS * 2)
    with pytest.raises(ValueError, match=r"wrong shapes: .*attn2\.to_k\.weight"):
        UNet2DConditionModel.from_pretrained(tmp_path)
    write_config(tmp_path, cross_attention_dim=CROSS, use_linear_projection=True)
    with pytest.raises(ValueError, match=r"proj_in\.weight"):
        UNet2DConditionModel.from_pretrained(tmp_path)


def test_missing_added_cond_kwargs(tmp_path):
    config = CONFIGS["sdxl"]
    _, ours = reference_and_ours(tmp_path, config)
    kw = inputs(config)
    kw["added_cond_kwargs"] = {"text_embeds": kw["added_cond_kwargs"]["text_embeds"]}
    with pytest.raises(ValueError, match=r"added_cond_kwargs\['time_ids'\]"):
        ours(**kw)


def guided_inputs(config, latents):
    """Guidance's two halves as diffusers takes them: the latents repeated, each conditioning with 2 x rows."""
    full = inputs(config, batch=2 * latents)
    full["timestep"] = torch.tensor(500.0)
    if "timestep_cond" in full:  # the guidance embedding is one per latent (LCMs)
        full["timestep_cond"] = torch.cat([full["timestep_cond"][:latents]] * 2)
    full["sample"] = torch.cat([full["sample"][:latents]] * 2)
    return full


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("latents", [1, 2])
def test_latents_given_once_for_guidance_halves(tmp_path, name, latents):
    """The sample with B rows and the text with 2B: the same output as diffusers' on the repeated sample, and the
    layers before the text (conv_in, SD's first self-attention) run on B rows only."""
    config = CONFIGS[name]
    ref, ours = reference_and_ours(tmp_path, config)
    full = guided_inputs(config, latents)
    once = dict(full, sample=full["sample"][:latents])
    if "timestep_cond" in full:
        once["timestep_cond"] = full["timestep_cond"][:latents]
    rows = {}
    hooks = [module.register_forward_hook(lambda m, i, o, key=key: rows.setdefault(key, []).append(i[0].shape[0]))
             for key, module in ours.named_modules() if key in ("conv_in", "conv_out") or key.endswith(".attn1")
             or key.endswith(".attn2")]
    with torch.no_grad():
        expected = ref(**full).sample
        got = ours(**once).sample
        repeated = ours(**full).sample
    for hook in hooks:
        hook.remove()
    assert got.shape == expected.shape
    assert_close(got, expected, name=f"{name}, latents once")
    assert_close(got, repeated, rel=1e-5, name=f"{name}, latents once against repeated")
    # SD 1.x/2.x: conv_in, the first resnet and the first self-attention come before any text; SDXL's added
    # embedding (and the class embedding of "options") carries the text into every resnet: all rows from conv_in
    shared = latents if name in ("sd1", "sd2", "lcm", "segmind") else 2 * latents
    assert rows["conv_in"] == [shared, 2 * latents] and rows["conv_out"] == [2 * latents] * 2
    assert all(r == [2 * latents] * 2 for k, r in rows.items() if k.endswith(".attn2"))
    assert rows[next(k for k in rows if k.endswith(".attn1"))] == [shared, 2 * latents]


def test_latents_once_with_a_text_mask_and_bad_rows(tmp_path):
    config = CONFIGS["sd1"]
    ref, ours = reference_and_ours(tmp_path, config)
    full = guided_inputs(config, 1)
    text_mask = torch.ones(2, 7)
    text_mask[0, 5:] = 0
    with torch.no_grad():
        assert_close(ours(**dict(full, sample=full["sample"][:1]), encoder_attention_mask=text_mask).sample,
                     ref(**full, encoder_attention_mask=text_mask).sample, name="latents once, a text mask")
        with pytest.raises(ValueError, match=r"sample has 2 rows and encoder_hidden_states 3"):
            ours(**dict(full, encoder_hidden_states=torch.randn(3, 7, CROSS)))
