"""Shared test helpers: oracle imports that may not skip in CI, random weights, error measures."""

import importlib
import os

import pytest
import torch


def oracle(module_name: str):
    """Import a reference library (diffusers, transformers). Without it a parity test skips locally,
    but fails under CI=true: a parity suite that silently skipped proves nothing."""
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        message = f"oracle {module_name} is not installed ({e}); pip install -r requirements-dev.txt"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, norms and biases included, so that a swapped or skipped
    part changes the output (default init leaves norm weights 1 and biases 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)
    return module


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|: an error relative to the output's scale."""
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def clip_hub_layout(ours: dict) -> dict:
    """Rename a minildm CLIPTextModel state dict to the hub's layout (transformers 4 names with the
    `text_model.` prefix), to write test files without a reference library."""
    renames = [("token_embedding", "embeddings.token_embedding"), ("position_embedding", "embeddings.position_embedding"),
               ("final_norm", "final_layer_norm"), ("layers.", "encoder.layers."), (".attn_norm", ".layer_norm1"),
               (".mlp_norm", ".layer_norm2"), (".attn.out", ".self_attn.out_proj"), (".attn.q", ".self_attn.q_proj"),
               (".attn.k", ".self_attn.k_proj"), (".attn.v", ".self_attn.v_proj")]
    hub = {}
    for key, value in ours.items():
        for old, new in renames:
            key = key.replace(old, new, 1)
        hub["text_model." + key] = value.contiguous()
    return hub
