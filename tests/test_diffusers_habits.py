"""What a diffusers user types works where it means the same thing in minildm (issue 28):
`scheduler.config`, a read-only mapping of the scheduler's settings, and `from_config` of that
config, for the same scheduler or another one (which keeps the training schedule)."""

import warnings

import pytest
import torch

import minildm
from minildm import schedulers

NAMES = [n for n in schedulers.__all__ if n not in ("VQDiffusionScheduler", "DDIMInverseScheduler")]


@pytest.mark.parametrize("name", schedulers.__all__)
def test_scheduler_config_is_a_read_only_mapping_that_rebuilds_the_scheduler(name):
    cls = getattr(schedulers, name)
    options = {"num_vec_classes": 17, "num_train_timesteps": 20} if "VQ" in name else {}
    scheduler = cls(**options)
    config = scheduler.config
    print(f"{name}: {len(config)} keys")
    assert config["_class_name"] == name and "self" not in config
    with pytest.raises(TypeError):
        config["num_train_timesteps"] = 5
    rebuilt = cls.from_config(config)
    assert dict(rebuilt.config) == dict(config)


@pytest.mark.parametrize("name", NAMES)
def test_from_config_of_the_pipelines_scheduler_keeps_its_training_schedule(name):
    pipe = minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DDIM's own options do not apply to every scheduler
        swapped = getattr(schedulers, name).from_config(pipe.scheduler.config)
    assert torch.equal(swapped.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    pipe.scheduler = swapped
    image = pipe("a red circle", num_inference_steps=4, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
