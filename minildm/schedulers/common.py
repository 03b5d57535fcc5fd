"""What the schedulers share: the training noise schedule, reading diffusers configs, drawing
noise, finding a step from its timestep, and the input checks.

The forward (noising) process of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models",
arXiv:2006.11239, eq. 4) is fixed by a sequence of betas: x_t = sqrt(alphas_cumprod[t]) x_0 +
sqrt(1 - alphas_cumprod[t]) eps, with alphas_cumprod[t] = prod_{s<=t} (1 - betas[s]). Every
scheduler here starts from the same betas (`make_betas`) and differs in how it walks back.
"""

import inspect
import math
import numbers
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
    LDM code calls "linear" and SD trained with (CompVis/latent-diffusion
    ldm/modules/diffusionmodules/util.py make_beta_schedule). squaredcos_cap_v2: the cosine schedule
    of Nichol & Dhariwal 2021 (arXiv:2102.09672, eq. 17), betas capped at 0.999.
    """
    check_schedule(num_train_timesteps, beta_start, beta_end)
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
        f"unknown beta_schedule {beta_schedule!r}; expected 'linear', 'scaled_linear' or "
        "'squaredcos_cap_v2' (or trained_betas)"
    )


# --- input checks, one per kind, so that the methods using them read without interruption ------


def check_choice(name: str, value, choices: tuple, why: str = ""):
    """A constructor option that takes one of a few values; `why` explains a short list."""
    if value not in choices:
        names = [repr(choice) for choice in choices]
        listed = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise ValueError(f"{name} must be {listed}{why}, got {value!r}")


def check_schedule(num_train_timesteps, beta_start=0.5, beta_end=0.5):
    """The training schedule's arguments, before a table of num_train_timesteps values is made
    (a config's 1e12 would ask for 4 TB)."""
    whole = (
        isinstance(num_train_timesteps, numbers.Integral) and type(num_train_timesteps) is not bool
    )
    if not whole or not 1 <= num_train_timesteps <= 100_000:
        raise ValueError(
            "num_train_timesteps must be an integer from 1 to 100000 (SD trains with 1000), "
            f"got {num_train_timesteps!r}"
        )
    for name, beta in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not is_probability(beta):  # 0 is fine where the schedule ignores it (cosine)
            raise ValueError(f"{name} must be a number in [0, 1], got {beta!r}")


def is_probability(value) -> bool:
    return isinstance(value, numbers.Real) and type(value) is not bool and 0 <= value <= 1


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int):
    is_integer = isinstance(num_inference_steps, int) and not isinstance(num_inference_steps, bool)
    valid = is_integer and 1 <= num_inference_steps <= num_train_timesteps
    if not valid:
        raise ValueError(
            "num_inference_steps must be an integer from 1 to num_train_timesteps "
            f"({num_train_timesteps}), got {num_inference_steps!r}"
        )


def check_timesteps_in_range(timesteps, num_train_timesteps: int):
    if timesteps.max() >= num_train_timesteps:
        outside = int(timesteps.max())
    elif timesteps.min() < 0:
        outside = int(timesteps.min())
    else:
        return
    raise ValueError(
        f"the schedule reaches timestep {outside}, outside the {num_train_timesteps} training "
        "steps (steps_offset with as many steps as training steps?): use fewer steps, or another "
        "steps_offset or timestep_spacing"
    )


def check_timesteps_set(timesteps, method: str):
    if timesteps is None:
        raise RuntimeError(f"call set_timesteps(...) before {method}(): it chooses the steps")


def spaced_timesteps(
    num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str, steps_offset: int = 0
) -> np.ndarray:
    """The n integer training steps to visit, noisiest first (DDPM, DDIM, PNDM), spaced as
    diffusers' DDIMScheduler.set_timesteps spaces them:

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


# --- finding a step on the schedule -------------------------------------------------------------


def timestep_index(timesteps, timestep, method: str, after: int | None = None) -> int:
    """Where `timestep`, a value of the schedule (not a position in it), is in `timesteps`: its
    first place, or with `after` its first place after that one.

    The timestep alone then tells a step where it is, without a hidden counter. `after` serves the
    multistep solvers, which go on from the step last taken because their schedules can hold a
    value twice (Karras sigmas can round two neighbouring levels to the same timestep): see
    docs/parity/schedulers.md, "A repeated timestep: which place a lookup finds".
    """
    check_timesteps_set(timesteps, method)
    start = 0 if after is None else after + 1
    places = (timesteps[start:] == float(timestep)).nonzero()
    if len(places) == 0:
        raise ValueError(timestep_not_found(timesteps, timestep, start))
    return start + int(places[0, 0])


def timestep_not_found(timesteps, timestep, start: int) -> str:
    value = float(timestep)
    shown = int(value) if value.is_integer() else value
    if start == 0:
        return f"timestep {shown} is not one of this schedule's timesteps {timesteps.tolist()}"
    return (
        f"timestep {shown} is not among the steps still to take, {timesteps[start:].tolist()}; "
        "call set_timesteps(...) to start again"
    )


def at_timesteps(values: torch.Tensor, schedule_timesteps, timesteps, like: torch.Tensor):
    """values[i] at each sample's timestep (a value of the schedule, first place), shaped
    (B, 1, 1, 1) to scale `like` and on its device and dtype: img2img starts there."""
    indices = [timestep_index(schedule_timesteps, t, "add_noise") for t in timesteps.flatten()]
    shape = (-1, *([1] * (like.ndim - 1)))  # (B,) -> (B, 1, 1, 1)
    return values[indices].to(like.device, like.dtype).reshape(shape)


# Keys of old hub configs that diffusers no longer reads: ignored when they say nothing different.
LEGACY_KEYS = {"timestep_values": None, "timesteps": 1000}
# Keys the official configs carry for other schedulers' sake, at a value that asks for nothing:
# SD's PNDM config gained clip_sample false in the commit "Make sure the scheduler compatible with
# DDIM" (c47dae7, the hub's scheduler/scheduler_config.json of CompVis/stable-diffusion-v1-4).
NEUTRAL_KEYS = {"clip_sample": False}


class FrozenConfig(dict):
    """A dict that refuses changes, as diffusers' scheduler.config does (copies and pickles)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a scheduler's config is read-only: make a new scheduler with from_config")

    __setitem__ = __delitem__ = __ior__ = update = setdefault = pop = popitem = clear = _refuse

    def __reduce__(self):
        return FrozenConfig, (dict(self),)


def frozen_config(cls, arguments: dict) -> FrozenConfig:
    """A scheduler's constructor arguments (its `locals()` before anything else is assigned), with
    `_class_name` as diffusers writes it: the read-only `scheduler.config` that `from_config` of
    this or another scheduler reads back."""
    values = {key: value for key, value in arguments.items() if key not in ("self", "__class__")}
    return FrozenConfig({"_class_name": cls.__name__, **values})


def config_kwargs(cls, config: dict) -> dict:
    """The keyword arguments for `cls` from a diffusers scheduler_config.json.

    Informational keys (`_class_name`, `_diffusers_version`) are dropped. A diffusers option of this
    algorithm that minildm does not implement (listed in `cls.UNIMPLEMENTED` with its neutral value)
    is an error unless it has that value. Keys of other schedulers (a PNDM config's `skip_prk_steps`
    given to Euler, as the blog post does) do not apply, and are dropped with a warning.
    """
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {}
    dropped = []  # keys of other schedulers
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in accepted:
            kwargs[key] = value
        elif key in cls.UNIMPLEMENTED:
            if value != cls.UNIMPLEMENTED[key]:
                raise ValueError(
                    f"{cls.__name__}: {key}={value!r} is not implemented in minildm "
                    f"(only {cls.UNIMPLEMENTED[key]!r})"
                )
        elif key in NEUTRAL_KEYS and value == NEUTRAL_KEYS[key]:
            continue
        elif key in LEGACY_KEYS:
            # "timesteps" is the old name of num_train_timesteps: harmless when the two agree
            train_steps = config.get("num_train_timesteps", 1000)
            same_as_train_steps = key == "timesteps" and value == train_steps
            if value != LEGACY_KEYS[key] and not same_as_train_steps:
                raise ValueError(
                    f"{cls.__name__}: legacy key {key}={value!r} would change the schedule; give "
                    "num_train_timesteps instead"
                )
        else:
            dropped.append(key)
    if dropped:
        warnings.warn(
            f"{cls.__name__} ignores config keys that do not apply to it: {sorted(dropped)}",
            stacklevel=3,
        )
    return kwargs


# diffusers options with the value that leaves the algorithm unchanged, for the schedulers that
# have them
NO_THRESHOLDING = {
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "rescale_betas_zero_snr": False,
}
