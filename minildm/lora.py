"""LoRA, low-rank adaptation: a frozen model learns something new through small matrices added
to some of its layers (Hu et al. 2021, arXiv:2106.09685).

A layer's frozen weight W (out x in) is adapted by the product of two thin matrices (section 4.1,
eq. 3; the alpha / r factor is section 4.1's last paragraph):

    W' = W + (alpha / r) B A,        A: (r x in),  B: (out x r),  r << min(in, out)

A starts random and B at zero, so before training W' = W: the adapted model begins as the base
model exactly. Only A and B learn, r (in + out) numbers instead of in x out: rank 4 on a 96-wide
projection is 768 numbers against 9,216. alpha fixes the update's size as the rank changes
(alpha = r: a factor 1); `scale` is the user's dial at sampling time (0: the base model, 1: the
LoRA as trained, 0.5: half of it).

Two ways to apply it, with the same result (to the rounding of the sums):

- unfused (`add_lora`): each adapted layer becomes a `LoRALayer` that computes
  W x + scale (alpha / r) B (A x); the base weights are untouched, several LoRAs can sit on one
  layer, each with its own scale, and this is the form that trains;
- fused (`fuse_lora`): W + scale (alpha / r) B A is written into the weight and the layer is a
  plain one again: no cost per call. Taking a fused LoRA out means loading the model again.

Here the adapted layers are nn.Linear ones (the attention projections q, k, v, out of the UNet and
the text encoder) and 1x1 nn.Conv2d ones (the UNet's proj_in / proj_out, which many SD 1.x LoRA
files adapt too): a 1x1 convolution is a linear map of each pixel's channels.

Shapes: x (..., in) for a linear layer, (B, in, H, W) for a 1x1 convolution.
"""

import math

import torch
from torch import nn


class LowRankUpdate(nn.Module):
    """(alpha / r) B A: `down` is A (in -> r), `up` is B (r -> out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)  # A
        self.up = nn.Linear(rank, out_features, bias=False)  # B
        # A as nn.Linear initialises it (Kaiming-uniform), B zero: the update starts at zero
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = 1.0

    @property
    def factor(self) -> float:
        return self.scale * self.alpha / self.rank

    def forward(self, x):  # (..., in) -> (..., out)
        return self.up(self.down(x)) * self.factor

    def delta_weight(self) -> torch.Tensor:
        """The update as one matrix, scale (alpha / r) B A: (out, in), in float32."""
        return self.factor * (self.up.weight.float() @ self.down.weight.float())


class LoRALayer(nn.Module):
    """A frozen nn.Linear or 1x1 nn.Conv2d (`base`) plus low-rank updates, by name."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.updates = nn.ModuleDict()

    def forward(self, x):
        y = self.base(x)
        for update in self.updates.values():
            if isinstance(self.base, nn.Conv2d):  # each pixel's channels: (B, C, H, W) last
                y = y + update(x.movedim(1, -1)).movedim(-1, 1)
            else:
                y = y + update(x)
        return y


def adaptable(module: nn.Module) -> bool:
    """The layers a LoRA can adapt: linear ones and 1x1 convolutions."""
    if isinstance(module, nn.Conv2d):
        return module.kernel_size == (1, 1) and module.stride == (1, 1) and module.groups == 1
    return isinstance(module, nn.Linear)


def attention_projections(model: nn.Module) -> list:
    """The names of the q, k, v and out projections of every attention in `model` (the UNet's
    attn1 and attn2, the text encoder's attn): the layers Hu et al. adapt (section 7.1)."""
    return [
        name
        for name, module in model.named_modules()
        if adaptable(module)
        and name.rsplit(".", 1)[-1] in ("q", "k", "v", "out")
        and ".attn" in "." + name
    ]


def add_lora(
    model: nn.Module, names: list, rank: int, alpha: float | None = None, adapter: str = "lora"
) -> dict:
    """Add a rank-`rank` update called `adapter` to each named layer of `model` (wrapping it in a
    LoRALayer the first time). -> {layer name: its LowRankUpdate}, placed on the layer's device
    and dtype."""
    updates = {}
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, LoRALayer):
            if not adaptable(layer):
                raise ValueError(
                    f"{name} is a {type(layer).__name__}: LoRA adapts linear layers "
                    "and 1x1 convolutions"
                )
            layer = LoRALayer(layer)
            _replace(model, name, layer)
        if adapter in layer.updates:
            raise ValueError(f"{name} already holds a LoRA called {adapter!r}")
        weight = layer.base.weight
        out_features, in_features = weight.shape[:2]
        update = LowRankUpdate(in_features, out_features, rank, alpha)
        layer.updates[adapter] = update.to(device=weight.device, dtype=weight.dtype)
        updates[name] = layer.updates[adapter]
    return updates


def lora_layers(model: nn.Module) -> dict:
    """{name: LoRALayer} of every adapted layer of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def set_lora_scale(model: nn.Module, adapter: str, scale: float):
    for layer in lora_layers(model).values():
        if adapter in layer.updates:
            layer.updates[adapter].scale = float(scale)


@torch.no_grad()
def fuse_lora(model: nn.Module) -> nn.Module:
    """Write every update into its layer's weight, W + sum of scale (alpha / r) B A (summed in
    float32, then rounded once to the weight's dtype), and put the plain layer back."""
    for name, layer in lora_layers(model).items():
        weight = layer.base.weight
        delta = sum(update.delta_weight() for update in layer.updates.values())
        weight.copy_((weight.float() + delta.view(weight.shape)).to(weight.dtype))
        _replace(model, name, layer.base)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Take every unfused update out: the base layers, unchanged, back in place."""
    for name, layer in lora_layers(model).items():
        _replace(model, name, layer.base)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
