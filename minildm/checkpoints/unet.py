"""The UNet's checkpoints: diffusers' `UNet2DConditionModel` / `UNet2DModel` files and CompVis'
openaimodel `UNetModel` (`model.diffusion_model.*`) <-> minildm's `UNet` (minildm/unet.py).

Here: the config translation (`config_from_diffusers`, `config_to_diffusers`), the key maps from
our names to diffusers' and CompVis' (`diffusers_name`, `original_name`, `file_names`, with the 2022
attention names of the CelebA-HQ hub file), the fused qkv of openaimodel's AttentionBlock
(`split_fused_qkv`), the choice between the trained and the EMA copy of a full-EMA CompVis file
(`select_ema`), the hints for weights that do not fit, and the loader `load_unet`, which hands the
model to cpu_speed's `speed_up`.
"""

import re

import torch

from minildm.checkpoints.weights import (
    CheckpointError,
    legacy_attention_name,
    load_into,
    rename_keys,
    squeeze_attention_weights,
)
from minildm.cpu_speed import speed_up
from minildm.unet import UNet, UNetConfig

# --- Config translation -----------------------------------------------------------------------


def config_from_diffusers(config: dict) -> UNetConfig:
    """From a diffusers `UNet2DConditionModel` or `UNet2DModel` config.json."""
    name = config.get("_class_name")
    if name not in ("UNet2DConditionModel", "UNet2DModel"):
        raise ValueError(f"expected a UNet2DConditionModel or UNet2DModel config, got {name!r}")
    defaults = {
        "act_fn": "silu",
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "use_linear_projection": False,
        "upcast_attention": False,
        "only_cross_attention": False,
        "class_embed_type": None,
        "num_class_embeds": None,
        "addition_embed_type": None,
        "time_embedding_type": "positional",
        "resnet_time_scale_shift": "default",
        "transformer_layers_per_block": 1,
        "encoder_hid_dim": None,
    }
    for key, supported in defaults.items():
        if config.get(key, supported) != supported:
            hint = ""
            if key == "use_linear_projection":
                hint = " (use_linear_projection: this looks like an SD 2.x UNet)"
            raise ValueError(
                f"{name} with {key}={config[key]!r} is not supported by minildm "
                f"(expected {supported!r}){hint}"
            )
    if name == "UNet2DConditionModel":
        default_channels = (320, 640, 1280, 1280)
    else:
        default_channels = (224, 448, 672, 896)
    channels = tuple(config.get("block_out_channels", default_channels))
    down = config["down_block_types"]
    up = config["up_block_types"]
    attention_levels = tuple(i for i, block in enumerate(down) if "Attn" in block)
    mirrored = tuple(len(up) - 1 - i for i, block in enumerate(up) if "Attn" in block)
    one_per_level = len(down) == len(channels) and len(up) == len(channels)
    if not one_per_level or sorted(mirrored) != list(attention_levels):
        raise ValueError(
            f"down_block_types {down} and up_block_types {up} must mirror each other, "
            "one per block_out_channels entry"
        )
    head_setting = config.get("attention_head_dim", 8)
    if isinstance(head_setting, (list, tuple)):
        if len(set(head_setting)) != 1:
            raise ValueError(
                f"per-level attention_head_dim {head_setting} is not supported "
                "(SD 2.x-style configs)"
            )
        head_setting = head_setting[0]
    if name == "UNet2DConditionModel":
        # The naming trap: for UNet2DConditionModel `attention_head_dim` is the number of heads
        # (8 for SD v1: 40/80/160 channels per head), unless num_attention_heads is given
        # (docs/parity/models.md, attention_head_dim counts heads in UNet2DConditionModel).
        context_dim = config.get("cross_attention_dim", 1280)
        heads = config.get("num_attention_heads") or head_setting
        if heads is None:
            raise ValueError(
                "a UNet2DConditionModel needs attention_head_dim (its number of heads) or "
                "num_attention_heads; both are null"
            )
        head_channels = None
    else:  # UNet2DModel: `attention_head_dim` really is the channels per head (CelebA-HQ: 32)
        context_dim = None
        heads = None
        head_channels = head_setting or channels[-1]
    return UNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        channels=channels,
        layers_per_level=config.get("layers_per_block", 2),
        attention_levels=attention_levels,
        context_dim=context_dim,
        heads=heads,
        head_channels=head_channels,
        norm_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        sample_size=config.get("sample_size", 64),
    )


def config_to_diffusers(config: UNetConfig) -> dict:
    """The diffusers `config.json` of this UNet (what `config_from_diffusers` reads back)."""
    n, attends = len(config.channels), config.attention_levels
    if config.context_dim is None:
        down = ["AttnDownBlock2D" if i in attends else "DownBlock2D" for i in range(n)]
        up = ["AttnUpBlock2D" if n - 1 - i in attends else "UpBlock2D" for i in range(n)]
        extra = {"_class_name": "UNet2DModel", "attention_head_dim": config.head_channels}
    else:
        down = ["CrossAttnDownBlock2D" if i in attends else "DownBlock2D" for i in range(n)]
        up = ["CrossAttnUpBlock2D" if n - 1 - i in attends else "UpBlock2D" for i in range(n)]
        # attention_head_dim is the number of heads here (the naming trap in config_from_diffusers)
        extra = {
            "_class_name": "UNet2DConditionModel",
            "attention_head_dim": config.heads,
            "cross_attention_dim": config.context_dim,
        }
    return {
        **extra,
        "_diffusers_version": "0.42.1",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": list(config.channels),
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": config.layers_per_level,
        "norm_num_groups": config.norm_groups,
        "norm_eps": config.norm_eps,
        "sample_size": config.sample_size,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


# --- Official weights -------------------------------------------------------------------------
# Written from our names to theirs (see autoencoder.py): loading looks file keys up in a table built
# from the module's names, and tests invert the same functions to write original checkpoints.


def diffusers_name(name: str, config: UNetConfig) -> str:
    rules = [
        (r"^time_embedding\.linear(\d)\.", r"time_embedding.linear_\1."),
        (r"^down\.(\d+)\.resample\.conv\.", r"down_blocks.\1.downsamplers.0.conv."),
        (r"^up\.(\d+)\.resample\.conv\.", r"up_blocks.\1.upsamplers.0.conv."),
        (r"^down\.", "down_blocks."),
        (r"^up\.", "up_blocks."),
        (r"^mid\.resnet1\.", "mid_block.resnets.0."),
        (r"^mid\.resnet2\.", "mid_block.resnets.1."),
        (r"^mid\.attention\.", "mid_block.attentions.0."),
        (r"\.time_proj\.", ".time_emb_proj."),
        (r"\.shortcut\.", ".conv_shortcut."),
        (r"^norm_out\.", "conv_norm_out."),
        # inside a spatial transformer
        (r"\.block\.", ".transformer_blocks.0."),
        (r"\.(attn[12])\.(q|k|v)\.", r".\1.to_\2."),
        (r"\.(attn[12])\.out\.", r".\1.to_out.0."),
        (r"\.ff\.proj\.", ".ff.net.0.proj."),
        (r"\.ff\.out\.", ".ff.net.2."),
    ]
    if config.context_dim is None:  # inside a self-attention block (CelebA-HQ)
        rules += [
            (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
            (r"(attentions\.\d+)\.(q|k|v)\.", r"\1.to_\2."),
            (r"(attentions\.\d+)\.out\.", r"\1.to_out.0."),
        ]
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def original_name(name: str, config: UNetConfig) -> str:
    """Our name -> openaimodel's (without the `model.diffusion_model.` prefix), the layout of
    diffusers' loaders/single_file_utils.py convert_ldm_unet_checkpoint.

    The CompVis UNet numbers its blocks flat: input_blocks.0 is conv_in, then per level
    `layers_per_level` blocks [ResBlock, attention?] and a downsampler block; output_blocks has
    `layers_per_level + 1` blocks [ResBlock, attention?, upsampler?] per level. The self-attention
    blocks of the CelebA-HQ UNet fuse q, k and v in one `qkv` tensor; this names them `q`/`k`/`v`,
    the tensors `split_fused_qkv` cuts from it.
    """
    per_level = config.layers_per_level + 1  # blocks per level, down (with its downsampler) and up

    def down(m):
        level, rest = int(m.group(1)), m.group(2)
        if rest.startswith("resample.conv."):
            block = 1 + level * per_level + config.layers_per_level
            return f"input_blocks.{block}.0.op.{rest.removeprefix('resample.conv.')}"
        kind, j, tail = re.match(r"(resnets|attentions)\.(\d+)\.(.*)", rest).groups()
        block = 1 + level * per_level + int(j)
        return f"input_blocks.{block}.{0 if kind == 'resnets' else 1}.{tail}"

    def up(m):
        level, rest = int(m.group(1)), m.group(2)
        has_attention = (len(config.channels) - 1 - level) in config.attention_levels
        if rest.startswith("resample.conv."):
            block = level * per_level + per_level - 1
            index = 2 if has_attention else 1  # after the ResBlock and its attention, if any
            return f"output_blocks.{block}.{index}.conv.{rest.removeprefix('resample.conv.')}"
        kind, j, tail = re.match(r"(resnets|attentions)\.(\d+)\.(.*)", rest).groups()
        block = level * per_level + int(j)
        return f"output_blocks.{block}.{0 if kind == 'resnets' else 1}.{tail}"

    rules = [
        (r"^time_embedding\.linear1\.", "time_embed.0."),
        (r"^time_embedding\.linear2\.", "time_embed.2."),
        (r"^conv_in\.", "input_blocks.0.0."),
        (r"^down\.(\d+)\.(.*)$", down),
        (r"^up\.(\d+)\.(.*)$", up),
        (r"^mid\.resnet1\.", "middle_block.0."),
        (r"^mid\.attention\.", "middle_block.1."),
        (r"^mid\.resnet2\.", "middle_block.2."),
        (r"^norm_out\.", "out.0."),
        (r"^conv_out\.", "out.2."),
        # inside a ResBlock
        (r"\.norm1\.(weight|bias)$", r".in_layers.0.\1"),
        (r"\.conv1\.", ".in_layers.2."),
        (r"\.time_proj\.", ".emb_layers.1."),
        (r"\.norm2\.(weight|bias)$", r".out_layers.0.\1"),
        (r"\.conv2\.", ".out_layers.3."),
        (r"\.shortcut\.", ".skip_connection."),
    ]
    is_transformer = ".block." in name or ".proj_in." in name or (".proj_out." in name)
    for pattern, replacement in rules:
        if is_transformer and pattern.startswith(r"\.norm"):
            continue  # a transformer block's norm1/norm2 are LayerNorms that keep their names
        name = re.sub(pattern, replacement, name)
    if config.context_dim is not None:  # spatial transformer internals are named as in diffusers
        for pattern, replacement in [
            (r"\.block\.", ".transformer_blocks.0."),
            (r"\.(attn[12])\.(q|k|v)\.", r".\1.to_\2."),
            (r"\.(attn[12])\.out\.", r".\1.to_out.0."),
            (r"\.ff\.proj\.", ".ff.net.0.proj."),
            (r"\.ff\.out\.", ".ff.net.2."),
        ]:
            name = re.sub(pattern, replacement, name)
    else:  # AttentionBlock: norm, (q, k, v from qkv), proj_out
        name = re.sub(
            r"^((?:input|output)_blocks\.\d+\.1|middle_block\.1)\.out\.", r"\1.proj_out.", name
        )
    return name


def file_names(model: "UNet") -> dict:
    """{name in some official layout: our name} for every parameter."""
    table = {}
    for ours in model.state_dict():
        diffusers = diffusers_name(ours, model.config)
        original = original_name(ours, model.config)
        spellings = {diffusers, "model.diffusion_model." + original}
        if model.config.context_dim is None and ".attentions." in diffusers:
            spellings.add(legacy_attention_name(diffusers))  # the CelebA-HQ hub file's 2022 names
        for theirs in spellings:
            assert table.setdefault(theirs, ours) == ours, f"{theirs} would name two parameters"
    return table


def split_fused_qkv(state_dict: dict, head_channels: int) -> dict:
    """openaimodel's AttentionBlock keeps q, k, v in one Conv1d `qkv` [3C, C, 1] laid out head by
    head (QKVAttentionLegacy): for each head, its q rows, then its k rows, then its v rows. Split it
    into three [C, C] matrices (and biases), and squeeze the Conv1d `proj_out` [C, C, 1]
    (docs/parity/models.md, The fused qkv of openaimodel's AttentionBlock is laid out head by
    head)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith((".qkv.weight", ".qkv.bias")):
            _check_fused_qkv(state_dict, key, head_channels)
            C3 = value.shape[0]
            heads = C3 // 3 // head_channels
            per_head = value.reshape(
                heads, 3 * head_channels, *value.shape[1:]
            )  # (heads, 3 Dh, C[, 1])
            for part, tensor in zip("qkv", per_head.split(head_channels, dim=1), strict=True):
                tensor = tensor.reshape(C3 // 3, *value.shape[1:])
                if tensor.ndim == 3 and tensor.shape[2] == 1:  # a Conv1d weight [C, C, 1]
                    tensor = tensor[..., 0]
                out[key.replace(".qkv.", f".{part}.")] = tensor
        elif key.endswith(".proj_out.weight") and value.ndim == 3 and value.shape[2] == 1:
            out[key] = value[..., 0]
        else:
            out[key] = value
    return out


def _check_fused_qkv(state_dict: dict, key: str, head_channels: int):
    """A fused qkv that cannot be cut head by head, or has another rank, is refused with its shape:
    a reshape would fail with torch's bare 'shape is invalid for input of size', and a (3 C, 1)
    bias would be cut into (C, 1) pieces, whose error no longer shows the file's shape."""
    weight = state_dict.get(key.rsplit(".", 1)[0] + ".weight")
    channels = weight.shape[1] if weight is not None and weight.ndim > 1 else None
    value = state_dict[key]
    rows = value.shape[0] if value.ndim else 0
    # a bias is one row each (3 C,); a weight is Conv1d's (3 C, C, 1) or a linear's (3 C, C)
    is_weight = key.endswith("weight")
    ranks_fit = (
        value.ndim in (2, 3) and value.shape[2:] in ((), (1,)) if is_weight else value.ndim == 1
    )
    fits = rows % (3 * head_channels) == 0 and (channels is None or rows == 3 * channels)
    if fits and ranks_fit:
        return
    expected = "(3 C, C, 1) or (3 C,)" if channels is None else None
    if expected is None:
        expected = str((3 * channels, channels, 1) if key.endswith("weight") else (3 * channels,))
    raise CheckpointError(
        f"{key} is {tuple(state_dict[key].shape)} in the checkpoint, expected {expected}: "
        f"openaimodel's fused q, k, v, {head_channels} rows per head for each of q, k and v; "
        "the weights belong to another configuration"
    )


def select_ema(state_dict: dict, ema: bool | None) -> dict:
    """Full-EMA CompVis checkpoints hold the UNet twice: `model.diffusion_model.X` (trained) and
    `model_ema.` + "diffusion_modelX" with the dots removed (CompVis/latent-diffusion
    ldm/modules/ema.py LitEma flattens the names; diffusers' convert_ldm_unet_checkpoint reads
    them). The caller must choose; EMA-only files (sd-v1-4.ckpt) keep just two `model_ema`
    counters."""
    counters = ("model_ema.decay", "model_ema.num_updates")
    ema_keys = [k for k in state_dict if k.startswith("model_ema.") and k not in counters]
    if len(ema_keys) <= 100:  # diffusers' own threshold for "this file has an EMA copy"
        if ema:
            raise CheckpointError(
                "ema=True, but the checkpoint holds no EMA copy of the UNet (an EMA-only file "
                "such as sd-v1-4.ckpt already stores its EMA weights as model.diffusion_model.*): "
                "pass ema=False"
            )
        # only the two counters are dropped (by load_unet): any other model_ema.* key is reported
        return state_dict
    if ema is None:
        raise CheckpointError(
            f"the checkpoint holds both the trained and the EMA UNet ({len(ema_keys)} model_ema.* "
            "tensors): pass ema=True for the EMA weights (usually better for sampling) or "
            "ema=False for the trained ones"
        )
    chosen = {k: v for k, v in state_dict.items() if not k.startswith("model_ema.")}
    if ema:
        for key in [k for k in chosen if k.startswith("model.diffusion_model.")]:
            flat = "model_ema." + "".join(key.split(".")[1:])
            if flat not in state_dict:
                raise CheckpointError(f"ema=True, but the EMA copy lacks {flat} (for {key})")
            chosen[key] = state_dict[flat]
    return chosen


def _mismatch_hint(missing, unexpected, mismatched):
    if any(k.startswith(("first_stage_model.", "cond_stage_model.")) for k in unexpected):
        return "a whole LDM / Stable Diffusion checkpoint: split it into components first"
    if any("attn2" in k and shapes[0][-1:] == (1024,) for k, shapes in mismatched.items()):
        return (
            "cross-attention from a 1024-wide context: an SD 2.x UNet, "
            "which minildm does not implement"
        )
    if any("attn2" in k for k in mismatched):
        return (
            "a context width other than the config's cross_attention_dim "
            "(SD v1: 768, LDM text-to-image: 1280)"
        )
    if mismatched:
        return "a UNet of another size: check block_out_channels and the block types in config.json"
    return None


def load_unet(
    config: UNetConfig,
    state_dict: dict,
    device=None,
    dtype=None,
    ema: bool | None = None,
) -> UNet:
    """A UNet from a diffusers state dict (modern or 2022 attention names) or an original CompVis
    one (`model.diffusion_model.*`; `ema` chooses between the two copies a full-EMA file holds)."""
    with torch.device("meta"):
        model = UNet(config)
    state_dict = select_ema(state_dict, ema)
    if config.context_dim is None:
        state_dict = split_fused_qkv(state_dict, config.head_channels)
    drop = [r"model_ema\.(decay|num_updates)"]
    weights, names_in_file = rename_keys(state_dict, file_names(model), drop=drop)
    # the CelebA-HQ hub file may hold its attention projections as 1x1 convs
    weights = squeeze_attention_weights(weights)
    model = load_into(
        model,
        weights,
        file_names=names_in_file,
        device=device,
        dtype=dtype,
        what="UNet",
        hint=_mismatch_hint,
    )
    return speed_up(model)  # oneDNN kernels for CPU inference (cpu_speed.py)
