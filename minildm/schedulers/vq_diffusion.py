"""VQ-Diffusion's sampler: discrete diffusion over code indices with a [MASK] class.

Gu et al. 2022, "Vector Quantized Diffusion Model for Text-to-Image Synthesis" (arXiv:2111.14822),
section 3.2. The forward process corrupts each of the N code indices independently: with
probability alpha_t + beta_t a code stays, with beta_t it becomes each other code (K of them), with
gamma_t it becomes [MASK] (index K), and [MASK] stays [MASK] ("mask-and-replace", eq. 4-5). Over t
steps these compose into cumulative probabilities alpha_bar_t, beta_bar_t, gamma_bar_t (eq. 6),
linear in t: alpha_bar from 0.99999 to 0.000009, gamma_bar from 0.000009 to 0.99999.

A step samples x_{t-1} from p(x_{t-1} | x_t) = sum_x0 q(x_{t-1} | x_t, x0) p(x0 | x_t) (eq. 11),
with p(x0 | x_t) from the transformer, everything in log space (probabilities down to 1e-30
matter), and the sample drawn by the Gumbel-max trick: argmax(log p + Gumbel noise). Matches
diffusers' VQDiffusionScheduler (and the original microsoft/VQ-Diffusion
image_synthesis/modeling/transformers/diffusion_transformer.py `DiffusionTransformer.p_sample`).

Shapes: B batch, K codes (4096), N positions (1024). Log-probabilities are (B, K or K+1, N).
"""

import numbers
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from minildm.layers import rand
from minildm.schedulers.common import (
    check_num_inference_steps,
    check_schedule,
    check_timesteps_set,
    config_kwargs,
    frozen_config,
    is_probability,
)


def _at(values: torch.Tensor, t) -> torch.Tensor:
    """values[t] for one step t (an int), or per sample for a (B,) tensor of steps, shaped (B, 1, 1)
    to broadcast over (B, classes, N): sampling uses one t for the batch, training one per image."""
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        return values[t].view(-1, 1, 1)
    return values[t]


def _cumulative_schedules(T: int, alpha_start, alpha_end, gamma_start, gamma_end):
    """Per-step and cumulative alpha and gamma (float64 numpy, as the references compute them).

    The cumulative arrays get one extra entry at the end, read as index -1: the state before
    step 0, a clean image (alpha_bar 1, gamma_bar 0). Per-step values are ratios of cumulative ones:
    alpha_t = alpha_bar_t / alpha_bar_{t-1} and
    (1 - gamma_t) = (1 - gamma_bar_t) / (1 - gamma_bar_{t-1}).
    """
    fraction = np.arange(0, T) / (T - 1)
    alpha_bar = np.concatenate(([1], fraction * (alpha_end - alpha_start) + alpha_start))
    alpha = alpha_bar[1:] / alpha_bar[:-1]
    gamma_bar = np.concatenate(([0], fraction * (gamma_end - gamma_start) + gamma_start))
    gamma = 1 - (1 - gamma_bar[1:]) / (1 - gamma_bar[:-1])
    return alpha, np.concatenate((alpha_bar[1:], [1])), gamma, np.concatenate((gamma_bar[1:], [0]))


def warn_unless_every_step(num_inference_steps: int, num_train_timesteps: int):
    if num_inference_steps != num_train_timesteps:
        warnings.warn(
            f"VQ-Diffusion does not subsample its {num_train_timesteps} steps: "
            f"{num_inference_steps} steps run only the last {num_inference_steps}, starting from a "
            f"fully masked image (diffusers does the same); use {num_train_timesteps} for the "
            "trained behaviour",
            stacklevel=3,
        )


class VQDiffusionScheduler:
    UNIMPLEMENTED = {}

    def __init__(
        self,
        num_vec_classes: int = 4097,
        num_train_timesteps: int = 100,
        alpha_cum_start: float = 0.99999,
        alpha_cum_end: float = 0.000009,
        gamma_cum_start: float = 0.000009,
        gamma_cum_end: float = 0.99999,
    ):
        self.config = frozen_config(type(self), locals())  # diffusers' scheduler.config
        whole = isinstance(num_vec_classes, numbers.Integral) and type(num_vec_classes) is not bool
        if not whole or not 2 <= num_vec_classes <= 1 << 20:
            raise ValueError(
                "num_vec_classes must be an integer from 2 (one code and [MASK]) to 2**20, got "
                f"{num_vec_classes!r}"
            )
        check_schedule(num_train_timesteps)
        ends = {
            "alpha_cum_start": alpha_cum_start,
            "alpha_cum_end": alpha_cum_end,
            "gamma_cum_start": gamma_cum_start,
            "gamma_cum_end": gamma_cum_end,
        }
        for name, value in ends.items():
            if not is_probability(value):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        self.num_train_timesteps = num_train_timesteps
        # the last class; the K = num_vec_classes - 1 others are codes
        self.mask_class = num_vec_classes - 1
        K = num_vec_classes - 1
        alpha, alpha_bar, gamma, gamma_bar = _cumulative_schedules(
            num_train_timesteps, alpha_cum_start, alpha_cum_end, gamma_cum_start, gamma_cum_end
        )
        # the rest, spread over the K codes
        beta = (1 - alpha - gamma) / K
        beta_bar = (1 - alpha_bar - gamma_bar) / K

        def log32(x):  # logs taken in float64, kept in float32 as diffusers does
            return torch.log(torch.tensor(x.astype("float64"))).float()

        self.log_alpha = log32(alpha)
        self.log_beta = log32(beta)
        self.log_gamma = log32(gamma)
        self.log_alpha_bar = log32(alpha_bar)
        self.log_beta_bar = log32(beta_bar)
        self.log_gamma_bar = log32(gamma_bar)
        self.timesteps = None

    @classmethod
    def from_config(cls, config: dict) -> "VQDiffusionScheduler":
        return cls(**config_kwargs(cls, config))

    def set_timesteps(self, num_inference_steps: int, device=None):
        """The steps T-1, ..., 0. The method does not skip steps: n < 100 runs only the last n of
        them, from a fully masked image at t = n - 1 (as diffusers does), which the model was not
        trained for (docs/parity/schedulers.md, "VQ-Diffusion runs the last n steps")."""
        check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        warn_unless_every_step(num_inference_steps, self.num_train_timesteps)
        self.timesteps = torch.arange(num_inference_steps - 1, -1, -1, device=device)
        for name in (
            "log_alpha",
            "log_beta",
            "log_gamma",
            "log_alpha_bar",
            "log_beta_bar",
            "log_gamma_bar",
        ):
            setattr(self, name, getattr(self, name).to(device))

    def step(
        self,
        log_p_x_0: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample x_{t-1} (B, N) from the model's log p(x0 | x_t) (B, K, N) and the current codes
        x_t (B, N)."""
        check_timesteps_set(self.timesteps, "step")
        t = int(timestep)
        if t == 0:
            log_p = log_p_x_0  # (B, K, N): the last step samples x0 itself
        else:
            log_p = self.log_posterior(log_p_x_0, sample, t)  # (B, K+1, N), eq. 11
        gumbel = self._gumbel_noise(log_p.shape, generator, log_p.device)
        return (log_p + gumbel).argmax(dim=1)  # (B, N)

    @staticmethod
    def _gumbel_noise(shape, generator, device):
        """-log(-log(u)), u ~ U(0, 1): argmax(log p + this) is a sample from p (the Gumbel-max
        trick). Drawn with torch.rand from `generator` as diffusers draws it (on the generator's
        device)."""
        uniform = rand(shape, generator, device)
        return -torch.log(-torch.log(uniform + 1e-30) + 1e-30)

    def log_posterior(self, log_p_x_0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """log p(x_{t-1} | x_t) = log sum_x0 q(x_{t-1} | x_t, x0) p(x0 | x_t) (eq. 11), (B, K+1, N).
        t: one step (an int) or one per image (a (B,) tensor, in training).

        By Bayes, q(x_{t-1} | x_t, x0) = q(x_t | x_{t-1}) q(x_{t-1} | x0) / q(x_t | x0). So: weight
        each candidate x0 by p(x0 | x_t) / q(x_t | x0), normalise, carry it t-1 steps forward with
        the cumulative transition, and multiply by the one-step likelihood q(x_t | x_{t-1}).
        """
        onehot_x_t = F.one_hot(x_t, self.mask_class + 1).permute(0, 2, 1).float()
        log_onehot_x_t = torch.log(onehot_x_t.clamp(min=1e-30))  # (B, K+1, N)
        log_q_x_t_given_x0 = self._log_q_x_t_given(x_t, log_onehot_x_t, t, cumulative=True)
        weights = log_p_x_0 - log_q_x_t_given_x0  # (B, K, N)
        normaliser = torch.logsumexp(weights, dim=1, keepdim=True)
        weights = weights - normaliser
        # (B, K+1, N): q(x_{t-1}) from the weighted x0
        log_q_prev = self._forward_cumulative(weights, t - 1)
        log_q_one_step = self._log_q_x_t_given(x_t, log_onehot_x_t, t, cumulative=False)
        return log_q_prev + log_q_one_step + normaliser

    def _log_q_x_t_given(self, x_t, log_onehot_x_t, t: int, cumulative: bool) -> torch.Tensor:
        """As a function of the earlier state, the log-probability of reaching the observed x_t:
        q(x_t | x0) over the K codes x0 (cumulative, (B, K, N)), or q(x_t | x_{t-1}) over the K
        codes and the mask (one step, (B, K+1, N))."""
        if cumulative:
            schedules = (self.log_alpha_bar, self.log_beta_bar, self.log_gamma_bar)
        else:
            schedules = (self.log_alpha, self.log_beta, self.log_gamma)
        log_a, log_b, log_c = (_at(values, t) for values in schedules)
        # from a code: stay (alpha + beta) if it is the observed code, else move to it (beta)
        log_q = (log_onehot_x_t[:, :-1, :] + log_a).logaddexp(log_b)  # (B, K, N)
        # where x_t is the mask, every code reached it with probability gamma
        log_q = torch.where((x_t == self.mask_class).unsqueeze(1), log_c, log_q)
        if not cumulative:
            # from the mask one can only stay masked: probability 1 iff x_t is the mask
            log_q = torch.cat((log_q, log_onehot_x_t[:, -1:, :]), dim=1)  # (B, K+1, N)
        return log_q

    def _forward_cumulative(self, log_p_x_0: torch.Tensor, t: int) -> torch.Tensor:
        """Push a distribution over codes (B, K, N) through t+1 steps of noise: (B, K+1, N) over
        codes and the mask. At t = -1 this is the identity (alpha_bar 1, gamma_bar 0)."""
        B, _, N = log_p_x_0.shape
        codes = (log_p_x_0 + _at(self.log_alpha_bar, t)).logaddexp(_at(self.log_beta_bar, t))
        return torch.cat((codes, _at(self.log_gamma_bar, t).expand(B, 1, N)), dim=1)

    def log_q_x_t_given_x_0(self, x_0: torch.Tensor, t) -> torch.Tensor:
        """The forward process in one jump (eq. 6): log q(x_t | x0) over the K codes and the mask,
        (B, K+1, N), for clean codes x_0 (B, N). What training samples x_t from."""
        onehot_x_0 = F.one_hot(x_0, self.mask_class).permute(0, 2, 1).float()  # (B, K, N)
        log_onehot_x_0 = torch.log(onehot_x_0.clamp(min=1e-30))
        return self._forward_cumulative(log_onehot_x_0, t)
