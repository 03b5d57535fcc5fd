"""LDMBert's checkpoints: diffusers' `LDMBertModel` files (the hub's `bert/` folder of
CompVis/ldm-text2im-large-256) and the x-transformers `TransformerWrapper` inside the original
CompVis checkpoint (`cond_stage_model.transformer.*`) <-> minildm's `LDMBert` (minildm/ldm_bert.py).

Here: the config translation (`config_from_diffusers`, `config_to_diffusers`), the key maps
(`KEY_RULES` for both layouts, `diffusers_name` for writing a folder), the hints for weights that
do not fit, and the loader `load_ldm_bert`.
"""

import re

import torch

from minildm.checkpoints.weights import load_into, remap_keys
from minildm.cpu_speed import speed_up
from minildm.ldm_bert import LDMBert, LDMBertConfig

# --- Config translation -----------------------------------------------------------------------


def config_from_diffusers(config: dict) -> LDMBertConfig:
    """From the hub `bert/config.json` (LDMBertConfig field names)."""
    activation = config.get("activation_function", "gelu")
    if activation != "gelu":
        raise ValueError(
            f"LDMBert activation_function {activation!r} is not supported; "
            "the official model uses 'gelu'"
        )
    return LDMBertConfig(
        vocab_size=config.get("vocab_size", 30522),
        max_length=config.get("max_position_embeddings", 77),
        width=config.get("d_model", 1280),
        layers=config.get("encoder_layers", 32),
        heads=config.get("encoder_attention_heads", 8),
        head_width=config.get("head_dim", 64),
        mlp_width=config.get("encoder_ffn_dim", 5120),
    )


def config_to_diffusers(config: LDMBertConfig) -> dict:
    """The transformers-style `bert/config.json` of diffusers' LDMBertModel (what
    `config_from_diffusers` reads back)."""
    return {
        "architectures": ["LDMBertModel"],
        "model_type": "ldmbert",
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_length,
        "d_model": config.width,
        "encoder_layers": config.layers,
        "encoder_attention_heads": config.heads,
        "head_dim": config.head_width,
        "encoder_ffn_dim": config.mlp_width,
        "activation_function": "gelu",
        "scale_embedding": False,
        "pad_token_id": 0,
    }


# --- Official weights -------------------------------------------------------------------------
# Two layouts map onto ours; their key patterns do not overlap, so one rule list serves both.
# In the original, layer list entry 2i is [norm, attention, residual] and 2i+1 [norm, feed-forward,
# residual] of our layer i (CompVis/latent-diffusion ldm/modules/x_transformer.py; the names of the
# old diffusers convert_from_ckpt.py convert_ldm_bert_checkpoint); `net.1` is a dropout, the
# residual has no weights.
def _original_layer(match) -> str:
    entry = int(match.group(1))
    part = match.group(2)
    layer = entry // 2
    is_attention = entry % 2 == 0
    if part.startswith("0."):  # the pre-norm
        return f"layers.{layer}.{'attn_norm' if is_attention else 'mlp_norm'}.{part[2:]}"
    renames = {
        "1.to_q.": "attn.q.",
        "1.to_k.": "attn.k.",
        "1.to_v.": "attn.v.",
        "1.to_out.": "attn.out.",
        "1.net.0.0.": "mlp.fc1.",
        "1.net.2.": "mlp.fc2.",
    }
    for old, new in renames.items():
        if part.startswith(old):
            return f"layers.{layer}.{new}{part[len(old) :]}"
    return match.group(0)  # unknown: left as is, so the strict loader reports it


KEY_RULES = [
    # diffusers / hub `bert/` layout (LDMBertModel, base_model_prefix "model")
    (r"^model\.embed_tokens\.", "token_embedding."),
    (r"^model\.embed_positions\.", "position_embedding."),
    (r"^model\.layers\.(\d+)\.self_attn_layer_norm\.", r"layers.\1.attn_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.", r"layers.\1.attn.\2."),
    (r"^model\.layers\.(\d+)\.self_attn\.out_proj\.", r"layers.\1.attn.out."),
    (r"^model\.layers\.(\d+)\.final_layer_norm\.", r"layers.\1.mlp_norm."),
    (r"^model\.layers\.(\d+)\.(fc1|fc2)\.", r"layers.\1.mlp.\2."),
    (r"^model\.layer_norm\.", "final_norm."),
    # original CompVis checkpoint (x-transformers TransformerWrapper, under
    # cond_stage_model.transformer.)
    (r"^cond_stage_model\.transformer\.", ""),
    (r"^token_emb\.", "token_embedding."),
    (r"^pos_emb\.emb\.", "position_embedding."),
    (r"^attn_layers\.layers\.(\d+)\.(.*)$", _original_layer),
    (r"^norm\.", "final_norm."),
]
# The language-model head is trained but unused for conditioning (the original's BERTEmbedder asks
# its TransformerWrapper for `return_embeddings=True`: CompVis/latent-diffusion
# ldm/modules/encoders/modules.py).
DROPPED_KEYS = [r"(cond_stage_model\.transformer\.)?to_logits\.(weight|bias)"]


# ours -> diffusers' LDMBertModel, for writing a folder (the inverse of the first rules above)
DIFFUSERS_NAMES = [
    (r"^token_embedding\.", "model.embed_tokens."),
    (r"^position_embedding\.", "model.embed_positions."),
    (r"^layers\.(\d+)\.attn_norm\.", r"model.layers.\1.self_attn_layer_norm."),
    (r"^layers\.(\d+)\.attn\.(q|k|v)\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^layers\.(\d+)\.attn\.out\.", r"model.layers.\1.self_attn.out_proj."),
    (r"^layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.final_layer_norm."),
    (r"^layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"model.layers.\1.\2."),
    (r"^final_norm\.", "model.layer_norm."),
]


def diffusers_name(name: str) -> str:
    """Our parameter name -> its name in diffusers' LDMBertModel (which also has a language-model
    head, `to_logits`, that conditioning never uses: a folder written from ours leaves it out)."""
    for pattern, replacement in DIFFUSERS_NAMES:
        name, count = re.subn(pattern, replacement, name)
        if count:
            return name
    raise KeyError(f"no diffusers name for LDMBert parameter {name!r}")


def _mismatch_hint(missing, unexpected, mismatched):
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in unexpected):
        return "a whole LDM checkpoint: split it into components first"
    if mismatched:
        return (
            "an LDMBert of another size: check that config.json (d_model, encoder_layers, ...) "
            "matches the weights"
        )
    return None


def load_ldm_bert(config: LDMBertConfig, state_dict: dict, device=None, dtype=None) -> LDMBert:
    with torch.device("meta"):
        model = LDMBert(config)
    weights, file_names = remap_keys(state_dict, KEY_RULES, DROPPED_KEYS)
    model = load_into(
        model,
        weights,
        file_names=file_names,
        device=device,
        dtype=dtype,
        what="LDMBert text encoder",
        hint=_mismatch_hint,
    )
    return speed_up(model)  # oneDNN kernels for CPU inference (cpu_speed.py)
