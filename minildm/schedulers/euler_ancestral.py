"""Euler ancestral: an Euler step to a lower noise level, then fresh noise back up to the next one.

The ancestral sampler of k-diffusion (Crowson, k_diffusion/sampling.py `sample_euler_ancestral`
and `get_ancestral_step`), in the sigma
parametrization of Karras et al. 2022 (arXiv:2206.00364; see euler.py): a sample is
x = x_0 + sigma * eps with sigma_t = sqrt((1 - a_t) / a_t). Going from sigma to sigma_next, the
step splits sigma_next into a deterministic part sigma_down and a random part sigma_up,

    sigma_up^2   = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2
    sigma_down^2 = sigma_next^2 - sigma_up^2

(sigma_up^2 is the DDPM posterior's variance, in sigma units), takes the Euler step of the
probability-flow ODE down to sigma_down and adds new noise of standard deviation sigma_up:

    d      = (x - x0_hat) / sigma                     the derivative dx/dsigma
    dt     = sigma_down - sigma
    x_next = x + d * dt + sigma_up * z,    z ~ N(0, I)

Matches diffusers' EulerAncestralDiscreteScheduler; the same generator gives the same trajectory.
"""

import torch

from minildm.layers import randn
from minildm.schedulers.common import (
    check_choice,
    check_num_inference_steps,
    config_kwargs,
    frozen_config,
    make_betas,
    timestep_index,
)
from minildm.schedulers.sigmas import add_noise_at_sigmas, predicted_x0, sigma_schedule


class EulerAncestralDiscreteScheduler:
    UNIMPLEMENTED = {
        "rescale_betas_zero_snr": False
    }  # the diffusers option kept out, neutral value

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        # diffusers' class offers neither "sample" prediction nor Karras sigmas
        self.config = frozen_config(type(self), locals())  # diffusers' scheduler.config
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        check_choice("timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        self.num_train_timesteps = num_train_timesteps
        self.steps_offset = steps_offset
        self.timestep_spacing = timestep_spacing
        self.prediction_type = prediction_type
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_inference_steps = None
        self.timesteps = None  # (n,) float32, from set_timesteps
        self.sigmas = None  # (n + 1,) float32, the noise level of each timestep and a final 0
        self.init_noise_sigma = None

    @classmethod
    def from_config(cls, config: dict) -> "EulerAncestralDiscreteScheduler":
        return cls(**config_kwargs(cls, config))

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the noise levels to visit, from sigma_max down to 0."""
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        timesteps, self.sigmas, self.init_noise_sigma = sigma_schedule(
            self.alphas_cumprod, num_inference_steps, self.timestep_spacing, self.steps_offset
        )
        self.timesteps = timesteps.to(device)  # sigmas stay on the CPU, as in euler.py

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
        """x at this timestep's noise level -> x at the next one: Euler down to sigma_down, noise
        up by sigma_up."""
        i = timestep_index(self.timesteps, timestep, "step")
        sigma = self.sigmas[i]
        sigma_next = self.sigmas[i + 1]
        sample = sample.float()  # step in float32 even for a float16 model, as diffusers does
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        denoised = predicted_x0(model_output, sample, sigma, self.prediction_type)
        d = (sample - denoised) / sigma  # dx/dsigma, as in euler.py
        dt = sigma_down - sigma
        prev_sample = sample + d * dt  # the Euler step down to sigma_down
        # drawn on the last step too, where sigma_up = 0, so that a generator advances as in
        # diffusers
        noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = prev_sample + noise * sigma_up  # fresh noise back up to sigma_next
        return prev_sample.to(model_output.dtype)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return add_noise_at_sigmas(self.sigmas, self.timesteps, original_samples, noise, timesteps)
