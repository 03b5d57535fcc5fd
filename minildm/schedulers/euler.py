"""Euler: the first-order sampler of the probability-flow ODE over noise levels sigma.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(arXiv:2206.00364). Write a noisy sample as x = x_0 + sigma * eps. DDPM's x_t = sqrt(a_t) x_0 +
sqrt(1 - a_t) eps (a_t = alphas_cumprod[t]) is such an x divided by sqrt(sigma^2 + 1), with

    sigma_t = sqrt((1 - a_t) / a_t)

so a trained noise predictor gives a denoiser x0_hat(x; sigma), and sampling follows the ODE
dx/dsigma = (x - x0_hat) / sigma (the paper's eqs. 1 and 3 with sigma(t) = t) from sigma_max down
to 0. This file takes one Euler step per noise level, the first-order part of Algorithm 1
(lines 3-4):

    d      = (x - x0_hat) / sigma          the derivative dx/dsigma
    dt     = sigma_next - sigma            the step, negative
    x_next = x + d * dt

The noise levels are the training sigmas interpolated at the chosen timesteps, or with
use_karras_sigmas the levels of eq. 5 (rho = 7) between the same two ends, each mapped back to a
fractional timestep for the model. Matches diffusers' EulerDiscreteScheduler.

The noise-level helpers it shares with the other sigma samplers are in sigmas.py.
"""

import torch

from minildm.schedulers.common import (
    check_choice,
    check_num_inference_steps,
    config_kwargs,
    frozen_config,
    make_betas,
    timestep_index,
)
from minildm.schedulers.sigmas import add_noise_at_sigmas, predicted_x0, sigma_schedule


class EulerDiscreteScheduler:
    # diffusers options kept out of minildm, with the value that leaves the algorithm above
    # unchanged
    UNIMPLEMENTED = {
        "interpolation_type": "linear",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_type": "discrete",
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self.config = frozen_config(type(self), locals())  # diffusers' scheduler.config
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
        check_choice("timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        self.num_train_timesteps = num_train_timesteps
        self.steps_offset = steps_offset
        self.timestep_spacing = timestep_spacing
        self.prediction_type = prediction_type
        self.use_karras_sigmas = use_karras_sigmas
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_inference_steps = None
        self.timesteps = None  # (n,) float32, from set_timesteps
        self.sigmas = None  # (n + 1,) float32, the noise level of each timestep and a final 0
        self.init_noise_sigma = None

    @classmethod
    def from_config(cls, config: dict) -> "EulerDiscreteScheduler":
        return cls(**config_kwargs(cls, config))

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the noise levels to visit, from sigma_max down to 0."""
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        timesteps, self.sigmas, self.init_noise_sigma = sigma_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            self.timestep_spacing,
            self.steps_offset,
            self.use_karras_sigmas,
        )
        self.timesteps = timesteps.to(device)
        # sigmas stay on the CPU: a 0-dim CPU tensor combines with a sample on any device, without
        # a transfer per step

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1): the variance-preserving x_t the model was trained on."""
        sigma = self.sigmas[timestep_index(self.timesteps, timestep, "scale_model_input")]
        return sample / (sigma**2 + 1) ** 0.5

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x at this timestep's noise level -> x at the next one, one Euler step (Algorithm 1,
        lines 3-4).

        `generator` is accepted so one sampling loop serves every scheduler, and unused: this step
        is deterministic (diffusers' optional "churn" noise, s_churn and co., is not implemented).
        """
        i = timestep_index(self.timesteps, timestep, "step")
        sigma = self.sigmas[i]
        sigma_next = self.sigmas[i + 1]
        sample = sample.float()  # step in float32 even for a float16 model, as diffusers does
        denoised = predicted_x0(model_output, sample, sigma, self.prediction_type)
        d = (sample - denoised) / sigma  # dx/dsigma, eqs. 1 and 3 with sigma(t) = t
        dt = sigma_next - sigma
        prev_sample = sample + d * dt  # the Euler step
        return prev_sample.to(model_output.dtype)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return add_noise_at_sigmas(self.sigmas, self.timesteps, original_samples, noise, timesteps)
