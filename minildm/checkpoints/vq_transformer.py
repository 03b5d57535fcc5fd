"""VQ-Diffusion's checkpoints: diffusers' `Transformer2DModel` (discrete inputs) and
`LearnedClassifierFreeSamplingEmbeddings` files, and microsoft/VQ-Diffusion's `ithq_learnable.pth`
<-> minildm's `VQTransformer` and `LearnedClassifierFreeEmbeddings` (minildm/vq_transformer.py).

Two configs, so two names: `config_from_diffusers` / `config_to_diffusers` for the transformer's,
`embeddings_config_from_diffusers` for the learned classifier-free embeddings'. Then the key maps
(`KEY_RULES` for both layouts, `diffusers_name` for writing a folder), the loaders
`load_vq_transformer` and `load_learned_embeddings`, and `split_original_checkpoint`, which cuts
the original file into the two (choosing its EMA copy by default).
"""

import re

import torch

from minildm.checkpoints.weights import load_into, remap_keys
from minildm.cpu_speed import speed_up
from minildm.vq_transformer import (
    LearnedClassifierFreeEmbeddings,
    VQTransformer,
    VQTransformerConfig,
)

# --- Config translation -----------------------------------------------------------------------


def config_from_diffusers(config: dict) -> VQTransformerConfig:
    """From a diffusers `Transformer2DModel` config with discrete inputs (num_vector_embeds
    set)."""
    if config.get("num_vector_embeds") is None:
        raise ValueError(
            "this Transformer2DModel has continuous inputs; "
            "minildm implements only VQ-Diffusion's discrete one"
        )
    # diffusers turns "layer_norm" into "ada_norm" here
    if config.get("norm_type", "ada_norm") not in ("ada_norm", "layer_norm"):
        raise ValueError(
            f"Transformer2DModel with norm_type={config['norm_type']!r} "
            "is not VQ-Diffusion's transformer"
        )
    expected = {
        "activation_fn": "geglu-approximate",
        "attention_bias": True,
        "only_cross_attention": False,
        "upcast_attention": False,
        "double_self_attention": False,
        "norm_elementwise_affine": True,
    }
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ValueError(
                f"Transformer2DModel with {key}={config[key]!r} is not VQ-Diffusion's "
                f"transformer (expected {value!r})"
            )
    size = config.get("sample_size", 32)
    if config.get("num_embeds_ada_norm") is None:
        raise ValueError(
            "num_embeds_ada_norm, the number of diffusion steps the AdaLayerNorms embed, is "
            "missing or null; VQ-Diffusion's transformer needs it"
        )
    return VQTransformerConfig(
        num_classes=config["num_vector_embeds"],
        height=size,
        width=size,
        layers=config.get("num_layers", 1),
        heads=config.get("num_attention_heads", 16),
        head_dim=config.get("attention_head_dim", 88),
        context_dim=config.get("cross_attention_dim"),
        num_timesteps=config.get("num_embeds_ada_norm"),
    )


def config_to_diffusers(config: VQTransformerConfig) -> dict:
    """The diffusers `Transformer2DModel` config.json of this model (what
    `config_from_diffusers` reads back)."""
    return {
        "_class_name": "Transformer2DModel",
        "_diffusers_version": "0.42.1",
        "num_vector_embeds": config.num_classes,
        "sample_size": config.height,
        "num_layers": config.layers,
        "num_attention_heads": config.heads,
        "attention_head_dim": config.head_dim,
        "cross_attention_dim": config.context_dim,
        "num_embeds_ada_norm": config.num_timesteps,
        "activation_fn": "geglu-approximate",
        "attention_bias": True,
        "norm_type": "ada_norm",
        "norm_elementwise_affine": True,
        "norm_eps": 1e-5,
        "only_cross_attention": False,
        "double_self_attention": False,
        "upcast_attention": False,
        "use_linear_projection": False,
        "dropout": 0.0,
    }


def embeddings_config_from_diffusers(config: dict) -> dict:
    """The `learned_classifier_free_sampling_embeddings/config.json` of a diffusers folder -> the
    keyword arguments of `LearnedClassifierFreeEmbeddings`."""
    if not config.get("learnable", False):
        raise ValueError(
            "these classifier-free embeddings are not learnable (no weights): "
            "the pipeline uses the empty prompt instead"
        )
    return {"length": config["length"], "hidden_size": config["hidden_size"]}


# --- Official weights -------------------------------------------------------------------------
KEY_RULES = [
    # the original checkpoint (ithq_learnable.pth, after split_original_checkpoint) -> ours
    (r"^transformer\.transformer\.", ""),
    (r"^content_emb\.emb\.", "token_embedding."),
    (r"^content_emb\.height_emb\.", "row_embedding."),
    (r"^content_emb\.width_emb\.", "column_embedding."),
    (r"\.ln1_1\.", ".norm2."),
    (r"\.ln1\.", ".norm1."),
    (r"\.ln2\.", ".norm3."),
    (r"\.(attn[12])\.query\.", r".\1.q."),
    (r"\.(attn[12])\.key\.", r".\1.k."),
    (r"\.(attn[12])\.value\.", r".\1.v."),
    (r"\.(attn[12])\.proj\.", r".\1.out."),
    (r"\.mlp\.0\.", ".ff.fc1."),
    (r"\.mlp\.2\.", ".ff.fc2."),
    (r"^to_logits\.0\.", "norm_out."),
    (r"^to_logits\.1\.", "out."),
    # diffusers' Transformer2DModel -> ours
    (r"^latent_image_embedding\.emb\.", "token_embedding."),
    (r"^latent_image_embedding\.height_emb\.", "row_embedding."),
    (r"^latent_image_embedding\.width_emb\.", "column_embedding."),
    (r"^transformer_blocks\.", "blocks."),
    (r"\.(attn[12])\.to_(q|k|v)\.", r".\1.\2."),
    (r"\.(attn[12])\.to_out\.0\.", r".\1.out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.fc1."),
    (r"\.ff\.net\.2\.", ".ff.fc2."),
]


# ours -> diffusers' Transformer2DModel, for writing a folder (the inverse of the last rules above)
DIFFUSERS_NAMES = [
    (r"^token_embedding\.", "latent_image_embedding.emb."),
    (r"^row_embedding\.", "latent_image_embedding.height_emb."),
    (r"^column_embedding\.", "latent_image_embedding.width_emb."),
    (r"^blocks\.", "transformer_blocks."),
    (r"\.(attn[12])\.(q|k|v)\.", r".\1.to_\2."),
    (r"\.(attn[12])\.out\.", r".\1.to_out.0."),
    (r"\.ff\.fc1\.", ".ff.net.0.proj."),
    (r"\.ff\.fc2\.", ".ff.net.2."),
]


def diffusers_name(name: str) -> str:
    """Our parameter name -> its name in diffusers' Transformer2DModel (every rule that matches
    applies)."""
    for pattern, replacement in DIFFUSERS_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


def load_vq_transformer(
    config: VQTransformerConfig,
    state_dict: dict,
    device=None,
    dtype=None,
) -> VQTransformer:
    """From a diffusers `transformer/` state dict, or the transformer part of an original checkpoint
    (see `split_original_checkpoint`)."""
    with torch.device("meta"):
        model = VQTransformer(config)
    weights, file_names = remap_keys(state_dict, KEY_RULES)
    model = load_into(
        model,
        weights,
        file_names=file_names,
        device=device,
        dtype=dtype,
        what="VQ-Diffusion transformer",
    )
    return speed_up(model)  # oneDNN kernels for CPU inference (cpu_speed.py)


def load_learned_embeddings(
    config: dict,
    state_dict: dict,
    device=None,
    dtype=None,
) -> LearnedClassifierFreeEmbeddings:
    with torch.device("meta"):
        model = LearnedClassifierFreeEmbeddings(**config)
    rules = [(r"^(transformer\.)?empty_text_embed$", "embeddings")]
    weights, file_names = remap_keys(state_dict, rules)
    return load_into(
        model,
        weights,
        file_names=file_names,
        device=device,
        dtype=dtype,
        what="learned classifier-free embeddings",
    )


def split_original_checkpoint(checkpoint: dict, ema: bool = True) -> tuple:
    """microsoft/VQ-Diffusion's ithq_learnable.pth ({"model": ..., "ema": ...}) -> (transformer
    state dict, learned-embedding state dict).

    The original samples with the EMA weights (microsoft/VQ-Diffusion inference_VQ_Diffusion.py,
    `get_model(ema=True)`), so ema=True is the default; the EMA dict covers only the transformer,
    under `transformer.` instead of `transformer.transformer.`. Other entries of "model" belong
    elsewhere: the OpenAI CLIP copy (`transformer.condition_emb.*`; the diffusers port uses
    transformers' CLIP), the VQ-VAE (loaded from ithq_vqvae.pth) and the schedule buffers (the
    scheduler recomputes them).
    """
    if "model" not in checkpoint:
        raise ValueError(
            "expected microsoft/VQ-Diffusion's checkpoint layout {'model': ..., 'ema': ...}, "
            f"got keys {sorted(checkpoint)[:5]}"
        )
    model = checkpoint["model"]
    transformer = {k: v for k, v in model.items() if k.startswith("transformer.transformer.")}
    embeddings = {k: v for k, v in model.items() if k == "transformer.empty_text_embed"}
    if ema:
        if "ema" not in checkpoint:
            raise ValueError("ema=True, but the checkpoint has no 'ema' entry: pass ema=False")
        ema_weights = checkpoint["ema"]
        transformer = {
            "transformer." + k: v for k, v in ema_weights.items() if k.startswith("transformer.")
        }
        ema_embeddings = {
            "transformer." + k: v for k, v in ema_weights.items() if k == "empty_text_embed"
        }
        if ema_embeddings:  # else keep those of "model"
            embeddings = ema_embeddings
    return transformer, embeddings
