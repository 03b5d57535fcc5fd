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
the key maps read, as does the `cond_stage_model.transformer.` prefix of original Stable Diffusion
checkpoints.

Shapes: B batch, L tokens (77 for text, 257 for a 224x224 image), D width, H heads, Dh = D / H.
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

    @classmethod
    def from_diffusers(cls, config: dict) -> "CLIPTextConfig":
        """From a transformers `config.json` (CLIPTextModel, or CLIPModel with a `text_config`)."""
        config = config.get("text_config", config)
        activation = _hidden_act(config)
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

    def to_diffusers(self) -> dict:
        """The transformers `config.json` of this model (what `from_diffusers` reads back)."""
        return {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_length,
            "hidden_size": self.width,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "intermediate_size": self.mlp_width,
            "layer_norm_eps": self.norm_eps,
            "hidden_act": self.activation,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
            "projection_dim": self.width,
            "torch_dtype": "float32",
        }


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

    @classmethod
    def from_diffusers(cls, config: dict) -> "CLIPVisionConfig":
        """From a transformers `config.json` (CLIPVisionModel, or CLIPModel / the safety checker
        with a `vision_config`)."""
        config = config.get("vision_config", config)
        # absent keys take transformers' CLIPVisionConfig defaults (a ViT-B/32), as it would
        return cls(
            image_size=config.get("image_size", 224),
            patch_size=config.get("patch_size", 32),
            channels=config.get("num_channels", 3),
            width=config.get("hidden_size", 768),
            layers=config.get("num_hidden_layers", 12),
            heads=config.get("num_attention_heads", 12),
            mlp_width=config.get("intermediate_size", 3072),
            norm_eps=config.get("layer_norm_eps", 1e-5),
            activation=_hidden_act(config),
        )


def _hidden_act(config: dict) -> str:
    activation = config.get("hidden_act", "quick_gelu")
    if activation not in ("quick_gelu", "gelu"):
        raise ValueError(
            f"CLIP hidden_act {activation!r} is not supported; expected 'quick_gelu' or 'gelu'"
        )
    return activation


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


# --- Official weights -------------------------------------------------------------------------
# transformers' names (hub files carry a `text_model.` prefix, transformers 5 saves without it;
# original SD checkpoints prefix `cond_stage_model.transformer.`) -> ours.
# The transformer layers are named alike in both towers.
ENCODER_LAYER_RULES = [
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.", r"layers.\1.attn.\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"layers.\1.attn.out."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"layers.\1.attn_norm."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"layers.\1.mlp_norm."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"layers.\1.mlp."),
]
KEY_RULES = [
    (r"^cond_stage_model\.transformer\.", ""),
    (r"^text_model\.", ""),
    (r"^embeddings\.(token|position)_embedding\.", r"\1_embedding."),
    *ENCODER_LAYER_RULES,
    (r"^final_layer_norm\.", "final_norm."),
]
# `position_ids` is an arange buffer that old transformers saved; we compute it in forward.
DROPPED_KEYS = [r"(cond_stage_model\.transformer\.)?(text_model\.)?embeddings\.position_ids"]


def transformers_name(name: str) -> str:
    """Our name -> the hub file's (`text_model.` prefix): the inverse of KEY_RULES, for saving."""
    rules = [
        (r"^(token|position)_embedding\.", r"embeddings.\1_embedding."),
        (r"^layers\.(\d+)\.attn\.(q|k|v)\.", r"encoder.layers.\1.self_attn.\2_proj."),
        (r"^layers\.(\d+)\.attn\.out\.", r"encoder.layers.\1.self_attn.out_proj."),
        (r"^layers\.(\d+)\.attn_norm\.", r"encoder.layers.\1.layer_norm1."),
        (r"^layers\.(\d+)\.mlp_norm\.", r"encoder.layers.\1.layer_norm2."),
        (r"^layers\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
        (r"^final_norm\.", "final_layer_norm."),
    ]
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return "text_model." + name


def _mismatch_hint(missing, unexpected, mismatched):
    got_shape, want_shape = mismatched.get("token_embedding.weight", ((), ()))
    if len(got_shape) == 2:  # (vocabulary, width); other shapes are named by load_into alone
        got_width, want_width = got_shape[1], want_shape[1]
        if got_width == 1024:
            return (
                "a 1024-wide text encoder: this looks like an SD 2.x (OpenCLIP ViT-H/14) "
                "checkpoint, which minildm does not implement"
            )
        return (
            f"the checkpoint's encoder is {got_width} wide, the config's {want_width}: "
            "config.json belongs to another model (ViT-L/14 is 768, ViT-B/32 512)"
        )
    if any("text_projection" in k for k in unexpected):
        return (
            "a CLIPTextModelWithProjection checkpoint; minildm uses the last hidden state, "
            "not the projection"
        )
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in unexpected):
        return "a whole Stable Diffusion checkpoint: split it into components first"
    return None


def load_clip_text_model(
    config: CLIPTextConfig,
    state_dict: dict,
    device=None,
    dtype=None,
) -> CLIPTextModel:
    with torch.device("meta"):
        model = CLIPTextModel(config)
    weights, file_names = remap_keys(state_dict, KEY_RULES, DROPPED_KEYS)
    model = load_into(
        model,
        weights,
        file_names=file_names,
        device=device,
        dtype=dtype,
        what="CLIP text encoder",
        hint=_mismatch_hint,
    )
    return speed_up(model)  # oneDNN kernels for CPU inference (cpu_speed.py)


# The image tower: hub files carry a `vision_model.` prefix, transformers 5 saves without it.
VISION_KEY_RULES = [
    (r"^vision_model\.", ""),
    (r"^embeddings\.(patch|position)_embedding\.", r"\1_embedding."),
    (r"^embeddings\.class_embedding$", "class_embedding"),
    (r"^pre_layrnorm\.", "pre_norm."),  # sic: transformers spells this one "layrnorm"
    (r"^post_layernorm\.", "post_norm."),
    *ENCODER_LAYER_RULES,
]
VISION_DROPPED_KEYS = [r"(vision_model\.)?embeddings\.position_ids"]


def _vision_mismatch_hint(missing, unexpected, mismatched):
    if any("text_model" in k or "token_embedding" in k for k in unexpected):
        return "a whole CLIPModel (both towers): load its text and image towers separately"
    got, want = mismatched.get("patch_embedding.weight", ((), ()))
    if len(got) == 4 and len(want) == 4:  # (width, channels, patch, patch) each
        return (
            f"the checkpoint's tower is {got[0]} wide with {got[2]}-pixel patches, "
            f"the config's {want[0]} with {want[2]}: config.json belongs to another model"
        )
    return None


def load_clip_vision_model(
    config: CLIPVisionConfig,
    state_dict: dict,
    device=None,
    dtype=None,
) -> CLIPVisionModel:
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    weights, file_names = remap_keys(state_dict, VISION_KEY_RULES, VISION_DROPPED_KEYS)
    model = load_into(
        model,
        weights,
        file_names=file_names,
        device=device,
        dtype=dtype,
        what="CLIP vision tower",
        hint=_vision_mismatch_hint,
    )
    return speed_up(model)  # oneDNN kernels for CPU inference (cpu_speed.py)
