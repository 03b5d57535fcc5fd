"""What every pipeline returns: images as PIL, numpy or torch, the way diffusers rounds them."""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass
class PipelineOutput:
    images: list | np.ndarray | torch.Tensor  # list of PIL images, (B, H, W, 3) numpy, or (B, 3, H, W) torch, in [0, 1]


def images_out(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) images in [0, 1] -> the requested type. "pil" rounds to 8 bits as diffusers does."""
    if output_type == "pt":
        return images
    array = images.float().cpu().permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    if output_type == "np":
        return array
    if output_type == "pil":
        return [Image.fromarray(image) for image in (array * 255).round().astype("uint8")]
    raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")


def check_output_type(output_type: str):
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
