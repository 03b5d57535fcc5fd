"""LDMBert: the text encoder of the CompVis LDM text-to-image model (ldm-text2im-large-256).

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(arXiv:2112.10752), section 4.3.1: a 32-layer, 1280-wide transformer trained from scratch with the
diffusion model on LAION-400M, over bert-base-uncased WordPiece tokens. In the original code it is
an x-transformers `TransformerWrapper(attn_layers=Encoder(dim=1280, depth=32))`
(CompVis/latent-diffusion `ldm/modules/encoders/modules.py` BERTEmbedder); diffusers ports it as
`LDMBertModel` (pipelines/latent_diffusion/pipeline_latent_diffusion.py). Both layouts load
(checkpoints/ldm_bert.py).

Unlike CLIP: learned absolute positions, exact (erf) GELU, no attention mask at all (padding tokens
are attended to: the original's BERTEmbedder passes no mask to its TransformerWrapper, nor does
diffusers' LDMTextToImagePipeline), and attention narrower than the residual stream: 8 heads x 64 =
512 channels inside a 1280-wide model, with q/k/v without bias (CompVis/latent-diffusion
ldm/modules/x_transformer.py Attention).

Shapes: B batch, L tokens (77), D width (1280), H heads, Dh head width (64).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minildm.layers import FP32LayerNorm, attention, check_input_ids


@dataclass(frozen=True)
class LDMBertConfig:
    """Defaults: the hub's `bert/config.json` of CompVis/ldm-text2im-large-256."""

    vocab_size: int = 30522
    max_length: int = 77
    width: int = 1280
    layers: int = 32
    heads: int = 8
    head_width: int = 64
    mlp_width: int = 5120
    norm_eps: float = 1e-5  # nn.LayerNorm's default, used by both implementations


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, head_width: int):
        super().__init__()
        self.heads = heads
        self.head_width = head_width
        inner = heads * head_width  # 512, narrower than the 1280-wide residual stream
        self.q = nn.Linear(width, inner, bias=False)
        self.k = nn.Linear(width, inner, bias=False)
        self.v = nn.Linear(width, inner, bias=False)
        self.out = nn.Linear(inner, width)

    def forward(self, x):  # (B, L, D)
        B, L, _ = x.shape

        def split_heads(t):  # (B, L, H * Dh) -> (B, H, L, Dh)
            return t.view(B, L, self.heads, self.head_width).transpose(1, 2)

        q, k, v = split_heads(self.q(x)), split_heads(self.k(x)), split_heads(self.v(x))
        y = attention(q, k, v, causal=False)  # no mask: padding tokens are attended to
        y = y.transpose(1, 2).reshape(B, L, self.heads * self.head_width)
        return self.out(y)  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x):
        # exact erf GELU (x-transformers nn.GELU, transformers "gelu")
        return self.fc2(F.gelu(self.fc1(x)))


class LDMBertLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LDMBertConfig):
        super().__init__()
        self.attn_norm = FP32LayerNorm(config.width, eps=config.norm_eps)
        self.attn = SelfAttention(config.width, config.heads, config.head_width)
        self.mlp_norm = FP32LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = MLP(config.width, config.mlp_width)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LDMBert(nn.Module):
    """(input_ids [B, L]) -> [B, L, 1280]. The unconditional input is the tokenized empty prompt
    ([CLS] [SEP] [PAD]...), run through the same model (CompVis/latent-diffusion scripts/txt2img.py:
    `get_learned_conditioning(n * [""])`)."""

    def __init__(self, config: LDMBertConfig = LDMBertConfig()):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_length, config.width)
        self.layers = nn.ModuleList(LDMBertLayer(config) for _ in range(config.layers))
        self.final_norm = FP32LayerNorm(config.width, eps=config.norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_input_ids(input_ids, self.config.vocab_size, self.config.max_length)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)  # (B, L, D)
