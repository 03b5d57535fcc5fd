"""VQ-Diffusion's transformer: noisy code indices + text -> log-probabilities of the clean codes.

Gu et al. 2022, "Vector Quantized Diffusion Model for Text-to-Image Synthesis" (arXiv:2111.14822),
section 3.3 and Fig. 2, with the "Improved VQ-Diffusion" learned classifier-free embedding
(Tang et al. 2022, arXiv:2205.16007). An image is a 32x32 grid of VQ code indices; the forward
process replaces codes by random codes or by a [MASK] class (index 4096). The transformer reads
the grid as 1024 tokens (code embedding + row and column embeddings), and each of its 36 blocks
runs self-attention, cross-attention to the 77 CLIP token vectors, and a feed-forward, with
LayerNorms whose scale and shift depend on the diffusion step ("AdaLayerNorm"). It predicts, for
every position, a distribution over the 4096 codes of the clean image x0 (never the mask class).

Matches microsoft/VQ-Diffusion `image_synthesis/modeling/transformers/transformer_utils.py`
(Text2ImageTransformer) and diffusers' `Transformer2DModel` with discrete inputs.

Shapes: B batch, N = h*w tokens (1024), C width (1408), L context tokens (77), D context width
(512), K codes (4096).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minildm.layers import FP32LayerNorm


@dataclass(frozen=True)
class VQTransformerConfig:
    """Defaults: the hub's `transformer/config.json` of microsoft/vq-diffusion-ithq."""

    num_classes: int = 4097  # 4096 codes + the mask class
    height: int = 32
    width: int = 32
    layers: int = 36
    heads: int = 16
    head_dim: int = 88  # 16 x 88 = 1408 channels
    context_dim: int = 512  # CLIP ViT-B/32
    num_timesteps: int = 100  # rows of the AdaLayerNorm step embedding

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim

    @property
    def mask_index(self) -> int:
        return self.num_classes - 1


ITHQ = VQTransformerConfig()  # 1,359,274,624 parameters


class AdaLayerNorm(nn.Module):
    """LayerNorm (no learned affine) whose scale and shift are predicted from the diffusion step:
    norm(x) * (1 + scale) + shift, with (scale, shift) = Linear(SiLU(Embedding(t)))."""

    def __init__(self, channels: int, num_timesteps: int):
        super().__init__()
        self.emb = nn.Embedding(num_timesteps, channels)
        self.linear = nn.Linear(channels, 2 * channels)
        self.channels = channels

    def forward(self, x, timestep):  # x (B, N, C), timestep () or (B,)
        scale, shift = self.linear(F.silu(self.emb(timestep))).chunk(2, dim=-1)  # (C,) or (B, C)
        if timestep.ndim == 1:  # one step per sample
            scale = scale[:, None, :]
            shift = shift[:, None, :]
        # statistics in float32 whatever the dtype (see layers.FP32LayerNorm)
        normed = F.layer_norm(x.float(), (self.channels,), eps=1e-5).to(x.dtype)
        return normed * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention from the tokens x (B, N, C) to `context` (B, L, D), or to x itself when
    context is None. q, k and v have biases here (the config's attention_bias), unlike the
    UNet's."""

    def __init__(self, channels: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(context_dim or channels, channels)
        self.v = nn.Linear(context_dim or channels, channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x, context=None):
        context = x if context is None else context
        B, N, C = x.shape

        def split_heads(t):  # (B, n, C) -> (B, heads, n, C / heads)
            return t.view(B, t.shape[1], self.heads, C // self.heads).transpose(1, 2)

        # softmax(Q K^T / sqrt(Dh)) V, as written out in layers.attention; the fused kernel keeps
        # the softmax statistics in float32 for half-precision inputs
        q, k, v = split_heads(self.q(x)), split_heads(self.k(context)), split_heads(self.v(context))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C / heads)
        return self.out(y.transpose(1, 2).reshape(B, N, C))


class FeedForward(nn.Module):
    """Linear to 4C, x * sigmoid(1.702 x) (the original's "GELU2", diffusers' "geglu-approximate",
    which despite its name is not gated), Linear back."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, 4 * channels)
        self.fc2 = nn.Linear(4 * channels, channels)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))


class Block(nn.Module):
    def __init__(self, config: VQTransformerConfig):
        super().__init__()
        C = config.channels
        self.norm1 = AdaLayerNorm(C, config.num_timesteps)
        self.attn1 = Attention(C, config.heads)
        self.norm2 = AdaLayerNorm(C, config.num_timesteps)
        self.attn2 = Attention(C, config.heads, context_dim=config.context_dim)
        self.norm3 = FP32LayerNorm(C)
        self.ff = FeedForward(C)

    def forward(self, x, context, timestep):
        x = x + self.attn1(self.norm1(x, timestep))  # tokens look at each other
        x = x + self.attn2(self.norm2(x, timestep), context)  # ... and at the prompt
        return x + self.ff(self.norm3(x))


class VQTransformer(nn.Module):
    """(indices [B, N], context [B, L, D], timestep) -> log p(x0) [B, K, N] in float32."""

    def __init__(self, config: VQTransformerConfig = ITHQ):
        super().__init__()
        self.config = config
        C = config.channels
        self.token_embedding = nn.Embedding(config.num_classes, C)
        self.row_embedding = nn.Embedding(config.height, C)
        self.column_embedding = nn.Embedding(config.width, C)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm_out = FP32LayerNorm(C)
        self.out = nn.Linear(C, config.num_classes - 1)  # the mask class is never predicted

    def forward(self, indices: torch.Tensor, context: torch.Tensor, timestep) -> torch.Tensor:
        c = self.config
        check_indices(indices, c)
        check_context(context, c, indices.shape[0])
        timestep = batch_timestep(timestep, c, indices)
        rows = torch.arange(c.height, device=indices.device)
        columns = torch.arange(c.width, device=indices.device)
        row_vectors = self.row_embedding(rows)[:, None, :]  # (h, 1, C)
        column_vectors = self.column_embedding(columns)[None, :, :]  # (1, w, C)
        positions = (row_vectors + column_vectors).reshape(1, c.height * c.width, -1)  # (1, N, C)
        x = self.token_embedding(indices) + positions  # (B, N, C)
        for block in self.blocks:
            x = block(x, context, timestep)
        logits = self.out(self.norm_out(x)).transpose(1, 2)  # (B, K, N)
        # log-probabilities in float64, as both references do: the sampler adds and subtracts them
        # in log space, where float32 (let alone half precision) loses the small ones
        return F.log_softmax(logits.double(), dim=1).float()


# --- input checks: what the transformer refuses -----------------------------------------------


def check_indices(indices, c: VQTransformerConfig):
    N = c.height * c.width
    if indices.dtype != torch.long or indices.ndim != 2 or indices.shape[1] != N:
        raise ValueError(
            f"expected code indices as a LongTensor (B, {N}) for a {c.height}x{c.width} grid, "
            f"got {indices.dtype} {tuple(indices.shape)}"
        )
    if indices.min() < 0 or indices.max() > c.mask_index:
        raise ValueError(
            f"indices must lie in [0, {c.mask_index}] ({c.mask_index} is the mask class), "
            f"got [{indices.min().item()}, {indices.max().item()}]"
        )


def check_context(context, c: VQTransformerConfig, batch: int):
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != c.context_dim:
        raise ValueError(
            f"expected context of shape ({batch}, L, {c.context_dim}) from CLIP ViT-B/32, "
            f"got {tuple(context.shape)}"
        )


def batch_timestep(timestep, c: VQTransformerConfig, indices: torch.Tensor) -> torch.Tensor:
    """One step for the batch (a 0-d tensor) or one per sample (B,), as a LongTensor."""
    timestep = torch.as_tensor(timestep, dtype=torch.long, device=indices.device)
    if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] != indices.shape[0]):
        raise ValueError(
            f"expected one timestep or one per sample, got shape {tuple(timestep.shape)}"
        )
    if timestep.min() < 0 or timestep.max() >= c.num_timesteps:
        raise ValueError(f"timestep must lie in [0, {c.num_timesteps}), got {timestep.tolist()}")
    return timestep


class LearnedClassifierFreeEmbeddings(nn.Module):
    """Improved VQ-Diffusion's learned "empty prompt": 77 x 512 vectors trained to stand in for the
    text condition in the unconditional branch of classifier-free guidance (used as is, not
    normalised like real text embeddings: diffusers' pipelines/deprecated/vq_diffusion/
    pipeline_vq_diffusion.py VQDiffusionPipeline._encode_prompt)."""

    def __init__(self, length: int = 77, hidden_size: int = 512):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(length, hidden_size))  # (L, D)
