"""DDIM inversion: DDIMInverseScheduler equal to diffusers' step by step, and
StableDiffusionPipeline.invert on the embedded tiny SD: sampling the inverted latents gives the
image back, and the inversion equals one built from diffusers' parts."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import (
    SCHEDULER_CONFIGS,
    compare_scheduler_steps,
    max_relative_error,
    oracle,
    reference_scheduler,
    scheduler_from_config,
)
from PIL import Image

import minildm
from minildm import shapes
from minildm.checkpoints.load import load_scheduler
from minildm.schedulers import DDIMInverseScheduler, DDIMScheduler, PNDMScheduler

STEPS = [1, 3, 10, 25, 50]
VARIANTS = {
    "as published": {},
    "trailing": {"timestep_spacing": "trailing"},
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
def test_ddim_inverse_matches_diffusers(official, variant, steps):
    config = dict(SCHEDULER_CONFIGS[official], **VARIANTS[variant])
    compare_scheduler_steps(
        scheduler_from_config(DDIMInverseScheduler, config),
        reference_scheduler("DDIMInverseScheduler", config),
        steps,
        f"DDIM inverse {official} {variant}",
    )


def test_inverting_a_ddim_scheduler_is_the_inverse_of_its_config():
    for official, config in SCHEDULER_CONFIGS.items():
        ddim = scheduler_from_config(DDIMScheduler, config)
        built = DDIMInverseScheduler.inverting(ddim)
        direct = scheduler_from_config(DDIMInverseScheduler, config)
        built.set_timesteps(25)
        direct.set_timesteps(25)
        ddim.set_timesteps(25)
        assert torch.equal(built.timesteps, direct.timesteps)
        assert torch.equal(built.timesteps, ddim.timesteps.flip(0))  # DDIM's, cleanest first
        assert torch.equal(built.alphas_cumprod, direct.alphas_cumprod)
        assert float(built.initial_alpha_cumprod) == float(direct.initial_alpha_cumprod)
        print(f"{official}: inverse timesteps {built.timesteps[:3].tolist()} ...")
    with pytest.raises(ValueError, match="'leading' or 'trailing' timesteps"):
        DDIMInverseScheduler.inverting(DDIMScheduler(timestep_spacing="linspace"))
    with pytest.raises(
        ValueError, match="timestep_spacing must be 'leading' or 'trailing', got 'linspace'"
    ):
        DDIMInverseScheduler(timestep_spacing="linspace")


def scene_image(seed: int):
    """A drawn scene of the shapes world and its caption."""
    scene = shapes.sample_scene(np.random.default_rng(seed), shapes.training_triples())
    caption = shapes.caption(
        scene["colour"], scene["shape"], scene["background"], scene["position"]
    )
    return shapes.draw_scene(scene), caption


@pytest.fixture(scope="module")
def tiny_sd():
    pipe = minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    return pipe


def autoencoded(pipe, image: np.ndarray):
    """x_0's latents (the VAE's mean) and their decoding: the best any inversion can give back."""
    pixels = torch.from_numpy(image.copy()).float().permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        mean, _ = pipe.vae.encode(pixels)
        decoded = (pipe.vae.decode(mean).float() / 2 + 0.5).clamp(0, 1)
    return mean * pipe.vae.config.scaling_factor, decoded[0].permute(1, 2, 0).numpy()


def sample_latents(pipe, prompt: str, latents: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM sampling from `latents`, guidance 1.0, to the final latents (before decoding)."""
    pipe.scheduler.set_timesteps(steps)
    context = pipe.encode_prompt([prompt], None, 1, guided=False)
    with torch.no_grad():
        return pipe.denoise(latents, pipe.scheduler.timesteps, context, 1.0, {})


def test_invert_then_sample_gives_the_image_back(tiny_sd):
    """50 steps, guidance 1.0, three scenes: the sampled latents return to x_0's within 5% of
    their largest value (from random noise: 20-45% off), the image to above 35 dB PSNR against the
    VAE's own reconstruction (and 8 dB above a sample from noise; the shipped decoder turns a 4%
    latent difference into 39.9 dB on one of the three, 50 dB on another); fewer steps are less
    faithful (the inversion's one-step lag)."""
    for seed in range(3):
        image, caption = scene_image(seed)
        x0, decoded = autoencoded(tiny_sd, image)
        errors = {}
        for steps in (10, 50):
            inverted = tiny_sd.invert(Image.fromarray(image), caption, steps)
            errors[steps] = max_relative_error(
                sample_latents(tiny_sd, caption, inverted, steps), x0
            )
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        from_noise = max_relative_error(sample_latents(tiny_sd, caption, noise, 50), x0)
        back = tiny_sd(
            caption, latents=inverted, num_inference_steps=50, guidance_scale=1.0, output_type="np"
        ).images[0]
        drawn = tiny_sd(
            caption, latents=noise, num_inference_steps=50, guidance_scale=1.0, output_type="np"
        ).images[0]
        psnr = 10 * np.log10(1 / np.mean((back - decoded) ** 2))
        psnr_from_noise = 10 * np.log10(1 / np.mean((drawn - decoded) ** 2))
        print(
            f"{caption!r}: latents back within {errors[50]:.3f} (50 steps), {errors[10]:.3f} "
            f"(10 steps), from noise {from_noise:.3f}; image {psnr:.1f} dB PSNR against the VAE's "
            f"reconstruction (from noise {psnr_from_noise:.1f} dB), max abs "
            f"{np.abs(back - decoded).max():.3f}"
        )
        assert errors[50] < 0.05 and from_noise > 0.15
        assert errors[10] > errors[50]
        assert psnr > 35 and psnr > psnr_from_noise + 8


INVERSION_RTOL = 1e-3


def test_invert_equals_an_inversion_from_diffusers_parts(tiny_sd):
    """diffusers' DDIMInverseScheduler driving diffusers' UNet on diffusers' VAE mean and text
    embeddings, as its inversion pipelines loop (cleanest timestep first).

    Inversion runs the sampler towards noise, where the ODE spreads differences apart: the two
    encoders' float rounding (their latents differ by about 1e-5 relative) grows step by step.
    Measured on the shipped tiny SD at guidance 1: 4.7e-5, 8.6e-5, 1.7e-4 after 5, 10, 25 steps
    with 2 threads, 3.8e-4 after 25 with 1 thread (the tiny SD before its autoencoder learned
    other drawings: 4.7e-5 after 25). A wrong timestep or a wrong step formula is off by 1e-2 or
    more, so the tolerance is INVERSION_RTOL."""
    diffusers = oracle("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = diffusers.StableDiffusionPipeline.from_pretrained(
            minildm.TINY_SD, safety_checker=None, requires_safety_checker=False
        )
    config = dict(reference.scheduler.config)
    inverse = reference_scheduler("DDIMInverseScheduler", config)
    image, caption = scene_image(0)
    for guidance in (1.0, 3.0):
        guided = guidance > 1.0
        with torch.no_grad():
            pixels = torch.from_numpy(image.copy()).float().permute(2, 0, 1)[None] / 127.5 - 1
            latents = reference.vae.encode(pixels).latent_dist.mean
            start_error = max_relative_error(tiny_sd.vae.encode(pixels)[0], latents)
            latents = latents * reference.vae.config.scaling_factor
            cond, uncond = reference.encode_prompt(caption, "cpu", 1, guided)
            context = torch.cat([uncond, cond]) if guided else cond
            inverse.set_timesteps(25)
            for t in inverse.timesteps:
                model_input = torch.cat([latents] * 2) if guided else latents
                prediction = reference.unet(model_input, t, encoder_hidden_states=context).sample
                if guided:
                    u, c = prediction.chunk(2)
                    prediction = u + guidance * (c - u)
                latents = inverse.step(prediction, t, latents).prev_sample
        ours = tiny_sd.invert(Image.fromarray(image), caption, 25, guidance_scale=guidance)
        error = max_relative_error(ours, latents)
        print(
            f"invert, 25 steps, guidance {guidance}: {error:.1e} from diffusers' "
            f"(tolerance {INVERSION_RTOL:g}; the encoders' latents differ by {start_error:.1e})"
        )
        assert error < INVERSION_RTOL


def test_invert_bad_input(tiny_sd):
    image, caption = scene_image(0)
    pil = Image.fromarray(image)
    pndm = minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)
    pndm.scheduler = PNDMScheduler.from_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    )
    with pytest.raises(ValueError, match="invert runs DDIM backwards.*a PNDMScheduler"):
        pndm.invert(pil, caption)
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        tiny_sd.invert(pil, [caption, caption])
    with pytest.raises(ValueError, match="guidance_scale"):
        tiny_sd.invert(pil, caption, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny_sd.invert(pil, caption, 0)
    assert isinstance(load_scheduler(minildm.TINY_SD / "scheduler"), DDIMScheduler)


def run_sd(*arguments, cwd):
    return subprocess.run(
        [sys.executable, "-m", "minildm", "sd", *arguments], capture_output=True, text=True, cwd=cwd
    )


def test_invert_command_line(tmp_path):
    image, caption = scene_image(1)
    Image.fromarray(image).save(tmp_path / "scene.png")
    result = run_sd(caption, "--invert", "scene.png", "--steps", "25", "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if "round trip" in line)
    print(line)
    psnr = float(line.split("PSNR ")[1].split(" dB")[0])
    assert psnr > 25  # against the drawn image: the autoencoder's own loss included
    written = list((tmp_path / "out").glob("sd-invert_*_0.png"))
    assert len(written) == 1 and Image.open(written[0]).size == (64, 64)

    Image.fromarray(image[:60]).save(tmp_path / "odd.png")
    (tmp_path / "notes.png").write_text("not an image")
    for arguments, message in [
        (["--invert", "absent.png"], "no such image file"),
        (["--invert", "notes.png"], "not an image PIL can read"),
        (["--invert", "odd.png"], "64x60 pixels; the autoencoder needs multiples of 8"),
        (["--invert", "scene.png", "-n", "2"], "does not take -n 2"),
        (["--invert", "scene.png", "--eta", "0.5"], "does not take --eta 0.5"),
        (["--invert", "scene.png", "--negative", "blue"], "does not take --negative"),
        (["--invert", "scene.png", "--scheduler", "PNDMScheduler"], "--scheduler PNDMScheduler"),
        (["--invert", "scene.png", "--height", "128"], "the image is 64x64"),
        (["--scheduler", "DDIMInverseScheduler"], "cannot generate one: sd --invert IMAGE"),
    ]:
        result = run_sd(caption, *arguments, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, (arguments, result.stderr)
