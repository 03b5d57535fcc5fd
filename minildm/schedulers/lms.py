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

from minildm.schedulers.common import check_num_inference_steps, config_kwargs, make_betas
from minildm.schedulers.sigmas import sigma_schedule


def lms_coefficients(sigmas: list[float], sigma_next: float) -> list[float]:
    """The weight of each past derivative in one linear multistep step from sigmas[0] to sigma_next.

    sigmas are the noise levels of the derivatives, newest first. Weight j is the integral over the
    step of the Lagrange basis polynomial l_j (1 at sigmas[j], 0 at the others). diffusers integrates
    it numerically with scipy; being a polynomial, it integrates exactly, which keeps scipy out of
    minildm's dependencies. sigma is measured from sigmas[0] so that the antiderivative is 0 at
    the start of the step and no large numbers cancel.
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
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}"
            )
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(
                f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {timestep_spacing!r}"
            )
        self.num_train_timesteps, self.steps_offset, self.timestep_spacing = (
            num_train_timesteps,
            steps_offset,
            timestep_spacing,
        )
        self.use_karras_sigmas, self.prediction_type = use_karras_sigmas, prediction_type
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self.init_noise_sigma = None  # depends on the schedule: set by set_timesteps
        self.derivatives = []  # dx/dsigma of the last (up to `order`) steps, newest last: all LMS remembers

    @classmethod
    def from_config(cls, config: dict) -> "LMSDiscreteScheduler":
        return cls(**config_kwargs(cls, config))

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the noise levels to visit, from noisiest to clean (sigma = 0 after the last step)."""
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        timesteps, self.sigmas, init_noise_sigma = sigma_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            self.timestep_spacing,
            self.steps_offset,
            self.use_karras_sigmas,
        )
        self.timesteps = timesteps.to(
            device
        )  # (n,) float32; self.sigmas (n + 1,) stays on the CPU: steps read a few as numbers
        self.init_noise_sigma = float(init_noise_sigma)
        self.derivatives = []

    def index_for_timestep(self, timestep) -> int:
        """The position of `timestep` in `timesteps` (they are all different)."""
        if self.timesteps is None:
            raise RuntimeError(
                "call set_timesteps(num_inference_steps) before step(), scale_model_input() or add_noise()"
            )
        matches = (self.timesteps == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(
                f"timestep {float(timestep)} is not one of this schedule's timesteps {self.timesteps.tolist()}"
            )
        return int(matches[0, 0])

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x -> x / sqrt(sigma^2 + 1): the DDPM x_t the model was trained on."""
        sigma = self.sigmas[self.index_for_timestep(timestep)]
        return sample / (sigma**2 + 1) ** 0.5

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        order: int = 4,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x at sigma_i -> x at sigma_{i+1}, using up to `order` derivatives. Call it once per timestep, in
        order. Deterministic: `generator` is accepted, so that a pipeline can pass one to any scheduler, and unused."""
        i = self.index_for_timestep(timestep)
        sigma = self.sigmas[i]
        if self.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        elif self.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction on the model's input x / sqrt(sigma^2 + 1), whose alphas_cumprod is 1 / (sigma^2 + 1)
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        derivative = (sample - x0) / sigma  # dx/dsigma
        # the polynomial goes through the derivatives known so far (diffusers counts the steps of the schedule
        # instead: the same from the first timestep on, not when sampling starts mid-schedule as img2img does)
        self.derivatives = (self.derivatives + [derivative])[-order:]

        past_sigmas = [
            float(self.sigmas[i - j]) for j in range(len(self.derivatives))
        ]  # sigma_i, sigma_{i-1}, ...
        weights = lms_coefficients(past_sigmas, float(self.sigmas[i + 1]))
        return sample + sum(w * d for w, d in zip(weights, reversed(self.derivatives)))

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """x = x_0 + sigma * noise, at timesteps of this schedule (one per sample)."""
        indices = [self.index_for_timestep(t) for t in timesteps]
        sigma = self.sigmas.to(original_samples.device, original_samples.dtype)[indices]
        sigma = sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))  # (B,) -> (B, 1, 1, 1)
        return original_samples + noise * sigma
