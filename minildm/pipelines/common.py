"""What the pipelines share: their output (images as PIL, numpy or torch, rounded the way diffusers
rounds them), the checks of their arguments, the starting noise and the scheduler's step options."""

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from minildm import schedulers
from minildm.checkpoints.weights import check_dtype, usable_device
from minildm.layers import randn


@dataclass
class PipelineOutput:
    # a list of PIL images, (B, H, W, 3) numpy, or (B, 3, H, W) torch, in [0, 1]
    images: list | np.ndarray | torch.Tensor


def move_models(models: list, device=None, dtype=None):
    """A pipeline's `to`: each model (None for one left out) to `device` and `dtype`; a dtype
    given first is taken as the dtype, as diffusers does."""
    if isinstance(device, torch.dtype):
        device, dtype = None, device
    if device is not None:
        usable_device(device)
    check_dtype(dtype)
    for model in models:
        if model is not None:
            model.to(device=device, dtype=dtype)


def image_array(image: Image.Image, channels: int = 3) -> np.ndarray:
    """A PIL image -> (H, W, channels) float32 in [0, 1], each mode by its own range: 8 bits per
    channel (L, RGB, P, RGBA ...) / 255; 16-bit grayscale (I;16, as 16-bit PNGs open, and I, as
    they convert) / 65535; float (F) as it is, which must lie in [0, 1]. PIL's convert("RGB")
    would clip those to 0 or 255: an all-white or all-black image."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)  # (H, W), one channel
        top = 1.0 if mode == "F" else 65535.0
        finite = np.isfinite(values).all()
        if not finite or values.min() < 0 or values.max() > top:
            found = f"[{values.min():g}, {values.max():g}]" if finite else "inf/nan values"
            raise ValueError(
                f"a mode-{mode} image must hold values in [0, {top:g}], this one holds {found}: "
                "convert it to an 8- or 16-bit image first"
            )
        gray = (values / top).astype(np.float32)
        return np.repeat(gray[..., None], channels, axis=2)
    converted = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.float32)
    return (converted / 255).reshape(*converted.shape[:2], channels)


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


def is_integer(value) -> bool:
    """An int (numpy's too), and not a bool: True is an int to Python, but never a count or a
    size."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_image_size(height: int, width: int, factor: int = 8):
    if not (is_integer(height) and is_integer(width)):
        raise TypeError(
            f"height and width must be integers (positive multiples of {factor}), got "
            f"{height!r} ({type(height).__name__}) and {width!r} ({type(width).__name__})"
        )
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise ValueError(
            f"height and width must be positive multiples of {factor} "
            f"(the autoencoder's downsampling factor), got {height}x{width}"
        )


def check_guidance_scale(guidance_scale, off_below_one: bool = False):
    """One rule for the three systems: a finite number >= 0. NaN would run and give NaN images,
    and a negative or string scale would fail deep inside torch, so all are refused here, before
    any work. 1 turns classifier-free guidance off everywhere; below 1, SD and VQ-Diffusion
    (`off_below_one`) run unguided too, as diffusers' pipelines do (guidance only when the scale
    is above 1), while LDM blends toward the unconditional prediction (diffusers guides at any
    scale but 1): the same number means two things, so SD and VQ-Diffusion say so."""
    if not is_number(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(
            f"guidance_scale must be a finite number >= 0 (1 turns guidance off), "
            f"got {guidance_scale!r}"
        )
    if off_below_one and guidance_scale < 1:
        warnings.warn(
            f"guidance_scale={guidance_scale:g} is below 1: this pipeline, as diffusers', then runs "
            "unguided, the same as guidance_scale=1 (only the LDM pipeline blends toward the "
            "unconditional prediction below 1)",
            stacklevel=3,
        )


def is_number(value) -> bool:
    """A real int or float (numpy's too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_generator(generator):
    """None (the global RNG) or one torch.Generator: a seed number given here by mistake would
    otherwise fail deep in the noise draw."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or None, "
            f"got {type(generator).__name__} {generator!r}"
        )


def check_eta(eta):
    """DDIM's eta (Song et al. 2021, eq. 16) scales the noise of each step: 0 is deterministic,
    1 DDPM's variance. Above 1 the step's noise variance exceeds 1 - alpha_bar_prev, and the
    direction term's square root (eq. 12) turns NaN, so [0, 1] is the range."""
    if not is_number(eta) or not 0 <= eta <= 1:
        raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM), got {eta!r}")


def check_sampler(scheduler, discrete: bool = False):
    """pipe.scheduler must be a minildm scheduler that samples: VQDiffusionScheduler for the codes
    of VQ-Diffusion (discrete), any other but DDIMInverseScheduler for the latents of the UNet
    pipelines. A diffusers scheduler has other step() arguments and outputs; the inverse one runs
    from an image towards noise."""
    name = type(scheduler).__name__
    if type(scheduler).__module__.split(".")[0] == "diffusers":
        raise ValueError(
            f"pipe.scheduler is diffusers' {name}: minildm's pipelines take minildm's schedulers, "
            f"e.g. minildm.schedulers.{name}.from_config(its config)"
        )
    if discrete != isinstance(scheduler, schedulers.VQDiffusionScheduler):
        wanted = "VQDiffusionScheduler" if discrete else "a latent sampler (DDIMScheduler, ...)"
        raise ValueError(f"pipe.scheduler is a {name}; this pipeline samples with {wanted}")
    if isinstance(scheduler, schedulers.DDIMInverseScheduler):
        raise ValueError(
            "pipe.scheduler is a DDIMInverseScheduler, which runs from an image towards noise and "
            "cannot generate one: StableDiffusionPipeline.invert uses it; sample with DDIMScheduler"
        )
    known = tuple(getattr(schedulers, name) for name in schedulers.__all__)
    if not isinstance(scheduler, known):
        raise ValueError(f"pipe.scheduler is a {name}; expected one of minildm.schedulers")


def check_count(name: str, value):
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_latents(latents: torch.Tensor | None, shape: tuple):
    """The caller's starting latents, if any, must have the shape the call will produce, and be
    finite: a NaN there would come out as a black image, or as a NaN error blamed on a later step."""
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor):
        raise TypeError(
            f"latents must be a torch.Tensor of shape {shape}, got {type(latents).__name__}"
        )
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        bad = int((~torch.isfinite(latents)).sum())
        raise ValueError(f"latents hold {bad} inf/nan value(s): pass finite starting latents")


EXPLODED = 1e4  # a UNet input this large means an earlier step blew the latents up


def check_finite_step(
    latents, model_input, model_output, noise_prediction, guidance_scale, step: int, t, scheduler
):
    """After each step: latents that turned inf/nan are reported at the step they appeared, with
    their cause, rather than surfacing at decode as a black image or an error about the
    autoencoder. The input was checked finite before the loop, so the cause is the UNet's output
    (in float16, an overflow past 65504), the guidance (a scale so large that
    u + s * (c - u) overflows), or the scheduler's arithmetic. model_output is the UNet's raw
    output, noise_prediction what the scheduler was given; guidance_scale is None when the run
    is unguided."""
    if torch.isfinite(latents).all():
        return
    where = f"the latents became inf/nan at step {step + 1} (timestep {int(t)})"
    largest_input = float(model_input.abs().max())
    if not torch.isfinite(model_output).all() and largest_input > EXPLODED:
        # the UNet only failed on latents an earlier step had already blown up (its input is
        # normally within about +-10: unit-variance x_t, or scaled so by scale_model_input)
        cause = (
            f"guidance_scale={guidance_scale:g} amplified the difference of the UNet's two "
            "predictions; use a smaller scale (7.5 is SD's usual)"
            if guidance_scale is not None and guidance_scale > 100
            else f"{type(scheduler).__name__}.step made them grow"
        )
        raise FloatingPointError(
            f"{where}: the UNet's input had already grown to {largest_input:.3g} (normally within "
            f"about 10) in the steps before: {cause}"
        )
    if not torch.isfinite(model_output).all():
        if model_output.dtype == torch.float16:
            raise FloatingPointError(
                f"{where}: the UNet's output overflowed float16 (largest value 65504). Run the "
                "UNet in float32 or bfloat16 (dtype=torch.float32, or --dtype bfloat16)."
            )
        raise FloatingPointError(
            f"{where}: the UNet returned inf/nan in {model_output.dtype} from finite input; "
            "its weights may be damaged (download them again) or not the model's"
        )
    if guidance_scale is not None and not torch.isfinite(noise_prediction).all():
        raise FloatingPointError(
            f"{where}: the UNet's predictions are finite, but guidance_scale={guidance_scale:g} "
            f"pushed their combination past {model_output.dtype}'s range; use a smaller scale "
            "(7.5 is SD's usual)"
        )
    raise FloatingPointError(
        f"{where}: the UNet's prediction is finite; {type(scheduler).__name__}.step produced them"
    )


def check_finite_text(context: torch.Tensor, encoder: str = "text encoder"):
    """The prompt's embeddings, before the UNet sees them: inf/nan here would otherwise surface
    as the UNet's failure."""
    if torch.isfinite(context).all():
        return
    if context.dtype == torch.float16:
        raise FloatingPointError(
            f"the {encoder} overflowed float16 (largest value 65504) on the prompt; run it in "
            "float32 or bfloat16 (dtype=torch.float32, or --dtype bfloat16)"
        )
    raise FloatingPointError(
        f"the {encoder} returned inf/nan in {context.dtype} for the prompt; its weights may be "
        "damaged (download them again) or not the model's"
    )


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
