"""Autoencoders: the image <-> latent maps that latent diffusion runs between.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(arXiv:2112.10752), section 3.1 and appendix G: a convolutional encoder compresses an image by a
factor f = 2^(levels-1) per side; a mirrored decoder maps latents back. Two regularisations:

- KL (`AutoencoderKL`): the encoder predicts a diagonal Gaussian (mean, log-variance) per latent
  pixel. Stable Diffusion v1 and the LDM text-to-image model share one KL-f8 model, 4 channels.
- VQ (`VQModel`, van den Oord et al. 2017; Esser et al. 2021 "Taming Transformers"): the encoder
  output is snapped to the nearest entry of a learned codebook. The unconditional CelebA-HQ LDM uses
  VQ-f4 (3 channels, 8192 codes); VQ-Diffusion uses an f8 model with 4096 codes of 128 dims and
  self-attention at its lowest resolution, and works on the code *indices*.

Both share the same encoder and decoder (ResBlocks, GroupNorm eps 1e-6, one single-head
self-attention between two ResBlocks in the middle). Matches CompVis/latent-diffusion
`ldm/modules/diffusionmodules/model.py` and diffusers `AutoencoderKL` / `VQModel`.

Latent scaling. Diffusion models are trained on `latent * scaling_factor` so the latents have about
unit variance: 0.18215 for KL-f8 (the YAML `scale_factor`). The CelebA-HQ LDM trains on unscaled VQ
latents (its YAML sets no scale_factor, so LatentDiffusion's default 1.0 applies); diffusers'
VQModel defaults to 0.18215 when the config omits it, and `LDMPipeline` has divided by it since
2023. minildm keeps 1.0 for VQ models whose config names no scaling factor, as the original does
(docs/parity/pipelines.md, "LDM CelebA-HQ: the latent scale is 1, not 0.18215").

Shapes: B batch, C channels, H x W image, h x w latent (H/f, W/f), D code dim, N codebook size.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minildm.layers import FP32GroupNorm, randn


@dataclass(frozen=True)
class AutoencoderConfig:
    """Defaults: the KL-f8 autoencoder of Stable Diffusion v1 (the hub's vae/config.json of
    CompVis/stable-diffusion-v1-4)."""

    in_channels: int = 3
    out_channels: int = 3
    channels: tuple = (128, 256, 512, 512)  # per resolution level, full resolution first
    layers_per_level: int = 2  # ResBlocks per encoder level; the decoder has one more per level
    # levels with self-attention after every ResBlock (VQ-Diffusion: the last)
    attention_levels: tuple = ()
    latent_channels: int = 4  # KL: channels of z; VQ: encoder output channels before quant_conv
    codebook_size: int = 0  # VQ: number of codes N (0 for a KL model)
    code_dim: int = 0  # VQ: the length D of a code vector
    norm_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def is_vq(self) -> bool:
        return self.codebook_size > 0

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


# Stable Diffusion v1.x and CompVis/ldm-text2im-large-256: the hub's vae/config.json and
# vqvae/config.json of the two repos, which describe the same model
KL_F8 = AutoencoderConfig()

# CompVis/ldm-celebahq-256: the hub's vqvae/config.json; the scale of CompVis/latent-diffusion
# models/ldm/celeba256/config.yaml (none set: LatentDiffusion's default 1.0)
VQ_F4_CELEBAHQ = AutoencoderConfig(
    channels=(128, 256, 512), latent_channels=3, codebook_size=8192, code_dim=3, scaling_factor=1.0
)

# microsoft/vq-diffusion-ithq: the hub's vqvae/config.json (microsoft/VQ-Diffusion's
# taming_dvae/config.yaml); it works on code indices, so no scaling
VQ_F8_ITHQ = AutoencoderConfig(
    channels=(64, 128, 256, 512),
    attention_levels=(3,),
    latent_channels=256,
    codebook_size=4096,
    code_dim=128,
    scaling_factor=1.0,
)


# --- building blocks ----------------------------------------------------------------------------


class ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 conv on the skip path when C changes.

    The UNet's ResBlock (unet.py) is this one plus a timestep input, with GroupNorm eps 1e-5.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        # eps 1e-6 throughout the autoencoders (CompVis/latent-diffusion
        # ldm/modules/diffusionmodules/model.py Normalize)
        self.norm1 = FP32GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = FP32GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.shortcut(x) if self.shortcut is not None else x) + h


class Attention(nn.Module):
    """Self-attention over all pixels, in one head, with a residual: every pixel mixes with every
    other.

    softmax(Q K^T / sqrt(C)) V as written out in layers.attention; here
    `F.scaled_dot_product_attention` computes it without materialising the (HW x HW) score matrix,
    with float32 softmax statistics in its kernels.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = FP32GroupNorm(groups, channels, eps=1e-6)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C): a token per pixel

        def one_head(t):  # (B, HW, C) -> (B, 1, HW, C)
            return t.view(B, H * W, 1, C).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            one_head(self.q(h)), one_head(self.k(h)), one_head(self.v(h))
        )
        y = y.transpose(1, 2).reshape(B, H * W, C)
        y = self.out(y).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + y


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv after padding one zero row/column on the bottom/right
    only (the original's asymmetric padding: CompVis/latent-diffusion
    ldm/modules/diffusionmodules/model.py Downsample), so H=2k gives exactly k rows."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResBlocks (each followed by attention where asked), then a
    resampling."""

    def __init__(self, in_channels, out_channels, num_blocks, attention: bool, resample, groups):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_blocks)
        )
        self.attentions = nn.ModuleList(
            Attention(out_channels, groups) for _ in range(num_blocks if attention else 0)
        )
        self.resample = resample

    def forward(self, x):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions:
                x = self.attentions[i](x)
        return self.resample(x) if self.resample is not None else x


class MidBlock(nn.Module):
    """ResBlock, self-attention, ResBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnet1 = ResBlock(channels, channels, groups)
        self.attention = Attention(channels, groups)
        self.resnet2 = ResBlock(channels, channels, groups)

    def forward(self, x):
        return self.resnet2(self.attention(self.resnet1(x)))


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, out_channels, H/f, W/f)."""

    def __init__(self, config: AutoencoderConfig, out_channels: int):
        super().__init__()
        ch, groups, last = config.channels, config.norm_groups, len(config.channels) - 1
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList(
            Level(
                ch[max(i - 1, 0)],
                ch[i],
                config.layers_per_level,
                i in config.attention_levels,
                Downsample(ch[i]) if i < last else None,
                groups,
            )
            for i in range(len(ch))
        )
        self.mid = MidBlock(ch[-1], groups)
        self.norm_out = FP32GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], out_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.levels:
            x = level(x)  # (B, ch[i], H / 2^i, W / 2^i), halved after every level but the last
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    """(B, in_channels, h, w) -> (B, 3, h*f, w*f). Levels run from the lowest resolution up, so
    decoder level i mirrors encoder level (levels - 1 - i)."""

    def __init__(self, config: AutoencoderConfig, in_channels: int):
        super().__init__()
        ch, groups, n = config.channels[::-1], config.norm_groups, len(config.channels)
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.mid = MidBlock(ch[0], groups)
        self.levels = nn.ModuleList(
            Level(
                ch[max(i - 1, 0)],
                ch[i],
                config.layers_per_level + 1,
                (n - 1 - i) in config.attention_levels,
                Upsample(ch[i]) if i < n - 1 else None,
                groups,
            )
            for i in range(n)
        )
        self.norm_out = FP32GroupNorm(groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(z))
        for level in self.levels:
            x = level(x)  # doubled after every level but the last
        return self.conv_out(F.silu(self.norm_out(x)))


# --- the two autoencoders ---------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    def __init__(self, config: AutoencoderConfig = KL_F8):
        super().__init__()
        if config.is_vq:
            raise ValueError(
                "this config describes a VQ autoencoder (codebook_size > 0): use VQModel"
            )
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config, out_channels=2 * latent)  # mean and log-variance
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        self.decoder = Decoder(config, in_channels=latent)

    def encode(self, x: torch.Tensor):
        """Images (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, 4, H/8, W/8)."""
        check_image(x, self.config)
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # the original clamps so exp() cannot overflow

    @staticmethod
    def sample(
        mean: torch.Tensor,
        logvar: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A draw z = mean + std * eps from the encoder's Gaussian; noise comes from `generator`'s
        device (as diffusers' randn_tensor does), so a CPU generator reproduces on any device."""
        noise = randn(mean.shape, generator, mean.device, mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z: torch.Tensor, sliced: bool = False) -> torch.Tensor:
        """Latents (B, 4, h, w), unscaled (divide by config.scaling_factor first) -> images
        (B, 3, 8h, 8w) in about [-1, 1]."""
        check_latent(z, self.config.latent_channels, "KL latents")
        x = decode_batch(lambda zi: self.decoder(self.post_quant_conv(zi)), z, sliced)
        return check_finite(x)


class VQModel(nn.Module):
    def __init__(self, config: AutoencoderConfig = VQ_F4_CELEBAHQ):
        super().__init__()
        if not config.is_vq:
            raise ValueError("this config has no codebook (codebook_size 0): use AutoencoderKL")
        self.config = config
        self.encoder = Encoder(config, out_channels=config.latent_channels)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.code_dim, 1)
        self.codebook = nn.Embedding(config.codebook_size, config.code_dim)  # (N, D)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.latent_channels, 1)
        self.decoder = Decoder(config, in_channels=config.latent_channels)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> continuous latents h (B, D, h, w), before
        quantization."""
        check_image(x, self.config)
        return self.quant_conv(self.encoder(x))

    def quantize(self, h: torch.Tensor):
        """Snap every latent pixel to its nearest code: -> (z_q (B, D, h, w), indices (B, h, w))."""
        check_latent(h, self.config.code_dim, "VQ latents")
        B, D, H, W = h.shape
        flat = h.permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D)
        # Euclidean distance to every code; torch.cdist is what diffusers uses, so near-ties break
        # the same way (the original expands |z|^2 + |e|^2 - 2 z.e, which cdist does internally).
        distances = torch.cdist(flat, self.codebook.weight.to(flat.dtype))  # (B*h*w, N)
        indices = distances.argmin(dim=1)  # (B*h*w,)
        z_q = self.codebook(indices).view(B, H, W, D).permute(0, 3, 1, 2)  # (B, D, h, w)
        return z_q.to(h.dtype), indices.view(B, H, W)

    def decode(self, h: torch.Tensor, quantize: bool = True, sliced: bool = False) -> torch.Tensor:
        """Latents (B, D, h, w) -> images (B, 3, H, W). `quantize=True` snaps them to the codebook
        first, as the original does for the CelebA-HQ LDM (CompVis/latent-diffusion
        ldm/models/diffusion/ddpm.py LatentDiffusion.decode_first_stage)."""
        check_latent(h, self.config.code_dim, "VQ latents")
        if quantize:
            h = self.quantize(h)[0]
        x = decode_batch(lambda hi: self.decoder(self.post_quant_conv(hi)), h, sliced)
        return check_finite(x)

    def decode_indices(self, indices: torch.Tensor, shape, sliced: bool = False) -> torch.Tensor:
        """Code indices (B, h*w) or (B, h, w) on an (h, w) grid -> images (B, 3, h*f, w*f)."""
        h, w = shape
        check_indices(indices, h, w, self.config.codebook_size)
        z_q = self.codebook(indices.reshape(-1, h, w)).permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.decode(z_q, quantize=False, sliced=sliced)


def decode_batch(decode_one, z, sliced: bool):
    """Decode all at once, or one image at a time (diffusers' "VAE slicing") to bound peak
    memory."""
    if not sliced:
        return decode_one(z)
    return torch.cat([decode_one(z[i : i + 1]) for i in range(z.shape[0])])


# --- input checks: what the autoencoders refuse, and what to do instead ----------------------


def check_image(x, config: AutoencoderConfig):
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != config.in_channels:
        raise ValueError(
            f"expected images of shape (B, {config.in_channels}, H, W) scaled to [-1, 1], "
            f"got {tuple(getattr(x, 'shape', ()))}"
        )
    f = config.downsampling_factor
    if x.shape[2] % f or x.shape[3] % f:
        raise ValueError(
            f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the downsampling factor "
            f"{f}: crop or resize to a multiple of {f}"
        )


def check_latent(z, channels: int, what: str):
    if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != channels:
        found = tuple(getattr(z, "shape", ()))
        raise ValueError(f"expected {what} of shape (B, {channels}, h, w), got {found}")
    if not torch.isfinite(z).all():
        bad = int((~torch.isfinite(z)).sum())
        raise FloatingPointError(
            f"the {what} given to decode hold {bad} inf/nan value(s) before decoding: they came "
            "from the caller or from the denoising loop, not from the autoencoder"
        )


def check_indices(indices, h: int, w: int, codebook_size: int):
    is_integer = indices.dtype in (torch.long, torch.int32, torch.int64)
    if not is_integer or indices[0].numel() != h * w:
        raise ValueError(
            f"expected integer indices of shape (B, {h * w}) or (B, {h}, {w}), "
            f"got {indices.dtype} {tuple(indices.shape)}"
        )
    low, high = indices.min().item(), indices.max().item()
    if low < 0 or high >= codebook_size:
        message = f"code indices must lie in [0, {codebook_size}), got [{low}, {high}]"
        if high == codebook_size:
            message += (
                f"; {codebook_size} is VQ-Diffusion's mask class: "
                "every token must be sampled before decoding"
            )
        raise ValueError(message)


def check_finite(x):
    """Raises on inf/nan in the decoded images, naming the cause, else returns x. The latents were
    checked finite on the way in (check_latent), so the decoder itself made them."""
    if not torch.isfinite(x).all():
        if x.dtype == torch.float16:
            raise FloatingPointError(
                "the autoencoder's decode produced inf/nan in float16: activations overflowed the "
                "half-precision range (65504). Run the autoencoder in float32 (load it with "
                "dtype=torch.float32); the rest of the pipeline may stay in half precision."
            )
        raise FloatingPointError(
            f"the autoencoder's decode produced inf/nan in {x.dtype} from finite latents: its "
            "weights may be damaged (download them again), or the latents far outside the "
            "trained range (were they divided by the scaling factor?)"
        )
    return x
