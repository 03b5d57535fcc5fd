"""What a diffusers user types works where it means the same thing in minildm (issue 28):
`scheduler.config`, a read-only mapping of the scheduler's settings, and `from_config` of that
config, for the same scheduler or another one (which keeps the training schedule)."""

import warnings

import pytest
import torch
from conftest import oracle

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


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_at_every_timestep_of_the_schedule_equals_diffusers(name):
    """add_noise accepts each of the scheduler's own timesteps (KDPM2's midpoints included, which
    it used to refuse) and gives diffusers' noisy samples."""
    diffusers = oracle("diffusers")
    cases = 0
    for steps in (4, 10, 25):  # PNDM's warm-up needs 4
        for options in ({}, {"beta_schedule": "scaled_linear"}):
            ours = getattr(schedulers, name)(**options)
            theirs = getattr(diffusers, name)(**options)
            ours.set_timesteps(steps)
            theirs.set_timesteps(steps)
            timesteps = theirs.timesteps
            assert torch.equal(ours.timesteps.to(timesteps.dtype), timesteps)
            generator = torch.Generator().manual_seed(steps)
            clean = torch.randn(len(timesteps), 4, 2, 2, generator=generator)
            noise = torch.randn(clean.shape, generator=generator)
            for t in timesteps:  # one at a time: diffusers picks a repeated timestep's 2nd place
                got = ours.add_noise(clean[:1], noise[:1], t[None])
                expected = theirs.add_noise(clean[:1], noise[:1], t[None])
                assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6), (steps, float(t))
                cases += 1
    print(f"{name}: add_noise equal to diffusers' at {cases} timesteps")


PIPELINES = {
    "sd": minildm.StableDiffusionPipeline,
    "ldm": minildm.LDMTextToImagePipeline,
    "ldm-uncond": minildm.LDMPipeline,
    "vq-diffusion": minildm.VQDiffusionPipeline,
}


def draw(pipe, system):
    prompt = [] if system == "ldm-uncond" else ["a red circle on a blue background"]
    steps = 50 if system == "vq-diffusion" else 4
    generator = torch.Generator().manual_seed(0)
    return pipe(*prompt, num_inference_steps=steps, generator=generator, output_type="np").images


@pytest.mark.parametrize("system", PIPELINES)
def test_pipe_to_moves_every_model_as_diffusers_does(system):
    """pipe.to("cpu"), pipe.to(torch.float16), pipe.to("cpu", torch.float32): every model moves,
    the pipeline comes back, and the embedded weights (stored in float16) survive the round trip
    bit for bit."""
    pipe = PIPELINES[system].from_pretrained(minildm.TINY_MODELS[system])
    before = draw(pipe, system)
    assert pipe.to("cpu") is pipe
    models = [value for value in vars(pipe).values() if isinstance(value, torch.nn.Module)]
    pipe.to(torch.float16)
    dtypes = {p.dtype for model in models for p in model.parameters()}
    assert dtypes == {torch.float16}, dtypes
    pipe.to("cpu", torch.float32)
    assert {p.dtype for model in models for p in model.parameters()} == {torch.float32}
    after = draw(pipe, system)
    print(
        f"{system}: {len(models)} models moved; image after the round trip equal: "
        f"{bool((before == after).all())}"
    )
    assert (before == after).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_a_device_this_torch_cannot_use_is_a_clear_error():
    pipe = minildm.LDMPipeline.from_pretrained(minildm.TINY_LDM_UNCOND)
    cases = [
        (lambda: pipe.to("cuda"), "device cuda: this torch sees no CUDA GPU; use device cpu"),
        (lambda: pipe.to("cuda", torch.float16), "this torch sees no CUDA GPU"),
        (lambda: pipe.to("tpu"), "device 'tpu' is not a device"),
        (lambda: pipe.to(torch.int8), "dtype must be torch.float32, torch.float16 or"),
        (
            lambda: minildm.LDMPipeline.from_pretrained(minildm.TINY_LDM_UNCOND, dtype=torch.int8),
            "dtype must be torch.float32",
        ),
        (lambda: pipe.to("meta"), "device meta: minildm runs on cpu or cuda"),
        (
            lambda: minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD, device="cuda"),
            "device cuda: this torch sees no CUDA GPU",
        ),
    ]
    for call, words in cases:
        with pytest.raises(ValueError) as raised:
            call()
        print(raised.value)
        assert words in str(raised.value)
    assert {p.device.type for p in pipe.unet.parameters()} == {"cpu"}  # nothing moved


@pytest.mark.parametrize("system", ["sd", "vq-diffusion", "ldm"])
def test_guidance_below_one_means_what_diffusers_makes_it_mean_and_says_so(system):
    """SD and VQ-Diffusion run unguided below 1 (diffusers guides only above 1): the image equals
    guidance 1's, with a warning. LDM guides at any scale but 1 (as diffusers): 0.5 is a blend
    toward the unconditional prediction, a different image, and no warning."""
    pipe = PIPELINES[system].from_pretrained(minildm.TINY_MODELS[system])
    steps = 50 if system == "vq-diffusion" else 4

    def draw_at(scale):
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a red circle on a blue background",
            num_inference_steps=steps,
            guidance_scale=scale,
            generator=generator,
            output_type="np",
        ).images

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        below = draw_at(0.5)
    said = [str(w.message) for w in caught if "below 1" in str(w.message)]
    unguided = draw_at(1.0)
    difference = float(abs(below - unguided).max())
    print(f"{system}: 0.5 against 1.0 differs by {difference:.3f}; warned: {said}")
    if system == "ldm":
        assert difference > 0.01 and not said
    else:
        assert difference == 0 and len(said) == 1 and "same as guidance_scale=1" in said[0]
