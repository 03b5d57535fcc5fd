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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


class TimestepMLP(nn.Module):
    """Sinusoidal features -> Linear, SiLU, Linear -> the (B, T) embedding every ResBlock
    receives."""

    def __init__(self, channels: int, time_channels: int):
        super().__init__()
        self.linear1 = nn.Linear(channels, time_channels)
        self.linear2 = nn.Linear(time_channels, time_channels)

    def forward(self, features):
        return self.linear2(F.silu(self.linear1(features)))


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
