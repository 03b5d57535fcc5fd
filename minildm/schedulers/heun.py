"""Heun: the second-order sampler of Karras et al. 2022, two model evaluations per step.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(arXiv:2206.00364), Algorithm 1, in the sigma parametrization of euler.py: x = x_0 + sigma * eps
with sigma_t = sqrt((1 - a_t) / a_t). From noise level sigma to sigma_next:

    d       = (x - x0_hat(x; sigma)) / sigma                          Euler stage (lines 3-4)
    x_euler = x + d * (sigma_next - sigma)
    d'      = (x_euler - x0_hat(x_euler; sigma_next)) / sigma_next    correction (lines 5-7),
    x_next  = x + (d + d') / 2 * (sigma_next - sigma)                 skipped when sigma_next = 0

The noise levels are those of euler.py, Karras sigmas (eq. 5, rho = 7) included. Each model
evaluation is one entry of `timesteps`, so every level after the first appears twice: once to
finish the step into it, once to start the step out of it. A timestep alone thus cannot say
which stage it is; the scheduler keeps the Euler stage's (x, d, sigma_next - sigma) until the
correction uses them. Matches diffusers' HeunDiscreteScheduler.
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


class HeunDiscreteScheduler:
    # diffusers options kept out of minildm, with the value that leaves the algorithm above
    # unchanged
    UNIMPLEMENTED = {
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "clip_sample": False,
        "clip_sample_range": 1.0,
    }
    # model calls per step: pipelines that start part-way down the schedule (img2img) skip 2
    # entries per step
    order = 2

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
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
        # (n,) float32: the timestep of each noise level but the final 0
        self.level_timesteps = None
        self.sigmas = None  # (n + 1,) float32: the noise levels and a final 0
        # (2n - 1,) float32: one per model evaluation, levels after the first repeated
        self.timesteps = None
        self.init_noise_sigma = None
        # (x, d, dt) of the Euler stage while its correction is pending, else None
        self.euler_stage = None

    @classmethod
    def from_config(cls, config: dict) -> "HeunDiscreteScheduler":
        return cls(**config_kwargs(cls, config))

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the noise levels, from sigma_max down to 0, and the 2n - 1 model evaluations
        between them."""
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        level_timesteps, self.sigmas, self.init_noise_sigma = sigma_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            self.timestep_spacing,
            self.steps_offset,
            self.use_karras_sigmas,
        )
        self.level_timesteps = level_timesteps.to(device)
        # [t0, t1, t1, t2, t2, ...]: the first of each pair ends a step (correction), the second
        # starts the next (Euler)
        repeated = [level_timesteps[:1], level_timesteps[1:].repeat_interleave(2)]
        self.timesteps = torch.cat(repeated).to(device)  # (2n - 1,)
        self.euler_stage = None  # a new schedule starts with an Euler stage

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1): the variance-preserving x_t the model was trained on (the same
        for both stages)."""
        sigma = self.sigmas[timestep_index(self.level_timesteps, timestep, "scale_model_input")]
        return sample / (sigma**2 + 1) ** 0.5

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One stage of a Heun step: the Euler stage (returns x_euler), or, after it, the correction
        (returns x_next). Deterministic: `generator` is accepted, so that a pipeline can pass one to
        any scheduler, and unused."""
        # the model saw `sample` at noise level sigmas[i]
        i = timestep_index(self.level_timesteps, timestep, "step")
        sigma = self.sigmas[i]
        denoised = predicted_x0(model_output, sample, sigma, self.prediction_type)
        d = (sample - denoised) / sigma  # dx/dsigma here, as in euler.py
        if self.euler_stage is None:  # Euler stage, from sigmas[i] to sigmas[i + 1] (lines 3-4)
            sigma_next = self.sigmas[i + 1]
            dt = sigma_next - sigma
            x_euler = sample + d * dt
            # a correction follows; the last step, to sigma = 0, stays a plain Euler step
            if sigma_next > 0:
                self.euler_stage = (sample, d, dt)
            return x_euler
        # correction (lines 5-7): `sample` is x_euler at sigmas[i]; redo the step from x with the
        # average of both slopes
        x, d_euler, dt = self.euler_stage
        self.euler_stage = None
        d_mean = (d_euler + d) / 2
        return x + d_mean * dt

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        # the levels' own timesteps: each level after the first is in `timesteps` twice
        return add_noise_at_sigmas(
            self.sigmas, self.level_timesteps, original_samples, noise, timesteps
        )
