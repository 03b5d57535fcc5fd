"""KDPM2 and KDPM2 ancestral: every timestep (the midpoints' included) and every step equal to
diffusers', on the three official configs, Karras sigmas included; the ancestral one with the same
generator. Where diffusers' ancestral schedule is nan (the cosine schedule's first step at few
steps), minildm's is finite and exact."""

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

from minildm.schedulers.kdpm2 import KDPM2DiscreteScheduler
from minildm.schedulers.kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from minildm.schedulers.sigmas import sigma_schedule

# diffusers' KDPM2 passes torch tensors to numpy functions, which numpy 2 warns about thousands of
# times per test
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

STEPS = [1, 3, 10, 25, 50]
# the common options, on top of each official config (the SD config's steps_offset=1 shows with
# "leading"); diffusers' KDPM2 classes have no "sample" prediction
VARIANTS = {
    "as published": {},
    "leading": {"timestep_spacing": "leading"},
    "trailing": {"timestep_spacing": "trailing"},
    "v_prediction": {"prediction_type": "v_prediction"},
    "cosine betas": {"beta_schedule": "squaredcos_cap_v2"},
    "karras": {"use_karras_sigmas": True},
    "karras, leading, v_prediction": {
        "use_karras_sigmas": True,
        "timestep_spacing": "leading",
        "prediction_type": "v_prediction",
    },
    "karras, trailing": {"use_karras_sigmas": True, "timestep_spacing": "trailing"},
}
# diffusers' ancestral schedule is nan there (see test_ancestral_cosine_first_step_is_finite)
ANCESTRAL_NAN_IN_DIFFUSERS = {("cosine betas", 3), ("cosine betas", 10)}
ANCESTRAL_CASES = [
    (variant, steps)
    for variant in VARIANTS
    for steps in STEPS
    if (variant, steps) not in ANCESTRAL_NAN_IN_DIFFUSERS
]


def config_of(official, variant):
    return dict(SCHEDULER_CONFIGS[official], **VARIANTS[variant])


REFERENCES = {}


def reference(class_name, official, variant):
    """diffusers' scheduler, built once per config and shared by the step counts: building one
    runs its set_timesteps(1000), most of this file's time. set_timesteps resets all its state."""
    key = (class_name, official, variant)
    if key not in REFERENCES:
        REFERENCES[key] = reference_scheduler(class_name, config_of(official, variant))
    return REFERENCES[key]


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("official", list(SCHEDULER_CONFIGS))
def test_kdpm2(official, variant, steps):
    config = config_of(official, variant)
    compare_scheduler_steps(
        scheduler_from_config(KDPM2DiscreteScheduler, config),
        reference("KDPM2DiscreteScheduler", official, variant),
        steps,
        f"KDPM2 {official} {variant}",
    )


@pytest.mark.parametrize(("variant", "steps"), ANCESTRAL_CASES)
@pytest.mark.parametrize("official", list(SCHEDULER_CONFIGS))
def test_kdpm2_ancestral_same_generator(official, variant, steps):
    config = config_of(official, variant)
    compare_scheduler_steps(
        scheduler_from_config(KDPM2AncestralDiscreteScheduler, config),
        reference("KDPM2AncestralDiscreteScheduler", official, variant),
        steps,
        f"KDPM2 ancestral {official} {variant}",
        seed=5,
    )


def test_ancestral_trajectories_agree_end_to_end():
    # each side on its own samples for a whole run, as a pipeline runs it
    config = SCHEDULER_CONFIGS["SD v1-4 (PNDM)"]
    ours = scheduler_from_config(KDPM2AncestralDiscreteScheduler, config)
    theirs = reference_scheduler("KDPM2AncestralDiscreteScheduler", config)
    finals = []
    for scheduler, step in (
        (ours, lambda *args, **kw: ours.step(*args, **kw)),
        (theirs, lambda *args, **kw: theirs.step(*args, **kw).prev_sample),
    ):
        scheduler.set_timesteps(25)
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(2, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = step(fake_model(scheduler.scale_model_input(x, t), t), t, x, generator=generator)
        finals.append(x)
    error = max_relative_error(*finals)
    print(f"KDPM2 ancestral, SD, 25 steps (49 calls) end to end: relative error {error:.1e}")
    assert error < 1e-6


@pytest.mark.parametrize("cls", [KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler])
def test_add_noise(cls):
    config = dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], timestep_spacing="leading")  # img2img's
    ours, theirs = scheduler_from_config(cls, config), reference_scheduler(cls.__name__, config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = theirs.timesteps[[0, 4, -1]]  # levels' timesteps, where img2img starts
    error = max_relative_error(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    print(f"{cls.__name__} add_noise at {t.tolist()}: relative error {error:.1e}")
    assert error < 1e-6


def test_schedule_values():
    # SD, 3 steps: levels at 999, 499.5 and 0, and between them the midpoints, whose noise levels
    # are the geometric means of the levels around them
    kdpm2 = scheduler_from_config(KDPM2DiscreteScheduler, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"])
    kdpm2.set_timesteps(3)
    assert kdpm2.order == 2 and len(kdpm2.timesteps) == 5 and len(kdpm2.sigmas) == 4
    assert kdpm2.timesteps.tolist() == pytest.approx([999.0, 788.84363, 499.5, 46.725216, 0.0])
    levels = kdpm2.sigmas.double()
    geometric_means = (levels[:-2] * levels[1:-1]) ** 0.5
    assert kdpm2.mid_sigmas[:-1].tolist() == pytest.approx(geometric_means.tolist(), rel=1e-6)
    assert kdpm2.mid_sigmas[-1].item() == 0  # the last step, to 0, is Euler's

    # the ancestral midpoint between sigma and sigma_down = sigma_next^2 / sigma is sigma_next:
    # with leading spacing its timestep is the next level's, exactly or almost
    ancestral = scheduler_from_config(
        KDPM2AncestralDiscreteScheduler,
        dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], timestep_spacing="leading"),
    )
    ancestral.set_timesteps(3)
    assert ancestral.timesteps.tolist() == pytest.approx([667.0, 334.0, 334.0, 1.0000093, 1.0])
    assert ancestral.timesteps[1].item() == ancestral.timesteps[2].item() == 334.0
    assert ancestral.mid_sigmas[:-1].tolist() == pytest.approx(
        ancestral.sigmas[1:-1].tolist(), rel=1e-5
    )


def test_karras_timesteps_are_rounded_from_float64():
    # diffusers' KDPM2 rounds the timesteps of Karras levels, from float64. LDM's config, leading
    # spacing, 125 steps: level 22 is at timestep 847.49998, which float32 makes 847.5, which
    # rounds to 848; diffusers and minildm have 847
    config = dict(
        SCHEDULER_CONFIGS["LDM text2im (DDIM)"], use_karras_sigmas=True, timestep_spacing="leading"
    )
    ours = scheduler_from_config(KDPM2DiscreteScheduler, config)
    theirs = reference_scheduler("KDPM2DiscreteScheduler", config)
    ours.set_timesteps(125)
    theirs.set_timesteps(125)
    assert torch.equal(ours.timesteps.double(), theirs.timesteps.double())
    assert ours.level_timesteps[22].item() == 847.0
    fractional, _, _ = sigma_schedule(ours.alphas_cumprod, 125, "leading", 0, True)  # float32
    assert fractional[22].item() == 847.5 and fractional[22].round().item() == 848.0


def test_karras_levels_repeat_a_timestep():
    # rounded Karras timesteps repeat at low noise (SD, 50 steps: ..., 1, 1, 0): a step is looked
    # for after the last one begun, so the second 1 finds the second level
    config = dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], use_karras_sigmas=True)
    kdpm2 = scheduler_from_config(KDPM2DiscreteScheduler, config)
    kdpm2.set_timesteps(50)
    assert kdpm2.level_timesteps[-3:].tolist() == [1.0, 1.0, 0.0]
    assert len(np.unique(kdpm2.level_timesteps.numpy())) < 50  # the parity test covers this case


def test_midpoint_timesteps_need_numpys_float32_log():
    # diffusers takes the midpoints' log sigma with numpy's float32 log, which for some of SD's
    # training sigmas differs from torch's in the last bit: minildm's midpoint_timesteps uses
    # numpy's (the parity tests compare those timesteps exactly)
    kdpm2 = scheduler_from_config(KDPM2DiscreteScheduler, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"])
    train_sigmas = ((1 - kdpm2.alphas_cumprod) / kdpm2.alphas_cumprod) ** 0.5  # float32
    numpy_log = torch.from_numpy(np.log(train_sigmas.numpy()))
    assert not torch.equal(numpy_log, train_sigmas.log())


def test_ancestral_cosine_first_step_is_finite():
    # the cosine schedule's sigma_max is 20291; at 3 steps the first step goes down to 1.01, and
    # diffusers' float32 sigma_down^2 = sigma_next^2 - sigma_up^2 cancels to 0: its sigma_down is
    # 0, its midpoint and midpoint timestep nan. minildm's sigma_down is sigma_next^2 / sigma,
    # exact, and the midpoint sigma_next, as for every ancestral step
    config = dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], beta_schedule="squaredcos_cap_v2")
    ours = scheduler_from_config(KDPM2AncestralDiscreteScheduler, config)
    theirs = reference_scheduler("KDPM2AncestralDiscreteScheduler", config)
    ours.set_timesteps(3)
    theirs.set_timesteps(3)
    assert torch.isnan(theirs.timesteps[1]) and theirs.sigmas_down[0].item() == 0
    assert torch.isfinite(ours.timesteps).all()
    sigma, sigma_next = ours.sigmas[0].item(), ours.sigmas[1].item()
    assert ours.down_sigmas[0].item() == pytest.approx(sigma_next**2 / sigma, rel=1e-6)
    assert ours.mid_sigmas[0].item() == pytest.approx(sigma_next, rel=1e-6)
    # the other timesteps are diffusers'
    assert torch.equal(ours.timesteps[[0, 2, 3, 4]], theirs.timesteps[[0, 2, 3, 4]])
    # and a run stays finite
    x = torch.randn(1, 4, 8, 8) * ours.init_noise_sigma
    generator = torch.Generator().manual_seed(0)
    for t in ours.timesteps:
        x = ours.step(fake_model(ours.scale_model_input(x, t), t), t, x, generator=generator)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("cls", [KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler])
def test_stage_state(cls):
    scheduler = scheduler_from_config(cls, SCHEDULER_CONFIGS["LDM text2im (DDIM)"])
    scheduler.set_timesteps(10)
    x, t = torch.randn(1, 4, 8, 8), scheduler.timesteps[0]
    first = scheduler.step(fake_model(x, t), t, x, generator=torch.Generator().manual_seed(0))
    assert not scheduler.state_in_first_order  # the midpoint comes next
    # a level's timestep where the midpoint was due is refused, naming the midpoint
    with pytest.raises(ValueError, match="waits for its midpoint, timestep"):
        scheduler.step(fake_model(x, t), scheduler.timesteps[4], x)
    # set_timesteps forgets the pending stage
    scheduler.set_timesteps(10)
    assert scheduler.state_in_first_order
    again = scheduler.step(fake_model(x, t), t, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, first)  # the first stage draws no noise


def test_generator_is_accepted_and_only_the_ancestral_one_uses_it():
    x = torch.randn(1, 4, 8, 8)

    def run(cls, seed):
        scheduler = scheduler_from_config(cls, SCHEDULER_CONFIGS["CelebA-HQ (DDIM)"])
        scheduler.set_timesteps(5)
        generator, sample = torch.Generator().manual_seed(seed), x
        for t in scheduler.timesteps:
            model_output = fake_model(scheduler.scale_model_input(sample, t), t)
            sample = scheduler.step(model_output, t, sample, generator=generator)
        return sample

    assert torch.equal(run(KDPM2DiscreteScheduler, 0), run(KDPM2DiscreteScheduler, 1))
    assert torch.equal(
        run(KDPM2AncestralDiscreteScheduler, 0), run(KDPM2AncestralDiscreteScheduler, 0)
    )
    assert not torch.equal(
        run(KDPM2AncestralDiscreteScheduler, 0), run(KDPM2AncestralDiscreteScheduler, 1)
    )


@pytest.mark.parametrize("cls", [KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler])
def test_bad_input_is_refused(cls):
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
    with pytest.raises(
        ValueError,
        match="prediction_type must be 'epsilon' or 'v_prediction' \\(diffusers has no other\\), "
        "got 'sample'",
    ):
        cls(prediction_type="sample")
    with pytest.raises(ValueError, match="timestep_spacing must be 'linspace', 'leading' or"):
        cls(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="use_exponential_sigmas=True is not implemented"):
        cls.from_config({"use_exponential_sigmas": True})
    with pytest.raises(ValueError, match="use_beta_sigmas=True is not implemented"):
        cls.from_config({"use_beta_sigmas": True})
    with pytest.raises(ValueError, match="reaches timestep 1000, outside the 1000 training steps"):
        cls(steps_offset=1, timestep_spacing="leading").set_timesteps(1000)
    with pytest.raises(RuntimeError, match="call set_timesteps\\(\\.\\.\\.\\) before step\\(\\)"):
        cls().step(torch.zeros(1), 999.0, torch.zeros(1))
    with pytest.raises(RuntimeError, match="before scale_model_input"):
        cls().scale_model_input(torch.zeros(1), 999.0)
    scheduler = cls()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 500 is not one of this schedule's timesteps"):
        scheduler.step(torch.zeros(1), 500, torch.zeros(1))
    with pytest.raises(ValueError, match="is not one of this schedule's timesteps"):
        scheduler.add_noise(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([500.0]))
