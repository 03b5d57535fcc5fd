"""Noise levels: what the sigma-parameterised samplers (Euler, Euler ancestral, Heun, LMS,
DPM-Solver++, UniPC) share.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(arXiv:2206.00364), write a noisy sample as x = x_0 + sigma * eps. DDPM's x_t = sqrt(a_t) x_0 +
sqrt(1 - a_t) eps (a_t = alphas_cumprod[t]) is such an x divided by sqrt(sigma^2 + 1), with

    sigma_t = sqrt((1 - a_t) / a_t)

so these samplers walk down a sequence of noise levels and tell the model the (possibly
fractional) training timestep of each. Karras et al.'s eq. 5 spaces the levels evenly in
sigma^(1/rho), rho = 7.
"""

import numpy as np
import torch

from minildm.schedulers.common import at_timesteps, check_timesteps_in_range


def sigma_schedule(
    alphas_cumprod: torch.Tensor,
    num_inference_steps: int,
    timestep_spacing: str,
    steps_offset: int,
    use_karras_sigmas: bool = False,
):
    """The timesteps to visit (n,), their noise levels followed by a final 0 (n + 1,), and the
    standard deviation of the starting noise; float32 tensors on the CPU.

    The arithmetic is diffusers': numpy float64 from the float32 training sigmas, then float32, so
    the timesteps are bit-equal to diffusers' and the sigmas agree to float32 rounding.
    """
    T, n = len(alphas_cumprod), num_inference_steps
    if timestep_spacing == "linspace":  # evenly from T - 1 down to 0, fractional in general
        timesteps = np.linspace(0, T - 1, n)[::-1]
    elif timestep_spacing == "leading":  # multiples of T // n from 0, shifted by steps_offset
        timesteps = np.arange(n)[::-1] * (T // n) + steps_offset
    else:  # trailing: T - 1 and every T / n below it, rounded. [:n]: for some n (61, 103, ...)
        # the float arange yields an extra value near 0, which diffusers keeps as a step at -1
        timesteps = np.round(np.arange(T, 0, -T / n))[:n] - 1
    timesteps = timesteps.astype(np.float32)
    check_timesteps_in_range(timesteps, T)

    # (T,) float32, increasing with t
    train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
    # (n,) float64, linear in t between training steps
    sigmas = np.interp(timesteps, np.arange(T), train_sigmas)
    if use_karras_sigmas:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), n)
        log_sigmas = np.log(train_sigmas)
        timesteps = np.array([sigma_to_timestep(sigma, log_sigmas) for sigma in sigmas])
        timesteps = timesteps.astype(np.float32)
    # (n + 1,): the last step lands on sigma = 0, a clean sample
    sigmas = np.append(sigmas, 0.0).astype(np.float32)

    # x_0 + sigma_max * eps has std sqrt(sigma_max^2 + 1) for unit-variance x_0, but diffusers
    # starts from std sigma_max with linspace and trailing spacing: see docs/parity/schedulers.md,
    # "The starting noise of the sigma samplers"
    sigma_max = torch.from_numpy(sigmas)[0]
    if timestep_spacing in ("linspace", "trailing"):
        init_noise_sigma = sigma_max
    else:
        init_noise_sigma = (sigma_max**2 + 1) ** 0.5
    return torch.from_numpy(timesteps), torch.from_numpy(sigmas), init_noise_sigma


def karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et
    al. eq. 5, rho = 7): smaller steps at low noise, where detail is decided. (n,) float64."""
    rho = 7.0
    ramp = np.linspace(0, 1, n)  # i / (n - 1)
    max_inv_rho = sigma_max ** (1 / rho)
    min_inv_rho = sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_timestep(sigma: float, log_sigmas: np.ndarray) -> float:
    """The fractional training timestep whose noise level is sigma: linear interpolation of
    log sigma between the two training steps around it. log_sigmas: (T,) float32, increasing."""
    log_sigma = np.log(max(sigma, 1e-10))  # float64
    # i with log_sigmas[i] <= log_sigma < log_sigmas[i + 1], kept inside the table
    i = np.clip(np.sum(log_sigmas <= log_sigma) - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[i] - log_sigma) / (log_sigmas[i] - log_sigmas[i + 1]), 0, 1)
    return (1 - w) * i + w * (i + 1)


def add_noise_at_sigmas(
    sigmas: torch.Tensor,
    level_timesteps: torch.Tensor,
    original_samples: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """x = x_0 + sigma_t * noise, in the unscaled form the sigma samplers step on, for one timestep
    of the schedule per sample (img2img starts part-way down the schedule). sigmas: the noise
    levels, level_timesteps: the timestep of each level."""
    sigma = at_timesteps(sigmas, level_timesteps, timesteps, original_samples)  # (B, 1, 1, 1)
    return original_samples + noise * sigma


def predicted_x0(
    model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The denoised estimate x0_hat from the model's output, for sample = x_0 + sigma * eps."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        # the model saw x_t = sample / sqrt(sigma^2 + 1) = sqrt(a) x_0 + sqrt(1 - a) eps with
        # a = 1 / (sigma^2 + 1), and v = sqrt(a) eps - sqrt(1 - a) x_0 (Salimans & Ho 2022,
        # arXiv:2202.00512), so x_0 = sqrt(a) x_t - sqrt(1 - a) v
        return sample / (sigma**2 + 1) - sigma / (sigma**2 + 1) ** 0.5 * model_output
    return model_output  # "sample": the model predicts x_0 itself
