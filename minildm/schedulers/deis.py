"""DEIS: a multistep exponential integrator of the diffusion ODE that extrapolates the model's noise
prediction as a polynomial in log rho.

Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator"
(arXiv:2204.13902), the Diffusion Exponential Integrator Sampler. Write a noisy sample as
x_t = alpha_t x_0 + sigma_t eps and measure time by rho_t = sigma_t / alpha_t, the noise-to-signal
ratio (the `sigma` of Karras et al. and of sigmas.py). The exponential integrator solves the linear
part of the probability-flow ODE exactly; with the model's noise prediction eps_hat as what is
left, and time changed to rho (the paper's rhoRK-DEIS and rhoAB-DEIS), the ODE becomes

    d(x / alpha) / d rho = eps_hat(x, rho)
    x_t / alpha_t = x_s / alpha_s + integral from rho_s to rho_t of eps_hat d rho

Multistep DEIS replaces eps_hat over the step by the polynomial through the last `order`
predictions eps_j, made at levels rho_j (the newest at rho_s), and integrates it exactly:

    x_t = alpha_t (x_s / alpha_s + sum_j C_j eps_j),  C_j = F_j(rho_t) - F_j(rho_s)

where F_j is an antiderivative in rho of the Lagrange basis polynomial l_j, 1 at node j and 0 at
the others. The paper's rhoAB-DEIS takes the polynomial in rho itself (qsh-zh/deis
th_deis/sampler.py, get_sampler_rho_ab, whose weights are numerical quadratures); diffusers'
solver_type "logrho", matched here, takes it in u = log rho (= -lambda, the log-SNR of DPM-Solver),
which with int u d rho = rho (u - 1) and int u^2 d rho = rho (u^2 - 2u + 2) gives closed forms:

    order 2, nodes u = b, c:     F(rho) = rho (u - 1 - c) / (b - c)
    order 3, nodes u = b, c, d:  F(rho) = rho ((u - 1 - c)(u - 1 - d) + 1) / ((b - c)(b - d))

First order (eps_hat constant) gives C = rho_t - rho_s, which is DDIM: x_t = (alpha_t / alpha_s)
x_s - sigma_t (e^h - 1) eps with h = lambda_t - lambda_s. The order warms up from 1, one past
prediction per step; with lower_order_final and fewer than 15 steps the last step is first order
and the one before it at most second (diffusers' rule).

The timesteps are DPM-Solver++'s (dpm_solver.multistep_schedule), and so are the noise levels
except the last: at rho = 0 log rho is -inf, so DEIS ends at the smallest training level sigma_min
(sigma of t = 0, 0.0292 for SD), and a sample keeps noise of that size. Matches diffusers'
DEISMultistepScheduler (algorithm_type "deis", solver_type "logrho").

Pitfalls met while matching diffusers (tests/test_scheduler_deis.py shows each):

- With Karras sigmas the levels already end at sigma_min, and diffusers appends it once more: the
  last step has size zero and returns its input, and a 1-step schedule returns the starting
  noise. minildm copies both (test_deis_ends_at_the_smallest_training_noise_level).
- C_j is a small difference of two values of F: at 50 steps F is up to 10^4 times C_j, so float32
  rounding in F moves a third-order step by up to 9e-5 relative (diffusers' float32 steps against
  the same arithmetic in float64, with sample prediction). To stay within 1e-6 of diffusers,
  minildm rounds as it does: float32, numpy's log (torch.log differs from it in the last bit for
  about 7% of float32 inputs), the third-order F expanded term by term in diffusers' order, and
  the first-order step in the DDIM form above (test_third_order_weights_are_sensitive_to_rounding).
"""

import numpy as np
import torch

from minildm.schedulers.common import (
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

# diffusers lowers the order of the last steps (lower_order_final) only for schedules of fewer
# steps than this; its documentation: it stabilises sampling with few steps
LOWER_ORDER_FINAL_BELOW = 15


# --- the weights: integrals of Lagrange polynomials in u = log rho ------------------------------


def linear_basis_integral(rho, u, b, c):
    """F(rho), an antiderivative in rho of (u - c) / (b - c), the linear polynomial in u = log rho
    that is 1 at u = b and 0 at u = c (u is log rho, passed in)."""
    return rho * (u - c - 1) / (b - c)


def quadratic_basis_integral(rho, u, b, c, d):
    """F(rho) for (u - c)(u - d) / ((b - c)(b - d)), 1 at u = b and 0 at c and d:
    rho ((u - 1 - c)(u - 1 - d) + 1) / ((b - c)(b - d)), evaluated expanded, term by term in the
    order diffusers evaluates it, because the rounding matters (see the module docstring)."""
    return rho * (c * (d - u + 1) - d * u + d + u**2 - 2 * u + 2) / ((b - c) * (b - d))


def eps_weights(rho_t, u_t, rho_s, u_s, nodes: list) -> list:
    """The weights C_j of a step from rho_s to rho_t, one per node (the log rho of each past
    prediction, the newest, at rho_s, first); 2 or 3 nodes. 0-dim tensors, rounded as diffusers."""
    basis_integral = linear_basis_integral if len(nodes) == 2 else quadratic_basis_integral
    weights = []
    for j in range(len(nodes)):
        # node j first, then the others in turn: the argument order decides the rounding
        rotated = nodes[j:] + nodes[:j]
        weights.append(basis_integral(rho_t, u_t, *rotated) - basis_integral(rho_s, u_s, *rotated))
    return weights


def log_as_numpy(x: torch.Tensor) -> torch.Tensor:
    """log of a float32 CPU tensor as numpy computes it, which diffusers uses for the logs of rho
    (torch.log rounds differently in the last bit for some inputs, and the weights magnify it)."""
    return torch.from_numpy(np.log(x.numpy()))


# --- DEIS ---------------------------------------------------------------------------------------


class DEISMultistepScheduler:
    UNIMPLEMENTED = {
        # not common.NO_THRESHOLDING: diffusers' DEIS has no rescale_betas_zero_snr, so that key
        # of another scheduler's config is dropped (with a warning), as diffusers drops it
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
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
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        # a DPM-Solver or UniPC config: diffusers reads their algorithm and solver as DEIS's own
        self.config = frozen_config(type(self), locals())  # diffusers' scheduler.config
        if algorithm_type in ("dpmsolver", "dpmsolver++"):
            algorithm_type = "deis"
        if solver_type in ("midpoint", "heun", "bh1", "bh2"):
            solver_type = "logrho"
        check_choice("solver_order", solver_order, (1, 2, 3))
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(
            "algorithm_type",
            algorithm_type,
            ("deis",),
            why=" (a DPM-Solver config's 'dpmsolver' or 'dpmsolver++' is read as 'deis')",
        )
        check_choice(
            "solver_type",
            solver_type,
            ("logrho",),
            why=" (the other multistep solvers' 'midpoint', 'heun', 'bh1', 'bh2' are read as it)",
        )
        check_choice("timestep_spacing", timestep_spacing, SPACINGS)
        self.num_train_timesteps = num_train_timesteps
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.solver_order = solver_order
        self.prediction_type = prediction_type
        self.lower_order_final = lower_order_final
        self.use_karras_sigmas = use_karras_sigmas
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.init_noise_sigma = 1.0  # start from pure N(0, I) noise
        self.num_inference_steps = None
        self.timesteps = None  # (n,) int64, from set_timesteps
        self.sigmas = None  # (n + 1,) float32, the noise level of each timestep and sigma_min
        # (n + 1,) each, from the sigmas
        self.alpha_t = self.sigma_t = self.lambda_t = self.rho = self.log_rho = None
        self.last_index = None  # the place on the schedule of the last step taken

    @classmethod
    def from_config(cls, config: dict) -> "DEISMultistepScheduler":
        return cls(**config_kwargs(cls, config))

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the noise levels to visit, and forget any previous sampling run."""
        # DPM-Solver++'s schedule, whose last level is 0
        timesteps, sigmas = multistep_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            self.timestep_spacing,
            self.steps_offset,
            self.use_karras_sigmas,
        )
        # DEIS ends at sigma_min instead (log rho = -inf at 0)
        if self.use_karras_sigmas:
            sigmas[-1] = sigmas[-2]  # which the Karras levels already end at: a step of size 0
        else:
            a = self.alphas_cumprod[0]
            sigmas[-1] = ((1 - a) / a) ** 0.5  # sigma of training step 0
        self.sigmas = sigmas
        # rounded, also the Karras timesteps of the cosine schedule (which DPM-Solver++ truncates)
        self.timesteps = torch.from_numpy(timesteps.round().astype(np.int64)).to(device)  # (n,)
        # (n + 1,) each, float32; rho = sigma_t / alpha_t equals sigmas up to rounding, computed
        # as diffusers computes it
        self.alpha_t, self.sigma_t, self.lambda_t = alpha_sigma_lambda(sigmas)
        self.rho = self.sigma_t / self.alpha_t
        self.log_rho = log_as_numpy(self.rho)
        self.num_inference_steps = num_inference_steps
        self.eps_predictions = []  # the last solver_order noise predictions, newest last
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
        eps = self._predicted_eps(model_output, sample, i)  # (B, C, H, W)
        self.eps_predictions = (self.eps_predictions + [eps])[-self.solver_order :]
        # warm up from first order while there are too few past predictions
        order = len(self.eps_predictions)
        if self.lower_order_final and len(self.timesteps) < LOWER_ORDER_FINAL_BELOW:
            # first order for the last step, at most second for the one before
            order = min(order, len(self.timesteps) - i)

        # from level s = i to level t = i + 1
        alpha_t, alpha_s = self.alpha_t[i + 1], self.alpha_t[i]
        if order == 1:
            # x_t = alpha_t (x_s / alpha_s + (rho_t - rho_s) eps), DDIM, written as diffusers does
            h = self.lambda_t[i + 1] - self.lambda_t[i]
            return (alpha_t / alpha_s) * sample - (self.sigma_t[i + 1] * (torch.exp(h) - 1.0)) * eps
        nodes = [self.log_rho[i - k] for k in range(order)]  # log rho of each prediction, newest
        weights = eps_weights(
            self.rho[i + 1], self.log_rho[i + 1], self.rho[i], self.log_rho[i], nodes
        )
        newest_first = self.eps_predictions[::-1][:order]
        # x_t = alpha_t (x_s / alpha_s + sum_j C_j eps_j), summed left to right as diffusers sums
        scaled = sample / alpha_s
        for weight, eps_j in zip(weights, newest_first, strict=True):
            scaled = scaled + weight * eps_j
        return alpha_t * scaled

    def _predicted_eps(self, model_output: torch.Tensor, sample: torch.Tensor, i: int):
        """The model's estimate of eps in x_t = alpha_t x_0 + sigma_t eps at level i, what DEIS
        integrates, whatever the model predicts."""
        if self.prediction_type == "epsilon":
            # diffusers goes to x0_hat and back, which changes eps by rounding only
            return model_output
        alpha, sigma = self.alpha_t[i], self.sigma_t[i]
        x0 = predict_x0(model_output, sample, alpha, sigma, self.prediction_type)
        return (sample - alpha * x0) / sigma

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return add_noise_at_levels(
            self.alpha_t, self.sigma_t, self.timesteps, original_samples, noise, timesteps
        )
