"""KDPM2: the DPM-2 sampler of k-diffusion, a second-order step whose second model call is made at
the midpoint of the step in log sigma.

In the sigma parametrization of Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models" (arXiv:2206.00364; see euler.py), a sample is x = x_0 +
sigma * eps with sigma_t = sqrt((1 - a_t) / a_t), and sampling follows dx/dsigma = (x - x0_hat) /
sigma. From noise level sigma to sigma_next one step of DPM-2 is

    sigma_mid = exp((log sigma + log sigma_next) / 2)            the geometric mean
    d         = (x - x0_hat(x; sigma)) / sigma                   first stage: Euler to sigma_mid
    x_mid     = x + d * (sigma_mid - sigma)
    d_mid     = (x_mid - x0_hat(x_mid; sigma_mid)) / sigma_mid   second stage: the slope there,
    x_next    = x + d_mid * (sigma_next - sigma)                 used for the whole step

and the last step, to sigma_next = 0 (where log sigma_next = -inf), is a plain Euler step. This is
DPM-Solver-2 (Lu et al. 2022, "DPM-Solver", arXiv:2206.00927, Algorithm 1) written for x = x_0 +
sigma * eps: there alpha = 1 and lambda = -log sigma, so its midpoint in lambda is the geometric
mean above and its exponential integrator becomes these two linear steps.
Crowson's k-diffusion (k_diffusion/sampling.py `sample_dpm_2`) places it in the frame of Karras et
al.'s Algorithm 2; diffusers, and minildm, take that algorithm's S_churn = 0 (no noise is added
before a step).

The noise levels are euler.py's (sigmas.sigma_schedule), with one difference: with
use_karras_sigmas (eq. 5, rho = 7) the levels' timesteps are rounded to integers. Each level but
the last gets two model calls, so `timesteps` interleaves the levels' timesteps with the
midpoints' fractional ones, [t_0, t_mid_0, t_1, t_mid_1, ..., t_{n-1}] (2n - 1 entries), and the
scheduler keeps the first stage's x until the second stage uses it. Matches diffusers'
KDPM2DiscreteScheduler, timesteps bit for bit.

Pitfalls met on the way to that (tests/test_scheduler_kdpm2.py shows each):
- Karras timesteps are rounded from float64: rounding their float32 values moves some by 1 (LDM's
  config, leading, 125 steps: 847.49998 is 847.5 in float32, which rounds to 848).
  test_karras_timesteps_are_rounded_from_float64.
- Rounded, they repeat at low noise (SD's config, 50 steps: ..., 1, 1, 0), so a step's level is
  looked for after the last step begun. test_karras_levels_repeat_a_timestep.
- The midpoints' timesteps are computed in float32 with numpy's log, as diffusers does; torch's
  log or float64 would change their last bits. test_midpoint_timesteps_need_numpys_float32_log
  and the parity tests, which compare every timestep exactly.
"""

import numpy as np
import torch

from minildm.schedulers.common import (
    check_choice,
    check_num_inference_steps,
    check_timesteps_set,
    config_kwargs,
    frozen_config,
    make_betas,
    timestep_index,
)
from minildm.schedulers.sigmas import (
    add_noise_at_sigmas,
    karras_sigmas,
    predicted_x0,
    sigma_schedule,
    sigma_to_timestep,
)

# diffusers' KDPM2 classes raise NotImplementedError in step for prediction_type="sample"
PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("linspace", "leading", "trailing")


# --- the schedule, shared with the ancestral variant (kdpm2_ancestral.py) ----------------------


def level_schedule(
    alphas_cumprod: torch.Tensor,
    num_inference_steps: int,
    timestep_spacing: str,
    steps_offset: int,
    use_karras_sigmas: bool,
):
    """The timesteps of the n levels (n,), the levels followed by a final 0 (n + 1,), and the
    standard deviation of the starting noise; float32, on the CPU. sigmas.sigma_schedule's, but
    Karras levels get integer timesteps, as diffusers' KDPM2 rounds them."""
    timesteps, sigmas, init_noise_sigma = sigma_schedule(
        alphas_cumprod, num_inference_steps, timestep_spacing, steps_offset, use_karras_sigmas
    )
    if use_karras_sigmas:
        # rounded from the float64 levels, as diffusers does: a float32 timestep within half a
        # float32 step of k + 1/2 can round the other way (see the module docstring). So the
        # levels are made again here, between the same two ends (the spaced schedule's, float64).
        spaced, _, _ = sigma_schedule(
            alphas_cumprod, num_inference_steps, timestep_spacing, steps_offset
        )
        train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()  # (T,) float32
        ends = np.interp(spaced[[-1, 0]].numpy(), np.arange(len(train_sigmas)), train_sigmas)
        levels = karras_sigmas(ends[0].item(), ends[1].item(), num_inference_steps)
        log_sigmas = np.log(train_sigmas)
        level_timesteps = [sigma_to_timestep(sigma, log_sigmas) for sigma in levels]
        timesteps = torch.from_numpy(np.round(level_timesteps).astype(np.float32))
    return timesteps, sigmas, init_noise_sigma


def midpoint_timesteps(mid_sigmas: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The fractional training timestep of each midpoint noise level, (m,) float32: log sigma
    interpolated linearly between the two training steps around it.

    sigmas.sigma_to_timestep does the same in float64; diffusers computes the midpoints' timesteps
    in float32 instead, with numpy's float32 log (which differs from torch's in the last bit for
    about one input in twelve), and so does this function, one value at a time, so that the
    timesteps given to the model are bit-equal to diffusers'.
    """
    train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()  # (T,) float32
    log_sigmas = np.log(train_sigmas)  # (T,) float32, increasing with t
    last = len(log_sigmas) - 2  # the lower end of the last interval
    timesteps = []
    for sigma in mid_sigmas.numpy():  # np.float32 each
        log_sigma = np.log(np.maximum(sigma, np.float32(1e-10)))
        # i with log_sigmas[i] <= log_sigma < log_sigmas[i + 1], kept inside the table; a Python
        # int, so that the arithmetic below stays float32
        i = min(max(int(np.sum(log_sigmas <= log_sigma)) - 1, 0), last)
        w = np.clip((log_sigmas[i] - log_sigma) / (log_sigmas[i] - log_sigmas[i + 1]), 0, 1)
        timesteps.append((1 - w) * i + w * (i + 1))
    return torch.from_numpy(np.array(timesteps, dtype=np.float32).reshape(-1))


def interleave(level_timesteps: torch.Tensor, mid_timesteps: torch.Tensor) -> torch.Tensor:
    """[t_0, t_mid_0, t_1, t_mid_1, ..., t_mid_{n-2}, t_{n-1}]: one entry per model call, (2n - 1,).
    level_timesteps: (n,); mid_timesteps: (n - 1,), the last step having no midpoint."""
    pairs = torch.stack([mid_timesteps, level_timesteps[1:]], dim=1)  # (n - 1, 2)
    return torch.cat([level_timesteps[:1], pairs.flatten()])


# --- DPM-2 --------------------------------------------------------------------------------------


class KDPM2DiscreteScheduler:
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
        # (n,) float32: the midpoint of each step; 0 for the last step, which has none
        self.mid_sigmas = None
        self.mid_timesteps = None  # (n - 1,) float32: the midpoints' timesteps
        self.timesteps = None  # (2n - 1,) float32: one per model call
        self.init_noise_sigma = None
        # (x, k): the sample a step started from and the step's place, while its second stage is
        # pending; else None
        self.first_stage = None
        self.last_step = None  # the place k of the last step begun

    @classmethod
    def from_config(cls, config: dict) -> "KDPM2DiscreteScheduler":
        return cls(**config_kwargs(cls, config))

    @property
    def state_in_first_order(self) -> bool:
        """True when the next call starts a step (a level's timestep), False when it finishes one
        (a midpoint's timestep). diffusers' name."""
        return self.first_stage is None

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the noise levels, from sigma_max down to 0, their midpoints, and the 2n - 1 model
        calls; forget any step in progress."""
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        level_timesteps, self.sigmas, self.init_noise_sigma = level_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            self.timestep_spacing,
            self.steps_offset,
            self.use_karras_sigmas,
        )
        # mid[k] = exp(lerp(log sigma_{k+1}, log sigma_k, 1/2)): the geometric mean, in diffusers'
        # order of lerp's two ends (the other order differs in the last bit, and so would the
        # timesteps). For the last step log 0 = -inf makes it 0: that step is Euler's.
        log_levels = self.sigmas.log()  # (n + 1,), -inf last
        self.mid_sigmas = log_levels[1:].lerp(log_levels[:-1], 0.5).exp()  # (n,)
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
            # (SD's config at 50 steps ends ..., 1, 1, 0), where diffusers counts its calls
            k = timestep_index(self.level_timesteps, timestep, method, after=self.last_step)
            return k, self.sigmas[k]
        k = self.first_stage[1]
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
        """One stage of a DPM-2 step: the first (returns x_mid; on the last step x_next), or after
        it the second (returns x_next). Deterministic: `generator` is accepted, so that a pipeline
        can pass one to any scheduler, and unused."""
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
        # second stage: `sample` is x_mid; the whole step from x with the midpoint's slope
        x, _ = self.first_stage
        self.first_stage = None
        return x + d * (self.sigmas[k + 1] - sigma)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """x_0 + sigma * noise at any of the schedule's timesteps (img2img starts at a level's).
        A midpoint's timestep gets the level its step lands on, as diffusers' KDPM2 gives it (its
        sigmas, one per model call, repeat each level after the first)."""
        check_timesteps_set(self.timesteps, "add_noise")
        per_call = self.sigmas[(torch.arange(len(self.timesteps)) + 1) // 2]  # (2n - 1,)
        return add_noise_at_sigmas(per_call, self.timesteps, original_samples, noise, timesteps)
