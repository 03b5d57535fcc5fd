"""DDIM and DDPM: every timestep and every step equal to diffusers', deterministic and
stochastic."""

import pytest
import torch
from conftest import (
    SCHEDULER_CONFIGS,
    compare_scheduler_steps,
    max_relative_error,
    reference_scheduler,
    scheduler_from_config,
)

from minildm.schedulers import DDIMScheduler, DDPMScheduler

STEPS = [1, 3, 10, 50]
VARIANTS = {  # the common options, on top of each official config
    "as published": {},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "v_prediction": {"prediction_type": "v_prediction"},
    "sample prediction, clipped": {"prediction_type": "sample", "clip_sample": True},
    "SD offset, cosine betas": {
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "beta_schedule": "squaredcos_cap_v2",
    },
}


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("official", list(SCHEDULER_CONFIGS))
def test_ddim_deterministic(official, variant, steps):
    config = dict(SCHEDULER_CONFIGS[official], **VARIANTS[variant])
    compare_scheduler_steps(
        scheduler_from_config(DDIMScheduler, config),
        reference_scheduler("DDIMScheduler", config),
        steps,
        f"DDIM {official} {variant}",
    )


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("official", list(SCHEDULER_CONFIGS))
def test_ddim_stochastic_same_generator(official, eta):
    config = SCHEDULER_CONFIGS[official]
    compare_scheduler_steps(
        scheduler_from_config(DDIMScheduler, config),
        reference_scheduler("DDIMScheduler", config),
        10,
        f"DDIM {official} eta={eta}",
        step_kwargs={"eta": eta},
        seed=7,
    )


@pytest.mark.parametrize("steps", [1, 10, 50, 999])
@pytest.mark.parametrize("variant", ["as published", "trailing", "v_prediction", "fixed_large"])
@pytest.mark.parametrize("official", list(SCHEDULER_CONFIGS))
def test_ddpm_same_generator(official, variant, steps):
    config = dict(
        SCHEDULER_CONFIGS[official],
        **({"variance_type": "fixed_large"} if variant == "fixed_large" else VARIANTS[variant]),
    )
    compare_scheduler_steps(
        scheduler_from_config(DDPMScheduler, config),
        reference_scheduler("DDPMScheduler", config),
        steps,
        f"DDPM {official} {variant}",
        seed=3,
    )


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_add_noise(cls):
    config = SCHEDULER_CONFIGS["CelebA-HQ (DDIM)"]
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 500, 999])
    error = max_relative_error(
        cls.from_config(config).add_noise(x0, noise, t),
        reference_scheduler(cls.__name__, config).add_noise(x0, noise, t),
    )
    print(f"{cls.__name__} add_noise: relative error {error:.1e}")
    assert error < 1e-6


def test_trailing_spacing_has_exactly_n_steps():
    # for some n (61, 103, 121, ...) np.arange(T, 0, -T/n) yields one extra value near 0, which
    # diffusers keeps as a step at timestep -1 (reading alphas_cumprod[-1], the noisiest); minildm
    # keeps n steps
    for n in (61, 103):
        scheduler = DDIMScheduler(timestep_spacing="trailing")
        scheduler.set_timesteps(n)
        reference = reference_scheduler("DDIMScheduler", {"timestep_spacing": "trailing"})
        reference.set_timesteps(n)
        assert len(scheduler.timesteps) == n and scheduler.timesteps.min() >= 0
        assert (
            len(reference.timesteps) == n + 1 and reference.timesteps[-1] == -1
        )  # the reference's extra step
        assert torch.equal(scheduler.timesteps, reference.timesteps[:n])


def test_official_schedule_values():
    # the numbers the configs imply: docs/parity/schedulers.md, "LDM's linear betas are diffusers'
    # scaled_linear" and "DDIM's first timestep and final alpha: CompVis against the hub configs"
    ldm = DDIMScheduler.from_config(SCHEDULER_CONFIGS["LDM text2im (DDIM)"])
    assert ldm.alphas_cumprod[-1].item() == pytest.approx(0.0015790, rel=1e-4)
    sd = scheduler_from_config(DDIMScheduler, SCHEDULER_CONFIGS["SD v1-4 (PNDM)"])
    assert sd.alphas_cumprod[-1].item() == pytest.approx(
        0.0046601, rel=1e-4
    ) and sd.final_alpha_cumprod.item() == pytest.approx(0.99915, rel=1e-5)
    sd.set_timesteps(50)
    assert sd.timesteps[:2].tolist() == [981, 961] and sd.timesteps[-1].item() == 1
    celeba = DDIMScheduler.from_config(SCHEDULER_CONFIGS["CelebA-HQ (DDIM)"])
    assert celeba.alphas_cumprod[-1].item() == pytest.approx(1.4230e-4, rel=1e-3)


def test_bad_input_is_refused():
    with pytest.raises(
        ValueError,
        match="num_inference_steps must be an integer from 1 to num_train_timesteps \\(1000\\), got 0",
    ):
        DDIMScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="got 1001"):
        DDPMScheduler().set_timesteps(1001)
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'"):
        DDIMScheduler(beta_schedule="cosine")
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        DDIMScheduler().step(torch.zeros(1), 10, torch.zeros(1))
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        DDPMScheduler().step(torch.zeros(1), 10, torch.zeros(1))
    with pytest.raises(ValueError, match="thresholding=True is not implemented"):
        DDIMScheduler.from_config({"thresholding": True})
    with pytest.raises(ValueError, match="prediction_type must be"):
        DDIMScheduler(prediction_type="x0")
    with pytest.raises(ValueError, match="reaches timestep 1000, outside the 1000 training steps"):
        DDPMScheduler(steps_offset=1).set_timesteps(1000)


def test_every_scheduler_takes_a_generator():
    """Pipelines pass `generator` to every scheduler's step; the deterministic ones accept and
    ignore it."""
    import inspect

    from minildm import schedulers

    for name in schedulers.__all__:
        assert "generator" in inspect.signature(getattr(schedulers, name).step).parameters, name
