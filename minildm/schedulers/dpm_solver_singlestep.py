"""DPM-Solver and DPM-Solver++ single-step, orders 1 to 3: each model call is one step, and a
higher-order step goes back to where its block of steps began.

Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in
Around 10 Steps" (arXiv:2206.00927) and "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models" (arXiv:2211.01095). Notation as in dpm_solver.py: a noisy sample
is x_t = alpha_t x_0 + sigma_t eps, time is the log-SNR lambda_t = log(alpha_t / sigma_t), a step
goes from level s to level t with h = lambda_t - lambda_s > 0. The exact solution of the diffusion
ODE over the step, written with the model's data prediction x0_hat (DPM-Solver++) or with its
noise prediction eps_hat (DPM-Solver, eq. 3.4 of the first paper), is

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral of e^lambda x0_hat dlambda       (++)
    x_t = (alpha_t / alpha_s) x_s - alpha_t * integral of e^-lambda eps_hat dlambda

with the integrals from lambda_s to lambda_t. Expand the prediction in lambda about s,
m(lambda_s + u h) = D0 + u D1 + u^2/2 D2 (D1 = h m', D2 = h^2 m''), and integrate exactly:

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D0
          + alpha_t ((e^-h - 1) / h + 1) D1 - alpha_t ((e^-h - 1 + h) / h^2 - 1/2) D2        (++)
    x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) D0
          - sigma_t ((e^h - 1) / h - 1) D1 - sigma_t ((e^h - 1 - h) / h^2 - 1/2) D2

A single-step solver of order k finds D1 (and D2) from predictions at k - 1 points inside the
step, at lambda_s + r h, 0 < r < 1. Unlike the papers, which place them at r = 1/2 (order 2) or
1/3 and 2/3 (order 3) and call the model there within one step, diffusers takes the schedule's
own levels as those points and makes every model call a step of its own. So the steps come in
blocks, the orders [1, 2] or [1, 2, 3] in turn: the block's first step, of order 1 (DDIM), goes
from s one level down; its second, of order 2, goes back to s and from there two levels down,
using the predictions at s and s + 1; its third, of order 3, from s three levels down, using all
three. The samples the first steps of a block return are only where the model is evaluated next.

solver_type "heun" is the expansion above, the slope D1 (and curvature D2) read off the
predictions by finite differences in lambda. "midpoint", the default, is the papers' own choice
(Algorithms 1 and 2 of the first paper, DPM-Solver-2 and -3, with any r in its appendix's
Algorithms 4 and 5; Algorithm 1 of the second, DPM-Solver++(2S)): at order 2 it weights the
slope D1 by -(1/2) alpha_t (e^-h - 1), the integral's value to first order in h; at order 3 it
drops D2 and takes D1 from the farthest point, third-order accurate when that point lies at
r = 2/3 (the papers' choice; here it lies wherever the schedule's levels put it). The authors'
code calls the two 'taylor' and 'dpmsolver' (LuChengTHU/dpm-solver, dpm_solver_pytorch.py,
singlestep_dpm_solver_second_update and singlestep_dpm_solver_third_update).

Matches diffusers' DPMSolverSinglestepScheduler with algorithm_type "dpmsolver++" (its default)
or "dpmsolver" (deprecated there), solver_type "midpoint" or "heun", final_sigmas_type "zero"
(default: the last step lands on the clean sample) or "sigma_min" (on the smallest training noise
level). The noise levels and timesteps are those of DPM-Solver++ multistep (dpm_solver.py) with
"linspace" spacing, Karras sigmas included. What differs from diffusers, or surprises in it:

- The config has no timestep_spacing and no steps_offset: the spacing is always "linspace", and
  a config's timestep_spacing or steps_offset (SD's PNDM config has steps_offset 1) is dropped
  with a warning, as diffusers drops it.
- With Karras sigmas the timesteps are always rounded (the multistep solver leaves those of the
  cosine schedule fractional), so the cosine schedule's first timestep repeats (999, 999, 999 at
  10 steps); a step is found at its first place after the last step taken, diffusers' first
  lookup takes the second place (see the test's _reference).
- lower_order_final defaults to False as in diffusers, but takes effect only with
  final_sigmas_type "sigma_min" and a step count that is a multiple of solver_order. Otherwise
  diffusers turns it on (a step of order > 1 into sigma = 0, where lambda = +inf, would divide
  by r = 0; and its order lists without it are made of whole blocks only), and it does so for
  good, rewriting its config, so a later set_timesteps with a suitable count keeps it on.
  minildm decides at every set_timesteps (test_lower_order_final_is_decided_per_call).
"""

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
    add_noise_at_levels,
    alpha_sigma_lambda,
    multistep_schedule,
    predict_x0,
)

ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def solver_orders(
    num_inference_steps: int, solver_order: int, lower_order_final: bool, final_sigma_zero: bool
) -> list[int]:
    """The order of each step, (n,): blocks 1, 2, ..., solver_order one after the other, the last
    block shorter when n is not a multiple of solver_order. lower_order_final also cuts a last
    block of full order into solver_order - 1 and 1; a step into sigma = 0 is of order 1."""
    full_blocks, rest = divmod(num_inference_steps, solver_order)
    blocks = [solver_order] * full_blocks + ([rest] if rest else [])
    if lower_order_final and rest == 0 and solver_order > 1:
        blocks[-1:] = [solver_order - 1, 1]
    orders = [order for block in blocks for order in range(1, block + 1)]
    if final_sigma_zero:
        orders[-1] = 1
    return orders


def predict_eps(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The model's estimate of the noise eps in x_t = alpha_t x_0 + sigma_t eps, whatever it
    predicts: the noise prediction DPM-Solver (not ++) steps with."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    # v_prediction: v = alpha_t eps - sigma_t x_0, so alpha_t v + sigma_t x_t = eps
    return alpha_t * model_output + sigma_t * sample


class DPMSolverSinglestepScheduler:
    UNIMPLEMENTED = {
        **NO_THRESHOLDING,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
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
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        final_sigmas_type: str = "zero",
    ):
        self.config = frozen_config(type(self), locals())  # diffusers' scheduler.config
        if algorithm_type == "deis":
            algorithm_type = "dpmsolver++"  # a DEIS config: diffusers reads it as the default
        if solver_type in ("bh1", "bh2", "logrho"):
            solver_type = "midpoint"  # a UniPC or DEIS config: likewise
        check_choice("solver_order", solver_order, (1, 2, 3))
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice(
            "algorithm_type",
            algorithm_type,
            ALGORITHM_TYPES,
            why=" (the stochastic 'sde-dpmsolver++' is not implemented)",
        )
        check_choice("solver_type", solver_type, ("midpoint", "heun"))
        check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        if algorithm_type == "dpmsolver" and final_sigmas_type == "zero":
            # into sigma = 0 (lambda = +inf) its update multiplies sigma_t = 0 by e^h = inf
            raise ValueError(
                "algorithm_type='dpmsolver' needs final_sigmas_type='sigma_min' (it cannot step "
                "to sigma = 0); pass final_sigmas_type='sigma_min' or use 'dpmsolver++'"
            )
        self.num_train_timesteps = num_train_timesteps
        self.solver_order = solver_order
        self.prediction_type = prediction_type
        self.algorithm_type = algorithm_type
        self.solver_type = solver_type
        self.lower_order_final = lower_order_final
        self.use_karras_sigmas = use_karras_sigmas
        self.final_sigmas_type = final_sigmas_type
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.init_noise_sigma = 1.0  # start from pure N(0, I) noise
        self.num_inference_steps = None
        self.timesteps = None  # (n,) int64, from set_timesteps
        self.sigmas = None  # (n + 1,) float32, the noise level of each timestep and the final one
        self.alpha_t = self.sigma_t = self.lambda_t = None  # (n + 1,) each, from the sigmas
        self.order_list = None  # (n,) the order of each step
        self.last_index = None  # the place on the schedule of the last step taken
        self.block_sample = None  # the sample at the first level of the current block
        self.block_predictions = []  # the predictions at its levels so far, in order

    @classmethod
    def from_config(cls, config: dict) -> "DPMSolverSinglestepScheduler":
        return cls(**config_kwargs(cls, config))

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose the noise levels to visit and the order of each step, and forget any previous
        sampling run."""
        timesteps, sigmas = multistep_schedule(
            self.alphas_cumprod, num_inference_steps, "linspace", 0, self.use_karras_sigmas
        )
        if self.final_sigmas_type == "sigma_min":
            # the smallest training noise level instead of 0, float32
            sigmas[-1] = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        self.sigmas = sigmas  # (n + 1,)
        self.timesteps = torch.from_numpy(timesteps.round().astype("int64")).to(device)  # (n,)
        # (n + 1,) each, float32
        self.alpha_t, self.sigma_t, self.lambda_t = alpha_sigma_lambda(self.sigmas)
        self.num_inference_steps = num_inference_steps
        final_sigma_zero = self.final_sigmas_type == "zero"
        # see the module docstring: when lower_order_final is forced on
        lower_order_final = (
            self.lower_order_final
            or final_sigma_zero
            or num_inference_steps % self.solver_order != 0
        )
        self.order_list = solver_orders(
            num_inference_steps, self.solver_order, lower_order_final, final_sigma_zero
        )
        self.last_index = None  # the place on the schedule of the last step taken
        self.block_sample = None  # the sample at the first level of the current block
        self.block_predictions = []  # the predictions at its levels so far, in order

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample  # the model sees x_t unscaled

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x at timesteps[i] -> x at the next level, from the first level of the current block.
        Deterministic: `generator` is accepted, so that every scheduler fits one sampling loop,
        and unused."""
        i = timestep_index(self.timesteps, timestep, "step", after=self.last_index)
        follows_last_step = self.last_index is not None and i == self.last_index + 1
        self.last_index = i
        # (B, C, H, W): x0_hat for DPM-Solver++, eps_hat for DPM-Solver
        if self.algorithm_type == "dpmsolver++":
            prediction = predict_x0(
                model_output, sample, self.alpha_t[i], self.sigma_t[i], self.prediction_type
            )
        else:
            prediction = predict_eps(
                model_output, sample, self.alpha_t[i], self.sigma_t[i], self.prediction_type
            )

        if not follows_last_step:
            self.block_predictions = []  # the first step, or one skipped to: no block to go on
        # the scheduled order, lower where sampling began inside a block (img2img starts part-way
        # down the schedule), as diffusers lowers it for want of predictions
        order = min(self.order_list[i], len(self.block_predictions) + 1)
        if order == 1:  # a new block begins here
            self.block_sample = sample
            self.block_predictions = []
        self.block_predictions.append(prediction)
        return self._update(self.block_sample, i - order + 1, i + 1, self.block_predictions)

    def _update(self, x: torch.Tensor, s: int, t: int, predictions: list) -> torch.Tensor:
        """From x at level s to level t, with the predictions at levels s, s + 1, ... (one to
        three of them: the order). The update in the module docstring."""
        h = self.lambda_t[t] - self.lambda_t[s]
        order = len(predictions)
        D0 = predictions[0]  # (B, C, H, W)
        D1 = D2 = None
        if order == 2:
            r1 = (self.lambda_t[s + 1] - self.lambda_t[s]) / h  # where the second point lies
            D1 = (predictions[1] - D0) / r1
        elif order == 3:
            r1 = (self.lambda_t[s + 1] - self.lambda_t[s]) / h
            r2 = (self.lambda_t[s + 2] - self.lambda_t[s]) / h
            slope_1 = (predictions[1] - D0) / r1  # = D1 + r1/2 D2 for the quadratic in u
            slope_2 = (predictions[2] - D0) / r2  # = D1 + r2/2 D2
            if self.solver_type == "heun":  # the quadratic through the three points
                D1 = (r2 * slope_1 - r1 * slope_2) / (r2 - r1)
                D2 = 2.0 * (slope_2 - slope_1) / (r2 - r1)
            else:
                D1 = slope_2  # the papers' DPM-Solver-3: the chord to the farthest point

        # the weights: float32 scalars, written as diffusers writes them (e^-h - 1 rather than
        # expm1; at these step sizes the two change a step by about 1e-7 of its scale)
        if self.algorithm_type == "dpmsolver++":
            alpha_t = self.alpha_t[t]
            e = torch.exp(-h) - 1.0
            x_t = (self.sigma_t[t] / self.sigma_t[s]) * x - (alpha_t * e) * D0
            if D1 is not None and self.solver_type == "midpoint" and order == 2:
                x_t = x_t - 0.5 * (alpha_t * e) * D1
            elif D1 is not None:
                x_t = x_t + (alpha_t * (e / h + 1.0)) * D1
            if D2 is not None:
                x_t = x_t - (alpha_t * ((e + h) / h**2 - 0.5)) * D2
            return x_t
        sigma_t = self.sigma_t[t]
        e = torch.exp(h) - 1.0
        x_t = (self.alpha_t[t] / self.alpha_t[s]) * x - (sigma_t * e) * D0
        if D1 is not None and self.solver_type == "midpoint" and order == 2:
            x_t = x_t - 0.5 * (sigma_t * e) * D1
        elif D1 is not None:
            x_t = x_t - (sigma_t * (e / h - 1.0)) * D1
        if D2 is not None:
            x_t = x_t - (sigma_t * ((e - h) / h**2 - 0.5)) * D2
        return x_t

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return add_noise_at_levels(
            self.alpha_t, self.sigma_t, self.timesteps, original_samples, noise, timesteps
        )
