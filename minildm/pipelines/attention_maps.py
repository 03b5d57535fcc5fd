"""Where each word of the prompt looks: cross-attention maps at image resolution, aggregated as
DAAM does (Tang et al. 2022, "What the DAAM: Interpreting Stable Diffusion Using Cross Attention",
arXiv:2210.04885, sec. 3.1): every cross-attention layer's weights softmax(Q K^T / sqrt(d)) for
the prompt's half of the batch, each head's map upsampled to the image (bicubic, clamped at 0),
summed over heads, layers and steps.

The weights are recorded by forward hooks on the UNet's cross-attention modules that recompute
them from the module's own inputs, so the UNet computes exactly what it computes without them
(its output is not touched); the hooks are removed when the call returns, even after an error.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minildm.unet import TransformerBlock


@dataclass
class AttentionMaps:
    image: object  # the PIL image the pipeline drew while the maps were recorded
    tokens: list  # the prompt's tokens between the start and end tokens, as the tokenizer split it
    maps: torch.Tensor  # (len(tokens), H, W) float32: each token's attention mass at each pixel
    shares: dict  # token -> its share of all the attention, with "<start>", "<end>", "<padding>"


@torch.no_grad()
def attention_maps(
    pipe,
    prompt: str,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    height: int | None = None,
    width: int | None = None,
) -> AttentionMaps:
    """Draw `prompt` with `pipe` (a StableDiffusionPipeline or LDMTextToImagePipeline) and return
    the image with one attention map per token of the prompt, at the image's resolution. A token
    that is part of a word (CLIP's BPE, BERT's WordPiece) gets its own map."""
    if not isinstance(prompt, str):
        raise ValueError(f"attention_maps takes one prompt (a string), got {type(prompt).__name__}")
    ids = pipe.tokenizer.encode(prompt)  # [start, tokens ..., end], not padded
    length = pipe.tokenizer.max_length
    if len(ids) > length:
        raise ValueError(
            f"the prompt is {len(ids)} tokens, the text encoder reads {length}: shorten it"
        )
    blocks = [m for m in pipe.unet.modules() if isinstance(m, TransformerBlock)]
    if not blocks:
        raise ValueError("this pipeline's UNet has no cross-attention: it reads no text")
    recorder = Recorder()
    hooks = [block.attn2.register_forward_hook(recorder.record) for block in blocks]
    try:
        # the pipeline's own output type: the maps are aligned with the image it returns
        image = pipe(
            prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
        ).images[0]
    finally:
        for hook in hooks:
            hook.remove()
    total = recorder.total(image.height, image.width)  # (L, H, W), L = the text encoder's length
    mass = total.sum(dim=(1, 2))  # (L,)
    share = (mass / mass.sum()).tolist()
    end = len(ids) - 1
    tokens = [pipe.tokenizer.decode([i]) for i in ids[1:end]]
    shares = {"<start>": share[0]}
    for token, value in zip(tokens, share[1:end]):
        shares[token] = shares.get(token, 0.0) + value
    shares["<end>"] = share[end]
    shares["<padding>"] = sum(share[end + 1 :])
    return AttentionMaps(image=image, tokens=tokens, maps=total[1:end], shares=shares)


class Recorder:
    """Sums each cross-attention call's weights of the last batch entry (the prompt's: guided
    batches are [unconditional, prompt]) per head, at the call's own resolution."""

    def __init__(self):
        self.maps = []  # (L, h, w) float32 per call, summed over heads

    def record(self, module, args, output):
        x, context = args  # (B, N, C), (B, L, D)
        x, context = x[-1:], context[-1:]
        heads, channels = module.heads, x.shape[-1]

        def split_heads(t):  # (1, n, C) -> (heads, n, C / heads)
            return t[0].view(t.shape[1], heads, channels // heads).transpose(0, 1)

        q, k = split_heads(module.q(x)), split_heads(module.k(context))
        scores = q.float() @ k.float().transpose(-2, -1) * (channels // heads) ** -0.5
        weights = scores.softmax(dim=-1)  # (heads, N, L)
        self.maps.append(weights.sum(dim=0).transpose(0, 1))  # (L, N)

    def total(self, height: int, width: int) -> torch.Tensor:
        """(L, height, width): every call's map upsampled to the image and summed. A call with N
        tokens saw the latent grid shrunk by s on each side, N = (height / s) * (width / s)."""
        total = torch.zeros(self.maps[0].shape[0], height, width)
        for weights in self.maps:
            scale = round((height * width / weights.shape[1]) ** 0.5)
            grid = weights.reshape(1, -1, height // scale, width // scale)  # (1, L, h, w)
            upsampled = F.interpolate(grid, size=(height, width), mode="bicubic")
            total += upsampled[0].clamp(min=0)
        return total
