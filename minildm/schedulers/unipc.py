"""UniPC: a multistep predictor (UniP) and a corrector (UniC) that costs no extra model call.

Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models" (arXiv:2302.04867). In the notation of DPM-Solver++ (dpm_solver.py):
x_t = alpha_t x_0 + sigma_t eps, lambda_t = log(alpha_t / sigma_t), x0_hat the model's prediction
of x_0. For a step from s to t, let h = lambda_t - lambda_s and hh = -h (the sign for a data
prediction model). Predictor and corrector share one update (the UniP/UniC equations with the
data prediction), three terms:

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^hh - 1) x0_hat_s - alpha_t B(hh) sum_k a_k D_k

where D_k = (x0_hat_{s_k} - x0_hat_s) / r_k are differences to other predictions and
r_k = (lambda_{s_k} - lambda_s) / h their distances in units of the step. UniP-p uses the p - 1
previous predictions; UniC-p redoes the step once the model has seen x_t, adding x0_hat_t itself
(r = 1), which raises the order of accuracy by one. The weights of order p solve R a = g, with
R_{jk} = r_k^(j-1) and g_j = hh phi_{j+1}(hh) j! / B(hh), j = 1 .. p, where
phi_1(x) = (e^x - 1) / x and phi_{k+1}(x) = (phi_k(x) - 1/k!) / x. B is free as long as
B(hh) = O(hh): bh1 takes B(hh) = hh, bh2 (the default) B(hh) = e^hh - 1.

A step corrects the sample it was given, then predicts the next one. The order warms up from 1
and, with lower_order_final, falls back to 1 for the last step (to sigma = 0, where
lambda = +inf and r = 0). Matches diffusers' UniPCMultistepScheduler with predict_x0=True (its
default). The noise levels are DPM-Solver++'s: the schedule helpers come from dpm_solver.py.
"""

import numpy as np
import torch

from minildm.schedulers.common import (
    NO_THRESHOLDING,
    check_choice,
    config_kwargs,
    frozen_config,
    make_betas,
    timestep_index,
)
from minildm.schedulers.dpm_solver import (
    PREDICTION_TYPES,
    SPACINGS,
    add_noise_at_levels,
    alpha_sigma_lambda,
    multistep_schedule,
    predict_x0,
)


class UniPCMultistepScheduler:
    UNIMPLEMENTED = {
        **NO_THRESHOLDING,
        "predict_x0": True,
        "solver_p": None,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
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
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list | tuple = (),
        use_karras_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self.config = frozen_config(type(self), locals())  # diffusers' scheduler.config
        if solver_type in ("midpoint", "heun", "logrho"):
            solver_type = "bh2"  # a DPM-Solver or DEIS config: diffusers reads it as the default
        check_choice("solver_order", solver_order, (1, 2, 3))
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("solver_type", solver_type, ("bh1", "bh2"))
        check_choice("timestep_spacing", timestep_spacing, SPACINGS)
        if not lower_order_final and solver_order > 1:
            raise ValueError(
                "lower_order_final=False is not supported: a step of order > 1 to sigma = 0 "
                "divides by r = 0 (diffusers returns inf)"
            )
        self.num_train_timesteps = num_train_timesteps
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.solver_order = solver_order
        self.solver_type = solver_type
        self.prediction_type = prediction_type
        # the steps whose result is not corrected (at the next step)
        self.disable_corrector = tuple(disable_corrector)
        self.use_karras_sigmas = use_karras_sigmas
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
    def from_config(cls, config: dict) -> "UniPCMultistepScheduler":
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
        self.timesteps = torch.from_numpy(timesteps.round().astype(np.int64)).to(device)  # (n,)
        # (n + 1,) each, float32
        self.alpha_t, self.sigma_t, self.lambda_t = alpha_sigma_lambda(self.sigmas)
        self.num_inference_steps = num_inference_steps
        self.x0_predictions = []  # the last solver_order predictions of x_0, newest last
        self.last_index = None  # the place on the schedule of the last step taken
        self.last_sample = None  # the last step's input (after correction)
        self.last_order = None  # and its predictor's order

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample  # the model sees x_t unscaled

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Correct x at timesteps[i] (UniC), then predict x at the next level (UniP). Deterministic:
        `generator` is accepted, so that every scheduler fits one sampling loop, and unused."""
        i = timestep_index(self.timesteps, timestep, "step", after=self.last_index)
        self.last_index = i
        # the data prediction x0_hat at level i, (B, C, H, W)
        x0 = predict_x0(
            model_output, sample, self.alpha_t[i], self.sigma_t[i], self.prediction_type
        )

        if self.last_sample is not None and i - 1 not in self.disable_corrector:
            # redo the last step, from last_sample at i - 1 to i, now knowing the model's output
            # at i
            sample = self._update(self.last_sample, i - 1, i, self.last_order, x0_new=x0)
        self.x0_predictions = (self.x0_predictions + [x0])[-self.solver_order :]
        # warm up from first order while there are too few past outputs; lower_order_final: no
        # higher than the steps left
        order = min(self.solver_order, len(self.x0_predictions), len(self.timesteps) - i)
        self.last_sample = sample
        self.last_order = order
        return self._update(sample, i, i + 1, order)

    def _update(
        self, x: torch.Tensor, s: int, t: int, order: int, x0_new: torch.Tensor | None = None
    ) -> torch.Tensor:
        """From x at level s to level t, using the predictions at s, s - 1, ..., s - order + 1 (the
        last `order` of x0_predictions). The predictor UniP-order has x0_new None; the corrector
        UniC-order adds x0_new, the prediction at t (r = 1)."""
        x0_s = self.x0_predictions[-1]
        h = self.lambda_t[t] - self.lambda_t[s]
        hh = -h
        # the earlier predictions as differences per unit of step: r_k, D_k for k = 1 .. order - 1
        r = [(self.lambda_t[s - k] - self.lambda_t[s]) / h for k in range(1, order)]
        D = [(self.x0_predictions[-1 - k] - x0_s) / r[k - 1] for k in range(1, order)]

        h_phi_1 = torch.expm1(hh)  # e^hh - 1 = hh phi_1(hh)
        B_h = hh if self.solver_type == "bh1" else torch.expm1(hh)
        # g_k = hh phi_{k+1}(hh) k! / B(hh), k = 1 .. order
        g = []
        h_phi_k = h_phi_1 / hh - 1  # hh phi_{k+1}(hh), starting at k = 1
        factorial = 1
        for k in range(1, order + 1):
            g.append(h_phi_k * factorial / B_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        g = torch.stack(g)  # (order,)

        if x0_new is None:  # UniP: weights for the order - 1 earlier points
            if order == 1:
                a = []
            elif order == 2:
                # as the reference implementation does: a fixed 1/2, the limit of the solution
                # g[0] as h -> 0
                a = [0.5]
            else:
                R = torch.stack([torch.stack(r) ** j for j in range(order - 1)])  # (order - 1,) * 2
                a = torch.linalg.solve(R, g[:-1])
        else:  # UniC: one more point, the new prediction at r = 1
            D = D + [x0_new - x0_s]
            if order == 1:
                a = [0.5]  # as the reference implementation, for the same reason
            else:
                r_all = torch.stack(r + [torch.ones(())])
                R = torch.stack([r_all**j for j in range(order)])  # (order, order)
                a = torch.linalg.solve(R, g)
        # sum_k a_k D_k, 0 for a first-order prediction
        correction = sum(a_k * D_k for a_k, D_k in zip(a, D, strict=True))
        # the three terms of the update in the module docstring
        sample_term = self.sigma_t[t] / self.sigma_t[s] * x  # (sigma_t / sigma_s) x_s
        x0_term = self.alpha_t[t] * h_phi_1 * x0_s  # alpha_t (e^hh - 1) x0_hat_s
        correction_term = self.alpha_t[t] * B_h * correction  # alpha_t B(hh) sum_k a_k D_k
        return sample_term - x0_term - correction_term

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return add_noise_at_levels(
            self.alpha_t, self.sigma_t, self.timesteps, original_samples, noise, timesteps
        )
