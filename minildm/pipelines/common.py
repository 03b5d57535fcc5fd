"""What the pipelines share: their output (images as PIL, numpy or torch, rounded the way diffusers
rounds them), the checks of their arguments, the starting noise and the scheduler's step options."""

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from minildm.layers import randn


@dataclass
class PipelineOutput:
    # a list of PIL images, (B, H, W, 3) numpy, or (B, 3, H, W) torch, in [0, 1]
    images: list | np.ndarray | torch.Tensor


def images_out(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) images in [0, 1] -> the requested type; "pil" rounds to 8 bits as diffusers
    does."""
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


def prompt_list(prompt) -> list:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(
            f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}"
        )
    return prompts


def check_image_size(height: int, width: int, factor: int = 8):
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise ValueError(
            f"height and width must be positive multiples of {factor} "
            f"(the autoencoder's downsampling factor), got {height}x{width}"
        )


def check_guidance_scale(guidance_scale):
    """One rule for the three systems: a finite number >= 0 (1 turns classifier-free guidance off in
    SD and VQ-Diffusion, as in diffusers). NaN would run and give NaN images, and a negative or
    string scale would fail deep inside torch, so all are refused here, before any work."""
    is_number = isinstance(guidance_scale, (int, float)) and not isinstance(guidance_scale, bool)
    if not is_number or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(
            f"guidance_scale must be a finite number >= 0 (1 turns guidance off), "
            f"got {guidance_scale!r}"
        )


def check_count(name: str, value):
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_latents(latents: torch.Tensor | None, shape: tuple):
    """The caller's starting latents, if any, must have the shape the call will produce."""
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")


def initial_noise(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Gaussian latents drawn in float32 on the generator's device (the CPU by default), then moved:
    the same seed gives the same image on any device and in any dtype, and the same as diffusers
    with a CPU generator."""
    return randn(shape, generator, device, torch.float32).to(dtype)


def step_options(scheduler, eta: float, generator) -> dict:
    """The keyword arguments of scheduler.step: every minildm scheduler takes `generator`; only DDIM
    has `eta`, and asking another scheduler for eta > 0 is an error rather than silently ignored."""
    import inspect

    options = {"generator": generator}
    if "eta" in inspect.signature(scheduler.step).parameters:
        options["eta"] = eta
    elif eta:
        raise ValueError(
            f"eta={eta} only applies to DDIM; {type(scheduler).__name__} has no eta (pass eta=0.0)"
        )
    return options
