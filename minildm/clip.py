"""CLIP text transformer: token ids -> one vector per token, the condition for the diffusion model.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"
(arXiv:2103.00020), section 2.4: a GPT-2-style pre-norm transformer with a causal mask. Stable
Diffusion v1 uses the ViT-L/14 text tower and VQ-Diffusion the ViT-B/32 one; both take the final
LayerNorm's output for every token (`last_hidden_state`), not the pooled/projected embedding.

Matches transformers' `CLIPTextModel` (modeling_clip.py), whose hub key names the key map reads,
as does the `cond_stage_model.transformer.` prefix of original Stable Diffusion checkpoints.

Shapes: B batch, L tokens (77), D width, H heads, Dh = D / H.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minildm.weights import load_into, remap_keys


@dataclass(frozen=True)
class CLIPTextConfig:
    """Defaults: openai/clip-vit-large-patch14, SD v1's text encoder (facts 1.3)."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    norm_eps: float = 1e-5
    activation: str = "quick_gelu"  # x * sigmoid(1.702 x), CLIP's fast GELU approximation (facts 6.6)

    @classmethod
    def from_diffusers(cls, config: dict) -> "CLIPTextConfig":
        """From a transformers `config.json` (CLIPTextModel, or CLIPModel with a `text_config`)."""
        config = config.get("text_config", config)
        activation = config.get("hidden_act", "quick_gelu")
        if activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"CLIP hidden_act {activation!r} is not supported; expected 'quick_gelu' or 'gelu'")
        return cls(  # absent keys take transformers' CLIPTextConfig defaults, as transformers would
            vocab_size=config.get("vocab_size", 49408),
            max_length=config.get("max_position_embeddings", 77),
            width=config.get("hidden_size", 512),
            layers=config.get("num_hidden_layers", 12),
            heads=config.get("num_attention_heads", 8),
            mlp_width=config.get("intermediate_size", 2048),
            norm_eps=config.get("layer_norm_eps", 1e-5),
            activation=activation,
        )


CLIP_VIT_L_14 = CLIPTextConfig()  # Stable Diffusion v1.x
CLIP_VIT_B_32 = CLIPTextConfig(width=512, heads=8, mlp_width=2048)  # VQ-Diffusion (facts 4.2)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm whose mean and variance are computed in float32, whatever the input dtype:
    in fp16/bf16 the variance of a wide vector loses most of its digits."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def attention(q, k, v, causal: bool):
    """softmax(Q K^T / sqrt(Dh)) V, written out for the reader; q, k, v are (B, H, L, Dh).

    The softmax runs in float32 (a half-precision softmax over 77 scores loses small weights).
    `F.scaled_dot_product_attention(q, k, v, is_causal=causal)` computes the same; at 77 tokens the
    explicit form costs nothing.
    """
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, L, L)
    if causal:  # token i may attend to tokens 0..i only (CLIP was trained left to right)
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    weights = scores.float().softmax(dim=-1).to(v.dtype)
    return weights @ v  # (B, H, L, Dh)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):  # (B, L, D)
        B, L, D = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, D // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, H, L, Dh)
        y = attention(q, k, v, causal=True).transpose(1, 2).reshape(B, L, D)
        return self.out(y)


class MLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, activation: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, mlp_width), nn.Linear(mlp_width, width)
        self.activation = activation

    def forward(self, x):
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.activation == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class CLIPLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.attn_norm = FP32LayerNorm(config.width, eps=config.norm_eps)
        self.attn = SelfAttention(config.width, config.heads)
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


def check_input_ids(input_ids, vocab_size: int, max_length: int):
    """Refuse what would otherwise fail deep inside an embedding lookup, with a message that helps."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long or input_ids.ndim != 2:
        raise TypeError(f"expected input_ids as a LongTensor [B, L] (from the tokenizer), got {getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] > max_length:
        raise ValueError(f"{input_ids.shape[1]} tokens given; the model has {max_length} positions (truncate with the tokenizer)")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got [{input_ids.min().item()}, {input_ids.max().item()}]: was a different tokenizer used?")


# --- Official weights -------------------------------------------------------------------------
# transformers' names (hub files carry a `text_model.` prefix, transformers 5 saves without it;
# original SD checkpoints prefix `cond_stage_model.transformer.`) -> ours.
KEY_RULES = [
    (r"^cond_stage_model\.transformer\.", ""),
    (r"^text_model\.", ""),
    (r"^embeddings\.(token|position)_embedding\.", r"\1_embedding."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.", r"layers.\1.attn.\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"layers.\1.attn.out."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"layers.\1.attn_norm."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"layers.\1.mlp_norm."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"layers.\1.mlp."),
    (r"^final_layer_norm\.", "final_norm."),
]
# `position_ids` is an arange buffer that old transformers saved; we compute it in forward.
DROPPED_KEYS = [r"(cond_stage_model\.transformer\.)?(text_model\.)?embeddings\.position_ids"]


def _mismatch_hint(missing, unexpected, mismatched):
    if "token_embedding.weight" in mismatched:
        (_, got_width), (_, want_width) = mismatched["token_embedding.weight"]
        if got_width == 1024:
            return "a 1024-wide text encoder: this looks like an SD 2.x (OpenCLIP ViT-H/14) checkpoint, which minildm does not implement"
        return f"the checkpoint's encoder is {got_width} wide, the config's {want_width}: config.json belongs to another model (ViT-L/14 is 768, ViT-B/32 512)"
    if any("text_projection" in k for k in unexpected):
        return "a CLIPTextModelWithProjection checkpoint; minildm uses the last hidden state, not the projection"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in unexpected):
        return "a whole Stable Diffusion checkpoint: split it into components first"
    return None


def load_clip_text_model(config: CLIPTextConfig, state_dict: dict, device=None, dtype=None) -> CLIPTextModel:
    with torch.device("meta"):
        model = CLIPTextModel(config)
    weights, file_names = remap_keys(state_dict, KEY_RULES, DROPPED_KEYS)
    return load_into(model, weights, file_names=file_names, device=device, dtype=dtype, what="CLIP text encoder", hint=_mismatch_hint)
