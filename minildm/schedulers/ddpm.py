"""DDPM: ancestral sampling, the original reverse process of a diffusion model.

Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239). Each step
samples x_{t-1} from the Gaussian posterior q(x_{t-1} | x_t, x0_hat) (eq. 6-7):

    mean     = sqrt(a_prev) beta_t / (1 - a_t) * x0_hat
               + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) * x_t
    variance = (1 - a_prev) / (1 - a_t) * beta_t      ("fixed_small"; "fixed_large" uses beta_t)

where a_t = alphas_cumprod[t], and over a subsequence of steps alpha_t = a_t / a_prev and
beta_t = 1 - alpha_t. Matches diffusers' DDPMScheduler.
"""

import torch

from minildm.layers import randn
from minildm.schedulers.common import (
    NO_THRESHOLDING,
    add_noise,
    check_choice,
    check_num_inference_steps,
    config_kwargs,
    frozen_config,
    make_betas,
    spaced_timesteps,
    timestep_index,
)


class DDPMScheduler:
    UNIMPLEMENTED = NO_THRESHOLDING

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        self.config = frozen_config(type(self), locals())  # diffusers' scheduler.config
        check_choice(
            "variance_type",
            variance_type,
            ("fixed_small", "fixed_large"),
            why=" (learned variances are not implemented)",
        )
        check_choice("prediction_type", prediction_type, ("epsilon", "sample", "v_prediction"))
        check_choice("timestep_spacing", timestep_spacing, ("leading", "trailing", "linspace"))
        self.num_train_timesteps = num_train_timesteps
        self.steps_offset = steps_offset
        self.timestep_spacing = timestep_spacing
        self.variance_type = variance_type
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = None

    @classmethod
    def from_config(cls, config: dict) -> "DDPMScheduler":
        return cls(**config_kwargs(cls, config))

    def set_timesteps(self, num_inference_steps: int, device=None):
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(
            self.num_train_timesteps, num_inference_steps, self.timestep_spacing, self.steps_offset
        )
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        t = int(timestep)
        index = timestep_index(self.timesteps, t, "step")
        prev_t = int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        alpha_t = a_t / a_prev  # over the skipped steps
        beta_t = 1 - alpha_t

        if self.prediction_type == "epsilon":
            x0 = (sample - (1 - a_t) ** 0.5 * model_output) / a_t**0.5
        elif self.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = a_t**0.5 * sample - (1 - a_t) ** 0.5 * model_output
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)

        # the posterior mean mu_tilde_t(x_t, x0_hat), eq. 7
        x0_coefficient = a_prev**0.5 * beta_t / (1 - a_t)
        sample_coefficient = alpha_t**0.5 * (1 - a_prev) / (1 - a_t)
        posterior_mean = x0_coefficient * x0 + sample_coefficient * sample
        if t == 0:
            return posterior_mean  # the last step adds no noise
        if self.variance_type == "fixed_small":
            # the posterior's own variance beta_tilde_t, eq. 7
            variance = torch.clamp((1 - a_prev) / (1 - a_t) * beta_t, min=1e-20)
        else:
            variance = beta_t  # the upper bound, beta_t
        z = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        return posterior_mean + variance**0.5 * z  # a sample of eq. 6

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return add_noise(self.alphas_cumprod, original_samples, noise, timesteps)
