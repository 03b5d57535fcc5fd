"""A result that turns inf/nan names its cause, found where the first non-finite (or exploded)
value appears: the guidance, the text encoder, the UNet or the scheduler (issue 28). Each row
breaks one part of an embedded pipeline and reads the error."""

import pytest
import torch

import minildm
from minildm.pipelines.common import check_finite_step


def poisoned(module_parameter):
    """Fill one parameter with nan: damaged weights."""

    def poison(pipe):
        with torch.no_grad():
            module_parameter(pipe).fill_(float("nan"))

    return poison


def scheduler_step_times(factor, from_step=1):
    """The scheduler's step, multiplied by `factor` from its `from_step`-th call: a scheduler
    whose arithmetic fails (inf) or diverges (a large finite factor)."""

    def wrap(pipe):
        step, calls = pipe.scheduler.step, []

        def broken(*args, **kwargs):
            calls.append(1)
            result = step(*args, **kwargs)
            return result * factor if len(calls) >= from_step else result

        pipe.scheduler.step = broken

    return wrap


PIPELINES = {
    "sd": minildm.StableDiffusionPipeline,
    "ldm": minildm.LDMTextToImagePipeline,
    "ldm-uncond": minildm.LDMPipeline,
    "vq-diffusion": minildm.VQDiffusionPipeline,
}

# (system, what breaks, how, the call's options, words of the error)
CAUSES = [
    ("sd", "huge guidance", None, {"guidance_scale": 1e30}, "guidance_scale=1e+30 amplified"),
    ("ldm", "huge guidance", None, {"guidance_scale": 1e30}, "guidance_scale=1e+30 amplified"),
    (
        "sd",
        "the text encoder",
        poisoned(lambda pipe: pipe.text_encoder.final_norm.weight),
        {},
        "the text encoder returned inf/nan",
    ),
    (
        "ldm",
        "the text encoder",
        poisoned(lambda pipe: pipe.bert.final_norm.weight),
        {},
        "the text encoder (LDMBert) returned inf/nan",
    ),
    (
        "vq-diffusion",
        "the text encoder",
        poisoned(lambda pipe: pipe.text_encoder.final_norm.weight),
        {},
        "the text encoder returned inf/nan",
    ),
    (
        "sd",
        "the UNet",
        poisoned(lambda pipe: pipe.unet.conv_out.bias),
        {},
        "the UNet returned inf/nan in torch.float32 from finite input",
    ),
    (
        "ldm-uncond",
        "the UNet",
        poisoned(lambda pipe: pipe.unet.conv_out.bias),
        {},
        "the UNet returned inf/nan",
    ),
    (
        "sd",
        "the scheduler (inf)",
        scheduler_step_times(float("inf")),
        {},
        "DDIMScheduler.step produced",
    ),
    (
        "sd",
        "the scheduler (diverging)",
        scheduler_step_times(1e30),
        {},
        "DDIMScheduler.step made them grow",
    ),
]


@pytest.mark.parametrize(
    "system, what, breaking, options, words", CAUSES, ids=[f"{c[0]}: {c[1]}" for c in CAUSES]
)
def test_a_non_finite_result_names_its_cause(system, what, breaking, options, words):
    pipe = PIPELINES[system].from_pretrained(minildm.TINY_MODELS[system])
    if breaking is not None:
        breaking(pipe)
    prompt = [] if system == "ldm-uncond" else ["a red circle on a blue background"]
    with pytest.raises(FloatingPointError) as raised:
        pipe(*prompt, num_inference_steps=4, **options)
    print(f"{system}, {what}: {raised.value}")
    assert words in str(raised.value)


def test_a_finite_step_is_not_reported():
    latents = torch.ones(1, 4, 8, 8)
    check_finite_step(latents, latents, latents, latents, 7.5, 0, 999, None)  # no error
