"""PNDM and LMS: every timestep and every step equal to diffusers', with and without the
warm-ups."""

import pytest
import torch
from conftest import (
    SCHEDULER_CONFIGS,
    compare_scheduler_steps,
    max_relative_error,
    reference_scheduler,
    scheduler_from_config,
)

from minildm.schedulers.lms import LMSDiscreteScheduler, lms_coefficients
from minildm.schedulers.pndm import PNDMScheduler

STEPS = [
    1,
    3,
    9,
    10,
    50,
]  # 9: delta = 111 is odd, where PNDM's Runge-Kutta half step is not exactly half

PNDM_VARIANTS = {  # on top of each official config (the DDIM configs say nothing of skip_prk_steps)
    "PLMS (skip_prk_steps)": {"skip_prk_steps": True},
    "PRK warm-up": {"skip_prk_steps": False},
    "trailing": {"skip_prk_steps": True, "timestep_spacing": "trailing"},
    "linspace": {"skip_prk_steps": True, "timestep_spacing": "linspace"},
    "PRK, trailing": {"skip_prk_steps": False, "timestep_spacing": "trailing"},
    "PRK, linspace": {"skip_prk_steps": False, "timestep_spacing": "linspace"},
    "v_prediction": {"skip_prk_steps": True, "prediction_type": "v_prediction"},
    "PRK, v_prediction": {"skip_prk_steps": False, "prediction_type": "v_prediction"},
    "offset, alpha to one, cosine betas": {
        "steps_offset": 1,
        "set_alpha_to_one": True,
        "beta_schedule": "squaredcos_cap_v2",
    },
}
# diffusers' set_timesteps cannot build the Runge-Kutta warm-up below 4 steps (a numpy broadcast
# error); ours refuses with a ValueError, tested in test_bad_input_is_refused
PNDM_CASES = [
    (variant, steps)
    for variant, options in PNDM_VARIANTS.items()
    for steps in STEPS
    if options.get("skip_prk_steps") or steps >= 4
]

LMS_VARIANTS = {
    "linspace (default)": {},
    "leading": {"timestep_spacing": "leading"},
    "trailing": {"timestep_spacing": "trailing"},
    "v_prediction": {"prediction_type": "v_prediction"},
    # the largest difference, ~7e-7: diffusers' weights carry ~5e-8 relative error (it evaluates the
    # integrand in float32), which a step from |x| ~ 7 down to |x| ~ 0.65 magnifies tenfold; ours
    # are exact (see below, and docs/parity/schedulers.md, "LMS weights: exact integrals against
    # scipy's quadrature")
    "sample prediction": {"prediction_type": "sample"},
    "Karras sigmas": {"use_karras_sigmas": True},
    "Karras sigmas, leading": {"use_karras_sigmas": True, "timestep_spacing": "leading"},
    "Karras sigmas, trailing": {"use_karras_sigmas": True, "timestep_spacing": "trailing"},
    "cosine betas": {"beta_schedule": "squaredcos_cap_v2"},
}


@pytest.mark.parametrize("variant, steps", PNDM_CASES)
@pytest.mark.parametrize("official", list(SCHEDULER_CONFIGS))
def test_pndm(official, variant, steps):
    config = dict(SCHEDULER_CONFIGS[official], **PNDM_VARIANTS[variant])
    compare_scheduler_steps(
        scheduler_from_config(PNDMScheduler, config),
        reference_scheduler("PNDMScheduler", config),
        steps,
        f"PNDM {official} {variant}",
    )


@pytest.mark.parametrize("steps", [1, 3, 10, 50])
@pytest.mark.parametrize("variant", list(LMS_VARIANTS))
@pytest.mark.parametrize("official", list(SCHEDULER_CONFIGS))
def test_lms(official, variant, steps):
    config = dict(SCHEDULER_CONFIGS[official], **LMS_VARIANTS[variant])
    compare_scheduler_steps(
        scheduler_from_config(LMSDiscreteScheduler, config),
        reference_scheduler("LMSDiscreteScheduler", config),
        steps,
        f"LMS {official} {variant}",
    )


@pytest.mark.parametrize("order", [1, 2, 3])
def test_lms_lower_order(order):
    config = SCHEDULER_CONFIGS["SD v1-4 (PNDM)"]
    compare_scheduler_steps(
        scheduler_from_config(LMSDiscreteScheduler, config),
        reference_scheduler("LMSDiscreteScheduler", config),
        10,
        f"LMS SD order={order}",
        step_kwargs={"order": order},
    )


def test_lms_coefficients_are_adams_bashforth_on_an_even_grid():
    # sigma 3 -> 2 with the past derivatives at 3, 4, 5, 6: step h = -1 and the textbook weights
    # h * (55, -59, 37, -9) / 24
    assert lms_coefficients([3.0, 4.0, 5.0, 6.0], 2.0) == pytest.approx(
        [-55 / 24, 59 / 24, -37 / 24, 9 / 24], rel=1e-12
    )
    assert lms_coefficients([3.0, 4.0], 2.0) == pytest.approx([-3 / 2, 1 / 2], rel=1e-12)
    assert lms_coefficients([3.0], 2.5) == [-0.5]  # Euler


def test_add_noise():
    config = SCHEDULER_CONFIGS["SD v1-4 (PNDM)"]
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    error = max_relative_error(
        scheduler_from_config(PNDMScheduler, config).add_noise(x0, noise, t),
        reference_scheduler("PNDMScheduler", config).add_noise(x0, noise, t),
    )
    print(f"PNDMScheduler add_noise: relative error {error:.1e}")
    assert error < 1e-6

    ours, theirs = (
        scheduler_from_config(LMSDiscreteScheduler, config),
        reference_scheduler("LMSDiscreteScheduler", config),
    )
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    t = theirs.timesteps[[0, 4, 9]]  # LMS adds the noise of its own schedule's sigmas
    error = max_relative_error(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    print(f"LMSDiscreteScheduler add_noise: relative error {error:.1e}")
    assert error < 1e-6


def test_official_schedule_values():
    # SD v1-4's scheduler: PLMS without the Runge-Kutta warm-up, the second timestep repeated for
    # the Heun step
    sd = scheduler_from_config(PNDMScheduler, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"])
    sd.set_timesteps(50)
    assert len(sd.timesteps) == 51 and sd.timesteps.tolist() == [981, 961] + list(
        range(961, 0, -20)
    )
    assert sd.init_noise_sigma == 1.0 and sd.final_alpha_cumprod.item() == pytest.approx(
        0.99915, rel=1e-6
    )
    prk = PNDMScheduler(steps_offset=1)
    prk.set_timesteps(10)  # 3 RK4 steps of 4 calls, then 7 PLMS steps
    assert (
        prk.timesteps.tolist()[:13]
        == [901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601, 601]
        and len(prk.timesteps) == 19
    )
    lms = scheduler_from_config(LMSDiscreteScheduler, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"])
    lms.set_timesteps(50)
    assert (
        lms.init_noise_sigma == pytest.approx(14.6146, rel=1e-5)
        and lms.timesteps[0].item() == 999
        and lms.sigmas[-1].item() == 0
    )


def test_bad_input_is_refused():
    for cls in (PNDMScheduler, LMSDiscreteScheduler):
        with pytest.raises(
            ValueError,
            match="num_inference_steps must be an integer from 1 to num_train_timesteps \\(1000\\), got 0",
        ):
            cls().set_timesteps(0)
        with pytest.raises(ValueError, match="got 1001"):
            cls().set_timesteps(1001)
        with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'"):
            cls(beta_schedule="cosine")
        with pytest.raises(RuntimeError, match="call set_timesteps"):
            cls().step(torch.zeros(1), 10, torch.zeros(1))
        with pytest.raises(ValueError, match="timestep_spacing must be"):
            cls(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="use_beta_sigmas=True is not implemented"):
        LMSDiscreteScheduler.from_config({"use_beta_sigmas": True})
    with pytest.raises(ValueError, match="use_exponential_sigmas=True is not implemented"):
        LMSDiscreteScheduler.from_config({"use_exponential_sigmas": True})
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction'"):
        PNDMScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type must be"):
        LMSDiscreteScheduler(prediction_type="x0")
    with pytest.raises(ValueError, match="at least 4 with skip_prk_steps=False, got 3"):
        PNDMScheduler(skip_prk_steps=False).set_timesteps(3)
    with pytest.raises(ValueError, match="reaches timestep 1000, outside the 1000 training steps"):
        PNDMScheduler(steps_offset=1, skip_prk_steps=True).set_timesteps(1000)
    lms = LMSDiscreteScheduler()
    lms.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 500 is not one of this schedule's timesteps"):
        lms.step(torch.zeros(1), 500, torch.zeros(1))
