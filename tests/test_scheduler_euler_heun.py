"""Euler, Euler ancestral and Heun: every timestep and every step equal to diffusers', on the three
official configs, Karras sigmas included; Euler ancestral with the same generator."""

import numpy as np
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

from minildm.schedulers.euler import EulerDiscreteScheduler
from minildm.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from minildm.schedulers.heun import HeunDiscreteScheduler

STEPS = [1, 3, 10, 50]
# the common options, on top of each official config (the SD config's steps_offset=1 shows with
# "leading")
VARIANTS = {
    "as published": {},
    "leading": {"timestep_spacing": "leading"},
    "trailing": {"timestep_spacing": "trailing"},
    "v_prediction": {"prediction_type": "v_prediction"},
    "cosine betas": {"beta_schedule": "squaredcos_cap_v2"},
    "sample prediction": {"prediction_type": "sample"},
    "karras": {"use_karras_sigmas": True},
    "karras, leading, v_prediction": {
        "use_karras_sigmas": True,
        "timestep_spacing": "leading",
        "prediction_type": "v_prediction",
    },
    "karras, trailing": {"use_karras_sigmas": True, "timestep_spacing": "trailing"},
}
# diffusers' Euler ancestral has neither "sample" prediction (its step raises NotImplementedError)
# nor Karras sigmas
ANCESTRAL_VARIANTS = [v for v in VARIANTS if v != "sample prediction" and "karras" not in v]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("official", list(SCHEDULER_CONFIGS))
def test_euler(official, variant, steps):
    config = dict(SCHEDULER_CONFIGS[official], **VARIANTS[variant])
    compare_scheduler_steps(
        scheduler_from_config(EulerDiscreteScheduler, config),
        reference_scheduler("EulerDiscreteScheduler", config),
        steps,
        f"Euler {official} {variant}",
    )


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variant", ANCESTRAL_VARIANTS)
@pytest.mark.parametrize("official", list(SCHEDULER_CONFIGS))
def test_euler_ancestral_same_generator(official, variant, steps):
    config = dict(SCHEDULER_CONFIGS[official], **VARIANTS[variant])
    compare_scheduler_steps(
        scheduler_from_config(EulerAncestralDiscreteScheduler, config),
        reference_scheduler("EulerAncestralDiscreteScheduler", config),
        steps,
        f"Euler ancestral {official} {variant}",
        seed=5,
    )


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("official", list(SCHEDULER_CONFIGS))
def test_heun(official, variant, steps):
    config = dict(SCHEDULER_CONFIGS[official], **VARIANTS[variant])
    compare_scheduler_steps(
        scheduler_from_config(HeunDiscreteScheduler, config),
        reference_scheduler("HeunDiscreteScheduler", config),
        steps,
        f"Heun {official} {variant}",
    )


@pytest.mark.parametrize(
    "cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler]
)
def test_add_noise(cls):
    config = dict(
        SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], timestep_spacing="leading"
    )  # img2img's setting
    ours, theirs = scheduler_from_config(cls, config), reference_scheduler(cls.__name__, config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = theirs.timesteps[[0, 4, -1]]  # for Heun, 4 is the second of a repeated pair
    error = max_relative_error(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    print(f"{cls.__name__} add_noise at {t.tolist()}: relative error {error:.1e}")
    assert error < 1e-6


def test_schedule_values():
    # SD's training noise levels run from sigma_min 0.0292 to sigma_max 14.6146; Karras sigmas
    # (eq. 5) are evenly spaced in sigma^(1/7)
    euler = scheduler_from_config(EulerDiscreteScheduler, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"])
    euler.set_timesteps(50)
    assert (
        euler.timesteps[0].item() == 999
        and euler.timesteps[-1].item() == 0
        and euler.sigmas[-1].item() == 0
    )
    assert euler.init_noise_sigma.item() == pytest.approx(14.6146, rel=1e-4) and euler.sigmas[
        -2
    ].item() == pytest.approx(0.029168, rel=1e-3)
    karras = scheduler_from_config(
        EulerDiscreteScheduler, dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], use_karras_sigmas=True)
    )
    karras.set_timesteps(50)
    assert karras.sigmas[[0, -2]].tolist() == pytest.approx(
        euler.sigmas[[0, -2]].tolist(), rel=1e-6
    )  # the same two ends
    assert np.diff(karras.sigmas[:-1].double().numpy() ** (1 / 7)) == pytest.approx(
        np.full(49, (0.029168 ** (1 / 7) - 14.6146 ** (1 / 7)) / 49), rel=1e-3
    )
    heun = scheduler_from_config(HeunDiscreteScheduler, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"])
    heun.set_timesteps(3)
    assert heun.timesteps.tolist() == [999.0, 499.5, 499.5, 0.0, 0.0] and len(heun.sigmas) == 4


def test_trailing_spacing_has_as_many_steps_as_asked():
    # diffusers' trailing spacing takes a float arange that, for 62 of the step counts 1..1000 (61
    # is the first), yields one extra value near 0: diffusers then makes a step n + 1 at timestep
    # -1. minildm stops at n steps, equal to diffusers' first n (why 61 is not among the parity
    # tests' step counts).
    ours, theirs = (
        EulerDiscreteScheduler(timestep_spacing="trailing"),
        reference_scheduler("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    )
    ours.set_timesteps(61)
    theirs.set_timesteps(61)
    assert (
        len(ours.timesteps) == 61
        and len(theirs.timesteps) == 62
        and theirs.timesteps[-1].item() == -1
    )
    assert torch.equal(ours.timesteps, theirs.timesteps[:61]) and torch.equal(
        ours.sigmas[:61], theirs.sigmas[:61]
    )


def test_step_is_found_from_the_timestep_value():
    # no hidden counter: the same call twice gives the same result, and steps may come in any order
    euler = scheduler_from_config(EulerDiscreteScheduler, SCHEDULER_CONFIGS["LDM text2im (DDIM)"])
    euler.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    late = euler.step(fake_model(x, euler.timesteps[5]), euler.timesteps[5], x)
    euler.step(fake_model(x, euler.timesteps[0]), euler.timesteps[0], x)
    assert torch.equal(euler.step(fake_model(x, euler.timesteps[5]), euler.timesteps[5], x), late)
    assert torch.equal(
        euler.step(fake_model(x, 999), 999, x),
        euler.step(fake_model(x, 999), euler.timesteps[0], x),
    )


def test_heun_state_is_reset_by_set_timesteps():
    heun = scheduler_from_config(HeunDiscreteScheduler, SCHEDULER_CONFIGS["LDM text2im (DDIM)"])
    heun.set_timesteps(10)
    x, t = torch.randn(1, 4, 8, 8), heun.timesteps[0]
    first = heun.step(fake_model(x, t), t, x)
    assert heun.euler_stage is not None  # a correction is pending
    heun.set_timesteps(10)
    assert heun.euler_stage is None and torch.equal(heun.step(fake_model(x, t), t, x), first)


def test_bad_input_is_refused():
    with pytest.raises(
        ValueError,
        match="num_inference_steps must be an integer from 1 to num_train_timesteps \\(1000\\), got 0",
    ):
        EulerDiscreteScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="got 1001"):
        HeunDiscreteScheduler().set_timesteps(1001)
    with pytest.raises(ValueError, match="got 1001"):
        EulerAncestralDiscreteScheduler().set_timesteps(1001)
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'"):
        HeunDiscreteScheduler(beta_schedule="cosine")
    for cls in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler):
        with pytest.raises(
            RuntimeError, match="call set_timesteps\\(\\.\\.\\.\\) before step\\(\\)"
        ):
            cls().step(torch.zeros(1), 999.0, torch.zeros(1))
        with pytest.raises(RuntimeError, match="before scale_model_input"):
            cls().scale_model_input(torch.zeros(1), 999.0)
        with pytest.raises(ValueError, match="timestep_spacing must be"):
            cls(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="use_exponential_sigmas=True is not implemented"):
        EulerDiscreteScheduler.from_config({"use_exponential_sigmas": True})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=True is not implemented"):
        EulerAncestralDiscreteScheduler.from_config({"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="clip_sample=True is not implemented"):
        HeunDiscreteScheduler.from_config({"clip_sample": True})
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction'"):
        EulerAncestralDiscreteScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type must be"):
        EulerDiscreteScheduler(prediction_type="x0")
    with pytest.raises(ValueError, match="reaches timestep 1000, outside the 1000 training steps"):
        EulerDiscreteScheduler(steps_offset=1, timestep_spacing="leading").set_timesteps(1000)
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 500 is not one of this schedule's timesteps"):
        euler.step(torch.zeros(1), 500, torch.zeros(1))
