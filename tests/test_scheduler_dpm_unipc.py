"""DPM-Solver++ and UniPC: every timestep and every step equal to diffusers', for the official
configs and the common options."""

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

from minildm.schedulers.dpm_solver import DPMSolverMultistepScheduler
from minildm.schedulers.unipc import UniPCMultistepScheduler

STEPS = [1, 3, 10, 25, 50]
# on top of each official config (from_config of a PNDM or DDIM config, as the blog swaps
# schedulers)
COMMON_VARIANTS = {
    "as published": {},
    "leading": {"timestep_spacing": "leading"},  # with SD's steps_offset=1
    "trailing": {"timestep_spacing": "trailing"},
    "karras sigmas": {
        "use_karras_sigmas": True
    },  # at 50 steps SD and LDM repeat timesteps at the clean end
    "karras sigmas, cosine betas": {
        "use_karras_sigmas": True,
        "beta_schedule": "squaredcos_cap_v2",
    },  # the first timestep repeats: see _reference
    "first order": {"solver_order": 1},
    "v_prediction": {"prediction_type": "v_prediction"},
    "sample prediction": {"prediction_type": "sample"},
}
DPM_VARIANTS = {
    **COMMON_VARIANTS,
    "heun": {"solver_type": "heun"},
    "lower_order_final off": {"lower_order_final": False},
    "karras sigmas, heun, v_prediction": {
        "use_karras_sigmas": True,
        "solver_type": "heun",
        "prediction_type": "v_prediction",
    },
}
# UniPC with lower_order_final=False is left out: diffusers' last step then divides by r = 0 and
# returns inf (ours refuses it)
UNIPC_VARIANTS = {
    **COMMON_VARIANTS,
    "third order": {"solver_order": 3},
    "bh1": {"solver_type": "bh1"},
    "bh1, third order, karras sigmas": {
        "solver_type": "bh1",
        "solver_order": 3,
        "use_karras_sigmas": True,
    },
    "corrector off after steps 0 and 2": {"disable_corrector": [0, 2]},
}


def _reference(class_name, config):
    """diffusers' scheduler. With Karras sigmas and cosine betas the first timestep repeats (998,
    998, ... from 10 steps on) and diffusers' text-to-image loop fails: it looks the first step up
    as the repeat's second place and runs off the end of the schedule (IndexError). Its img2img
    pipelines call set_begin_index, which makes it start at the first place; the reference does the
    same here."""
    reference = reference_scheduler(class_name, config)
    if config.get("use_karras_sigmas") and config.get("beta_schedule") == "squaredcos_cap_v2":
        set_timesteps = reference.set_timesteps

        def set_timesteps_from_the_first_step(num_inference_steps):
            set_timesteps(num_inference_steps)
            reference.set_begin_index(0)

        reference.set_timesteps = set_timesteps_from_the_first_step
    return reference


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variant", list(DPM_VARIANTS))
@pytest.mark.parametrize("official", list(SCHEDULER_CONFIGS))
def test_dpm_solver_steps(official, variant, steps):
    config = dict(SCHEDULER_CONFIGS[official], **DPM_VARIANTS[variant])
    compare_scheduler_steps(
        scheduler_from_config(DPMSolverMultistepScheduler, config),
        _reference("DPMSolverMultistepScheduler", config),
        steps,
        f"DPM++ {official} {variant}",
    )


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variant", list(UNIPC_VARIANTS))
@pytest.mark.parametrize("official", list(SCHEDULER_CONFIGS))
def test_unipc_steps(official, variant, steps):
    config = dict(SCHEDULER_CONFIGS[official], **UNIPC_VARIANTS[variant])
    compare_scheduler_steps(
        scheduler_from_config(UniPCMultistepScheduler, config),
        _reference("UniPCMultistepScheduler", config),
        steps,
        f"UniPC {official} {variant}",
    )


def test_karras_schedules_do_repeat_timesteps():
    # so the parity tests above do cover finding a step whose timestep value is not unique
    for cls in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        scheduler = scheduler_from_config(
            cls, dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], use_karras_sigmas=True)
        )
        scheduler.set_timesteps(50)
        assert len(set(scheduler.timesteps.tolist())) < 50


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_swapping_between_dpm_solver_and_unipc_configs(cls):
    # a UniPC config given to DPM-Solver++ (solver_type 'bh2') and back ('midpoint'): diffusers
    # reads the other's solver_type as its default
    other = (
        "UniPCMultistepScheduler"
        if cls is DPMSolverMultistepScheduler
        else "DPMSolverMultistepScheduler"
    )
    config = dict(reference_scheduler(other, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"]).config)
    compare_scheduler_steps(
        scheduler_from_config(cls, config),
        reference_scheduler(cls.__name__, config),
        20,
        f"{cls.__name__} from a {other} config",
    )


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_from_a_deis_config(cls):
    # DEIS's algorithm_type 'deis' and solver_type 'logrho' are read as the defaults, as diffusers
    # reads them
    config = dict(
        reference_scheduler("DEISMultistepScheduler", SCHEDULER_CONFIGS["SD v1-4 (PNDM)"]).config
    )
    assert config["algorithm_type"] == "deis" and config["solver_type"] == "logrho"
    compare_scheduler_steps(
        scheduler_from_config(cls, config),
        reference_scheduler(cls.__name__, config),
        20,
        f"{cls.__name__} from a DEIS config",
    )


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_set_timesteps_starts_afresh(cls):
    # a second run on the same scheduler (and a generator, accepted and unused) gives what a fresh
    # scheduler gives
    config = SCHEDULER_CONFIGS["LDM text2im (DDIM)"]
    used, fresh = scheduler_from_config(cls, config), scheduler_from_config(cls, config)
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
@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_add_noise(cls, karras):
    # at the schedule's own noise levels, as diffusers (which needs set_timesteps first: before it,
    # diffusers reads the levels in reverse order, so ours refuses)
    config = dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], use_karras_sigmas=karras)
    ours, theirs = scheduler_from_config(cls, config), reference_scheduler(cls.__name__, config)
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = theirs.timesteps[
        [0, 7, 12]
    ]  # unique timesteps (diffusers takes a repeated one's second place, ours its first)
    error = max_relative_error(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    print(f"{cls.__name__} add_noise, karras={karras}: relative error {error:.1e}")
    assert error < 1e-6
    with pytest.raises(ValueError, match="timestep 5 is not one of this schedule's timesteps"):
        ours.add_noise(x0, noise, torch.tensor([5, 5, 5]))
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        cls().add_noise(x0, noise, t)


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_bad_input_is_refused(cls):
    with pytest.raises(
        ValueError,
        match="num_inference_steps must be an integer from 1 to num_train_timesteps \\(1000\\), got 0",
    ):
        cls().set_timesteps(0)
    with pytest.raises(ValueError, match="got 1001"):
        cls().set_timesteps(1001)
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'"):
        cls(beta_schedule="cosine")
    with pytest.raises(RuntimeError, match="call set_timesteps\\(...\\) before step\\(\\)"):
        cls().step(torch.zeros(1), 10, torch.zeros(1))
    with pytest.raises(ValueError, match="prediction_type must be"):
        cls(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="timestep_spacing must be"):
        cls(timestep_spacing="karras")
    with pytest.raises(ValueError, match="solver_type must be"):
        cls(solver_type="euler")
    with pytest.raises(ValueError, match="thresholding=True is not implemented"):
        cls.from_config({"thresholding": True})
    with pytest.raises(ValueError, match="final_sigmas_type='sigma_min' is not implemented"):
        cls.from_config({"final_sigmas_type": "sigma_min"})
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


def test_bad_solver_options_are_refused():
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver\\+\\+' is not implemented"):
        DPMSolverMultistepScheduler.from_config({"algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(ValueError, match="use_lu_lambdas=True is not implemented"):
        DPMSolverMultistepScheduler.from_config({"use_lu_lambdas": True})
    with pytest.raises(ValueError, match="solver_order must be 1 or 2"):
        DPMSolverMultistepScheduler(solver_order=3)
    with pytest.raises(ValueError, match="predict_x0=False is not implemented"):
        UniPCMultistepScheduler.from_config({"predict_x0": False})
    with pytest.raises(ValueError, match="solver_order must be 1, 2 or 3"):
        UniPCMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="lower_order_final=False is not supported"):
        UniPCMultistepScheduler(lower_order_final=False)
