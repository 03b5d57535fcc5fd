"""PNDM: pseudo numerical methods, the sampler Stable Diffusion v1 ships with.

Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"
(arXiv:2202.09778). A classical ODE step x + delta * f(x) moves the sample off the region the
model was trained on. PNDM keeps what a classical solver does to its slope estimates (the
"gradient part": how several noise estimates are combined) and replaces the straight-line update
by the "transfer part" phi, which moves x_t to t - delta along the noising process (eq. 9):

    phi(x_t, e, t, t - delta) = sqrt(a_{t-delta} / a_t) * x_t
        - (a_{t-delta} - a_t) * e
          / (sqrt(a_t) * (sqrt((1 - a_{t-delta}) a_t) + sqrt((1 - a_t) a_{t-delta})))

with a_t = alphas_cumprod[t]. With e = eps(x_t, t), phi is exactly a deterministic DDIM step.
The gradient parts, with e_0 the newest noise estimate and e_1, e_2, e_3 those of the previous
steps:

    PLMS (pseudo linear multistep, the 4th-order Adams-Bashforth weights):
        e' = (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24
    PRK (pseudo Runge-Kutta, classic RK4), four model calls per step:
        e1 = eps(x_t, t)                  x1 = phi(x_t, e1, t, t - delta/2)
        e2 = eps(x1, t - delta/2)         x2 = phi(x_t, e2, t, t - delta/2)
        e3 = eps(x2, t - delta/2)         x3 = phi(x_t, e3, t, t - delta)
        e4 = eps(x3, t - delta)           x_{t-delta} = phi(x_t, e', t, t - delta),
                                          e' = (e1 + 2 e2 + 2 e3 + e4) / 6

PLMS needs three past estimates, so the paper's method (F-PNDM) first takes three PRK steps, 12
model calls; their e1 become PLMS's history. With skip_prk_steps=True, what Stable Diffusion uses,
the first step is instead a pseudo improved Euler (Heun) step, two model calls, e' = (e(x_t, t) +
e(x*, t - delta)) / 2 with x* the Euler (DDIM) estimate, followed by the 2nd- and 3rd-order
Adams-Bashforth weights, (3 e_0 - e_1) / 2 and (23 e_0 - 16 e_1 + 5 e_2) / 12, until four
estimates are known. Either way `timesteps` lists one entry per model call, so some times repeat.

Matches diffusers' PNDMScheduler, including its choices: every step goes back by
delta = num_train_timesteps // num_inference_steps on the training grid whatever the spacing, the
Runge-Kutta half step is delta // 2, and with v_prediction the combined model outputs are turned
into a noise estimate with the sample and time the step starts from.
"""

import numpy as np
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

RUNGE_KUTTA_CALLS = 12  # three RK4 steps of four model calls before PLMS has its three estimates


def check_runge_kutta_steps(num_inference_steps: int, skip_prk_steps: bool):
    if not skip_prk_steps and num_inference_steps < 4:
        raise ValueError(
            "the Runge-Kutta warm-up takes three steps before the 4-step linear multistep method: "
            "num_inference_steps must be at least 4 with skip_prk_steps=False, got "
            f"{num_inference_steps} (or use skip_prk_steps=True)"
        )


class PNDMScheduler:
    UNIMPLEMENTED = {}  # every option of diffusers' PNDMScheduler is implemented

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        self.config = frozen_config(type(self), locals())  # diffusers' scheduler.config
        check_choice(
            "prediction_type",
            prediction_type,
            ("epsilon", "v_prediction"),
            why=" (PNDM combines noise estimates)",
        )
        check_choice("timestep_spacing", timestep_spacing, ("leading", "trailing", "linspace"))
        self.num_train_timesteps = num_train_timesteps
        self.steps_offset = steps_offset
        self.timestep_spacing = timestep_spacing
        self.skip_prk_steps = skip_prk_steps
        self.prediction_type = prediction_type
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        # the "a_{t-delta}" of the last step: 1 (a clean image), or the first training step's value
        # as SD does
        if set_alpha_to_one:
            self.final_alpha_cumprod = torch.tensor(1.0)
        else:
            self.final_alpha_cumprod = self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0  # start from pure N(0, I) noise
        self.num_inference_steps = None
        self.timesteps = None
        self._forget_history()

    @classmethod
    def from_config(cls, config: dict) -> "PNDMScheduler":
        return cls(**config_kwargs(cls, config))

    def _forget_history(self):
        """PNDM is a multistep method: this is all it remembers between calls, and a new trajectory
        starts empty."""
        self.calls = 0  # step() calls so far: which stage of the method comes next
        # the model outputs at the start of the last (up to four) steps, newest last
        self.past_outputs = []
        self.stage_outputs = []  # the current Runge-Kutta step's model outputs so far
        # x_t of the current Runge-Kutta or Heun step: every stage restarts from it
        self.step_start_sample = None

    def set_timesteps(self, num_inference_steps: int, device=None):
        """The training steps the model is called at, one entry per model call, from noisiest to
        cleanest."""
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        check_runge_kutta_steps(num_inference_steps, self.skip_prk_steps)
        self.num_inference_steps = n = num_inference_steps
        T = self.num_train_timesteps
        steps = spaced_timesteps(T, n, self.timestep_spacing, self.steps_offset)

        if self.skip_prk_steps:
            # the Heun correction of the first step calls the model at the second time, where the
            # next step starts again
            timesteps = np.concatenate([steps[:2], steps[1:]])  # (n + 1,)
        else:
            half = T // n // 2
            # each RK4 step calls the model at its start, twice at its midpoint and at its end;
            # PLMS then restarts at the end
            runge_kutta = [
                [steps[k], steps[k + 1] + half, steps[k + 1] + half, steps[k + 1]] for k in range(3)
            ]
            # (12 + n - 3,)
            timesteps = np.concatenate([np.array(runge_kutta).reshape(-1), steps[3:]])
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64)).to(device)
        self._forget_history()

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample  # PNDM's model sees x_t unscaled

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The sample for the next entry of `timesteps`. Call it once per entry, in order: the stage
        of the method is chosen by how many calls came before (set_timesteps starts over).
        Deterministic: `generator` is accepted, so that a pipeline can pass one to any scheduler,
        and unused."""
        check_timesteps_set(self.timesteps, "step")
        call = self.calls
        t = int(timestep)
        self.calls += 1
        if not self.skip_prk_steps and call < RUNGE_KUTTA_CALLS:
            return self._runge_kutta_stage(model_output, t, sample, call)
        return self._linear_multistep(model_output, t, sample, call)

    def _runge_kutta_stage(
        self, e: torch.Tensor, t: int, sample: torch.Tensor, call: int
    ) -> torch.Tensor:
        stage = call % 4
        # every stage moves from the step's start, x_t at t_start
        t_start = int(self.timesteps[call - stage])
        half = self.num_train_timesteps // self.num_inference_steps // 2
        if stage == 0:  # e1 = eps(x_t, t); x1 = phi(x_t, e1, t, t - delta/2)
            self.step_start_sample = sample
            self.stage_outputs = [e]
            self.past_outputs.append(e)  # PLMS will reuse the e1 of each RK step
            # diffusers aims at t - delta // 2 here but then tells the model t_next + delta // 2:
            # one training step apart when delta is odd, more with uneven spacings; kept for parity
            return self._transfer(sample, e, t_start, t_start - half)
        self.stage_outputs.append(e)
        if stage == 1:  # t is the midpoint: x2 = phi(x_t, e2, t, t - delta/2)
            return self._transfer(self.step_start_sample, e, t_start, t)
        if stage == 2:  # t - half is the end: x3 = phi(x_t, e3, t, t - delta)
            return self._transfer(self.step_start_sample, e, t_start, t - half)
        e1, e2, e3, e4 = self.stage_outputs  # t is the end
        gradient = (e1 + 2 * e2 + 2 * e3 + e4) / 6  # PRK's gradient part, the RK4 weights
        return self._transfer(self.step_start_sample, gradient, t_start, t)

    def _linear_multistep(
        self, model_output: torch.Tensor, t: int, sample: torch.Tensor, call: int
    ) -> torch.Tensor:
        delta = self.num_train_timesteps // self.num_inference_steps
        if self.skip_prk_steps and call == 1:
            # Heun's correction of the first step: redo it from x_{t+delta} with the mean of the
            # slopes at both ends
            gradient = (self.past_outputs[-1] + model_output) / 2
            return self._transfer(self.step_start_sample, gradient, t + delta, t)
        self.past_outputs = self.past_outputs[-3:] + [model_output]
        e = self.past_outputs[::-1]  # e[0] is this step's estimate, e[1] the previous step's, ...
        # PLMS's gradient part: the Adams-Bashforth weights of as many estimates as are known
        if len(e) == 1:
            # first step (skip_prk_steps): an Euler (DDIM) step, corrected at the next call
            self.step_start_sample = sample
            gradient = e[0]
        elif len(e) == 2:
            gradient = (3 * e[0] - e[1]) / 2
        elif len(e) == 3:
            gradient = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
        else:
            gradient = (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24
        return self._transfer(sample, gradient, t, t - delta)

    def _transfer(
        self, sample: torch.Tensor, model_output: torch.Tensor, t: int, t_prev: int
    ) -> torch.Tensor:
        """phi(x_t, e, t, t_prev) of eq. 9, the transfer part: the DDIM move of x_t to t_prev for
        the noise estimate e."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        if self.prediction_type == "v_prediction":
            # v = sqrt(a) eps - sqrt(1 - a) x0, so eps = sqrt(a) v + sqrt(1 - a) x_t
            e = a_t**0.5 * model_output + (1 - a_t) ** 0.5 * sample
        else:
            e = model_output
        # the two terms of eq. 9; the denominator is sqrt(a_t) (sqrt((1 - a_prev) a_t) +
        # sqrt((1 - a_t) a_prev)), multiplied out
        sample_term = (a_prev / a_t) ** 0.5 * sample
        denominator = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
        noise_term = (a_prev - a_t) * e / denominator
        return sample_term - noise_term

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return add_noise(self.alphas_cumprod, original_samples, noise, timesteps)
