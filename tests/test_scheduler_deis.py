"""DEIS: every timestep and every step equal to diffusers', for the official configs and the common
options; the end of the schedule, the rounding of the weights, and bad input."""

import warnings

import pytest
import torch
from conftest import (
    SCHEDULER_CONFIGS,
    compare_scheduler_steps,
    fake_model,
    max_relative_error,
    reference_scheduler,
    scheduler_from_config,
)

from minildm.schedulers.deis import DEISMultistepScheduler, eps_weights

STEPS = [1, 3, 10, 25, 50]
# on top of each official config (from_config of a PNDM or DDIM config, as the blog swaps
# schedulers); second order is DEIS's default
VARIANTS = {
    "as published": {},
    "first order": {"solver_order": 1},
    "third order": {"solver_order": 3},
    "leading": {"timestep_spacing": "leading"},  # with SD's steps_offset=1
    "trailing": {"timestep_spacing": "trailing"},
    "third order, trailing": {"solver_order": 3, "timestep_spacing": "trailing"},
    # at 50 steps SD and LDM repeat timesteps at the clean end; the last step has size 0
    "karras sigmas": {"use_karras_sigmas": True},
    "third order, karras sigmas": {"solver_order": 3, "use_karras_sigmas": True},
    "karras sigmas, cosine betas": {
        "use_karras_sigmas": True,
        "beta_schedule": "squaredcos_cap_v2",
    },  # the first timestep can repeat: see _reference
    "v_prediction": {"prediction_type": "v_prediction"},
    "sample prediction": {"prediction_type": "sample"},
    # the largest float32 cancellation in the weights: see
    # test_third_order_weights_are_sensitive_to_rounding
    "third order, v_prediction": {"solver_order": 3, "prediction_type": "v_prediction"},
    "third order, sample prediction": {"solver_order": 3, "prediction_type": "sample"},
    # changes the steps below 15 steps only (diffusers' rule)
    "lower_order_final off": {"lower_order_final": False},
    "third order, lower_order_final off": {"solver_order": 3, "lower_order_final": False},
}


def _reference(config):
    """diffusers' DEIS. With Karras sigmas and cosine betas a timestep at the noisy end can repeat,
    and diffusers' lookup of the first step then takes the repeat's second place; its img2img
    pipelines call set_begin_index, which makes it start at the first place, and so does this (as
    in test_scheduler_dpm_unipc.py)."""
    reference = reference_scheduler("DEISMultistepScheduler", config)
    if config.get("use_karras_sigmas") and config.get("beta_schedule") == "squaredcos_cap_v2":
        set_timesteps = reference.set_timesteps

        def set_timesteps_from_the_first_step(num_inference_steps):
            set_timesteps(num_inference_steps)
            reference.set_begin_index(0)

        reference.set_timesteps = set_timesteps_from_the_first_step
    return reference


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("official", list(SCHEDULER_CONFIGS))
def test_deis_steps(official, variant, steps):
    config = dict(SCHEDULER_CONFIGS[official], **VARIANTS[variant])
    compare_scheduler_steps(
        scheduler_from_config(DEISMultistepScheduler, config),
        _reference(config),
        steps,
        f"DEIS {official} {variant}",
    )


def test_karras_schedules_do_repeat_timesteps():
    # so the parity tests above do cover finding a step whose timestep value is not unique
    scheduler = scheduler_from_config(
        DEISMultistepScheduler, dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], use_karras_sigmas=True)
    )
    scheduler.set_timesteps(50)
    assert len(set(scheduler.timesteps.tolist())) < 50


@pytest.mark.parametrize("other", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_from_a_dpm_solver_or_unipc_config(other):
    # their algorithm_type ('dpmsolver++') and solver_type ('midpoint', 'bh2') are read as DEIS's
    # defaults, as diffusers reads them; their other keys do not apply
    config = dict(reference_scheduler(other, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"]).config)
    # as saved to disk: in memory, diffusers lists the keys left at their defaults, and its
    # from_config resets those to the new class's defaults (solver_order=3 would be read as 2)
    del config["_use_default_values"]
    for order in (2, 3):
        config["solver_order"] = order
        compare_scheduler_steps(
            scheduler_from_config(DEISMultistepScheduler, config),
            reference_scheduler("DEISMultistepScheduler", config),
            20,
            f"DEIS order {order} from a {other} config",
        )


@pytest.mark.parametrize("karras", [False, True])
def test_deis_ends_at_the_smallest_training_noise_level(karras):
    # not at sigma = 0, where log rho = -inf; with Karras sigmas the levels already end there, and
    # the last level repeats: the last step has size 0 and returns its input unchanged
    config = dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], use_karras_sigmas=karras)
    ours, theirs = (
        scheduler_from_config(DEISMultistepScheduler, config),
        _reference(config),
    )
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    a = ours.alphas_cumprod[0]
    sigma_min = ((1 - a) / a) ** 0.5
    print(f"karras={karras}: last levels {ours.sigmas[-2:].tolist()}, sigma_min {sigma_min:.6f}")
    assert ours.sigmas[-1] == pytest.approx(float(sigma_min), rel=1e-6)
    assert torch.equal(ours.sigmas, theirs.sigmas)
    assert (ours.sigmas[-1] == ours.sigmas[-2]) == karras

    # one step with Karras sigmas: from sigma_max to sigma_max, the starting noise comes back
    ours.set_timesteps(1)
    theirs.set_timesteps(1)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = ours.timesteps[0]
    got = ours.step(fake_model(noise, t), t, noise)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs.step(fake_model(noise, t), t, noise).prev_sample
    assert max_relative_error(got, expected) < 1e-6
    assert torch.equal(got, noise) == karras


def test_weights_integrate_polynomials_in_log_rho_exactly():
    # in float64, independently of diffusers: the weights of order k integrate every polynomial
    # of degree < k in u = log rho exactly, int from rho_s to rho_t of u^m d rho
    rho_t, rho_s, rho_1, rho_2 = torch.tensor([0.5, 0.8, 1.3, 2.0], dtype=torch.float64)
    u_t, u_s, u_1, u_2 = (torch.log(r) for r in (rho_t, rho_s, rho_1, rho_2))

    def exact(m):  # antiderivatives rho (u - 1) and rho (u^2 - 2u + 2) of u and u^2
        antiderivative = [
            lambda r, u: r,
            lambda r, u: r * (u - 1),
            lambda r, u: r * (u**2 - 2 * u + 2),
        ][m]
        return antiderivative(rho_t, u_t) - antiderivative(rho_s, u_s)

    for nodes in ([u_s, u_1], [u_s, u_1, u_2]):
        weights = eps_weights(rho_t, u_t, rho_s, u_s, nodes)
        for m in range(len(nodes)):
            integral = sum(w * u**m for w, u in zip(weights, nodes, strict=True))
            assert float(integral) == pytest.approx(float(exact(m)), rel=1e-12)


def test_third_order_weights_are_sensitive_to_rounding():
    # the weights are small differences of large values, so the same arithmetic in float64 moves
    # diffusers' own third-order steps by far more than the parity tolerance: matching diffusers
    # to 1e-6 takes its float32 rounding (see minildm/schedulers/deis.py)
    config = dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], solver_order=3, prediction_type="sample")
    float32, float64 = _reference(config), _reference(config)
    float32.set_timesteps(50)
    float64.set_timesteps(50)
    float64.sigmas = float64.sigmas.double()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in float32.timesteps:
            output = fake_model(x, t)
            step_32 = float32.step(output, t, x).prev_sample
            step_64 = float64.step(output.double(), t, x.double()).prev_sample
            worst = max(worst, max_relative_error(step_32, step_64))
            x = step_32
    print(f"diffusers' DEIS-3 in float32 against float64: worst step relative error {worst:.1e}")
    assert worst > 1e-5


def test_lower_order_final_only_below_15_steps():
    config = dict(SCHEDULER_CONFIGS["LDM text2im (DDIM)"], solver_order=3)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for steps, changes in ((14, True), (15, False)):
        results = []
        for lower_order_final in (True, False):
            scheduler = DEISMultistepScheduler.from_config(
                dict(config, lower_order_final=lower_order_final)
            )
            scheduler.set_timesteps(steps)
            x = sample
            for t in scheduler.timesteps:
                x = scheduler.step(fake_model(x, t), t, x)
            results.append(x)
        assert torch.equal(results[0], results[1]) != changes


def test_set_timesteps_starts_afresh():
    # a second run on the same scheduler (and a generator, accepted and unused) gives what a fresh
    # scheduler gives
    config = dict(SCHEDULER_CONFIGS["LDM text2im (DDIM)"], solver_order=3)
    used = scheduler_from_config(DEISMultistepScheduler, config)
    fresh = scheduler_from_config(DEISMultistepScheduler, config)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for scheduler, runs in ((used, 2), (fresh, 1)):
        for _ in range(runs):
            scheduler.set_timesteps(10)
            x = sample
            for t in scheduler.timesteps:
                x = scheduler.step(
                    fake_model(x, t), t, x, generator=torch.Generator().manual_seed(0)
                )
        results.append(x)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("karras", [False, True])
def test_add_noise(karras):
    # at the schedule's own noise levels, as diffusers (which needs set_timesteps first: before it,
    # diffusers reads the levels in reverse order, so ours refuses)
    config = dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], use_karras_sigmas=karras)
    ours = scheduler_from_config(DEISMultistepScheduler, config)
    theirs = reference_scheduler("DEISMultistepScheduler", config)
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    # unique timesteps (diffusers takes a repeated one's second place, ours its first)
    t = theirs.timesteps[[0, 7, 12]]
    error = max_relative_error(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    print(f"DEIS add_noise, karras={karras}: relative error {error:.1e}")
    assert error < 1e-6
    with pytest.raises(ValueError, match="timestep 5 is not one of this schedule's timesteps"):
        ours.add_noise(x0, noise, torch.tensor([5, 5, 5]))
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        DEISMultistepScheduler().add_noise(x0, noise, t)


def test_bad_input_is_refused():
    cls = DEISMultistepScheduler
    with pytest.raises(
        ValueError,
        match="num_inference_steps must be an integer from 1 to num_train_timesteps "
        "\\(1000\\), got 0",
    ):
        cls().set_timesteps(0)
    with pytest.raises(ValueError, match="got 1001"):
        cls().set_timesteps(1001)
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'"):
        cls(beta_schedule="cosine")
    with pytest.raises(RuntimeError, match="call set_timesteps\\(...\\) before step\\(\\)"):
        cls().step(torch.zeros(1), 10, torch.zeros(1))
    with pytest.raises(ValueError, match="prediction_type must be .*got 'flow_prediction'"):
        cls(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="timestep_spacing must be"):
        cls(timestep_spacing="karras")
    with pytest.raises(ValueError, match="solver_order must be 1, 2 or 3, got 4"):
        cls(solver_order=4)
    with pytest.raises(ValueError, match="solver_type must be 'logrho' .*got 'euler'"):
        cls(solver_type="euler")
    with pytest.raises(
        ValueError, match="algorithm_type must be 'deis' .*got 'sde-dpmsolver\\+\\+'"
    ):
        cls(algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="thresholding=True is not implemented"):
        cls.from_config({"thresholding": True})
    with pytest.raises(ValueError, match="use_exponential_sigmas=True is not implemented"):
        cls.from_config({"use_exponential_sigmas": True})
    with pytest.raises(ValueError, match="use_flow_sigmas=True is not implemented"):
        cls.from_config({"use_flow_sigmas": True})
    with pytest.raises(ValueError, match="reaches timestep 1000, outside the 1000 training steps"):
        cls(timestep_spacing="leading", steps_offset=1).set_timesteps(999)
    with pytest.raises(ValueError, match="visits a timestep twice"):
        cls(timestep_spacing="leading").set_timesteps(1000)
    scheduler = cls()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 5 is not one of this schedule's timesteps"):
        scheduler.step(torch.zeros(1), 5, torch.zeros(1))
    t = scheduler.timesteps[0]
    scheduler.step(torch.zeros(1), t, torch.zeros(1))
    with pytest.raises(
        ValueError, match=f"timestep {int(t)} is not among the steps still to take"
    ):  # no stepping twice
        scheduler.step(torch.zeros(1), t, torch.zeros(1))
