"""CLIP text transformer: token ids -> one vector per token, the condition for the diffusion model.
Also CLIP's image transformer, which only Stable Diffusion's safety checker uses.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"
(arXiv:2103.00020), section 2.4: a GPT-2-style pre-norm transformer with a causal mask. Stable
Diffusion v1 uses the ViT-L/14 text tower and VQ-Diffusion the ViT-B/32 one; both take the final
LayerNorm's output for every token (`last_hidden_state`), not the pooled/projected embedding.

The image tower (section 2.4 too) is a Vision Transformer (Dosovitskiy et al. 2020,
arXiv:2010.11929) built from the same layers, without the causal mask; it summarises an image in
one vector.

Matches transformers' `CLIPTextModel` and `CLIPVisionModel` (modeling_clip.py), whose hub key names
the key maps (checkpoints/clip.py) read, as they read the `cond_stage_model.transformer.` prefix of
original Stable Diffusion checkpoints.

Shapes: B batch, L tokens (77 for text, 257 for a 224x224 image), D width, H heads, Dh = D / H.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minildm.layers import FP32LayerNorm, attention, check_input_ids


@dataclass(frozen=True)
class CLIPTextConfig:
    """Defaults: openai/clip-vit-large-patch14, SD v1's text encoder (the hub's
    text_encoder/config.json of CompVis/stable-diffusion-v1-4)."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    norm_eps: float = 1e-5
    activation: str = "quick_gelu"  # x * sigmoid(1.702 x): openai/CLIP clip/model.py QuickGELU


CLIP_VIT_L_14 = CLIPTextConfig()  # Stable Diffusion v1.x
# VQ-Diffusion: the hub's text_encoder/config.json of microsoft/vq-diffusion-ithq
CLIP_VIT_B_32 = CLIPTextConfig(width=512, heads=8, mlp_width=2048)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Defaults: the ViT-L/14 image tower of openai/clip-vit-large-patch14, the one inside SD v1's
    safety checker (the vision_config of the hub's safety_checker/config.json of
    CompVis/stable-diffusion-v1-4). Field names as in CLIPTextConfig, so `CLIPLayer` takes
    either."""

    image_size: int = 224
    patch_size: int = 14  # the "/14" of ViT-L/14: 224 / 14 = 16 patches a side, 256 in all
    channels: int = 3
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_width: int = 4096
    norm_eps: float = 1e-5
    activation: str = "quick_gelu"


class SelfAttention(nn.Module):
    """causal: text tokens see only earlier tokens; image patches all see each other
    (causal=False)."""

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape

        def split_heads(t):  # (B, L, D) -> (B, H, L, Dh)
            return t.view(B, L, self.heads, D // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.q(x)), split_heads(self.k(x)), split_heads(self.v(x))
        y = attention(q, k, v, causal=self.causal).transpose(1, 2).reshape(B, L, D)
        return self.out(y)


class MLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)
        self.activation = activation

    def forward(self, x):
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.activation == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class CLIPLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). The text tower's layers
    are causal, the image tower's not."""

    def __init__(self, config: "CLIPTextConfig | CLIPVisionConfig", causal: bool = True):
        super().__init__()
        self.attn_norm = FP32LayerNorm(config.width, eps=config.norm_eps)
        self.attn = SelfAttention(config.width, config.heads, causal)
        self.mlp_norm = FP32LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = MLP(config.width, config.mlp_width, config.activation)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class CLIPTextModel(nn.Module):
    """(input_ids [B, L]) -> last hidden state [B, L, D]."""

    def __init__(self, config: CLIPTextConfig = CLIP_VIT_L_14):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_length, config.width)
        self.layers = nn.ModuleList(CLIPLayer(config) for _ in range(config.layers))
        self.final_norm = FP32LayerNorm(config.width, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_input_ids(input_ids, self.config.vocab_size, self.config.max_length)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)  # (B, L, D)


class CLIPVisionModel(nn.Module):
    """(pixel_values [B, 3, 224, 224], CLIP-normalised) -> pooled image embedding [B, D].

    The image is cut into 14x14 patches; each is embedded linearly (one convolution whose stride is
    its kernel size). A learned class token goes in front, a learned position embedding is added,
    and the transformer reads all tokens, each seeing every other. The class token's final state is
    the image's summary. CLIP adds one LayerNorm before the transformer (paper, section 2.4) and one
    on the class token at the end.
    """

    def __init__(self, config: CLIPVisionConfig = CLIPVisionConfig()):
        super().__init__()
        self.config = config
        self.grid = config.image_size // config.patch_size  # patches per side (16)
        # no bias: the position embedding, added next, already gives every token its own offset
        self.patch_embedding = nn.Conv2d(
            config.channels, config.width, config.patch_size, stride=config.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.zeros(config.width))
        # one position per patch, and position 0 for the class token
        self.position_embedding = nn.Embedding(1 + self.grid**2, config.width)
        self.pre_norm = FP32LayerNorm(config.width, eps=config.norm_eps)
        self.layers = nn.ModuleList(CLIPLayer(config, causal=False) for _ in range(config.layers))
        self.post_norm = FP32LayerNorm(config.width, eps=config.norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_pixel_values(pixel_values, self.config)
        B = pixel_values.shape[0]
        pixels = pixel_values.to(self.patch_embedding.weight.dtype)
        patches = self.patch_embedding(pixels)  # (B, D, grid, grid)
        patches = patches.flatten(2).transpose(1, 2)  # (B, grid * grid, D), in row-major order
        class_token = self.class_embedding.expand(B, 1, -1)  # (B, 1, D)
        tokens = torch.cat([class_token, patches], dim=1)  # (B, 1 + grid * grid, D)
        x = tokens + self.position_embedding.weight
        x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x[:, 0])  # (B, D): the class token alone


def check_pixel_values(pixel_values, config: CLIPVisionConfig):
    """Refuse images the tower cannot read, saying what to do instead of failing inside the
    convolution."""
    S = config.image_size
    C = config.channels
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        found = getattr(pixel_values, "dtype", type(pixel_values))
        raise TypeError(f"expected pixel_values as a float tensor [B, {C}, {S}, {S}], got {found}")
    if pixel_values.ndim != 4:
        one = ""
        if pixel_values.ndim == 3:
            one = " (one image: add the batch dimension, pixel_values[None])"
        raise ValueError(
            f"expected pixel_values [B, {C}, {S}, {S}], got shape {tuple(pixel_values.shape)}{one}"
        )
    if pixel_values.shape[1] != C:
        layout = " (channels last? use .permute(0, 3, 1, 2))" if pixel_values.shape[-1] == C else ""
        raise ValueError(
            f"expected {C} colour channels in dimension 1, "
            f"got shape {tuple(pixel_values.shape)}{layout}"
        )
    if pixel_values.shape[2:] != (S, S):
        raise ValueError(
            f"the vision tower takes {S}x{S} images, "
            f"got {pixel_values.shape[2]}x{pixel_values.shape[3]}: resize and center-crop first "
            "(minildm.safety_checker.preprocess does what CLIPImageProcessor does)"
        )
