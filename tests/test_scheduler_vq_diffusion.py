"""VQ-Diffusion scheduler: the same sampled indices as diffusers at every step, with the same
generator."""

import pytest
import torch
from conftest import max_relative_error, oracle

from minildm.schedulers.vq_diffusion import VQDiffusionScheduler

# the hub's scheduler/scheduler_config.json of microsoft/vq-diffusion-ithq: the class defaults, as
# diffusers' scripts/convert_vq_diffusion_to_diffusers.py passes only num_vec_classes
HUB_CONFIG = {
    "_class_name": "VQDiffusionScheduler",
    "_diffusers_version": "0.8.0.dev0",
    "alpha_cum_end": 9e-06,
    "alpha_cum_start": 0.99999,
    "gamma_cum_end": 0.99999,
    "gamma_cum_start": 9e-06,
    "num_train_timesteps": 100,
    "num_vec_classes": 4097,
}
K, N = 4096, 64  # the official 4096 codes, over a small 8x8 grid


def fake_log_p_x_0(x_t: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in for the transformer: log-probabilities over the K codes that depend
    on the current codes and the step, peaked enough that sampling is not uniform."""
    g = torch.Generator().manual_seed(1000 + t)
    logits = 3 * torch.randn(x_t.shape[0], K, x_t.shape[1], generator=g)
    logits += (
        2
        * torch.nn.functional.one_hot(x_t.clamp(max=K - 1), K).permute(0, 2, 1)
        * (x_t != K)[:, None, :]
    )
    return torch.log_softmax(logits.double(), dim=1).float()


@pytest.mark.parametrize("steps", [100, 10])
def test_same_indices_as_diffusers_at_every_step(steps):
    diffusers = oracle("diffusers")
    ours = VQDiffusionScheduler.from_config(HUB_CONFIG)
    theirs = diffusers.VQDiffusionScheduler.from_config(
        {k: v for k, v in HUB_CONFIG.items() if k != "_class_name"}
    )
    if steps == 100:
        ours.set_timesteps(steps)
    else:
        with pytest.warns(UserWarning, match="does not subsample"):
            ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x_t = torch.full((2, N), K)  # start fully masked
    ours_generator, theirs_generator = (
        torch.Generator().manual_seed(0),
        torch.Generator().manual_seed(0),
    )
    worst_posterior, masked_left = 0.0, []
    for t in theirs.timesteps:
        log_p_x_0 = fake_log_p_x_0(x_t, int(t))
        if t > 0:
            worst_posterior = max(
                worst_posterior,
                max_relative_error(
                    ours.log_posterior(log_p_x_0, x_t, int(t)),
                    theirs.q_posterior(log_p_x_0, x_t, t),
                ),
            )
        expected = theirs.step(log_p_x_0, t, x_t, generator=theirs_generator).prev_sample
        got = ours.step(log_p_x_0, t, x_t, generator=ours_generator)
        assert torch.equal(got, expected), f"indices differ at t={int(t)}"
        x_t = expected
        masked_left.append(int((x_t == K).sum()))
    print(
        f"VQ-Diffusion scheduler, {steps} steps: sampled indices identical at every step; "
        f"log-posterior max relative error {worst_posterior:.1e}; masked tokens left: "
        f"{masked_left[0]} after the first step, {masked_left[-1]} at the end"
    )
    assert worst_posterior < 1e-6 and masked_left[-1] == 0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"from 1 to num_train_timesteps \(100\), got 101"):
        VQDiffusionScheduler().set_timesteps(101)
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        VQDiffusionScheduler().step(torch.zeros(1, K, N), 0, torch.zeros(1, N, dtype=torch.long))
