"""CLIP text encoder vs transformers' CLIPTextModel / CLIPTextModelWithProjection on tiny random configs."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from minidiff.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from tests.utils import assert_close, seeded_

VOCAB = 1000
LENGTH = 12


def reference(with_projection=False, hidden_act="quick_gelu", eos_token_id=VOCAB - 1, seed=0, **kw):
    cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, projection_dim=24,
                                      num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=16,
                                      hidden_act=hidden_act, eos_token_id=eos_token_id, bos_token_id=VOCAB - 2,
                                      pad_token_id=1, **kw)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    model = cls(cfg).eval()
    return seeded_(model, seed=seed, std=0.1)


def prompts(eos, pad):
    """(ids, attention_mask): bos, random tokens, eos at a different place per row, padding after it.

    Token ids stay below eos and below 998 (bos), except one row that holds a token above `eos`
    before its eos, so that the legacy argmax rule and the first-eos rule pick different rows."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (3, LENGTH), generator=g)
    ids[:, 0] = VOCAB - 2
    mask = torch.zeros(3, LENGTH, dtype=torch.long)
    for row, end in enumerate((5, 8, LENGTH - 1)):
        ids[row, end] = eos
        ids[row, end + 1:] = pad
        mask[row, :end + 1] = 1
    ids[1, 3] = 600 if eos < 600 else ids[1, 3]
    return ids, mask


def save_hub(model, folder):
    model.save_pretrained(folder)
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    return folder


@pytest.mark.parametrize("with_projection", [False, True])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("legacy_eos", [False, True])
def test_matches_transformers(tmp_path, with_projection, hidden_act, legacy_eos):
    # legacy: config eos_token_id 2 (SD 1.x, SDXL) pools at argmax(ids); else at the first id == eos
    eos_in_text = VOCAB - 1 if legacy_eos else 550
    ref = reference(with_projection, hidden_act, eos_token_id=2 if legacy_eos else eos_in_text)
    ours = (CLIPTextModelWithProjection if with_projection else CLIPTextModel).from_pretrained(
        save_hub(ref, tmp_path / "text_encoder"))
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    ids, mask = prompts(eos_in_text, pad=eos_in_text if legacy_eos else 0)
    for attention_mask in (None, mask):
        with torch.no_grad():
            r = ref(ids, attention_mask=attention_mask, output_hidden_states=True)
            o = ours(ids, attention_mask=attention_mask, output_hidden_states=True)
        assert_close(o.last_hidden_state, r.last_hidden_state, name="last_hidden_state")
        assert len(o.hidden_states) == 3 + 1
        for i, (a, b) in enumerate(zip(o.hidden_states, r.hidden_states)):
            assert_close(a, b, name=f"hidden_states[{i}]")
        if with_projection:
            assert_close(o.text_embeds, r.text_embeds, name="text_embeds")
            assert_close(o[0], r[0], name="out[0] (text_embeds)")
        else:
            assert_close(o.pooler_output, r.pooler_output, name="pooler_output")
            assert_close(o[1], r[1], name="out[1] (pooler_output)")
        assert_close(o[0], r[0], name="out[0]")
        # diffusers' clip_skip path: a penultimate hidden state through the final layer norm
        with torch.no_grad():
            skip_o = ours.text_model.final_layer_norm(o.hidden_states[-2])
            skip_r = ref.text_model.final_layer_norm(r.hidden_states[-2])
        assert_close(skip_o, skip_r, name="clip-skip hidden state")
    # padding mask really changes the padded rows
    with torch.no_grad():
        plain = ours(ids).last_hidden_state
        masked = ours(ids, attention_mask=mask).last_hidden_state
    assert (plain - masked).abs().max() > 1e-3


def test_pooling_rules_differ():
    """The two pooling rules pick different rows on the test ids: a swapped rule would fail above."""
    from minidiff.models.clip import pooled_row
    ids, _ = prompts(550, pad=0)
    assert pooled_row(ids, 550).tolist() == [5, 8, LENGTH - 1]
    assert pooled_row(ids, 2).tolist() != [5, 8, LENGTH - 1]


def test_return_tuple_and_no_hidden_states(tmp_path):
    ref = reference(with_projection=True)
    ours = CLIPTextModelWithProjection.from_pretrained(save_hub(ref, tmp_path / "te"))
    ids, _ = prompts(VOCAB - 1, pad=VOCAB - 1)
    with torch.no_grad():
        r = ref(ids, return_dict=False)
        o = ours(ids, return_dict=False)
        out = ours(ids)
    assert isinstance(o, tuple) and len(o) == len(r) == 2
    assert out.hidden_states is None and out["last_hidden_state"] is out.last_hidden_state
    assert_close(o[0], r[0], name="text_embeds")
    assert_close(o[1], r[1], name="last_hidden_state")


def test_flattened_keys_and_position_ids(tmp_path):
    """transformers 5 writes keys without `text_model.`; older files carry a position_ids buffer."""
    ref = reference(with_projection=True, hidden_act="gelu")
    hub = save_hub(ref, tmp_path / "hub")
    sd = load_file(hub / "model.safetensors")
    assert any(k.startswith("text_model.") for k in sd) and "text_projection.weight" in sd
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "config.json").write_text((hub / "config.json").read_text())
    flat_sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    flat_sd["embeddings.position_ids"] = torch.arange(16)[None]
    save_file(flat_sd, flat / "model.safetensors")
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((hub / "config.json").read_text())
    save_file({**sd, "text_model.embeddings.position_ids": torch.arange(16)[None]}, old / "model.safetensors")

    ids, mask = prompts(VOCAB - 1, pad=VOCAB - 1)
    with torch.no_grad():
        r = ref(ids, attention_mask=mask)
        for folder in (flat, old):
            o = CLIPTextModelWithProjection.from_pretrained(folder)(ids, attention_mask=mask)
            assert_close(o.text_embeds, r.text_embeds, name=f"{folder.name} text_embeds")
            assert_close(o.last_hidden_state, r.last_hidden_state, name=f"{folder.name} last_hidden_state")


def test_fp16_load_and_save_roundtrip(tmp_path):
    ref = reference()
    hub = save_hub(ref, tmp_path / "hub")
    ids, mask = prompts(VOCAB - 1, pad=VOCAB - 1)
    half = CLIPTextModel.from_pretrained(hub, torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    with torch.no_grad():
        r = ref(ids, attention_mask=mask)
        o = half(ids, attention_mask=mask)
    assert o.last_hidden_state.dtype == torch.float16
    assert_close(o.last_hidden_state, r.last_hidden_state, rel=2e-2, name="fp16 last_hidden_state")

    # our save_pretrained writes a folder transformers reads back to the same model
    ours = CLIPTextModel.from_pretrained(hub)
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.CLIPTextModel.from_pretrained(tmp_path / "ours").eval()
    again = CLIPTextModel.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        assert_close(back(ids).pooler_output, r_pool := ref(ids).pooler_output, name="transformers reload")
        assert_close(again(ids).pooler_output, r_pool, name="minidiff reload")


def test_errors(tmp_path):
    ref = reference()
    hub = save_hub(ref, tmp_path / "hub")
    cfg = json.loads((hub / "config.json").read_text())

    bad = tmp_path / "bad_act"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((hub / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match=r"config.json: hidden_act='relu' is not supported"):
        CLIPTextModel.from_pretrained(bad)

    (bad / "config.json").write_text(json.dumps({**cfg, "is_decoder": True}))
    with pytest.raises(ValueError, match=r"is_decoder=True is not supported .*supported: False"):
        CLIPTextModel.from_pretrained(bad)

    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match=r"wrong shapes: .*text_model\.embeddings\.position_embedding\.weight: "
                                         r"file \(16, 32\) vs model \(16, 48\)"):
        CLIPTextModel.from_pretrained(bad)

    # a CLIPTextModel file lacks the projection a CLIPTextModelWithProjection needs
    with pytest.raises(ValueError, match=r"1 missing keys: text_projection\.weight"):
        CLIPTextModelWithProjection.from_pretrained(hub)

    ours = CLIPTextModel.from_pretrained(hub)
    with pytest.raises(ValueError, match=r"has 17 tokens, more than its max_position_embeddings=16"):
        ours(torch.zeros(1, 17, dtype=torch.long))
