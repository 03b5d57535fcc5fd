"""Euler ancestral: an Euler step to a lower noise level, then fresh noise back up to the next one.

The ancestral sampler of k-diffusion (Crowson, `sample_euler_ancestral`), in the sigma
parametrization of Karras et al. 2022 (arXiv:2206.00364; see euler.py): a sample is
x = x_0 + sigma * eps with sigma_t = sqrt((1 - a_t) / a_t). Going from sigma to sigma_next, the
step splits sigma_next into a deterministic part sigma_down and a random part sigma_up,

    sigma_up^2   = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2    (the DDPM posterior's variance, in sigma units)
    sigma_down^2 = sigma_next^2 - sigma_up^2

takes the Euler step of the probability-flow ODE down to sigma_down and adds new noise of
standard deviation sigma_up:

    d      = (x - x0_hat) / sigma
    x_next = x + d * (sigma_down - sigma) + sigma_up * z,    z ~ N(0, I)

Matches diffusers' EulerAncestralDiscreteScheduler; the same generator gives the same trajectory.
"""

import torch

from minildm.schedulers.common import check_num_inference_steps, config_kwargs, make_betas, randn
from minildm.schedulers.sigmas import predicted_x0, sigma_schedule, step_index


class EulerAncestralDiscreteScheduler:
    UNIMPLEMENTED = {
        "rescale_betas_zero_snr": False
    }  # the diffusers option kept out, with its neutral value

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
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}"
            )
        if timestep_spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(
                f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {timestep_spacing!r}"
            )
        self.num_train_timesteps, self.steps_offset, self.timestep_spacing = (
            num_train_timesteps,
            steps_offset,
            timestep_spacing,
        )
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
        sigma = self.sigmas[step_index(self.timesteps, timestep, "scale_model_input")]
        return sample / (sigma**2 + 1) ** 0.5

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x at this timestep's noise level -> x at the next one: Euler down to sigma_down, noise up by sigma_up."""
        i = step_index(self.timesteps, timestep, "step")
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sample = sample.float()  # step in float32 even for a float16 model, as diffusers does
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        d = (
            sample - predicted_x0(model_output, sample, sigma, self.prediction_type)
        ) / sigma  # dx/dsigma
        prev_sample = sample + d * (sigma_down - sigma)
        # drawn on the last step too, where sigma_up = 0, so that a generator advances as in diffusers
        noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = prev_sample + noise * sigma_up
        return prev_sample.to(model_output.dtype)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """x = x_0 + sigma_t * noise, in the unscaled form step() works on; one timestep per sample, each
        one of this schedule's (as img2img starts part-way down the schedule)."""
        sigma = self.sigmas[[step_index(self.timesteps, t, "add_noise") for t in timesteps]]
        sigma = sigma.to(original_samples.device, original_samples.dtype).reshape(
            -1, *([1] * (original_samples.ndim - 1))
        )  # (B,) -> (B, 1, 1, 1)
        return original_samples + noise * sigma
