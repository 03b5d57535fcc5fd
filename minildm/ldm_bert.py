"""LDMBert: the text encoder of the CompVis LDM text-to-image model (ldm-text2im-large-256).

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(arXiv:2112.10752), section 4.3.1: a 32-layer, 1280-wide transformer trained from scratch with the
diffusion model on LAION-400M, over bert-base-uncased WordPiece tokens. In the original code it is
an x-transformers `TransformerWrapper(attn_layers=Encoder(dim=1280, depth=32))`
(CompVis/latent-diffusion `ldm/modules/encoders/modules.py` BERTEmbedder); diffusers ports it as
`LDMBertModel` (pipelines/latent_diffusion/pipeline_latent_diffusion.py). Both layouts load here.

Unlike CLIP: learned absolute positions, exact (erf) GELU, no attention mask at all (padding tokens
are attended to: the original's BERTEmbedder passes no mask to its TransformerWrapper, nor does
diffusers' LDMTextToImagePipeline), and attention narrower than the residual stream: 8 heads x 64 =
512 channels inside a 1280-wide model, with q/k/v without bias (CompVis/latent-diffusion
ldm/modules/x_transformer.py Attention).

Shapes: B batch, L tokens (77), D width (1280), H heads, Dh head width (64).
"""

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minildm.checkpoints.weights import load_into, remap_keys
from minildm.cpu_speed import speed_up
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

    @classmethod
    def from_diffusers(cls, config: dict) -> "LDMBertConfig":
        """From the hub `bert/config.json` (LDMBertConfig field names)."""
        activation = config.get("activation_function", "gelu")
        if activation != "gelu":
            raise ValueError(
                f"LDMBert activation_function {activation!r} is not supported; "
                "the official model uses 'gelu'"
            )
        return cls(
            vocab_size=config.get("vocab_size", 30522),
            max_length=config.get("max_position_embeddings", 77),
            width=config.get("d_model", 1280),
            layers=config.get("encoder_layers", 32),
            heads=config.get("encoder_attention_heads", 8),
            head_width=config.get("head_dim", 64),
            mlp_width=config.get("encoder_ffn_dim", 5120),
        )

    def to_diffusers(self) -> dict:
        """The transformers-style `bert/config.json` of diffusers' LDMBertModel (what
        `from_diffusers` reads back)."""
        return {
            "architectures": ["LDMBertModel"],
            "model_type": "ldmbert",
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_length,
            "d_model": self.width,
            "encoder_layers": self.layers,
            "encoder_attention_heads": self.heads,
            "head_dim": self.head_width,
            "encoder_ffn_dim": self.mlp_width,
            "activation_function": "gelu",
            "scale_embedding": False,
            "pad_token_id": 0,
        }


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


# --- Official weights -------------------------------------------------------------------------
# Two layouts map onto ours; their key patterns do not overlap, so one rule list serves both.
# In the original, layer list entry 2i is [norm, attention, residual] and 2i+1 [norm, feed-forward,
# residual] of our layer i (CompVis/latent-diffusion ldm/modules/x_transformer.py; the names of the
# old diffusers convert_from_ckpt.py convert_ldm_bert_checkpoint); `net.1` is a dropout, the
# residual has no weights.
def _original_layer(match) -> str:
    entry = int(match.group(1))
    part = match.group(2)
    layer = entry // 2
    is_attention = entry % 2 == 0
    if part.startswith("0."):  # the pre-norm
        return f"layers.{layer}.{'attn_norm' if is_attention else 'mlp_norm'}.{part[2:]}"
    renames = {
        "1.to_q.": "attn.q.",
        "1.to_k.": "attn.k.",
        "1.to_v.": "attn.v.",
        "1.to_out.": "attn.out.",
        "1.net.0.0.": "mlp.fc1.",
        "1.net.2.": "mlp.fc2.",
    }
    for old, new in renames.items():
        if part.startswith(old):
            return f"layers.{layer}.{new}{part[len(old) :]}"
    return match.group(0)  # unknown: left as is, so the strict loader reports it


KEY_RULES = [
    # diffusers / hub `bert/` layout (LDMBertModel, base_model_prefix "model")
    (r"^model\.embed_tokens\.", "token_embedding."),
    (r"^model\.embed_positions\.", "position_embedding."),
    (r"^model\.layers\.(\d+)\.self_attn_layer_norm\.", r"layers.\1.attn_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.", r"layers.\1.attn.\2."),
    (r"^model\.layers\.(\d+)\.self_attn\.out_proj\.", r"layers.\1.attn.out."),
    (r"^model\.layers\.(\d+)\.final_layer_norm\.", r"layers.\1.mlp_norm."),
    (r"^model\.layers\.(\d+)\.(fc1|fc2)\.", r"layers.\1.mlp.\2."),
    (r"^model\.layer_norm\.", "final_norm."),
    # original CompVis checkpoint (x-transformers TransformerWrapper, under
    # cond_stage_model.transformer.)
    (r"^cond_stage_model\.transformer\.", ""),
    (r"^token_emb\.", "token_embedding."),
    (r"^pos_emb\.emb\.", "position_embedding."),
    (r"^attn_layers\.layers\.(\d+)\.(.*)$", _original_layer),
    (r"^norm\.", "final_norm."),
]
# The language-model head is trained but unused for conditioning (the original's BERTEmbedder asks
# its TransformerWrapper for `return_embeddings=True`: CompVis/latent-diffusion
# ldm/modules/encoders/modules.py).
DROPPED_KEYS = [r"(cond_stage_model\.transformer\.)?to_logits\.(weight|bias)"]


# ours -> diffusers' LDMBertModel, for writing a folder (the inverse of the first rules above)
DIFFUSERS_NAMES = [
    (r"^token_embedding\.", "model.embed_tokens."),
    (r"^position_embedding\.", "model.embed_positions."),
    (r"^layers\.(\d+)\.attn_norm\.", r"model.layers.\1.self_attn_layer_norm."),
    (r"^layers\.(\d+)\.attn\.(q|k|v)\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^layers\.(\d+)\.attn\.out\.", r"model.layers.\1.self_attn.out_proj."),
    (r"^layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.final_layer_norm."),
    (r"^layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"model.layers.\1.\2."),
    (r"^final_norm\.", "model.layer_norm."),
]


def diffusers_name(name: str) -> str:
    """Our parameter name -> its name in diffusers' LDMBertModel (which also has a language-model
    head, `to_logits`, that conditioning never uses: a folder written from ours leaves it out)."""
    for pattern, replacement in DIFFUSERS_NAMES:
        name, count = re.subn(pattern, replacement, name)
        if count:
            return name
    raise KeyError(f"no diffusers name for LDMBert parameter {name!r}")


def _mismatch_hint(missing, unexpected, mismatched):
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in unexpected):
        return "a whole LDM checkpoint: split it into components first"
    if mismatched:
        return (
            "an LDMBert of another size: check that config.json (d_model, encoder_layers, ...) "
            "matches the weights"
        )
    return None


def load_ldm_bert(config: LDMBertConfig, state_dict: dict, device=None, dtype=None) -> LDMBert:
    with torch.device("meta"):
        model = LDMBert(config)
    weights, file_names = remap_keys(state_dict, KEY_RULES, DROPPED_KEYS)
    model = load_into(
        model,
        weights,
        file_names=file_names,
        device=device,
        dtype=dtype,
        what="LDMBert text encoder",
        hint=_mismatch_hint,
    )
    return speed_up(model)  # oneDNN kernels for CPU inference (cpu_speed.py)
