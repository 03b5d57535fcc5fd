"""The denoising UNet: (noisy latent, timestep, text context) -> predicted noise.

Ronneberger et al. 2015 (the U shape), Ho et al. 2020 "Denoising Diffusion Probabilistic Models"
(ResBlocks with a timestep embedding, self-attention), Rombach et al. 2022 (arXiv:2112.10752)
section 3.3: conditioning by cross-attention from every latent pixel to the tokens of the prompt,
inside "spatial transformer" blocks. Matches CompVis/latent-diffusion
`ldm/modules/diffusionmodules/openaimodel.py` (UNetModel) with `ldm/modules/attention.py`
(SpatialTransformer), and diffusers' `UNet2DConditionModel` (SD v1, LDM text-to-image) and
`UNet2DModel` (the unconditional CelebA-HQ LDM, whose blocks attend only to themselves).

The path: conv_in; down levels (ResBlocks, each followed by attention at attention levels, then a
stride-2 conv) whose every output is kept as a skip; a middle block at the lowest resolution; up
levels that concatenate one skip before each ResBlock, then upsample; GroupNorm, SiLU, conv_out.

Shapes: B batch, C channels, h x w latent, L context tokens, D context width, T timestep-embedding
width (4 x the first level's channels).
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minildm.checkpoints.weights import (
    CheckpointError,
    legacy_attention_name,
    load_into,
    rename_keys,
    squeeze_attention_weights,
)
from minildm.layers import FP32GroupNorm


@dataclass(frozen=True)
class UNetConfig:
    """Defaults: the Stable Diffusion v1 UNet (the hub's unet/config.json of
    CompVis/stable-diffusion-v1-4; CompVis/stable-diffusion
    configs/stable-diffusion/v1-inference.yaml)."""

    in_channels: int = 4
    out_channels: int = 4
    channels: tuple = (320, 640, 1280, 1280)  # per level, full resolution first
    layers_per_level: int = 2  # ResBlocks per down level; up levels have one more
    # down levels with attention after every ResBlock; up levels mirror them
    attention_levels: tuple = (0, 1, 2)
    # width of the text context; None: an unconditional UNet with self-attention blocks
    context_dim: int | None = 768
    heads: int | None = 8  # cross-attention UNets: a fixed number of heads at every level...
    head_channels: int | None = None  # ...self-attention UNets: a fixed number of channels per head
    norm_groups: int = 32
    norm_eps: float = 1e-5
    # the latent size it was trained at (the pipelines' default image size / 8 or / 4)
    sample_size: int = 64

    @property
    def time_channels(self) -> int:
        return 4 * self.channels[0]

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def heads_at(self, channels: int) -> int:
        return self.heads if self.heads is not None else channels // self.head_channels

    @classmethod
    def from_diffusers(cls, config: dict) -> "UNetConfig":
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
            head_channels = None
        else:  # UNet2DModel: `attention_head_dim` really is the channels per head (CelebA-HQ: 32)
            context_dim = None
            heads = None
            head_channels = head_setting or channels[-1]
        return cls(
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

    def to_diffusers(self) -> dict:
        """The diffusers `config.json` of this UNet (what `from_diffusers` reads back)."""
        n, attends = len(self.channels), self.attention_levels
        if self.context_dim is None:
            down = ["AttnDownBlock2D" if i in attends else "DownBlock2D" for i in range(n)]
            up = ["AttnUpBlock2D" if n - 1 - i in attends else "UpBlock2D" for i in range(n)]
            extra = {"_class_name": "UNet2DModel", "attention_head_dim": self.head_channels}
        else:
            down = ["CrossAttnDownBlock2D" if i in attends else "DownBlock2D" for i in range(n)]
            up = ["CrossAttnUpBlock2D" if n - 1 - i in attends else "UpBlock2D" for i in range(n)]
            # attention_head_dim is the number of heads here (the naming trap in from_diffusers)
            extra = {
                "_class_name": "UNet2DConditionModel",
                "attention_head_dim": self.heads,
                "cross_attention_dim": self.context_dim,
            }
        return {
            **extra,
            "_diffusers_version": "0.42.1",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.channels),
            "down_block_types": down,
            "up_block_types": up,
            "layers_per_block": self.layers_per_level,
            "norm_num_groups": self.norm_groups,
            "norm_eps": self.norm_eps,
            "sample_size": self.sample_size,
            "act_fn": "silu",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
        }


# CompVis/stable-diffusion-v1-4 and every SD 1.x fine-tune: 859,520,964 parameters
SD_V1 = UNetConfig()

# CompVis/ldm-text2im-large-256 (LDMBert context): 872,300,484
LDM_TEXT2IM = UNetConfig(context_dim=1280, sample_size=32)

# CompVis/ldm-celebahq-256, unconditional on VQ-f4 latents: 274,056,163
CELEBAHQ = UNetConfig(
    in_channels=3,
    out_channels=3,
    channels=(224, 448, 672, 896),
    attention_levels=(1, 2, 3),
    context_dim=None,
    heads=None,
    head_channels=32,
)


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), cosines first (diffusers'
    `flip_sin_to_cos`; CompVis/latent-diffusion ldm/modules/diffusionmodules/util.py
    timestep_embedding concatenates [cos, sin]).

    Frequencies fall geometrically from 1 to 1/max_period, as in the Transformer's positional
    encoding. Computed in float32 whatever the model's dtype: t up to 999 times a frequency needs
    more digits than half precision has.
    """
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(-math.log(max_period) * steps / half)  # (dim/2,)
    angles = timesteps.float()[:, None] * frequencies[None, :]  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepMLP(nn.Module):
    """Sinusoidal features -> Linear, SiLU, Linear -> the (B, T) embedding every ResBlock
    receives."""

    def __init__(self, channels: int, time_channels: int):
        super().__init__()
        self.linear1 = nn.Linear(channels, time_channels)
        self.linear2 = nn.Linear(time_channels, time_channels)

    def forward(self, features):
        return self.linear2(F.silu(self.linear1(features)))


class ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x))) + time))), with a 1x1 conv on the skip path when C
    changes: the autoencoder's ResBlock plus a projection of the timestep embedding, added to every
    pixel between the two convolutions (Ho et al. 2020, appendix B)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        eps: float,
        time_channels: int,
    ):
        super().__init__()
        self.norm1 = FP32GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_channels, out_channels)
        self.norm2 = FP32GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x, time_embedding):  # (B, C_in, h, w), (B, T) -> (B, C_out, h, w)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(time_embedding))[:, :, None, None]  # one shift per channel
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.shortcut(x) if self.shortcut is not None else x) + h


class SelfAttentionBlock(nn.Module):
    """The unconditional UNet's attention (openaimodel AttentionBlock): GroupNorm, multi-head
    self-attention over all pixels, a residual. Heads of a fixed width (32 channels for CelebA-HQ).
    The computation of the autoencoder's Attention, with several heads and eps 1e-5."""

    def __init__(self, channels: int, heads: int, groups: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm = FP32GroupNorm(groups, channels, eps=eps)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x):  # (B, C, h, w)
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, hw, C): a token per pixel

        def split_heads(t):  # (B, hw, C) -> (B, heads, hw, C / heads)
            return t.view(B, H * W, self.heads, C // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.q(h)), split_heads(self.k(h)), split_heads(self.v(h))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        y = self.out(y).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, h, w)
        return x + y


class MultiHeadAttention(nn.Module):
    """Attention from the tokens x (B, N, C) to `context` (B, L, D), or to x itself when context is
    None. q/k/v have no bias in the LDM spatial transformer."""

    def __init__(self, channels: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(channels, channels, bias=False)
        self.k = nn.Linear(context_dim or channels, channels, bias=False)
        self.v = nn.Linear(context_dim or channels, channels, bias=False)
        self.out = nn.Linear(channels, channels)

    def forward(self, x, context=None):
        context = x if context is None else context
        B, N, C = x.shape

        def split_heads(t):  # (B, n, C) -> (B, heads, n, C / heads)
            return t.view(B, t.shape[1], self.heads, C // self.heads).transpose(1, 2)

        # softmax(Q K^T / sqrt(Dh)) V, as written out in layers.attention; the fused kernels keep
        # the softmax statistics in float32 for half-precision inputs
        q, k, v = split_heads(self.q(x)), split_heads(self.k(context)), split_heads(self.v(context))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C / heads)
        return self.out(y.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """The feed-forward of the transformer block: Linear to 2 x 4C, value * gelu(gate), Linear back
    (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Linear(channels, 2 * 4 * channels)
        self.out = nn.Linear(4 * channels, channels)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(value * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm: self-attention, cross-attention to the context, feed-forward; each a residual."""

    def __init__(self, channels: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)
        self.norm3 = nn.LayerNorm(channels)
        self.attn1 = MultiHeadAttention(channels, heads)
        self.attn2 = MultiHeadAttention(channels, heads, context_dim)
        self.ff = GEGLU(channels)

    def forward(self, x, context):  # (B, HW, C), (B, L, D)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, the image as HW tokens through a transformer block, 1x1 conv out,
    residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        # eps 1e-6 here (CompVis/latent-diffusion ldm/modules/attention.py Normalize), unlike the
        # ResBlocks' 1e-5 (ldm/modules/diffusionmodules/util.py normalization)
        self.norm = FP32GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.block = TransformerBlock(channels, heads, context_dim)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        h = self.block(h, context)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv, padding 1 (symmetric, unlike the autoencoder's)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size`, then a 3x3 conv. `size` is that of the skip connection
    the next level concatenates: twice the input's when the latent size is divisible by the UNet's
    factor, one less where a stride-2 conv had rounded an odd size up (65 -> 33 -> 65, not 66).
    diffusers' UNet2DConditionModel does the same (its `upsample_size`), so SD takes any multiple
    of 8 as image size; for a doubling, interpolating to the size equals scale_factor=2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):  # (B, C, h, w) -> (B, C, *size), size about (2h, 2w)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNetLevel(nn.Module):
    """The ResBlocks, attentions (one per ResBlock, or none) and resampling of one resolution level.
    UNet.forward runs them, because the skip connections cross between levels."""

    def __init__(self, resnets, attentions, resample):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.resample = resample


class UNet(nn.Module):
    def __init__(self, config: UNetConfig = SD_V1):
        super().__init__()
        self.config = config
        ch = config.channels
        n = len(ch)
        T = config.time_channels
        self.time_embedding = TimestepMLP(ch[0], T)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)

        def resnet(c_in, c_out):
            return ResBlock(c_in, c_out, config.norm_groups, eps=config.norm_eps, time_channels=T)

        def attention(c):
            if config.context_dim is not None:
                return SpatialTransformer(
                    c, config.heads_at(c), config.context_dim, config.norm_groups
                )
            return SelfAttentionBlock(c, config.heads_at(c), config.norm_groups, config.norm_eps)

        skip_channels = [ch[0]]  # channels of every tensor the down path keeps, in order
        self.down = nn.ModuleList()
        for i in range(n):
            c_in = ch[max(i - 1, 0)]
            resnets = [
                resnet(c_in if j == 0 else ch[i], ch[i]) for j in range(config.layers_per_level)
            ]
            attentions = [attention(ch[i]) for _ in resnets] if i in config.attention_levels else []
            downsample = Downsample(ch[i]) if i < n - 1 else None
            self.down.append(UNetLevel(resnets, attentions, downsample))
            skip_channels += [ch[i]] * (config.layers_per_level + (1 if i < n - 1 else 0))

        self.mid = nn.ModuleDict(
            dict(
                resnet1=resnet(ch[-1], ch[-1]),
                attention=attention(ch[-1]),
                resnet2=resnet(ch[-1], ch[-1]),
            )
        )

        self.up = nn.ModuleList()
        c = ch[-1]
        for i in range(n):  # lowest resolution first; up level i mirrors down level n - 1 - i
            c_out = ch[n - 1 - i]
            resnets = []
            for _ in range(config.layers_per_level + 1):
                # input: the previous output ++ one skip
                resnets.append(resnet(c + skip_channels.pop(), c_out))
                c = c_out
            attentions = []
            if (n - 1 - i) in config.attention_levels:
                attentions = [attention(c_out) for _ in resnets]
            upsample = Upsample(c_out) if i < n - 1 else None
            self.up.append(UNetLevel(resnets, attentions, upsample))

        self.norm_out = FP32GroupNorm(config.norm_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    def _attend(self, attention, x, context):
        return attention(x, context) if self.config.context_dim is not None else attention(x)

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample (B, C, h, w), timestep (B,) or one number for all, context (B, L, D)
        -> (B, C, h, w)."""
        check_sample(sample, self.config)
        check_context(context, self.config, sample.shape[0])
        timesteps = batch_timesteps(timestep, sample)
        features = timestep_embedding(timesteps, self.config.channels[0]).to(sample.dtype)
        emb = self.time_embedding(features)  # (B, T)

        x = self.conv_in(sample)
        skips = [x]
        for level in self.down:
            for j, resnet in enumerate(level.resnets):
                x = resnet(x, emb)
                if level.attentions:
                    x = self._attend(level.attentions[j], x, context)
                skips.append(x)
            if level.resample is not None:
                x = level.resample(x)  # (B, C, h/2, w/2)
                skips.append(x)

        x = self.mid["resnet1"](x, emb)
        x = self._attend(self.mid["attention"], x, context)
        x = self.mid["resnet2"](x, emb)

        for level in self.up:
            for j, resnet in enumerate(level.resnets):
                x = resnet(torch.cat([x, skips.pop()], dim=1), emb)  # concatenate along channels
                if level.attentions:
                    x = self._attend(level.attentions[j], x, context)
            if level.resample is not None:
                x = level.resample(x, skips[-1].shape[2:])  # (B, C, 2h, 2w): the next skip's size
        return self.conv_out(F.silu(self.norm_out(x)))


# --- input checks: what the UNet refuses, and what to do instead ------------------------------


def check_sample(sample, config: UNetConfig):
    if (
        not isinstance(sample, torch.Tensor)
        or sample.ndim != 4
        or sample.shape[1] != config.in_channels
    ):
        raise ValueError(
            f"expected latents of shape (B, {config.in_channels}, h, w), "
            f"got {tuple(getattr(sample, 'shape', ()))}"
        )
    if sample.shape[2] < 1 or sample.shape[3] < 1:
        raise ValueError(f"expected latents of at least 1x1, got {tuple(sample.shape)}")


def check_context(context, config: UNetConfig, batch: int):
    if config.context_dim is None:
        if context is not None:
            raise ValueError("this UNet is unconditional (self-attention only); pass context=None")
        return
    if context is None:
        raise ValueError(
            "this UNet attends to a text context: pass context of shape "
            f"(B, L, {config.context_dim}) from the text encoder"
        )
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != config.context_dim:
        raise ValueError(
            f"expected context of shape ({batch}, L, {config.context_dim}), "
            f"got {tuple(context.shape)}: was it made by the right text encoder? "
            "(SD v1: CLIP ViT-L/14, 768; LDM: LDMBert, 1280)"
        )


def batch_timesteps(timestep, sample: torch.Tensor) -> torch.Tensor:
    """One number, or one per sample -> a (B,) tensor on the sample's device."""
    timesteps = torch.as_tensor(timestep, device=sample.device)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(sample.shape[0])
    if timesteps.shape != (sample.shape[0],):
        raise ValueError(
            f"expected one timestep or one per sample ({sample.shape[0]},), "
            f"got shape {tuple(timesteps.shape)}"
        )
    return timesteps


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
    from minildm.cpu_speed import speed_up  # not at the top: cpu_speed imports GEGLU from here

    return speed_up(model)  # oneDNN kernels for CPU inference (cpu_speed.py)
