"""DPM-Solver(++) single-step: every timestep, every order and every step equal to diffusers', for
the official configs and the common options."""

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

from minildm.schedulers.dpm_solver_singlestep import DPMSolverSinglestepScheduler

CLASS_NAME = "DPMSolverSinglestepScheduler"
STEPS = [1, 3, 10, 25, 50]
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
# on top of each official config (from_config of a PNDM or DDIM config, as the blog swaps
# schedulers)
VARIANTS = {
    "as published": {},  # second order, midpoint
    "first order": {"solver_order": 1},
    "third order": {"solver_order": 3},
    "heun": {"solver_type": "heun"},
    "heun, third order": {"solver_type": "heun", "solver_order": 3},
    "karras sigmas": {"use_karras_sigmas": True},  # timesteps repeat at the clean end
    "karras sigmas, third order": {"use_karras_sigmas": True, "solver_order": 3},
    "karras sigmas, cosine betas, third order": {
        "use_karras_sigmas": True,
        "beta_schedule": "squaredcos_cap_v2",
        "solver_order": 3,
    },  # the first timestep repeats: see _reference
    "v_prediction, third order": {"prediction_type": "v_prediction", "solver_order": 3},
    "sample prediction": {"prediction_type": "sample"},
    "sample prediction, heun, third order": {
        "prediction_type": "sample",
        "solver_type": "heun",
        "solver_order": 3,
    },
    # with a final sigma of 0 diffusers turns lower_order_final on whatever it is given
    "lower_order_final on, third order": {"lower_order_final": True, "solver_order": 3},
    "lower_order_final off, third order": {"lower_order_final": False, "solver_order": 3},
    # not a key of this scheduler: diffusers and minildm both drop it (linspace spacing)
    "trailing spacing, ignored": {"timestep_spacing": "trailing"},
    "sigma_min": SIGMA_MIN,
    "sigma_min, lower_order_final off, third order": {
        **SIGMA_MIN,
        "lower_order_final": False,
        "solver_order": 3,
    },  # full third-order blocks to the end at 3 steps
    "sigma_min, karras sigmas, lower_order_final off": {
        **SIGMA_MIN,
        "use_karras_sigmas": True,
        "lower_order_final": False,
    },  # the last Karras level is sigma_min itself: a last step of size 0
    "dpmsolver": {**SIGMA_MIN, "algorithm_type": "dpmsolver"},
    "dpmsolver, heun, third order": {
        **SIGMA_MIN,
        "algorithm_type": "dpmsolver",
        "solver_type": "heun",
        "solver_order": 3,
    },
    "dpmsolver, v_prediction, third order": {
        **SIGMA_MIN,
        "algorithm_type": "dpmsolver",
        "prediction_type": "v_prediction",
        "solver_order": 3,
    },
    "dpmsolver, sample prediction": {
        **SIGMA_MIN,
        "algorithm_type": "dpmsolver",
        "prediction_type": "sample",
    },
}


def _reference(config):
    """diffusers' scheduler. With Karras sigmas and cosine betas the first timestep repeats (999,
    999, 999 at 10 steps), and diffusers' first lookup takes its second place, skipping the first
    step (its text-to-image loop then runs off the end of the schedule). Its img2img pipelines call
    set_begin_index, which makes it start at the first place; the reference does the same here."""
    reference = reference_scheduler(CLASS_NAME, config)
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
def test_dpm_solver_singlestep_steps(official, variant, steps):
    config = dict(SCHEDULER_CONFIGS[official], **VARIANTS[variant])
    compare_scheduler_steps(
        scheduler_from_config(DPMSolverSinglestepScheduler, config),
        _reference(config),
        steps,
        f"DPM single-step {official} {variant}",
    )


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_orders_match_diffusers(solver_order, lower_order_final, final_sigmas_type):
    # the order of every step, for every step count up to 40 (a fresh diffusers scheduler each
    # time: it rewrites its own lower_order_final, see the next test)
    options = dict(
        solver_order=solver_order,
        lower_order_final=lower_order_final,
        final_sigmas_type=final_sigmas_type,
    )
    for steps in range(1, 41):
        ours = DPMSolverSinglestepScheduler(**options)
        theirs = reference_scheduler(CLASS_NAME, options)
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
        assert ours.order_list == theirs.order_list, (steps, ours.order_list, theirs.order_list)


def test_lower_order_final_is_decided_per_call():
    # diffusers turns lower_order_final on for good once a step count is not a multiple of the
    # order; minildm decides at every set_timesteps, as a fresh scheduler would
    options = dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min")
    ours = DPMSolverSinglestepScheduler(**options)
    theirs = reference_scheduler(CLASS_NAME, options)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(7)
        scheduler.set_timesteps(6)
    assert ours.order_list == [1, 2, 3, 1, 2, 3]
    assert theirs.order_list == [1, 2, 3, 1, 2, 1]  # if this fails, diffusers has changed
    fresh = reference_scheduler(CLASS_NAME, options)
    fresh.set_timesteps(6)
    assert fresh.order_list == ours.order_list


def test_karras_schedules_do_repeat_timesteps():
    # so the parity tests above do cover finding a step whose timestep value is not unique
    config = dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], use_karras_sigmas=True)
    scheduler = scheduler_from_config(DPMSolverSinglestepScheduler, config)
    scheduler.set_timesteps(50)
    assert len(set(scheduler.timesteps.tolist())) < 50  # 1, 1 at the clean end
    config = dict(config, beta_schedule="squaredcos_cap_v2")
    scheduler = scheduler_from_config(DPMSolverSinglestepScheduler, config)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps[:3].tolist() == [999, 999, 999]


@pytest.mark.parametrize("start", [1, 2, 4])
@pytest.mark.parametrize("solver_order", [2, 3])
def test_starting_part_way(solver_order, start):
    # img2img begins part-way down the schedule, maybe inside a block: the first steps are then
    # of lower order (diffusers finds the step from its timestep and lowers the order for want of
    # predictions)
    config = dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], solver_order=solver_order)
    ours = scheduler_from_config(DPMSolverSinglestepScheduler, config)
    theirs = reference_scheduler(CLASS_NAME, config)
    ours.set_timesteps(12)
    theirs.set_timesteps(12)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for t in theirs.timesteps[start:]:
        output = fake_model(sample, t)
        expected = theirs.step(output, t, sample).prev_sample
        worst = max(worst, max_relative_error(ours.step(output, t, sample), expected))
        sample = expected
    print(f"order {solver_order} from step {start}: worst step relative error {worst:.1e}")
    assert worst < 1e-6


@pytest.mark.parametrize("other", ["UniPCMultistepScheduler", "DEISMultistepScheduler"])
def test_from_a_unipc_or_deis_config(other):
    # diffusers reads their solver_type ('bh2', 'logrho') and algorithm_type ('deis') as its
    # defaults, and drops their other keys (timestep_spacing, ...), as minildm does
    config = dict(reference_scheduler(other, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"]).config)
    compare_scheduler_steps(
        scheduler_from_config(DPMSolverSinglestepScheduler, config),
        reference_scheduler(CLASS_NAME, config),
        20,
        f"{CLASS_NAME} from a {other} config",
    )


def test_set_timesteps_starts_afresh():
    # a second run on the same scheduler (and a generator, accepted and unused) gives what a fresh
    # scheduler gives
    config = dict(SCHEDULER_CONFIGS["LDM text2im (DDIM)"], solver_order=3)
    used = scheduler_from_config(DPMSolverSinglestepScheduler, config)
    fresh = scheduler_from_config(DPMSolverSinglestepScheduler, config)
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
    # at the schedule's own noise levels, as diffusers (which needs set_timesteps first)
    config = dict(SCHEDULER_CONFIGS["SD v1-4 (PNDM)"], use_karras_sigmas=karras)
    ours = scheduler_from_config(DPMSolverSinglestepScheduler, config)
    theirs = reference_scheduler(CLASS_NAME, config)
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    # unique timesteps (diffusers takes a repeated one's second place, ours its first)
    t = theirs.timesteps[[0, 7, 12]]
    error = max_relative_error(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    print(f"add_noise, karras={karras}: relative error {error:.1e}")
    assert error < 1e-6
    with pytest.raises(ValueError, match="timestep 5 is not one of this schedule's timesteps"):
        ours.add_noise(x0, noise, torch.tensor([5, 5, 5]))
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        DPMSolverSinglestepScheduler().add_noise(x0, noise, t)


def test_bad_input_is_refused():
    cls = DPMSolverSinglestepScheduler
    with pytest.raises(
        ValueError,
        match="num_inference_steps must be an integer from 1 to num_train_timesteps "
        "\\(1000\\), got 0",
    ):
        cls().set_timesteps(0)
    with pytest.raises(ValueError, match="got 1001"):
        cls().set_timesteps(1001)
    with pytest.raises(ValueError, match="visits a timestep twice"):
        cls().set_timesteps(1000)  # linspace rounds two of 1000 levels to one timestep
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'"):
        cls(beta_schedule="cosine")
    with pytest.raises(RuntimeError, match="call set_timesteps\\(...\\) before step\\(\\)"):
        cls().step(torch.zeros(1), 10, torch.zeros(1))
    with pytest.raises(ValueError, match="solver_order must be 1, 2 or 3, got 4"):
        cls(solver_order=4)
    with pytest.raises(ValueError, match="prediction_type must be"):
        cls(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="solver_type must be 'midpoint' or 'heun', got 'euler'"):
        cls(solver_type="euler")
    with pytest.raises(ValueError, match="'sde-dpmsolver\\+\\+' is not implemented"):
        cls(algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="final_sigmas_type must be 'zero' or 'sigma_min'"):
        cls(final_sigmas_type="max")
    with pytest.raises(ValueError, match="'dpmsolver' needs final_sigmas_type='sigma_min'"):
        cls(algorithm_type="dpmsolver")
    for key, value in [
        ("thresholding", True),
        ("use_exponential_sigmas", True),
        ("use_flow_sigmas", True),
        ("lambda_min_clipped", -5.1),
        ("variance_type", "learned_range"),
    ]:
        with pytest.raises(ValueError, match=f"{key}={value!r} is not implemented"):
            cls.from_config({key: value})
    scheduler = cls()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 5 is not one of this schedule's timesteps"):
        scheduler.step(torch.zeros(1), 5, torch.zeros(1))
    t = scheduler.timesteps[0]
    scheduler.step(torch.zeros(1), t, torch.zeros(1))
    # no stepping twice
    with pytest.raises(ValueError, match=f"timestep {int(t)} is not among the steps still to take"):
        scheduler.step(torch.zeros(1), t, torch.zeros(1))
