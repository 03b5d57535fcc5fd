"""KDPM2 ancestral: a DPM-2 step (kdpm2.py) down to a lower noise level, then fresh noise back up
to the next one.

The ancestral DPM-2 sampler of Crowson's k-diffusion (k_diffusion/sampling.py
`sample_dpm_2_ancestral`, with `get_ancestral_step` at eta = 1), in the sigma parametrization of
Karras et al. 2022 (arXiv:2206.00364; see euler.py): x = x_0 + sigma * eps with sigma_t =
sqrt((1 - a_t) / a_t). As in euler_ancestral.py, going from sigma to sigma_next splits sigma_next
into a deterministic part sigma_down and a random part sigma_up,

    sigma_up^2   = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2   (the DDPM posterior variance)
    sigma_down^2 = sigma_next^2 - sigma_up^2

and the step is DPM-2 (DPM-Solver-2 of Lu et al. 2022, arXiv:2206.00927, Algorithm 1) from sigma
down to sigma_down, its midpoint the geometric mean of the two, followed by new noise of standard
deviation sigma_up:

    sigma_mid = exp((log sigma + log sigma_down) / 2)
    d         = (x - x0_hat(x; sigma)) / sigma                   first stage: Euler to sigma_mid
    x_mid     = x + d * (sigma_mid - sigma)
    d_mid     = (x_mid - x0_hat(x_mid; sigma_mid)) / sigma_mid   second stage
    x_next    = x + d_mid * (sigma_down - sigma) + sigma_up * z,    z ~ N(0, I)

The last step, to sigma_next = 0, is a plain Euler step and draws no noise.

A property of eta = 1 worth knowing: sigma_down = sigma_next^2 / sigma, so sigma_mid =
sqrt(sigma * sigma_down) is sigma_next itself. The second model call of each step is made at the
next level's noise level (to float32 rounding) and, with integer timesteps, at the next level's
timestep: SD's config with leading spacing and 3 steps gives the timesteps [667, 334, 334,
1.0000093, 1], 334 twice. A timestep alone therefore cannot say which stage a call is; the
scheduler keeps the pending first stage, and diffusers counts its calls (test_schedule_values).

The noise levels, their timesteps and the interleaved `timesteps` [t_0, t_mid_0, t_1, ...,
t_{n-1}] are built as in kdpm2.py, with its pitfalls. Matches diffusers'
KDPM2AncestralDiscreteScheduler, timesteps bit for bit; the same generator gives the same
trajectory. One deliberate difference: where diffusers' float32 sigma_down cancels to 0 or below
(the first step from the cosine schedule's sigma_max = 20291, at 2 to 10 linspace steps), its
midpoint and every sample after it are nan, and minildm's are finite
(test_ancestral_cosine_first_step_is_finite).
"""

import torch

from minildm.layers import randn
from minildm.schedulers.common import (
    check_choice,
    check_num_inference_steps,
    check_timesteps_set,
    config_kwargs,
    frozen_config,
    make_betas,
    timestep_index,
)
from minildm.schedulers.kdpm2 import (
    PREDICTION_TYPES,
    SPACINGS,
    interleave,
    level_schedule,
    midpoint_timesteps,
)
from minildm.schedulers.sigmas import add_noise_at_sigmas, predicted_x0


class KDPM2AncestralDiscreteScheduler:
    # diffusers options kept out of minildm, with the value that leaves the algorithm above
    # unchanged
    UNIMPLEMENTED = {"use_exponential_sigmas": False, "use_beta_sigmas": False}
    # model calls per step: pipelines that start part-way down the schedule (img2img) skip 2
    # entries of `timesteps` per step
    order = 2

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self.config = frozen_config(type(self), locals())  # diffusers' scheduler.config
        check_choice(
            "prediction_type", prediction_type, PREDICTION_TYPES, why=" (diffusers has no other)"
        )
        check_choice("timestep_spacing", timestep_spacing, SPACINGS)
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
        self.level_timesteps = None  # (n,) float32: the timestep of each level but the final 0
        self.sigmas = None  # (n + 1,) float32: the noise levels and a final 0
        # (n,) float32 each, per step: the ancestral split of the level it goes to, and the
        # midpoint between its start and sigma_down (0 for the last step, which has none)
        self.up_sigmas = self.down_sigmas = self.mid_sigmas = None
        self.mid_timesteps = None  # (n - 1,) float32: the midpoints' timesteps
        self.timesteps = None  # (2n - 1,) float32: one per model call
        self.init_noise_sigma = None
        # (x, k): the sample a step started from and the step's place, while its second stage is
        # pending; else None
        self.first_stage = None
        self.last_step = None  # the place k of the last step begun

    @classmethod
    def from_config(cls, config: dict) -> "KDPM2AncestralDiscreteScheduler":
        return cls(**config_kwargs(cls, config))

    @property
    def state_in_first_order(self) -> bool:
        """True when the next call starts a step (a level's timestep), False when it finishes one
        (a midpoint's timestep). diffusers' name."""
        return self.first_stage is None

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the noise levels, from sigma_max down to 0, each step's ancestral split and
        midpoint, and the 2n - 1 model calls; forget any step in progress."""
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        level_timesteps, self.sigmas, self.init_noise_sigma = level_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            self.timestep_spacing,
            self.steps_offset,
            self.use_karras_sigmas,
        )
        sigma, sigma_next = self.sigmas[:-1], self.sigmas[1:]  # (n,) each: every step's two ends
        self.up_sigmas = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        # sigma_down^2 is a difference of two nearly equal numbers when sigma_next << sigma; in
        # float32 it comes out 0 or negative below sigma_next / sigma of about 3e-4 (the cosine
        # schedule's first step down from 20291, at 2 to 10 linspace steps), where diffusers'
        # sigma_down, midpoint, timestep and samples are nan. There minildm takes the exact
        # value sigma_next^2 / sigma; elsewhere it keeps diffusers' float32 difference, digits
        # lost and all, so that the midpoints' timesteps stay equal to diffusers'.
        down_squared = sigma_next**2 - self.up_sigmas**2
        exact = sigma_next**2 / sigma
        self.down_sigmas = torch.where(down_squared > 0, down_squared**0.5, exact)
        # the geometric mean of sigma and sigma_down, as k-diffusion writes it. The last step
        # has sigma_down = 0, and lerp(log sigma, -inf) gives -inf + inf = nan there: it is set
        # to 0, the mark of the step without a midpoint (diffusers does the same).
        self.mid_sigmas = sigma.log().lerp(self.down_sigmas.log(), 0.5).exp()
        self.mid_sigmas[-1] = 0.0
        self.mid_timesteps = midpoint_timesteps(self.mid_sigmas[:-1], self.alphas_cumprod)
        self.level_timesteps = level_timesteps.to(device)
        self.mid_timesteps = self.mid_timesteps.to(device)
        self.timesteps = interleave(self.level_timesteps, self.mid_timesteps)  # (2n - 1,)
        self.first_stage = None
        self.last_step = None

    def stage_sigma(self, timestep, method: str):
        """The place k of the step this model call belongs to, and the noise level the model sees
        at it: sigmas[k] when the call starts step k, mid_sigmas[k] when it finishes it."""
        if self.first_stage is None:
            # looked for after the last step begun: rounded Karras timesteps repeat at low noise
            k = timestep_index(self.level_timesteps, timestep, method, after=self.last_step)
            return k, self.sigmas[k]
        k = self.first_stage[1]
        # a midpoint timestep may equal the next level's (see the module docstring): the pending
        # first stage, not the value, says this is the second stage
        if float(timestep) != float(self.mid_timesteps[k]):
            raise ValueError(
                f"{method}(): the step from timestep {self.level_timesteps[k].item()} waits for "
                f"its midpoint, timestep {self.mid_timesteps[k].item()}, got {float(timestep)}; "
                "take the timesteps in order, or call set_timesteps(...) to start again"
            )
        return k, self.mid_sigmas[k]

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1): the variance-preserving x_t the model was trained on, at the level
        or at the midpoint."""
        _, sigma = self.stage_sigma(timestep, "scale_model_input")
        return sample / (sigma**2 + 1) ** 0.5

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One stage of an ancestral DPM-2 step: the first (returns x_mid; on the last step the
        final, clean x), or after it the second (returns x_next, with noise from `generator`)."""
        k, sigma_model = self.stage_sigma(timestep, "step")
        denoised = predicted_x0(model_output, sample, sigma_model, self.prediction_type)
        d = (sample - denoised) / sigma_model  # dx/dsigma where the model looked
        sigma = self.sigmas[k]
        if self.first_stage is None:  # Euler from sigma to the midpoint
            sigma_mid = self.mid_sigmas[k]
            x_mid = sample + d * (sigma_mid - sigma)
            self.last_step = k
            # a second stage follows, except on the last step, whose midpoint is 0
            if sigma_mid > 0:
                self.first_stage = (sample, k)
            return x_mid
        # second stage: `sample` is x_mid; from x down to sigma_down with the midpoint's slope,
        # then fresh noise back up to sigma_next
        x, _ = self.first_stage
        self.first_stage = None
        x_down = x + d * (self.down_sigmas[k] - sigma)
        noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        return x_down + noise * self.up_sigmas[k]

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """x_0 + sigma * noise at any of the schedule's timesteps (img2img starts at a level's).
        A midpoint's timestep gets the level its step lands on, as diffusers' KDPM2 gives it (its
        sigmas, one per model call, repeat each level after the first)."""
        check_timesteps_set(self.timesteps, "add_noise")
        per_call = self.sigmas[(torch.arange(len(self.timesteps)) + 1) // 2]  # (2n - 1,)
        return add_noise_at_sigmas(per_call, self.timesteps, original_samples, noise, timesteps)
