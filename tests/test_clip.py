"""CLIP text encoder: parity with transformers' CLIPTextModel at the official sizes, in every layout."""

import json

import pytest
import torch
from conftest import max_relative_error, oracle, randomize_
from safetensors.torch import save_file

import minildm
from minildm.checkpoints.clip import load_clip_text_model, text_config_from_diffusers
from minildm.clip import (
    CLIP_VIT_B_32,
    CLIP_VIT_L_14,
    CLIPTextModel,
)

# the text_config fields of openai/clip-vit-large-patch14 and clip-vit-base-patch32 (the hub's
# text_encoder/config.json of CompVis/stable-diffusion-v1-4 and microsoft/vq-diffusion-ithq)
OFFICIAL = {
    "ViT-L/14": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
    ),
    "ViT-B/32": dict(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        projection_dim=512,
    ),
}
PRESETS = {"ViT-L/14": CLIP_VIT_L_14, "ViT-B/32": CLIP_VIT_B_32}
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "a watercolor of Kyoto in spring, " * 6,
]
TOLERANCE = 1e-5  # fp32, max abs error relative to the output's max abs value


@pytest.fixture(scope="module", params=list(OFFICIAL))
def reference(request, tmp_path_factory):
    """A transformers CLIPTextModel at an official size with every parameter random, its output, and a
    folder it saved itself (transformers 5: model.safetensors without the `text_model.` prefix)."""
    transformers = oracle("transformers")
    config = transformers.CLIPTextConfig(
        max_position_embeddings=77,
        vocab_size=49408,
        hidden_act="quick_gelu",
        **OFFICIAL[request.param],
    )
    model = randomize_(transformers.CLIPTextModel(config).eval())
    folder = tmp_path_factory.mktemp("clip") / "text_encoder"
    model.save_pretrained(folder)
    input_ids = minildm.CLIPTokenizer()(PROMPTS)
    with torch.no_grad():
        expected = model(input_ids).last_hidden_state
    return dict(
        name=request.param, model=model, folder=folder, input_ids=input_ids, expected=expected
    )


def hub_layout(model) -> dict:
    """The key layout of the hub files (written by transformers 4): `text_model.` prefix and the
    `position_ids` buffer."""
    state = {"text_model." + k: v.contiguous() for k, v in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


def check(ours, reference, label):
    with torch.no_grad():
        got = ours(reference["input_ids"])
    error = max_relative_error(got, reference["expected"])
    print(
        f"CLIP {reference['name']} {label}: max relative error {error:.2e} (tolerance {TOLERANCE:.0e})"
    )
    assert got.shape == reference["expected"].shape
    assert error < TOLERANCE


def test_saved_by_transformers(reference):
    ours = minildm.load_component(reference["folder"])
    assert isinstance(ours, CLIPTextModel) and ours.config == PRESETS[reference["name"]]
    check(ours, reference, "transformers-5 folder")


def test_hub_layout_safetensors_and_bin(reference, tmp_path):
    (tmp_path / "config.json").write_text((reference["folder"] / "config.json").read_text())
    state = hub_layout(reference["model"])
    torch.save(state, tmp_path / "pytorch_model.bin")
    check(minildm.load_component(tmp_path), reference, "hub layout, pytorch_model.bin")
    save_file(state, tmp_path / "model.safetensors")  # preferred over the .bin beside it
    check(minildm.load_component(tmp_path), reference, "hub layout, model.safetensors")
    save_file({k: v.half() for k, v in state.items()}, tmp_path / "model.fp16.safetensors")
    ours = minildm.load_component(tmp_path, variant="fp16")
    # fp16 file, upcast to the default dtype
    assert ours.token_embedding.weight.dtype == torch.float32
    with torch.no_grad():
        error = max_relative_error(ours(reference["input_ids"]), reference["expected"])
    print(
        f"CLIP {reference['name']} fp16 variant file read in fp32: max relative error {error:.2e} (tolerance 1e-2)"
    )
    assert 0 < error < 1e-2  # it did read the rounded fp16 file, not the fp32 one


def test_original_stable_diffusion_layout(reference, tmp_path):
    """sd-v1-4.ckpt stores the text encoder under `cond_stage_model.transformer.`; diffusers' own
    converter (an independent oracle) and our key map must read it to the same model."""
    transformers = oracle("transformers")
    convert = oracle("diffusers.loaders.single_file_utils").convert_ldm_clip_checkpoint
    original = {
        "cond_stage_model.transformer." + k: v for k, v in hub_layout(reference["model"]).items()
    }
    (tmp_path / "config.json").write_text((reference["folder"] / "config.json").read_text())
    save_file(convert(original), tmp_path / "model.safetensors")
    via_diffusers = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (
            max_relative_error(
                via_diffusers(reference["input_ids"]).last_hidden_state, reference["expected"]
            )
            < TOLERANCE
        )
    config = text_config_from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    check(
        load_clip_text_model(config, original),
        reference,
        "original SD layout (cond_stage_model.transformer.)",
    )


def test_bfloat16_within_tolerance_of_float32(reference):
    ours = minildm.load_component(reference["folder"], dtype=torch.bfloat16)
    with torch.no_grad():
        got = ours(reference["input_ids"])
    error = max_relative_error(got.float(), reference["expected"])
    print(f"CLIP {reference['name']} bf16: max relative error {error:.2e} (tolerance 3e-2)")
    assert got.dtype == torch.bfloat16 and error < 3e-2


def test_float16_small_shapes():
    """fp16 matmuls on the CPU are slow, so a small model: the same code path as at full size."""
    transformers = oracle("transformers")
    config = transformers.CLIPTextConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        hidden_act="quick_gelu",
    )
    reference = randomize_(transformers.CLIPTextModel(config).eval())
    state = reference.state_dict()
    ours32 = load_clip_text_model(text_config_from_diffusers(config.to_dict()), state)
    ours16 = load_clip_text_model(
        text_config_from_diffusers(config.to_dict()), state, dtype=torch.float16
    )
    input_ids = minildm.CLIPTokenizer()(PROMPTS)
    with torch.no_grad():
        expected = reference(input_ids).last_hidden_state
        error32 = max_relative_error(ours32(input_ids), expected)
        error16 = max_relative_error(ours16(input_ids).float(), expected)
    print(
        f"CLIP small: fp32 max relative error {error32:.2e} (tolerance 1e-5), fp16 {error16:.2e} (tolerance 5e-3)"
    )
    assert error32 < TOLERANCE and error16 < 5e-3


def test_checkpoint_of_another_size_is_refused(reference, tmp_path):
    other = "ViT-B/32" if reference["name"] == "ViT-L/14" else "ViT-L/14"
    with torch.device("meta"):
        model = CLIPTextModel(PRESETS[other])
    with pytest.raises(
        minildm.CheckpointError,
        match=r"(?s)shapes differ \(196\): final_norm.bias \(text_model.final_layer_norm.bias "
        r"in the file\) is \(\d+,\) in the checkpoint.*encoder is \d+ wide",
    ):
        load_clip_text_model(PRESETS[other], hub_layout(reference["model"]))
    # a 1024-wide encoder is named as the SD 2.x one
    sd2 = {
        k: torch.zeros(*v.shape[:-1], 1024) if k.endswith("token_embedding.weight") else v
        for k, v in model.state_dict().items()
    }
    with pytest.raises(minildm.CheckpointError, match="SD 2.x"):
        load_clip_text_model(PRESETS[other], sd2)


def test_missing_and_extra_keys_are_named():
    with torch.device("meta"):
        state = dict(CLIPTextModel(CLIP_VIT_B_32).state_dict())
    state.pop("final_norm.weight")
    state["text_projection.weight"] = torch.zeros(512, 512, device="meta")
    with pytest.raises(
        minildm.CheckpointError,
        match=(
            r"(?s)missing from the checkpoint \(1: final_norm.weight\)"
            r".*not used .*text_projection.weight.*WithProjection"
        ),
    ):
        load_clip_text_model(CLIP_VIT_B_32, state)


def test_bad_input_ids_are_refused():
    with torch.device("meta"):
        model = CLIPTextModel(CLIP_VIT_B_32)
    with pytest.raises(TypeError, match="LongTensor"):
        model(torch.zeros(1, 77))
    with pytest.raises(ValueError, match="78 tokens"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 49408\)"):
        model(torch.full((1, 77), 50000))
