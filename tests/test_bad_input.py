"""Bad input on the command line and in the pipelines: a clear error that says what was expected,
raised before any weights are loaded or steps taken (issue 13's cases, one table row each)."""

import pytest
import torch

import minildm
import minildm.__main__ as cli
from minildm.__main__ import main

# (arguments, words the error must contain); every row fails before any weights are loaded
CLI_CASES = [
    (["ldm", "a cat", "-n", "0"], "-n is the number of images, at least 1; got 0"),
    (["vq-diffusion", "a cat", "-n", "0"], "-n is the number of images, at least 1; got 0"),
    (["ldm-uncond", "-n", "-2"], "-n is the number of images, at least 1; got -2"),
    (["sd", "a cat", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["sd", "a cat", "--seed", str(2**64)], "--seed must lie in [0, 2**63)"),
    (["sd", "a cat", "--seed", "-1"], "--seed must lie in [0, 2**63)"),
    (["sd", "a cat", "--device", "gpu0"], "--device 'gpu0' is not a device: expected cpu, cuda"),
    (["sd", "a cat", "--device", "mps"], "--device mps: minildm runs on cpu or cuda"),
]


def refuse_to_load(args):
    raise AssertionError("the weights were loaded before the arguments were checked")


@pytest.mark.parametrize("arguments, words", CLI_CASES, ids=lambda v: " ".join(map(str, v)))
def test_command_line_refuses_before_loading(arguments, words, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "load_pipeline", refuse_to_load)
    with pytest.raises(SystemExit) as raised:
        main(arguments + ["--out", str(tmp_path)])
    message = str(raised.value.code)
    print(f"{' '.join(arguments)}: {message}")
    assert message.startswith("error: ") and words in message


def test_a_device_without_a_gpu_is_refused_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "load_pipeline", refuse_to_load)
    with pytest.raises(SystemExit) as raised:
        main(["sd", "a cat", "--device", "cuda:99", "--out", str(tmp_path)])
    message = str(raised.value.code)
    print(message)
    assert "sees no CUDA GPU" in message or "CUDA GPU(s) here" in message


def test_an_output_folder_that_is_a_file_is_refused_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "load_pipeline", refuse_to_load)
    a_file = tmp_path / "taken.png"
    a_file.write_bytes(b"not a folder")
    for out in (a_file, a_file / "below"):
        with pytest.raises(SystemExit) as raised:
            main(["sd", "a cat", "--out", str(out)])
        message = str(raised.value.code)
        print(message)
        assert f"{a_file} is a file, not a folder; choose another --out" in message
    assert a_file.read_bytes() == b"not a folder"


@pytest.mark.parametrize("system", ["sd", "ldm", "vq-diffusion"])
@pytest.mark.parametrize("scale", ["nan", "inf", "-1"])
def test_guidance_scale_one_rule_for_the_three_systems(system, scale, tmp_path):
    """NaN used to run (SD: silently as 'no guidance'; LDM: until a FloatingPointError blaming
    half precision; VQ-Diffusion: silently); now each refuses it with the same words."""
    with pytest.raises(SystemExit) as raised:
        main([system, "a cat", "--guidance", scale, "--out", str(tmp_path)])
    message = str(raised.value.code)
    print(f"{system} --guidance {scale}: {message}")
    assert "guidance_scale must be a finite number >= 0 (1 turns guidance off" in message
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("scale", ["7.5", True, None, float("nan")])
def test_pipeline_guidance_scale_of_the_wrong_kind(scale):
    pipe = minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)
    steps = []
    with pytest.raises(ValueError, match=r"guidance_scale must be a finite number >= 0"):
        pipe("a cat", guidance_scale=scale, callback=lambda *a: steps.append(a))
    assert not steps  # refused before the first step


def test_pipeline_image_size_zero_is_an_error_not_the_default():
    pipe = minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)
    with pytest.raises(ValueError, match=r"positive multiples of 8 .*got 64x0"):
        pipe("a cat", height=64, width=0, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"positive multiples of 8 .*got 12x64"):
        pipe("a cat", height=12, width=64, generator=torch.Generator().manual_seed(0))


def test_broken_json_names_the_file_before_the_models_load(tmp_path):
    import shutil

    folder = tmp_path / "tiny-sd"
    shutil.copytree(minildm.TINY_SD, folder)
    for name in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json"):
        original = (folder / name).read_text()
        (folder / name).write_text(original[: len(original) // 2])  # cut short
        with pytest.raises(minildm.CheckpointError) as raised:
            minildm.StableDiffusionPipeline.from_pretrained(folder)
        print(raised.value)
        assert f"{folder / name} is not valid JSON" in str(raised.value)
        assert "download the folder again" in str(raised.value)
        (folder / name).write_text(original)


def test_the_warning_for_a_long_prompt_shows_a_line_not_the_whole_text():
    prompt = "a red circle " + "and a blue square " * 5000  # 90,013 characters
    with pytest.warns(UserWarning, match=r"longer than 77 tokens") as caught:
        ids = minildm.CLIPTokenizer()(prompt)
    message = str(caught[0].message)
    print(f"{len(message)} characters: {message[:120]}...")
    assert ids.shape == (1, 77) and len(message) < 200
    dropped = int(message.rsplit("(", 1)[1].split()[0])  # "... (N characters)"
    assert 89_000 < dropped < len(prompt)  # nearly all of it, counted rather than printed
