"""DDIM: deterministic (eta = 0) or partly stochastic sampling on a subsequence of the training
steps.

Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (arXiv:2010.02502), eq. 12:

    x_{t-1} = sqrt(a_{t-1}) * x0_hat                       "predicted x_0"
            + sqrt(1 - a_{t-1} - sigma_t^2) * eps_hat      "direction pointing to x_t"
            + sigma_t * z                                  random noise, z ~ N(0, I)

with a_t = alphas_cumprod[t], x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t), and
sigma_t = eta * sqrt((1 - a_{t-1}) / (1 - a_t)) * sqrt(1 - a_t / a_{t-1}) (eq. 16). Matches
diffusers' DDIMScheduler and, with steps_offset=1 and set_alpha_to_one=False, the CompVis
DDIMSampler (CompVis/latent-diffusion ldm/models/diffusion/ddim.py DDIMSampler.make_schedule,
built on make_ddim_timesteps and make_ddim_sampling_parameters of
ldm/modules/diffusionmodules/util.py): see docs/parity/schedulers.md, "DDIM's first timestep and
final alpha: CompVis against the hub configs".
"""

import torch

from minildm.layers import randn
from minildm.schedulers.common import (
    NO_THRESHOLDING,
    add_noise,
    check_choice,
    check_num_inference_steps,
    check_timesteps_set,
    config_kwargs,
    frozen_config,
    make_betas,
    spaced_timesteps,
)


class DDIMScheduler:
    UNIMPLEMENTED = NO_THRESHOLDING

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
    ):
        self.config = frozen_config(type(self), locals())  # diffusers' scheduler.config
        check_choice("prediction_type", prediction_type, ("epsilon", "sample", "v_prediction"))
        check_choice("timestep_spacing", timestep_spacing, ("leading", "trailing", "linspace"))
        self.num_train_timesteps = num_train_timesteps
        self.steps_offset = steps_offset
        self.timestep_spacing = timestep_spacing
        self.clip_sample = clip_sample
        self.clip_sample_range = clip_sample_range
        self.prediction_type = prediction_type
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        # the "a_{t-1}" of the last step: 1 (a clean image), or the first training step's value as
        # CompVis does
        if set_alpha_to_one:
            self.final_alpha_cumprod = torch.tensor(1.0)
        else:
            self.final_alpha_cumprod = self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0  # start from pure N(0, I) noise
        self.num_inference_steps = None
        self.timesteps = None

    @classmethod
    def from_config(cls, config: dict) -> "DDIMScheduler":
        return cls(**config_kwargs(cls, config))

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the num_inference_steps training steps to visit, from noisiest to cleanest."""
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(
            self.num_train_timesteps, num_inference_steps, self.timestep_spacing, self.steps_offset
        )
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample  # DDIM's model sees x_t unscaled

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x_t -> x_{t-1} by eq. 12; eta = 0 is deterministic, eta = 1 is DDPM-like noise."""
        check_timesteps_set(self.timesteps, "step")
        t = int(timestep)
        # diffusers always steps back by T // n, whatever the spacing; so do we, to match it
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

        x0, eps = self.predicted_x0_and_eps(model_output, sample, a_t)  # x0_hat, eps_hat
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)

        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # sigma_t^2 / eta^2, eq. 16
        sigma = eta * variance**0.5
        # the three terms of eq. 12
        predicted_x0_term = a_prev**0.5 * x0  # "predicted x_0"
        direction_to_x_t = (1 - a_prev - sigma**2) ** 0.5 * eps  # "direction pointing to x_t"
        prev_sample = predicted_x0_term + direction_to_x_t
        if eta > 0:
            z = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            random_noise = sigma * z  # sigma_t z, "random noise"
            prev_sample = prev_sample + random_noise
        return prev_sample

    def predicted_x0_and_eps(self, model_output: torch.Tensor, sample: torch.Tensor, a_t):
        return predicted_x0_and_eps(self.prediction_type, model_output, sample, a_t)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return add_noise(self.alphas_cumprod, original_samples, noise, timesteps)


def predicted_x0_and_eps(
    prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, a_t
):
    """The model's estimates of x_0 and of the noise eps in x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,
    whichever of the two (or v) it predicts. Also DDIM inversion's (ddim_inverse.py)."""
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - a_t**0.5 * x0) / (1 - a_t) ** 0.5
    else:
        # v_prediction (Salimans & Ho 2022, arXiv:2202.00512): v = sqrt(a) eps - sqrt(1 - a) x0
        x0 = a_t**0.5 * sample - (1 - a_t) ** 0.5 * model_output
        eps = a_t**0.5 * model_output + (1 - a_t) ** 0.5 * sample
    return x0, eps
