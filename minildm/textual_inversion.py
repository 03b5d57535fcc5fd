"""Textual inversion: a new word for a frozen text-to-image model (Gal et al. 2022,
arXiv:2208.01618, "An Image is Worth One Word").

A placeholder token, "<pink>", is added to the tokenizer, and the text encoder's embedding table
gains one row for it: a vector v in the space of the words it already knows. That vector is the
only thing that learns; the text encoder, the UNet and the autoencoder stay frozen. It is found by
the loss that trained the model (section 3, eq. 2), on a few pictures of the concept with captions
that use the placeholder ("a <pink> circle on a blue background"):

    v* = argmin_v  E_{x, eps, t} || eps - unet(x_t, t, text_encoder(caption with v)) ||^2

Everything the model can draw must already be reachable from its text input: textual inversion
finds the input that asks for the concept, it cannot teach the model to draw what it never could
(a new shape needs LoRA, minildm/lora.py, or more training).

A concept may hold several vectors; the placeholder then stands for several tokens, "<pink>",
"<pink>_1", ..., which the tokenizer writes in its place (tokenizer.py, `expand_placeholders`).

Shapes: V vocabulary size, D the text encoder's width, n the placeholder's number of vectors.
"""

import dataclasses

import torch
from torch import nn


def add_placeholder(tokenizer, text_encoder, token: str, vectors: torch.Tensor) -> list:
    """Give `token` the embedding vectors (n, D) (or one (D,)): new tokenizer ids and new rows of
    the text encoder's token embedding, after the V it has. -> the n new ids."""
    width = text_encoder.token_embedding.weight.shape[1]
    vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.ndim else vectors
    if vectors.ndim != 2 or vectors.shape[1] != width or len(vectors) == 0:
        raise ValueError(
            f"the embedding for {token!r} is {tuple(vectors.shape)}, expected (n, {width}) for "
            f"this {width}-wide text encoder: it was made for another model"
            + (" (768 wide: SD 1.x's CLIP ViT-L/14)" if vectors.shape[-1] == 768 else "")
        )
    if not torch.isfinite(vectors).all():
        raise ValueError(f"the embedding for {token!r} holds NaN or infinite values")
    V = text_encoder.token_embedding.num_embeddings
    if len(tokenizer) != V:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens and the text encoder {V} rows: they "
            "must agree before a placeholder is added to both"
        )
    names = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
    ids = tokenizer.add_tokens(names)  # refuses a token the vocabulary already holds
    grow_token_embedding(text_encoder, vectors)
    return ids


def grow_token_embedding(text_encoder, vectors: torch.Tensor):
    """The token embedding (V, D) -> (V + n, D), the old rows unchanged, the new ones `vectors`."""
    old = text_encoder.token_embedding.weight  # (V, D)
    grown = nn.Embedding(len(old) + len(vectors), old.shape[1], device=old.device, dtype=old.dtype)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([old.detach(), vectors.to(old)]))  # (V + n, D)
    grown.weight.requires_grad_(old.requires_grad)
    text_encoder.token_embedding = grown
    text_encoder.config = dataclasses.replace(text_encoder.config, vocab_size=len(grown.weight))


def placeholder_vectors(text_encoder, ids: list) -> torch.Tensor:
    """The placeholder's vectors (n, D), as they are now (what a file of it stores)."""
    return text_encoder.token_embedding.weight[ids].detach().clone()
