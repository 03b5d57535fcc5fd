"""DPM-Solver++(2M): a second-order multistep solver of the diffusion ODE, good samples in about
20 steps.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"
(arXiv:2211.01095). Write a noisy sample as x_t = alpha_t x_0 + sigma_t eps and measure time by
the log signal-to-noise ratio lambda_t = log(alpha_t / sigma_t). In lambda, the diffusion ODE
written with the model's prediction x0_hat of x_0 (the data prediction) has the exact solution

    x_t = (sigma_t / sigma_s) x_s
          + sigma_t * integral from lambda_s to lambda_t of e^lambda x0_hat dlambda

Taking x0_hat equal to some D over the step, with h = lambda_t - lambda_s > 0, the integral is
done:

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D

First order (DPM-Solver++1, which is DDIM) takes D = x0_hat(x_s). Algorithm 2 (multistep 2M)
extrapolates linearly in lambda from the previous step's prediction, at no extra model call:

    D = (1 + 1/(2r)) x0_hat(x_s) - 1/(2r) x0_hat(x_{s'}),
    r = h_prev / h = (lambda_s - lambda_s') / h

The step sizes come from the noise levels of the schedule. Following diffusers (and Karras et
al.), a level is named by sigma = sqrt((1 - a_t) / a_t), a_t = alphas_cumprod[t]; then
alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t and lambda_t = -log sigma. With
use_karras_sigmas the levels are those of Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models" (arXiv:2206.00364), eq. 5, rho = 7, and the timesteps given to
the model are interpolated from them. The last step lands on sigma = 0, the clean image.

Matches diffusers' DPMSolverMultistepScheduler with algorithm_type="dpmsolver++" (its default).
The schedule helpers below are shared with UniPC (unipc.py).
"""

import numpy as np
import torch

from minildm.schedulers.common import (
    NO_THRESHOLDING,
    at_timesteps,
    check_choice,
    check_num_inference_steps,
    check_timesteps_in_range,
    config_kwargs,
    frozen_config,
    make_betas,
    timestep_index,
)
from minildm.schedulers.sigmas import karras_sigmas, sigma_to_timestep

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SPACINGS = ("linspace", "leading", "trailing")


# --- the schedule, shared by the multistep solvers (DPM-Solver++, UniPC) -------------------------


def multistep_timesteps(
    num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str, steps_offset: int
) -> np.ndarray:
    """The (n,) timesteps, noisiest first. diffusers' multistep solvers place n + 1 points and drop
    the cleanest one, since their last step goes to sigma = 0 rather than to a timestep (so
    "leading" and "linspace" differ from DDIM's)."""
    T, n = num_train_timesteps, num_inference_steps
    if timestep_spacing == "linspace":  # evenly from T - 1 down to 0, 0 dropped
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if (
        timestep_spacing == "leading"
    ):  # multiples of T // (n + 1), 0 dropped, shifted by steps_offset
        multiples = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64)
        return multiples + steps_offset
    # trailing: T - 1, T - 1 - T/n, ... ([:n]: see sigmas.sigma_schedule)
    return np.arange(T, 0, -T / n)[:n].round().astype(np.int64) - 1


def multistep_schedule(
    alphas_cumprod: torch.Tensor,
    num_inference_steps: int,
    timestep_spacing: str,
    steps_offset: int,
    use_karras_sigmas: bool,
) -> tuple[np.ndarray, torch.Tensor]:
    """The timesteps, (n,) float64 (fractional with Karras sigmas: the caller rounds them), and the
    noise levels sigma, (n + 1,) float32, the last one 0. Arithmetic as diffusers': float32
    training sigmas, float64 in numpy."""
    T = len(alphas_cumprod)
    check_num_inference_steps(num_inference_steps, T)
    # (T,) float32, sigma of each training step
    train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
    if use_karras_sigmas:
        # the levels come first, the timesteps follow from them; spacing does not apply
        sigmas = karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), num_inference_steps)
        log_sigmas = np.log(train_sigmas)
        timesteps = np.array([sigma_to_timestep(sigma, log_sigmas) for sigma in sigmas])
    else:
        timesteps = multistep_timesteps(T, num_inference_steps, timestep_spacing, steps_offset)
        check_timesteps_in_range(timesteps, T)
        check_distinct_timesteps(timesteps, timestep_spacing)
        sigmas = train_sigmas[timesteps]
    # (n + 1,): the last step goes to the clean image
    sigmas = np.append(sigmas, 0.0).astype(np.float32)
    return timesteps.astype(np.float64), torch.from_numpy(sigmas)


def check_distinct_timesteps(timesteps: np.ndarray, timestep_spacing: str):
    # e.g. 'leading' with as many steps as training steps
    if len(np.unique(timesteps)) < len(timesteps):
        raise ValueError(
            f"timestep_spacing={timestep_spacing!r} with {len(timesteps)} steps visits a timestep "
            "twice (a step of size 0); use fewer steps"
        )


def alpha_sigma_lambda(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha_t, sigma_t (x_t = alpha_t x_0 + sigma_t eps) and the log-SNR lambda_t of each noise
    level, in float32 as diffusers computes them. At sigma = 0: alpha_t = 1, sigma_t = 0,
    lambda_t = +inf."""
    alpha_t = 1 / (sigmas**2 + 1) ** 0.5
    sigma_t = sigmas * alpha_t
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


def predict_x0(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The model's estimate of the clean sample x_0 from x_t = alpha_t x_0 + sigma_t eps, whatever
    it predicts: the data prediction DPM-Solver++ steps with."""
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "sample":
        return model_output
    # v_prediction (Salimans & Ho 2022, arXiv:2202.00512): v = alpha_t eps - sigma_t x_0
    return alpha_t * sample - sigma_t * model_output


def add_noise_at_levels(
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    level_timesteps: torch.Tensor,
    original_samples: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """x_t = alpha_t x_0 + sigma_t noise at the noise level the schedule has for each timestep (with
    Karras sigmas not quite the training level of the rounded timestep), so that sampling can start
    there. alpha_t, sigma_t: those of each level; level_timesteps: the timestep of each level."""
    alpha = at_timesteps(alpha_t, level_timesteps, timesteps, original_samples)  # (B, 1, 1, 1)
    sigma = at_timesteps(sigma_t, level_timesteps, timesteps, original_samples)
    return alpha * original_samples + sigma * noise


# --- DPM-Solver++ -------------------------------------------------------------------------------


class DPMSolverMultistepScheduler:
    UNIMPLEMENTED = {
        **NO_THRESHOLDING,
        "algorithm_type": "dpmsolver++",
        "euler_at_final": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self.config = frozen_config(type(self), locals())  # diffusers' scheduler.config
        if solver_type in ("bh1", "bh2", "logrho"):
            solver_type = "midpoint"  # a UniPC or DEIS config: diffusers reads it as the default
        check_choice("solver_order", solver_order, (1, 2), why=" (third order is not implemented)")
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("solver_type", solver_type, ("midpoint", "heun"))
        check_choice("timestep_spacing", timestep_spacing, SPACINGS)
        self.num_train_timesteps = num_train_timesteps
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.solver_order = solver_order
        self.solver_type = solver_type
        self.prediction_type = prediction_type
        # lower_order_final changes nothing here: the last step is first order anyway, because it
        # ends at sigma = 0 (lambda = +inf, so r = 0 and 1/(2r) would be infinite); diffusers uses
        # it with final_sigmas_type='sigma_min' and third order, neither implemented here
        self.lower_order_final = lower_order_final
        self.use_karras_sigmas = use_karras_sigmas
        self.beta_schedule = beta_schedule
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.init_noise_sigma = 1.0  # start from pure N(0, I) noise
        self.num_inference_steps = None
        self.timesteps = None  # (n,) int64, from set_timesteps
        self.sigmas = None  # (n + 1,) float32, the noise level of each timestep and a final 0
        self.alpha_t = self.sigma_t = self.lambda_t = None  # (n + 1,) each, from the sigmas
        self.last_index = None  # the place on the schedule of the last step taken

    @classmethod
    def from_config(cls, config: dict) -> "DPMSolverMultistepScheduler":
        if config.get("algorithm_type") == "deis":  # a DEIS config: diffusers reads the default
            config = dict(config, algorithm_type="dpmsolver++")
        return cls(**config_kwargs(cls, config))

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the noise levels to visit, and forget any previous sampling run."""
        timesteps, self.sigmas = multistep_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            self.timestep_spacing,
            self.steps_offset,
            self.use_karras_sigmas,
        )
        # diffusers leaves Karras timesteps of the cosine schedule unrounded: int64 truncates them
        if not (self.use_karras_sigmas and self.beta_schedule == "squaredcos_cap_v2"):
            timesteps = timesteps.round()
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64)).to(device)  # (n,)
        # (n + 1,) each, float32
        self.alpha_t, self.sigma_t, self.lambda_t = alpha_sigma_lambda(self.sigmas)
        self.num_inference_steps = num_inference_steps
        self.x0_predictions = []  # the last solver_order predictions of x_0, newest last
        self.last_index = None  # the place on the schedule of the last step taken

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample  # the model sees x_t unscaled

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x at timesteps[i] -> x at the next level. Deterministic: `generator` is accepted, so that
        every scheduler fits one sampling loop, and unused."""
        i = timestep_index(self.timesteps, timestep, "step", after=self.last_index)
        self.last_index = i
        # the data prediction x0_hat(x_s), (B, C, H, W)
        x0 = predict_x0(
            model_output, sample, self.alpha_t[i], self.sigma_t[i], self.prediction_type
        )
        self.x0_predictions = (self.x0_predictions + [x0])[-self.solver_order :]

        # from level s = i to level t = i + 1
        alpha_t = self.alpha_t[i + 1]
        sigma_t = self.sigma_t[i + 1]
        sigma_s = self.sigma_t[i]
        h = self.lambda_t[i + 1] - self.lambda_t[i]
        # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D, the update of every order
        sample_term = (sigma_t / sigma_s) * sample
        x0_weight = alpha_t * (torch.exp(-h) - 1.0)
        is_last = i == len(self.timesteps) - 1
        # first order (DPM-Solver++1, D = x0_hat(x_s)): no previous prediction yet, or the step to
        # sigma = 0 (where lambda = +inf makes r = 0)
        if len(self.x0_predictions) < 2 or is_last:
            return sample_term - x0_weight * x0

        r = (self.lambda_t[i] - self.lambda_t[i - 1]) / h  # the previous step's size relative to h
        x0_prev = self.x0_predictions[-2]
        if self.solver_type == "midpoint":  # Algorithm 2: D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev
            D = x0 + (x0 - x0_prev) / (2 * r)
            return sample_term - x0_weight * D
        # heun: x0_hat = x0 + (lambda - lambda_s) / h * slope, integrated exactly (midpoint
        # approximates its second term)
        slope = (x0 - x0_prev) / r
        slope_weight = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
        return sample_term - x0_weight * x0 + slope_weight * slope

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return add_noise_at_levels(
            self.alpha_t, self.sigma_t, self.timesteps, original_samples, noise, timesteps
        )
