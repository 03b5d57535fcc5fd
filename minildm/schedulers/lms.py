"""LMS: the linear multistep sampler of k-diffusion, stepping in the noise level sigma.

Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models" (arXiv:2206.00364) write sampling as an ODE in the noise level (their eqs. 1 and 3 with
sigma(t) = t; the d_i of their Algorithm 1):

    dx/dsigma = (x - D(x; sigma)) / sigma

for the sample in "variance exploding" form x = x_0 + sigma * eps, where D is the model's estimate
of x_0. A DDPM sample x_t is x / sqrt(sigma^2 + 1) with sigma_t = sqrt((1 - a_t) / a_t), a_t =
alphas_cumprod[t]. Katherine Crowson's k-diffusion (`sample_lms`) solves it with the classic
linear multistep (Adams-Bashforth) method on the uneven sigma grid: the derivatives d_i, d_{i-1},
... of the last `order` steps are interpolated by a polynomial in sigma, and that is integrated
over the step:

    x_{i+1} = x_i + sum_j d_{i-j} * integral from sigma_i to sigma_{i+1} of l_j(sigma) dsigma

with l_j the Lagrange basis polynomial that is 1 at sigma_{i-j} and 0 at the other sigmas. On an
even grid these weights are the textbook (55, -59, 37, -9) / 24 of 4th-order Adams-Bashforth.
use_karras_sigmas spaces the sigmas as the paper's eq. 5, evenly in sigma^(1/7).

Matches diffusers' LMSDiscreteScheduler, including its choices: "linspace" timesteps are not
rounded (the model is told fractional steps, with sigma interpolated between training steps),
and the starting noise is scaled by sigma_max, or by sqrt(sigma_max^2 + 1) with "leading".
"""

import torch
from numpy.polynomial import Polynomial

from minildm.schedulers.common import (
    check_choice,
    check_num_inference_steps,
    config_kwargs,
    frozen_config,
    make_betas,
    timestep_index,
)
from minildm.schedulers.sigmas import add_noise_at_sigmas, predicted_x0, sigma_schedule


def lms_coefficients(sigmas: list[float], sigma_next: float) -> list[float]:
    """The weight of each past derivative in one linear multistep step from sigmas[0] to
    sigma_next.

    sigmas are the noise levels of the derivatives, newest first. Weight j is the integral over the
    step of the Lagrange basis polynomial l_j (1 at sigmas[j], 0 at the others). diffusers
    integrates it numerically with scipy; being a polynomial, it integrates exactly, which keeps
    scipy out of minildm's dependencies (docs/parity/schedulers.md, "LMS weights: exact integrals
    against scipy's quadrature"). sigma is measured from sigmas[0] so that the antiderivative is 0
    at the start of the step and no large numbers cancel.
    """
    weights = []
    for j, sigma_j in enumerate(sigmas):
        basis = Polynomial([1.0])
        for k, sigma_k in enumerate(sigmas):
            if k != j:  # l_j(s) = prod over k != j of (s - sigma_k) / (sigma_j - sigma_k)
                basis = basis * Polynomial([-(sigma_k - sigmas[0]), 1.0]) / (sigma_j - sigma_k)
        weights.append(float(basis.integ()(sigma_next - sigmas[0])))
    return weights


class LMSDiscreteScheduler:
    UNIMPLEMENTED = {"use_exponential_sigmas": False, "use_beta_sigmas": False}

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self.config = frozen_config(type(self), locals())  # diffusers' scheduler.config
        check_choice("prediction_type", prediction_type, ("epsilon", "sample", "v_prediction"))
        check_choice("timestep_spacing", timestep_spacing, ("leading", "trailing", "linspace"))
        self.num_train_timesteps = num_train_timesteps
        self.steps_offset = steps_offset
        self.timestep_spacing = timestep_spacing
        self.use_karras_sigmas = use_karras_sigmas
        self.prediction_type = prediction_type
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self.init_noise_sigma = None  # depends on the schedule: set by set_timesteps
        # dx/dsigma of the last (up to `order`) steps, newest last: all LMS remembers
        self.derivatives = []

    @classmethod
    def from_config(cls, config: dict) -> "LMSDiscreteScheduler":
        return cls(**config_kwargs(cls, config))

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the noise levels to visit, from noisiest to clean (sigma = 0 after the last
        step)."""
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        timesteps, self.sigmas, init_noise_sigma = sigma_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            self.timestep_spacing,
            self.steps_offset,
            self.use_karras_sigmas,
        )
        # (n,) float32; self.sigmas (n + 1,) stays on the CPU: steps read a few as numbers
        self.timesteps = timesteps.to(device)
        self.init_noise_sigma = float(init_noise_sigma)
        self.derivatives = []

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x -> x / sqrt(sigma^2 + 1): the DDPM x_t the model was trained on."""
        sigma = self.sigmas[timestep_index(self.timesteps, timestep, "scale_model_input")]
        return sample / (sigma**2 + 1) ** 0.5

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        order: int = 4,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x at sigma_i -> x at sigma_{i+1}, using up to `order` derivatives. Call it once per
        timestep, in order. Deterministic: `generator` is accepted, so that a pipeline can pass one
        to any scheduler, and unused."""
        i = timestep_index(self.timesteps, timestep, "step")
        sigma = self.sigmas[i]
        denoised = predicted_x0(model_output, sample, sigma, self.prediction_type)
        d = (sample - denoised) / sigma  # dx/dsigma, Karras et al.'s eqs. 1 and 3
        # the polynomial goes through the derivatives known so far (diffusers counts the steps of
        # the schedule instead: the same from the first timestep on, not when sampling starts
        # mid-schedule as img2img does)
        self.derivatives = (self.derivatives + [d])[-order:]

        # sigma_i, sigma_{i-1}, ...: the levels of the derivatives, newest first
        past_sigmas = [float(self.sigmas[i - j]) for j in range(len(self.derivatives))]
        weights = lms_coefficients(past_sigmas, float(self.sigmas[i + 1]))
        newest_first = reversed(self.derivatives)
        # sum_j d_{i-j} * integral of l_j over the step
        multistep_update = sum(w * d_j for w, d_j in zip(weights, newest_first, strict=True))
        return sample + multistep_update

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return add_noise_at_sigmas(self.sigmas, self.timesteps, original_samples, noise, timesteps)
