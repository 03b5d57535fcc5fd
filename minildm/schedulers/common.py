"""What the schedulers share: the training noise schedule, reading diffusers configs, drawing noise.

The forward (noising) process of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models",
arXiv:2006.11239, eq. 4) is fixed by a sequence of betas: x_t = sqrt(alphas_cumprod[t]) x_0 +
sqrt(1 - alphas_cumprod[t]) eps, with alphas_cumprod[t] = prod_{s<=t} (1 - betas[s]). Every
scheduler here starts from the same betas (`make_betas`) and differs in how it walks back.
"""

import inspect
import math
import warnings

import numpy as np
import torch


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas=None,
) -> torch.Tensor:
    """The betas of the training noise schedule, (num_train_timesteps,) float32.

    linear: evenly spaced betas (Ho et al. 2020). scaled_linear: evenly spaced sqrt(beta), what the
    LDM code calls "linear" and SD trained with (facts 6.1). squaredcos_cap_v2: the cosine schedule of
    Nichol & Dhariwal 2021 (arXiv:2102.09672, eq. 17), betas capped at 0.999.
    """
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return (
            torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32)
            ** 2
        )
    if beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(t):  # the fraction of signal left at time t in [0, 1]
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        return torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
            dtype=torch.float32,
        )
    raise ValueError(
        f"unknown beta_schedule {beta_schedule!r}; expected 'linear', 'scaled_linear' or 'squaredcos_cap_v2' (or trained_betas)"
    )


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int):
    if (
        not isinstance(num_inference_steps, int)
        or not 1 <= num_inference_steps <= num_train_timesteps
    ):
        raise ValueError(
            f"num_inference_steps must be an integer from 1 to num_train_timesteps ({num_train_timesteps}), got {num_inference_steps!r}"
        )


def spaced_timesteps(
    num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str, steps_offset: int = 0
) -> np.ndarray:
    """The n integer training steps to visit, noisiest first (DDPM, DDIM, PNDM), spaced as diffusers does:

    leading   0, T//n, 2 T//n, ... shifted by steps_offset (SD: 1, 21, ..., 981 for 50 steps)
    trailing  T - 1, T - 1 - T/n, ... rounded; np.arange yields one value too many for some n
              (61, 103, ...), which diffusers keeps as a step at timestep -1: minildm keeps n
    linspace  evenly from T - 1 down to 0, both ends included, rounded
    """
    T, n = num_train_timesteps, num_inference_steps
    if timestep_spacing == "leading":
        timesteps = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    elif timestep_spacing == "trailing":
        timesteps = np.round(np.arange(T, 0, -T / n))[:n].astype(np.int64) - 1
    else:
        timesteps = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    check_timesteps_in_range(timesteps, T)
    return timesteps.copy()


def check_timesteps_in_range(timesteps, num_train_timesteps: int):
    if timesteps.max() >= num_train_timesteps or timesteps.min() < 0:
        raise ValueError(
            f"the schedule reaches timestep {int(timesteps.max()) if timesteps.max() >= num_train_timesteps else int(timesteps.min())}, "
            f"outside the {num_train_timesteps} training steps (steps_offset with as many steps as training steps?): "
            "use fewer steps, or another steps_offset or timestep_spacing"
        )


def randn(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Gaussian noise drawn as diffusers' `randn_tensor` draws it: on the generator's device (a CPU
    generator gives the same numbers whatever device the model is on), then moved."""
    device = torch.device(device)
    noise_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=noise_device, dtype=dtype).to(device)


def add_noise(
    alphas_cumprod: torch.Tensor,
    original_samples: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise (Ho et al. 2020, eq. 4), one t per sample."""
    a = alphas_cumprod.to(original_samples.device, original_samples.dtype)[
        timesteps.to(original_samples.device)
    ]
    a = a.flatten().reshape(-1, *([1] * (original_samples.ndim - 1)))  # (B,) -> (B, 1, 1, 1)
    return a**0.5 * original_samples + (1 - a) ** 0.5 * noise


# Keys of old hub configs that diffusers no longer reads: ignored when they say nothing different.
LEGACY_KEYS = {"timestep_values": None, "timesteps": 1000}
# Keys the official configs carry for other schedulers' sake, at a value that asks for nothing:
# SD's PNDM config has clip_sample false "to make it compatible with DDIM" (facts 1.3).
NEUTRAL_KEYS = {"clip_sample": False}


def config_kwargs(cls, config: dict) -> dict:
    """The keyword arguments for `cls` from a diffusers scheduler_config.json.

    Informational keys (`_class_name`, `_diffusers_version`) are dropped. A diffusers option of this
    algorithm that minildm does not implement (listed in `cls.UNIMPLEMENTED` with its neutral value)
    is an error unless it has that value. Keys of other schedulers (a PNDM config's `skip_prk_steps`
    given to Euler, as the blog post does) do not apply, and are dropped with a warning.
    """
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs, dropped = {}, []
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in accepted:
            kwargs[key] = value
        elif key in cls.UNIMPLEMENTED:
            if value != cls.UNIMPLEMENTED[key]:
                raise ValueError(
                    f"{cls.__name__}: {key}={value!r} is not implemented in minildm (only {cls.UNIMPLEMENTED[key]!r})"
                )
        elif key in NEUTRAL_KEYS and value == NEUTRAL_KEYS[key]:
            continue
        elif key in LEGACY_KEYS:
            if value != LEGACY_KEYS[key] and not (
                key == "timesteps" and value == config.get("num_train_timesteps", 1000)
            ):
                raise ValueError(
                    f"{cls.__name__}: legacy key {key}={value!r} would change the schedule; give num_train_timesteps instead"
                )
        else:
            dropped.append(key)
    if dropped:
        warnings.warn(
            f"{cls.__name__} ignores config keys that do not apply to it: {sorted(dropped)}",
            stacklevel=3,
        )
    return kwargs


# diffusers options with the value that leaves the algorithm unchanged, for the schedulers that have them
NO_THRESHOLDING = {
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "rescale_betas_zero_snr": False,
}
