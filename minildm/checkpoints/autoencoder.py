"""The autoencoders' checkpoints: diffusers' `AutoencoderKL` / `VQModel` files (modern and 2022
attention names), the `first_stage_model.*` of CompVis checkpoints (taming-transformers names) and
microsoft/VQ-Diffusion's `ithq_vqvae.pth` <-> minildm's `AutoencoderKL` and `VQModel`
(minildm/autoencoder.py).

Here: the config translation (`config_from_diffusers`, `config_to_diffusers`), the key maps from
our names to diffusers' and CompVis' (`diffusers_name`, `original_name`, `file_names`), the
training-only tensors dropped (`DROPPED_KEYS`), the hints for weights that do not fit, and the
loader `load_autoencoder`.
"""

import re

import torch
from torch import nn

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, VQModel
from minildm.checkpoints.weights import (
    legacy_attention_name,
    load_into,
    rename_keys,
    squeeze_attention_weights,
)
from minildm.cpu_speed import speed_up

# --- Config translation -----------------------------------------------------------------------


def config_from_diffusers(config: dict) -> AutoencoderConfig:
    """From a diffusers `AutoencoderKL` or `VQModel` config.json."""
    name = config.get("_class_name")
    if name not in ("AutoencoderKL", "VQModel"):
        raise ValueError(f"expected an AutoencoderKL or VQModel config, got {name!r}")
    unsupported = {
        "act_fn": "silu",
        "norm_type": "group",
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
        "lookup_from_codebook": False,
        "shift_factor": None,
        "latents_mean": None,
    }
    for key, supported in unsupported.items():
        if config.get(key, supported) != supported:
            raise ValueError(
                f"{name} with {key}={config[key]!r} is not one of the four official "
                f"autoencoders minildm implements (expected {supported!r})"
            )
    channels = tuple(config.get("block_out_channels", (64,)))
    down = config.get("down_block_types", ["DownEncoderBlock2D"] * len(channels))
    up = config.get("up_block_types", ["UpDecoderBlock2D"] * len(channels))
    attention_levels = tuple(i for i, block in enumerate(down) if block.startswith("Attn"))
    mirrored = tuple(len(up) - 1 - i for i, block in enumerate(up) if block.startswith("Attn"))
    one_per_level = len(down) == len(channels) and len(up) == len(channels)
    if not one_per_level or sorted(mirrored) != list(attention_levels):
        raise ValueError(
            f"down_block_types {down} and up_block_types {up} must mirror each other, "
            "one per block_out_channels entry"
        )
    is_vq = name == "VQModel"
    latent_channels = config.get("latent_channels", 3 if is_vq else 4)
    scaling_factor = config.get("scaling_factor")
    if (
        not scaling_factor
    ):  # absent (or null): 1.0 for a VQ model, see minildm/autoencoder.py's docstring
        scaling_factor = 1.0 if is_vq else 0.18215
    return AutoencoderConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        channels=channels,
        layers_per_level=config.get("layers_per_block", 1),
        attention_levels=attention_levels,
        latent_channels=latent_channels,
        codebook_size=config.get("num_vq_embeddings", 256) if is_vq else 0,
        code_dim=(config.get("vq_embed_dim") or latent_channels) if is_vq else 0,
        norm_groups=config.get("norm_num_groups", 32),
        scaling_factor=scaling_factor,
    )


def config_to_diffusers(config: AutoencoderConfig, sample_size: int = 512) -> dict:
    """The diffusers `config.json` of this model (what `config_from_diffusers` reads back);
    sample_size, the image size it was trained at, is only informative (diffusers' tiled
    decoding reads it)."""
    n = len(config.channels)
    diffusers_config = {
        "_class_name": "VQModel" if config.is_vq else "AutoencoderKL",
        "_diffusers_version": "0.42.1",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": list(config.channels),
        "down_block_types": [
            "AttnDownEncoderBlock2D" if i in config.attention_levels else "DownEncoderBlock2D"
            for i in range(n)
        ],
        "up_block_types": [
            "AttnUpDecoderBlock2D" if n - 1 - i in config.attention_levels else "UpDecoderBlock2D"
            for i in range(n)
        ],
        "layers_per_block": config.layers_per_level,
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_groups,
        "act_fn": "silu",
        "sample_size": sample_size,
        "scaling_factor": config.scaling_factor,
    }
    if config.is_vq:
        diffusers_config.update(
            num_vq_embeddings=config.codebook_size, vq_embed_dim=config.code_dim
        )
    return diffusers_config


# --- Official weights -------------------------------------------------------------------------
# The map is written from our names to theirs, so that it can be read in both directions: loading
# looks every file key up in a table built from the module's own names; tests invert it to write
# original-layout checkpoints.
DIFFUSERS_NAMES = [
    (r"^encoder\.levels\.", "encoder.down_blocks."),
    (r"^decoder\.levels\.", "decoder.up_blocks."),
    (r"\.resample\.conv\.", ".{resample}.0.conv."),  # downsamplers / upsamplers
    (r"\.mid\.resnet1\.", ".mid_block.resnets.0."),
    (r"\.mid\.resnet2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attention\.", ".mid_block.attentions.0."),
    (r"\.shortcut\.", ".conv_shortcut."),
    (r"\.norm_out\.", ".conv_norm_out."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
    (r"(attentions\.\d+)\.(q|k|v)\.", r"\1.to_\2."),
    (r"(attentions\.\d+)\.out\.", r"\1.to_out.0."),
    (r"^codebook\.", "quantize.embedding."),
]


def diffusers_name(name: str) -> str:
    for pattern, replacement in DIFFUSERS_NAMES:
        name = re.sub(pattern, replacement, name)
    resample = "downsamplers" if name.startswith("encoder.") else "upsamplers"
    return name.replace("{resample}", resample)


def original_name(name: str, num_levels: int) -> str:
    """Our name -> the CompVis (taming-transformers) name, also used by microsoft/VQ-Diffusion."""

    def decoder_level(m):  # the original numbers the decoder's levels from the full resolution
        return f"decoder.up.{num_levels - 1 - int(m.group(1))}."

    def resample(m):
        return ".downsample.conv." if name.startswith("encoder.") else ".upsample.conv."

    rules = [
        (r"^encoder\.levels\.(\d+)\.", r"encoder.down.\1."),
        (r"^decoder\.levels\.(\d+)\.", decoder_level),  # stored by resolution
        (r"\.resample\.conv\.", resample),
        (r"\.resnets\.", ".block."),
        (r"\.attentions\.", ".attn."),
        (r"\.mid\.resnet1\.", ".mid.block_1."),
        (r"\.mid\.resnet2\.", ".mid.block_2."),
        (r"\.mid\.attention\.", ".mid.attn_1."),
        (r"\.shortcut\.", ".nin_shortcut."),
        (r"(attn\.\d+|attn_1)\.out\.", r"\1.proj_out."),
        (r"^codebook\.", "quantize.embedding."),
    ]
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def file_names(model: nn.Module) -> dict:
    """{name in some official layout: our name} for every parameter, in every layout we read."""
    num_levels = len(model.config.channels)
    table = {}
    for ours in model.state_dict():
        diffusers = diffusers_name(ours)
        original = original_name(ours, num_levels)
        legacy = legacy_attention_name(diffusers)  # the 2022 names inside the official hub files
        spellings = {diffusers, legacy, original}
        spellings |= {"first_stage_model." + original, "vae." + original}  # in whole checkpoints
        if ours == "codebook.weight":
            # VQ-Diffusion's EMA quantizer keeps a bare tensor
            # (diffusers' scripts/convert_vq_diffusion_to_diffusers.py)
            spellings.add("quantize.embedding")
        for theirs in spellings:
            assert table.setdefault(theirs, ours) == ours, f"{theirs} would name two parameters"
    return table


# Training-only tensors in original checkpoints: the GAN/LPIPS loss, EMA bookkeeping, and the EMA
# quantizer's running statistics (VQ-Diffusion's EMAVectorQuantizer).
DROPPED_KEYS = [
    r"(first_stage_model\.)?loss\..*",
    r"model_ema\..*",
    r"(first_stage_model\.)?quantize\.(cluster_size|embedding_avg|embed_avg)",
]


def _mismatch_hint(missing, unexpected, mismatched):
    if any(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in unexpected):
        return "a whole LDM / Stable Diffusion checkpoint: split it into components first"
    if "codebook.weight" in missing:
        return (
            "a KL autoencoder's weights loaded as a VQModel: "
            "its config.json should name AutoencoderKL"
        )
    if any("quantize.embedding" in k for k in unexpected):
        return (
            "a VQ autoencoder's weights loaded as an AutoencoderKL: "
            "its config.json should name VQModel"
        )
    if mismatched:
        return (
            "an autoencoder of another size: check block_out_channels, latent_channels and the "
            "codebook in config.json"
        )
    return None


def load_autoencoder(config: AutoencoderConfig, state_dict: dict, device=None, dtype=None):
    """AutoencoderKL or VQModel (by `config.is_vq`) from a state dict in the diffusers (modern or
    2022 names), CompVis `first_stage_model.*`, or VQ-Diffusion `ithq_vqvae.pth` layout."""
    with torch.device("meta"):
        model = VQModel(config) if config.is_vq else AutoencoderKL(config)
    weights, names_in_file = rename_keys(state_dict, file_names(model), DROPPED_KEYS)
    what = "VQ autoencoder" if config.is_vq else "KL autoencoder"
    weights = squeeze_attention_weights(weights)
    model = load_into(
        model,
        weights,
        file_names=names_in_file,
        device=device,
        dtype=dtype,
        what=what,
        hint=_mismatch_hint,
    )
    return speed_up(model)  # oneDNN kernels for CPU inference (cpu_speed.py)
