"""DDIM inversion: DDIM's deterministic update run from an image towards noise.

With eta = 0, DDIM (Song, Meng & Ermon 2021, arXiv:2010.02502, eq. 12; ddim.py) is the Euler
discretisation of an ODE (section 4.3, eq. 14), so it can be integrated the other way: from a
clean latent up the noise levels to a latent whose DDIM sampling returns (nearly) that image, the
first step of most image-editing methods (Mokady et al. 2022, "Null-text Inversion",
arXiv:2211.09794, section 3; Hertz et al.'s prompt-to-prompt builds on it). One step goes from
level s to the next, noisier level t:

    x0_hat = (x_s - sqrt(1 - a_s) eps_hat) / sqrt(a_s)
    x_t    = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps_hat

with eps_hat the model's prediction *at t* from x_s: the value at x_t is not known yet, so the
inversion assumes eps changes little over one step. That approximation is why the round trip is
close but not exact, and closer with more steps.

Matches diffusers' DDIMInverseScheduler (the timesteps of DDIMScheduler in increasing order; at
the first step the "previous" level is a clean image, alpha 1, or alphas_cumprod[0] with
set_alpha_to_one=False, as DDIM's final step uses it).
"""

import torch

from minildm.schedulers.common import (
    add_noise,
    check_choice,
    check_num_inference_steps,
    check_timesteps_set,
    config_kwargs,
    frozen_config,
    make_betas,
    spaced_timesteps,
)
from minildm.schedulers.ddim import DDIMScheduler, predicted_x0_and_eps


class DDIMInverseScheduler:
    UNIMPLEMENTED = {"rescale_betas_zero_snr": False}

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
    ):
        self.config = frozen_config(type(self), locals())  # diffusers' scheduler.config
        check_choice("prediction_type", prediction_type, ("epsilon", "sample", "v_prediction"))
        # diffusers' inverse offers no "linspace"
        check_choice("timestep_spacing", timestep_spacing, ("leading", "trailing"))
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
        # the level the first step starts from: DDIM's final "a_{t-1}" (ddim.py)
        if set_alpha_to_one:
            self.initial_alpha_cumprod = torch.tensor(1.0)
        else:
            self.initial_alpha_cumprod = self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = None

    @classmethod
    def from_config(cls, config: dict) -> "DDIMInverseScheduler":
        return cls(**config_kwargs(cls, config))

    @classmethod
    def inverting(cls, ddim: DDIMScheduler) -> "DDIMInverseScheduler":
        """The inverse of a DDIMScheduler: its training schedule, timesteps and prediction type,
        and its final level as the starting one, so that sampling with `ddim` retraces the path."""
        if ddim.timestep_spacing not in ("leading", "trailing"):
            raise ValueError(
                f"DDIM inversion follows 'leading' or 'trailing' timesteps (as diffusers' does); "
                f"this DDIMScheduler's are {ddim.timestep_spacing!r}"
            )
        inverse = cls(
            num_train_timesteps=ddim.num_train_timesteps,
            trained_betas=ddim.betas.tolist(),
            clip_sample=ddim.clip_sample,
            steps_offset=ddim.steps_offset,
            prediction_type=ddim.prediction_type,
            clip_sample_range=ddim.clip_sample_range,
            timestep_spacing=ddim.timestep_spacing,
        )
        inverse.initial_alpha_cumprod = ddim.final_alpha_cumprod
        return inverse

    def set_timesteps(self, num_inference_steps: int, device=None):
        """DDIM's timesteps for num_inference_steps, cleanest first."""
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(
            self.num_train_timesteps, num_inference_steps, self.timestep_spacing, self.steps_offset
        )[::-1].copy()
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
        """x_s -> x_t, t = timestep, s one DDIM step below it; model_output is predicted at t.
        Deterministic: `generator` is accepted (pipelines pass it) and unused."""
        check_timesteps_set(self.timesteps, "step")
        t = int(timestep)
        # the level we come from: one step of T // n below (as DDIM's step goes down by it)
        s = t - self.num_train_timesteps // self.num_inference_steps
        a_s = self.alphas_cumprod[s] if s >= 0 else self.initial_alpha_cumprod
        a_t = self.alphas_cumprod[t]
        x0, eps = predicted_x0_and_eps(self.prediction_type, model_output, sample, a_s)
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return a_t**0.5 * x0 + (1 - a_t) ** 0.5 * eps  # eq. 12 with eta = 0, towards t

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return add_noise(self.alphas_cumprod, original_samples, noise, timesteps)
