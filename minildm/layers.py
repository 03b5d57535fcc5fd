"""The few parts several models truly share: normalisations whose statistics are computed in
float32, the attention function written out, the token-id check of the two text encoders, and how
random noise is drawn (by the autoencoder's posterior, the pipelines and the schedulers).

Everything else that looks alike across models (the UNet's ResBlock takes a timestep embedding, the
autoencoder's does not; the UNet's multi-head attention and VQ-Diffusion's differ in their biases)
lives in the file of the model it belongs to, so each model file reads on its own.

Shapes: B batch, H heads, L tokens, Dh channels per head.
"""

import torch
import torch.nn.functional as F
from torch import nn


def randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (the CPU without one), then moved to `device`:
    a seed gives the same numbers whatever device the model runs on, and the same numbers as
    diffusers' `randn_tensor` given a CPU generator."""
    draw_on = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


def rand(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Uniform noise in [0, 1), drawn by the same rule as `randn`."""
    draw_on = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


class FP32GroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32 whatever the input dtype: a half-precision
    variance over 512 channels x 4096 pixels loses most of its digits."""

    def forward(self, x):
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm whose mean and variance are computed in float32, whatever the input dtype:
    in fp16/bf16 the variance of a wide vector loses most of its digits."""

    def forward(self, x):
        weight, bias = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def attention(q, k, v, causal: bool):
    """softmax(Q K^T / sqrt(Dh)) V, written out for the reader; q, k, v are (B, H, L, Dh).

    The softmax runs in float32 (a half-precision softmax over 77 scores loses small weights).
    `F.scaled_dot_product_attention(q, k, v, is_causal=causal)` computes the same; at 77 tokens (or
    257 image patches) the explicit form costs little. The image models, with thousands of pixels
    as tokens, call that fused kernel instead: it never materialises the (L x L) score matrix.
    """
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, L, L)
    if causal:  # token i may attend to tokens 0..i only (CLIP was trained left to right)
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    weights = scores.float().softmax(dim=-1).to(v.dtype)
    return weights @ v  # (B, H, L, Dh)


def check_input_ids(input_ids, vocab_size: int, max_length: int):
    """Refuse what would otherwise fail deep inside an embedding lookup, with a message that
    helps."""
    is_tensor = isinstance(input_ids, torch.Tensor)
    if not is_tensor or input_ids.dtype != torch.long or input_ids.ndim != 2:
        dtype = getattr(input_ids, "dtype", type(input_ids))
        shape = tuple(getattr(input_ids, "shape", ()))
        raise TypeError(
            f"expected input_ids as a LongTensor [B, L] (from the tokenizer), got {dtype} {shape}"
        )
    if input_ids.shape[1] > max_length:
        raise ValueError(
            f"{input_ids.shape[1]} tokens given; the model has {max_length} positions "
            "(truncate with the tokenizer)"
        )
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); "
            f"got [{input_ids.min().item()}, {input_ids.max().item()}]: "
            "was a different tokenizer used?"
        )
