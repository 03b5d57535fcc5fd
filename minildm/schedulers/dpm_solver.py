"""DPM-Solver++(2M): a second-order multistep solver of the diffusion ODE, good samples in about 20 steps.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"
(arXiv:2211.01095). Write a noisy sample as x_t = alpha_t x_0 + sigma_t eps and measure time by the
log signal-to-noise ratio lambda_t = log(alpha_t / sigma_t). In lambda, the diffusion ODE written with
the model's prediction x0_hat of x_0 has the exact solution

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral from lambda_s to lambda_t of e^lambda x0_hat dlambda

Taking x0_hat equal to some D over the step, with h = lambda_t - lambda_s > 0, the integral is done:

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D

First order (DPM-Solver++1, which is DDIM) takes D = x0_hat(x_s).
Algorithm 2 (multistep 2M) extrapolates linearly in lambda from the previous step's prediction, at no
extra model call:

    D = (1 + 1/(2r)) x0_hat(x_s) - 1/(2r) x0_hat(x_{s'}),    r = h_prev / h = (lambda_s - lambda_s') / h

The step sizes come from the noise levels of the schedule. Following diffusers (and Karras et al.), a
level is named by sigma = sqrt((1 - a_t) / a_t), a_t = alphas_cumprod[t]; then alpha_t = 1 / sqrt(1 + sigma^2),
sigma_t = sigma alpha_t and lambda_t = -log sigma. With use_karras_sigmas the levels are those of Karras et
al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (arXiv:2206.00364), eq. 5,
rho = 7, and the timesteps given to the model are interpolated from them. The last step lands on sigma = 0,
the clean image.

Matches diffusers' DPMSolverMultistepScheduler with algorithm_type="dpmsolver++" (its default). The
schedule helpers below are shared with UniPC (unipc.py).
"""

import numpy as np
import torch

from minildm.schedulers.common import (
    NO_THRESHOLDING,
    check_num_inference_steps,
    check_timesteps_in_range,
    config_kwargs,
    make_betas,
)
from minildm.schedulers.sigmas import karras_sigmas, sigma_to_timestep

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SPACINGS = ("linspace", "leading", "trailing")


# --- the schedule, shared by the multistep solvers (DPM-Solver++, UniPC) -------------------------


def multistep_timesteps(
    num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str, steps_offset: int
) -> np.ndarray:
    """The (n,) timesteps, noisiest first. diffusers' multistep solvers place n + 1 points and drop the
    cleanest one, since their last step goes to sigma = 0 rather than to a timestep (so "leading" and
    "linspace" differ from DDIM's)."""
    T, n = num_train_timesteps, num_inference_steps
    if timestep_spacing == "linspace":  # evenly from T - 1 down to 0, 0 dropped
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if (
        timestep_spacing == "leading"
    ):  # multiples of T // (n + 1), 0 dropped, shifted by steps_offset
        return (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(
            np.int64
        ) + steps_offset
    return (
        np.arange(T, 0, -T / n)[:n].round().astype(np.int64) - 1
    )  # trailing: T - 1, T - 1 - T/n, ... ([:n]: see sigmas.sigma_schedule)


def multistep_schedule(
    alphas_cumprod: torch.Tensor,
    num_inference_steps: int,
    timestep_spacing: str,
    steps_offset: int,
    use_karras_sigmas: bool,
) -> tuple[np.ndarray, torch.Tensor]:
    """The timesteps, (n,) float64 (fractional with Karras sigmas: the caller rounds them), and the noise
    levels sigma, (n + 1,) float32, the last one 0. Arithmetic as diffusers': float32 training sigmas,
    float64 in numpy."""
    T = len(alphas_cumprod)
    check_num_inference_steps(num_inference_steps, T)
    train_sigmas = (
        ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    ).numpy()  # (T,) float32, sigma of each training step
    if (
        use_karras_sigmas
    ):  # the levels come first, the timesteps follow from them; spacing does not apply
        sigmas = karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), num_inference_steps)
        log_sigmas = np.log(train_sigmas)
        timesteps = np.array([sigma_to_timestep(sigma, log_sigmas) for sigma in sigmas])
    else:
        timesteps = multistep_timesteps(T, num_inference_steps, timestep_spacing, steps_offset)
        check_timesteps_in_range(timesteps, T)
        sigmas = train_sigmas[timesteps]
        if len(np.unique(timesteps)) < len(
            timesteps
        ):  # e.g. 'leading' with as many steps as training steps
            raise ValueError(
                f"timestep_spacing={timestep_spacing!r} with {num_inference_steps} steps visits a timestep twice "
                "(a step of size 0); use fewer steps"
            )
    sigmas = np.append(sigmas, 0.0).astype(
        np.float32
    )  # (n + 1,): the last step goes to the clean image
    return timesteps.astype(np.float64), torch.from_numpy(sigmas)


def alpha_sigma_lambda(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha_t, sigma_t (x_t = alpha_t x_0 + sigma_t eps) and the log-SNR lambda_t of each noise level,
    in float32 as diffusers computes them. At sigma = 0: alpha_t = 1, sigma_t = 0, lambda_t = +inf."""
    alpha_t = 1 / (sigmas**2 + 1) ** 0.5
    sigma_t = sigmas * alpha_t
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


def find_step_index(timesteps: torch.Tensor, timestep, last_index: int | None) -> int:
    """Where `timestep` is on the schedule: its first place after the step last taken. A timestep value
    is not always unique: Karras sigmas can round two neighbouring levels to the same timestep."""
    start = 0 if last_index is None else last_index + 1
    places = (timesteps[start:] == timestep).nonzero()
    if len(places) == 0 and start == 0:
        raise ValueError(f"timestep {int(timestep)} is not on this schedule, {timesteps.tolist()}")
    if len(places) == 0:
        raise ValueError(
            f"timestep {int(timestep)} is not among the steps still to take, {timesteps[start:].tolist()}; "
            "call set_timesteps(...) to start again"
        )
    return start + int(places[0, 0])


def predict_x0(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The model's estimate of the clean sample x_0 from x_t = alpha_t x_0 + sigma_t eps, whatever it predicts."""
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "sample":
        return model_output
    return (
        alpha_t * sample - sigma_t * model_output
    )  # v_prediction (Salimans & Ho 2022): v = alpha_t eps - sigma_t x_0


def add_noise_at_levels(
    scheduler, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """x_t = alpha_t x_0 + sigma_t noise at the noise level the schedule has for each timestep (with Karras
    sigmas not quite the training level of the rounded timestep), so that sampling can start there."""
    if scheduler.timesteps is None:
        raise RuntimeError(
            "call set_timesteps(...) before add_noise(): the noise levels are the schedule's"
        )
    indices = [find_step_index(scheduler.timesteps, t, None) for t in timesteps.flatten()]
    shape = (-1, *([1] * (original_samples.ndim - 1)))  # (B,) -> (B, 1, 1, 1)
    alpha_t = (
        scheduler.alpha_t[indices]
        .to(original_samples.device, original_samples.dtype)
        .reshape(shape)
    )
    sigma_t = (
        scheduler.sigma_t[indices]
        .to(original_samples.device, original_samples.dtype)
        .reshape(shape)
    )
    return alpha_t * original_samples + sigma_t * noise


# --- DPM-Solver++ ----------------------------------------------------------------------------------


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
        if solver_order not in (1, 2):
            raise ValueError(
                f"solver_order must be 1 or 2 (third order is not implemented), got {solver_order!r}"
            )
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}"
            )
        if solver_type in (
            "bh1",
            "bh2",
            "logrho",
        ):  # a UniPC or DEIS config: diffusers reads it as the default
            solver_type = "midpoint"
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(
                f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {timestep_spacing!r}"
            )
        self.num_train_timesteps, self.timestep_spacing, self.steps_offset = (
            num_train_timesteps,
            timestep_spacing,
            steps_offset,
        )
        self.solver_order, self.solver_type, self.prediction_type = (
            solver_order,
            solver_type,
            prediction_type,
        )
        # lower_order_final changes nothing here: the last step is first order anyway, because it ends at sigma = 0
        # (lambda = +inf, so r = 0 and 1/(2r) would be infinite); diffusers uses it with final_sigmas_type='sigma_min'
        # and third order, neither implemented here
        self.lower_order_final = lower_order_final
        self.use_karras_sigmas, self.beta_schedule = use_karras_sigmas, beta_schedule
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.init_noise_sigma = 1.0  # start from pure N(0, I) noise
        self.num_inference_steps = None
        self.timesteps = None

    @classmethod
    def from_config(cls, config: dict) -> "DPMSolverMultistepScheduler":
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
        if not (self.use_karras_sigmas and self.beta_schedule == "squaredcos_cap_v2"):
            timesteps = timesteps.round()  # diffusers leaves Karras timesteps of the cosine schedule unrounded: int64 truncates them
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64)).to(device)  # (n,)
        self.alpha_t, self.sigma_t, self.lambda_t = alpha_sigma_lambda(
            self.sigmas
        )  # (n + 1,) each, float32
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
        """x at timesteps[i] -> x at the next level. Deterministic: `generator` is accepted, so that every
        scheduler fits one sampling loop, and unused."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(...) before step()")
        i = find_step_index(self.timesteps, timestep, self.last_index)
        self.last_index = i
        x0 = predict_x0(
            model_output, sample, self.alpha_t[i], self.sigma_t[i], self.prediction_type
        )  # (B, C, H, W)
        self.x0_predictions = (self.x0_predictions + [x0])[-self.solver_order :]

        alpha_t, sigma_t, sigma_s = self.alpha_t[i + 1], self.sigma_t[i + 1], self.sigma_t[i]
        h = self.lambda_t[i + 1] - self.lambda_t[i]
        is_last = i == len(self.timesteps) - 1
        # first order: no previous prediction yet, or the step to sigma = 0 (where lambda = +inf makes r = 0)
        if len(self.x0_predictions) < 2 or is_last:
            return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0

        r = (
            self.lambda_t[i] - self.lambda_t[i - 1]
        ) / h  # the previous step's size relative to this one
        x0_prev = self.x0_predictions[-2]
        if self.solver_type == "midpoint":  # Algorithm 2: D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev
            D = x0 + (x0 - x0_prev) / (2 * r)
            return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D
        # heun: x0_hat = x0 + (lambda - lambda_s) / h * slope, integrated exactly (midpoint approximates its second term)
        slope = (x0 - x0_prev) / r
        return (
            (sigma_t / sigma_s) * sample
            - (alpha_t * (torch.exp(-h) - 1.0)) * x0
            + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * slope
        )

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return add_noise_at_levels(self, original_samples, noise, timesteps)
