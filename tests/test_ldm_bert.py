"""LDMBert: parity with diffusers' LDMBertModel at the official size, from the hub and original layouts."""

import pytest
import torch
from conftest import max_relative_error, oracle, randomize_

import minildm
from minildm.checkpoints.ldm_bert import config_from_diffusers, load_ldm_bert
from minildm.ldm_bert import LDMBert, LDMBertConfig

PROMPTS = ["A painting of a squirrel eating a burger", "", "a watercolor of Kyoto in spring, " * 6]
TOLERANCE = 1e-5  # fp32, max abs error relative to the output's max abs value


def reference_class():
    module = oracle("diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion")
    return module.LDMBertConfig, module.LDMBertModel


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """diffusers' LDMBertModel at the hub config (the hub's bert/config.json of
    CompVis/ldm-text2im-large-256), every parameter random, saved by the reference library
    itself."""
    Config, Model = reference_class()
    model = randomize_(Model(Config()).eval())  # the defaults are the official config
    folder = tmp_path_factory.mktemp("ldm") / "bert"
    model.save_pretrained(folder)
    input_ids = minildm.BertTokenizer()(PROMPTS)
    with torch.no_grad():
        expected = model(input_ids).last_hidden_state
    return dict(model=model, folder=folder, input_ids=input_ids, expected=expected)


def check(ours, reference, label, tolerance=TOLERANCE):
    with torch.no_grad():
        got = ours(reference["input_ids"])
    error = max_relative_error(got.float(), reference["expected"])
    print(f"LDMBert {label}: max relative error {error:.2e} (tolerance {tolerance:.0e})")
    assert got.shape == (3, 77, 1280) and error < tolerance
    return got


def test_saved_by_diffusers(reference):
    ours = minildm.load_component(reference["folder"])
    assert isinstance(ours, LDMBert) and ours.config == LDMBertConfig()
    check(ours, reference, "hub layout (model.safetensors, to_logits dropped)")


# The original x-transformers names for each hub name, from the old diffusers convert_from_ckpt.py
# convert_ldm_bert_checkpoint (written out here independently of minildm's key map, which must
# invert it).
def original_layout(hub: dict) -> dict:
    original = {}
    for key, value in hub.items():
        parts = key.split(".")
        if key.startswith("model.layers."):
            i, rest = int(parts[2]), ".".join(parts[3:])
            table = {
                "self_attn_layer_norm.weight": f"{2 * i}.0.weight",
                "self_attn_layer_norm.bias": f"{2 * i}.0.bias",
                "self_attn.q_proj.weight": f"{2 * i}.1.to_q.weight",
                "self_attn.k_proj.weight": f"{2 * i}.1.to_k.weight",
                "self_attn.v_proj.weight": f"{2 * i}.1.to_v.weight",
                "self_attn.out_proj.weight": f"{2 * i}.1.to_out.weight",
                "self_attn.out_proj.bias": f"{2 * i}.1.to_out.bias",
                "final_layer_norm.weight": f"{2 * i + 1}.0.weight",
                "final_layer_norm.bias": f"{2 * i + 1}.0.bias",
                "fc1.weight": f"{2 * i + 1}.1.net.0.0.weight",
                "fc1.bias": f"{2 * i + 1}.1.net.0.0.bias",
                "fc2.weight": f"{2 * i + 1}.1.net.2.weight",
                "fc2.bias": f"{2 * i + 1}.1.net.2.bias",
            }
            name = "attn_layers.layers." + table[rest]
        else:
            name = {
                "model.embed_tokens.weight": "token_emb.weight",
                "model.embed_positions.weight": "pos_emb.emb.weight",
                "model.layer_norm.weight": "norm.weight",
                "model.layer_norm.bias": "norm.bias",
                "to_logits.weight": "to_logits.weight",
                "to_logits.bias": "to_logits.bias",
            }[key]
        original["cond_stage_model.transformer." + name] = value
    return original


def test_original_compvis_layout(reference):
    original = original_layout(reference["model"].state_dict())
    assert len(original) == 32 * 13 + 6 == 422  # the hub's bert/pytorch_model.bin holds 422 tensors
    check(
        load_ldm_bert(LDMBertConfig(), original),
        reference,
        "original layout (cond_stage_model.transformer.attn_layers)",
    )


def test_bfloat16_within_tolerance_of_float32(reference):
    ours = minildm.load_component(reference["folder"], dtype=torch.bfloat16)
    got = check(ours, reference, "bf16", tolerance=5e-2)
    assert got.dtype == torch.bfloat16


def test_float16_small_shapes():
    Config, Model = reference_class()
    config = Config(
        d_model=64, encoder_layers=4, encoder_ffn_dim=256, encoder_attention_heads=2, head_dim=16
    )
    reference = randomize_(Model(config).eval())
    ours_config = config_from_diffusers(config.to_dict())
    ours32 = load_ldm_bert(ours_config, reference.state_dict())
    ours16 = load_ldm_bert(ours_config, reference.state_dict(), dtype=torch.float16)
    input_ids = minildm.BertTokenizer()(PROMPTS)
    with torch.no_grad():
        expected = reference(input_ids).last_hidden_state
        error32 = max_relative_error(ours32(input_ids), expected)
        error16 = max_relative_error(ours16(input_ids).float(), expected)
    print(
        f"LDMBert small: fp32 max relative error {error32:.2e} (tolerance 1e-5), fp16 {error16:.2e} (tolerance 5e-3)"
    )
    assert error32 < TOLERANCE and error16 < 5e-3


def test_checkpoint_of_another_size_is_refused(reference):
    small = LDMBertConfig(layers=4)
    with pytest.raises(
        minildm.CheckpointError,
        match=r"(?s)not used by the LDMBert text encoder \(364: model.layers.10",
    ):
        load_ldm_bert(small, reference["model"].state_dict())
    with pytest.raises(minildm.CheckpointError, match="(?s)shapes differ.*another size"):
        load_ldm_bert(LDMBertConfig(width=1024, heads=8), reference["model"].state_dict())
