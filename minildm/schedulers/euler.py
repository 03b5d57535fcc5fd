"""Euler: the first-order sampler of the probability-flow ODE over noise levels sigma.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(arXiv:2206.00364). Write a noisy sample as x = x_0 + sigma * eps. DDPM's x_t = sqrt(a_t) x_0 +
sqrt(1 - a_t) eps (a_t = alphas_cumprod[t]) is such an x divided by sqrt(sigma^2 + 1), with

    sigma_t = sqrt((1 - a_t) / a_t)

so a trained noise predictor gives a denoiser x0_hat(x; sigma), and sampling follows the ODE
dx/dsigma = (x - x0_hat) / sigma (the paper's ODE with sigma(t) = t) from sigma_max down to 0. This file
takes one Euler step per noise level, the first-order part of Algorithm 1 (lines 3-4):

    d      = (x - x0_hat) / sigma
    x_next = x + d * (sigma_next - sigma)

The noise levels are the training sigmas interpolated at the chosen timesteps, or with
use_karras_sigmas the levels of eq. 5 (rho = 7) between the same two ends, each mapped back to a
fractional timestep for the model. Matches diffusers' EulerDiscreteScheduler.

The noise-level helpers it shares with the other sigma samplers are in sigmas.py.
"""

import torch

from minildm.schedulers.common import check_num_inference_steps, config_kwargs, make_betas
from minildm.schedulers.sigmas import predicted_x0, sigma_schedule, step_index


class EulerDiscreteScheduler:
    # diffusers options kept out of minildm, with the value that leaves the algorithm above unchanged
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
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}"
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
        self.prediction_type, self.use_karras_sigmas = prediction_type, use_karras_sigmas
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
        # sigmas stay on the CPU: a 0-dim CPU tensor combines with a sample on any device, without a transfer per step

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
        """x at this timestep's noise level -> x at the next one, one Euler step (Algorithm 1, lines 3-4).

        `generator` is accepted so one sampling loop serves every scheduler, and unused: this step is
        deterministic (diffusers' optional "churn" noise, s_churn and co., is not implemented).
        """
        i = step_index(self.timesteps, timestep, "step")
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sample = sample.float()  # step in float32 even for a float16 model, as diffusers does
        d = (
            sample - predicted_x0(model_output, sample, sigma, self.prediction_type)
        ) / sigma  # dx/dsigma
        prev_sample = sample + d * (sigma_next - sigma)
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
