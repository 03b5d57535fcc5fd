"""CLIP's checkpoints: transformers' `CLIPTextModel` / `CLIPVisionModel` files (hub files with a
`text_model.` / `vision_model.` prefix, transformers 5 files without) and the text tower inside
original Stable Diffusion checkpoints (`cond_stage_model.transformer.*`, the OpenAI CLIP weights as
transformers names them) <-> minildm's `CLIPTextModel` and `CLIPVisionModel` (minildm/clip.py).

Two configs, so two names where the other files have one: `text_config_from_diffusers` /
`text_config_to_diffusers` for the text tower, `vision_config_from_diffusers` for the image tower
(which checkpoints/safety_checker.py reads for the checker's tower). Then the key maps (`KEY_RULES`,
`VISION_KEY_RULES` and their inverse `transformers_name`), the hints for weights that do not fit,
and the loaders `load_clip_text_model` and `load_clip_vision_model`.
"""

import re

import torch

from minildm.checkpoints.weights import load_into, remap_keys
from minildm.clip import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel
from minildm.cpu_speed import speed_up

# --- Config translation -----------------------------------------------------------------------


def text_config_from_diffusers(config: dict) -> CLIPTextConfig:
    """From a transformers `config.json` (CLIPTextModel, or CLIPModel with a `text_config`)."""
    config = config.get("text_config", config)
    activation = _hidden_act(config)
    # absent keys take transformers' CLIPTextConfig defaults, as transformers would
    return CLIPTextConfig(
        vocab_size=config.get("vocab_size", 49408),
        max_length=config.get("max_position_embeddings", 77),
        width=config.get("hidden_size", 512),
        layers=config.get("num_hidden_layers", 12),
        heads=config.get("num_attention_heads", 8),
        mlp_width=config.get("intermediate_size", 2048),
        norm_eps=config.get("layer_norm_eps", 1e-5),
        activation=activation,
    )


def text_config_to_diffusers(config: CLIPTextConfig) -> dict:
    """The transformers `config.json` of this model (what `text_config_from_diffusers` reads
    back)."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_length,
        "hidden_size": config.width,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "intermediate_size": config.mlp_width,
        "layer_norm_eps": config.norm_eps,
        "hidden_act": config.activation,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
        "projection_dim": config.width,
        "torch_dtype": "float32",
    }


def vision_config_from_diffusers(config: dict) -> CLIPVisionConfig:
    """From a transformers `config.json` (CLIPVisionModel, or CLIPModel / the safety checker
    with a `vision_config`)."""
    config = config.get("vision_config", config)
    # absent keys take transformers' CLIPVisionConfig defaults (a ViT-B/32), as it would
    return CLIPVisionConfig(
        image_size=config.get("image_size", 224),
        patch_size=config.get("patch_size", 32),
        channels=config.get("num_channels", 3),
        width=config.get("hidden_size", 768),
        layers=config.get("num_hidden_layers", 12),
        heads=config.get("num_attention_heads", 12),
        mlp_width=config.get("intermediate_size", 3072),
        norm_eps=config.get("layer_norm_eps", 1e-5),
        activation=_hidden_act(config),
    )


def _hidden_act(config: dict) -> str:
    activation = config.get("hidden_act", "quick_gelu")
    if activation not in ("quick_gelu", "gelu"):
        raise ValueError(
            f"CLIP hidden_act {activation!r} is not supported; expected 'quick_gelu' or 'gelu'"
        )
    return activation


# --- Official weights -------------------------------------------------------------------------
# transformers' names (hub files carry a `text_model.` prefix, transformers 5 saves without it;
# original SD checkpoints prefix `cond_stage_model.transformer.`) -> ours.
# The transformer layers are named alike in both towers.
ENCODER_LAYER_RULES = [
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.", r"layers.\1.attn.\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"layers.\1.attn.out."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"layers.\1.attn_norm."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"layers.\1.mlp_norm."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"layers.\1.mlp."),
]
KEY_RULES = [
    (r"^cond_stage_model\.transformer\.", ""),
    (r"^text_model\.", ""),
    (r"^embeddings\.(token|position)_embedding\.", r"\1_embedding."),
    *ENCODER_LAYER_RULES,
    (r"^final_layer_norm\.", "final_norm."),
]
# `position_ids` is an arange buffer that old transformers saved; we compute it in forward.
DROPPED_KEYS = [r"(cond_stage_model\.transformer\.)?(text_model\.)?embeddings\.position_ids"]


def transformers_name(name: str) -> str:
    """Our name -> the hub file's (`text_model.` prefix): the inverse of KEY_RULES, for saving."""
    rules = [
        (r"^(token|position)_embedding\.", r"embeddings.\1_embedding."),
        (r"^layers\.(\d+)\.attn\.(q|k|v)\.", r"encoder.layers.\1.self_attn.\2_proj."),
        (r"^layers\.(\d+)\.attn\.out\.", r"encoder.layers.\1.self_attn.out_proj."),
        (r"^layers\.(\d+)\.attn_norm\.", r"encoder.layers.\1.layer_norm1."),
        (r"^layers\.(\d+)\.mlp_norm\.", r"encoder.layers.\1.layer_norm2."),
        (r"^layers\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
        (r"^final_norm\.", "final_layer_norm."),
    ]
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return "text_model." + name


def _mismatch_hint(missing, unexpected, mismatched):
    got_shape, want_shape = mismatched.get("token_embedding.weight", ((), ()))
    if len(got_shape) == 2:  # (vocabulary, width); other shapes are named by load_into alone
        got_width, want_width = got_shape[1], want_shape[1]
        if got_width == 1024:
            return (
                "a 1024-wide text encoder: this looks like an SD 2.x (OpenCLIP ViT-H/14) "
                "checkpoint, which minildm does not implement"
            )
        return (
            f"the checkpoint's encoder is {got_width} wide, the config's {want_width}: "
            "config.json belongs to another model (ViT-L/14 is 768, ViT-B/32 512)"
        )
    if any("text_projection" in k for k in unexpected):
        return (
            "a CLIPTextModelWithProjection checkpoint; minildm uses the last hidden state, "
            "not the projection"
        )
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in unexpected):
        return "a whole Stable Diffusion checkpoint: split it into components first"
    return None


def load_clip_text_model(
    config: CLIPTextConfig,
    state_dict: dict,
    device=None,
    dtype=None,
) -> CLIPTextModel:
    with torch.device("meta"):
        model = CLIPTextModel(config)
    weights, file_names = remap_keys(state_dict, KEY_RULES, DROPPED_KEYS)
    model = load_into(
        model,
        weights,
        file_names=file_names,
        device=device,
        dtype=dtype,
        what="CLIP text encoder",
        hint=_mismatch_hint,
    )
    return speed_up(model)  # oneDNN kernels for CPU inference (cpu_speed.py)


# The image tower: hub files carry a `vision_model.` prefix, transformers 5 saves without it.
VISION_KEY_RULES = [
    (r"^vision_model\.", ""),
    (r"^embeddings\.(patch|position)_embedding\.", r"\1_embedding."),
    (r"^embeddings\.class_embedding$", "class_embedding"),
    (r"^pre_layrnorm\.", "pre_norm."),  # sic: transformers spells this one "layrnorm"
    (r"^post_layernorm\.", "post_norm."),
    *ENCODER_LAYER_RULES,
]
VISION_DROPPED_KEYS = [r"(vision_model\.)?embeddings\.position_ids"]


def _vision_mismatch_hint(missing, unexpected, mismatched):
    if any("text_model" in k or "token_embedding" in k for k in unexpected):
        return "a whole CLIPModel (both towers): load its text and image towers separately"
    got, want = mismatched.get("patch_embedding.weight", ((), ()))
    if len(got) == 4 and len(want) == 4:  # (width, channels, patch, patch) each
        return (
            f"the checkpoint's tower is {got[0]} wide with {got[2]}-pixel patches, "
            f"the config's {want[0]} with {want[2]}: config.json belongs to another model"
        )
    return None


def load_clip_vision_model(
    config: CLIPVisionConfig,
    state_dict: dict,
    device=None,
    dtype=None,
) -> CLIPVisionModel:
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    weights, file_names = remap_keys(state_dict, VISION_KEY_RULES, VISION_DROPPED_KEYS)
    model = load_into(
        model,
        weights,
        file_names=file_names,
        device=device,
        dtype=dtype,
        what="CLIP vision tower",
        hint=_vision_mismatch_hint,
    )
    return speed_up(model)  # oneDNN kernels for CPU inference (cpu_speed.py)
