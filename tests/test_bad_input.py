"""Bad input on the command line and in the pipelines: a clear error that says what was expected,
raised before any weights are loaded or steps taken (issue 13's cases, one table row each)."""

import argparse

import pytest
import torch
from PIL import Image

import minildm
from minildm.__main__ import main
from minildm.tools import generate

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
    # empty values used to be ignored (the folder's scheduler, no inversion, the embedded model)
    (["sd", "a cat", "--scheduler", ""], "--scheduler is empty: give it a value, or leave it out"),
    (["sd", "a cat", "--invert", ""], "--invert is empty"),
    (["ldm", "a cat", "--weights", " "], "--weights is empty"),
    (["sd", "a cat", "--ema", "true"], "--ema true chooses between the two UNets of an original"),
]


def refuse_to_load(args):
    raise AssertionError("the weights were loaded before the arguments were checked")


@pytest.mark.parametrize("arguments, words", CLI_CASES, ids=lambda v: " ".join(map(str, v)))
def test_command_line_refuses_before_loading(arguments, words, monkeypatch, tmp_path):
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    with pytest.raises(SystemExit) as raised:
        main(arguments + ["--out", str(tmp_path)])
    message = str(raised.value)
    print(f"{' '.join(arguments)}: {message}")
    assert message.startswith("error: ") and words in message


def test_a_device_without_a_gpu_is_refused_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    with pytest.raises(SystemExit) as raised:
        main(["sd", "a cat", "--device", "cuda:99", "--out", str(tmp_path)])
    message = str(raised.value)
    print(message)
    assert "sees no CUDA GPU" in message or "CUDA GPU(s) here" in message


def test_an_output_folder_that_is_a_file_is_refused_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    a_file = tmp_path / "taken.png"
    a_file.write_bytes(b"not a folder")
    for out in (a_file, a_file / "below"):
        with pytest.raises(SystemExit) as raised:
            main(["sd", "a cat", "--out", str(out)])
        message = str(raised.value)
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
    message = str(raised.value)
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


# --- the command line, continued: what is checked before any weights load --------------------

EARLY_CASES = [
    (
        ["sd", "a cat", "--scheduler", "Fast"],
        "--scheduler: unknown scheduler 'Fast'; choose one of",
    ),
    # PNDM's Runge-Kutta warm-up needs 4 steps: refused by the scheduler, before the models load
    (["sd", "a cat", "--scheduler", "PNDMScheduler", "--steps", "2"], "must be at least 4"),
    # a byte that is not UTF-8 reaches Python as a lone surrogate (PEP 383's surrogateescape)
    (["sd", "a \udcff cat"], "the prompt holds the byte 0xFF at character 3, which is not UTF-8"),
    (["sd", "a cat", "--negative", "\udcfe"], "--negative holds the byte 0xFE at character 1"),
    (["ldm-uncond", "--out", "/proc"], "cannot write into the folder"),
    (["ldm-uncond", "--out", "/proc/a-new-folder"], "cannot create the folder"),
]


@pytest.mark.parametrize("arguments, words", EARLY_CASES, ids=lambda v: " ".join(map(str, v)))
def test_checked_before_the_weights_load(arguments, words, monkeypatch, tmp_path):
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    out = [] if "--out" in arguments else ["--out", str(tmp_path)]
    with pytest.raises(SystemExit) as raised:
        main(arguments + out)
    message = str(raised.value)
    print(f"{' '.join(arguments)!a}: {message}")
    assert message.startswith("error: ") and words in message
    assert not list(tmp_path.iterdir())


def test_weights_of_the_wrong_kind_are_named_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    a_pt = tmp_path / "model.pt"
    a_pt.write_bytes(b"\x80\x02}q\x00.")  # a pickle: never opened
    empty = tmp_path / "unfinished"
    empty.mkdir()
    parts = tmp_path / "parts"
    (parts / "unet").mkdir(parents=True)
    (parts / "unet" / "model.safetensors.part").write_bytes(b"1234")
    not_a_pipeline = tmp_path / "unet-only"
    not_a_pipeline.mkdir()
    (not_a_pipeline / "config.json").write_text("{}")
    cases = [
        (["sd", "--weights", str(a_pt)], "is a .pt file: sd takes a pipeline folder, a repo id"),
        (["ldm", "--weights", str(a_pt)], "ldm takes a pipeline folder or a repo id"),
        (["sd", "--weights", str(empty)], "is empty: a download that did not finish?"),
        (["sd", "--weights", str(parts)], "holds only 1 unfinished .part file(s)"),
        (["sd", "--weights", str(not_a_pipeline)], "has no model_index.json: expected a diffusers"),
        (
            ["sd", "--weights", "weights/stable-diffusion-v1-4"],
            "`python -m minildm download stable-diffusion-v1-4 --dir weights`, then pass "
            "--weights weights/stable-diffusion-v1-4",
        ),
        (
            ["vq-diffusion", "--weights", "microsoft/vq-diffusion-ithq"],
            "`python -m minildm download vq-diffusion-ithq --dir weights`",
        ),
        (["ldm", "--weights", "someone/else"], "`python -m minildm download --list` lists"),
    ]
    for arguments, words in cases:
        prompt = [] if arguments[0] == "ldm-uncond" else ["a cat"]
        with pytest.raises(SystemExit) as raised:
            main([arguments[0], *prompt, *arguments[1:], "--out", str(tmp_path / "out")])
        message = str(raised.value)
        print(f"{' '.join(arguments)}: {message}")
        assert words in message
        assert "huggingface-cli" not in message and "pass each component" not in message


def run_uncond(tmp_path, *extra):
    main(["ldm-uncond", "--steps", "1", "--out", str(tmp_path), *extra])


def test_a_second_run_never_overwrites_the_first(tmp_path, capsys):
    run_uncond(tmp_path, "-n", "2")
    first = sorted(p.name for p in tmp_path.iterdir())
    assert first == [
        "ldm-uncond_seed0_0.png",
        "ldm-uncond_seed0_1.png",
        "ldm-uncond_seed0_grid.png",
    ]
    (tmp_path / first[0]).write_bytes(b"the first run's image")  # to see whether it survives
    capsys.readouterr()
    run_uncond(tmp_path, "-n", "2")
    output = capsys.readouterr().out
    print(output)
    assert (tmp_path / first[0]).read_bytes() == b"the first run's image"
    second = sorted(p.name for p in tmp_path.iterdir() if p.name not in first)
    assert second == [
        "ldm-uncond_seed0_run2_0.png",
        "ldm-uncond_seed0_run2_1.png",
        "ldm-uncond_seed0_run2_grid.png",
    ]
    listed = output.split("wrote 3 file(s):\n")[1].split()
    assert listed == [str(tmp_path / name) for name in second]  # every file, at the end


def test_overwrite_reuses_the_names_and_removes_the_earlier_runs_extra_files(tmp_path, capsys):
    run_uncond(tmp_path, "-n", "3")
    (tmp_path / "ldm-uncond_seed0_0.png").write_bytes(b"old")
    (tmp_path / "keep-me.png").write_bytes(b"not this command's")
    run_uncond(tmp_path, "-n", "1", "--overwrite")
    output = capsys.readouterr().out
    print(output)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["keep-me.png", "ldm-uncond_seed0_0.png"]  # not the old _1, _2 and grid
    assert (tmp_path / "ldm-uncond_seed0_0.png").read_bytes().startswith(b"\x89PNG")
    assert output.count("--overwrite: removed") == 3


def test_the_prompt_names_the_files(tmp_path, capsys):
    paths = generate.output_files(
        argparse.Namespace(
            command="sd",
            prompt="A red circle, on a BLUE background!",
            seed=7,
            n=1,
            out=tmp_path,
            overwrite=False,
        )
    )
    print([p.name for p in paths])
    assert [p.name for p in paths] == ["sd_a-red-circle-on-a-blue-background_seed7_0.png"]


def test_progress_counts_steps_not_model_calls(tmp_path, capsys):
    """PNDM's Runge-Kutta warm-up calls the model 13 times for 4 steps (diffusers' 50 steps: 51
    calls with PLMS only); the progress line used to show 'step 13/13' for --steps 4."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_uncond(tmp_path, "--steps", "4", "--scheduler", "PNDMScheduler")
    output = capsys.readouterr().out
    print(output.replace("\r", "\n")[-400:])
    assert "PNDMScheduler calls the model 13 times for 4 steps" in output
    assert "step 4/4" in output and "/13" not in output
    # the folder's DDIM options (set_alpha_to_one, ...) do not apply to PNDM: no warning for that
    assert not [w for w in caught if "ignores config keys" in str(w.message)]


def test_tokenize_shows_the_row_not_every_id(capsys):
    main(["tokenize", "cat " * 10_000])
    output = capsys.readouterr().out
    print(f"{len(output)} characters: {output[:160]}...")
    assert "10002 tokens (with start/end)" in output and "and 9925 more, dropped" in output
    assert len(output) < 1200
    with pytest.raises(SystemExit, match="holds the byte 0xE9 at character 4, which is not UTF-8"):
        main(["tokenize", "caf\udce9"])


# --- the pipelines: arguments of the wrong type, before any work ------------------------------


@pytest.fixture(scope="module")
def tiny_sd():
    return minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)


def count_text_encoder_calls(pipe, monkeypatch):
    calls = []
    original = pipe.text_encoder.forward
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a: calls.append(1) or original(*a))
    return calls


SD_ARGUMENT_CASES = [
    ({"height": 64.0}, TypeError, "height and width must be integers"),
    ({"height": "64"}, TypeError, "height and width must be integers"),
    ({"width": True}, TypeError, "height and width must be integers"),
    ({"num_images_per_prompt": True}, ValueError, "num_images_per_prompt must be a positive"),
    ({"num_images_per_prompt": 1.0}, ValueError, "num_images_per_prompt must be a positive"),
    ({"num_inference_steps": True}, ValueError, "num_inference_steps must be an integer from 1"),
    ({"num_inference_steps": 2.5}, ValueError, "num_inference_steps must be an integer from 1"),
    ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be an integer from 1"),
    ({"num_inference_steps": 1001}, ValueError, "num_inference_steps must be an integer from 1"),
    ({"latents": torch.full((1, 4, 8, 8), float("nan"))}, ValueError, "latents hold 256 inf/nan"),
    ({"latents": [[0.0]]}, TypeError, "latents must be a torch.Tensor of shape (1, 4, 8, 8)"),
    ({"eta": float("nan")}, ValueError, "eta must be a number in [0, 1]"),
    ({"eta": -1}, ValueError, "eta must be a number in [0, 1]"),
    ({"eta": 1e30}, ValueError, "eta must be a number in [0, 1]"),  # used to become NaN latents
    ({"eta": "0"}, ValueError, "eta must be a number in [0, 1]"),
    ({"generator": 0}, TypeError, "generator must be a torch.Generator"),  # a seed, by mistake
    ({"output_type": "png"}, ValueError, "output_type must be 'pil', 'np' or 'pt'"),
    ({"prompt": []}, TypeError, "prompt must be a string or a non-empty list of strings"),
    ({"prompt": None}, TypeError, "prompt must be a string or a non-empty list of strings"),
    ({"callback_steps": 0}, ValueError, "callback_steps must be a positive integer"),
]


@pytest.mark.parametrize("argument, error, words", SD_ARGUMENT_CASES, ids=lambda v: repr(v)[:40])
def test_pipeline_arguments_are_checked_before_any_work(
    tiny_sd, argument, error, words, monkeypatch
):
    encoded = count_text_encoder_calls(tiny_sd, monkeypatch)
    steps = []
    with pytest.raises(error) as raised:
        tiny_sd(**{"prompt": "a cat", "callback": lambda *a: steps.append(a), **argument})
    print(f"{argument}: {raised.value}")
    assert words in str(raised.value) and not steps and not encoded


def test_the_other_pipelines_check_their_arguments_the_same_way():
    ldm = minildm.LDMTextToImagePipeline.from_pretrained(minildm.TINY_LDM)
    uncond = minildm.LDMPipeline.from_pretrained(minildm.TINY_LDM_UNCOND)
    vq = minildm.VQDiffusionPipeline.from_pretrained(minildm.TINY_VQ_DIFFUSION)
    cases = [
        (lambda: ldm("a cat", height=64.0), TypeError, "height and width must be integers"),
        (lambda: ldm("a cat", num_inference_steps=True), ValueError, "num_inference_steps must"),
        (lambda: uncond(batch_size=True), ValueError, "batch_size must be a positive integer"),
        (lambda: uncond(num_inference_steps=0), ValueError, "num_inference_steps must"),
        (lambda: vq("a cat", num_images_per_prompt=True), ValueError, "num_images_per_prompt"),
        (lambda: vq("a cat", num_inference_steps=2.0), ValueError, "num_inference_steps must"),
        (lambda: vq("a cat", truncation_rate=True), ValueError, "truncation_rate must lie in"),
        (lambda: vq("a cat", generator=1), TypeError, "generator must be a torch.Generator"),
        (lambda: ldm("a cat", eta=float("nan")), ValueError, "eta must be a number in [0, 1]"),
        (lambda: uncond(eta=2), ValueError, "eta must be a number in [0, 1]"),
        (lambda: uncond(generator="0"), TypeError, "generator must be a torch.Generator"),
    ]
    for call, error, words in cases:
        with pytest.raises(error) as raised:
            call()
        print(raised.value)
        assert words in str(raised.value)


# --- a non-finite result names its cause --------------------------------------------------------


def fake_unet_output(pipe, monkeypatch, make):
    """Replace the UNet's output by make(real output): an overflow the tiny model cannot produce."""
    original = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, "forward", lambda *a: make(original(*a)))


def test_a_float16_overflow_in_the_unet_is_named(tiny_sd, monkeypatch):
    fake_unet_output(tiny_sd, monkeypatch, lambda out: (out * 1e6).half())  # past 65504: inf
    with pytest.raises(FloatingPointError) as raised:
        tiny_sd("a cat", num_inference_steps=3)
    print(raised.value)
    assert "at step 1 (timestep" in str(raised.value)
    assert "the UNet's output overflowed float16" in str(raised.value)


def test_inf_from_a_float32_unet_is_not_blamed_on_half_precision(tiny_sd, monkeypatch):
    fake_unet_output(
        tiny_sd, monkeypatch, lambda out: out.index_fill(0, torch.tensor([0]), float("inf"))
    )
    with pytest.raises(FloatingPointError) as raised:
        tiny_sd("a cat", num_inference_steps=3)
    print(raised.value)
    assert "returned inf/nan in torch.float32 from finite input" in str(raised.value)
    assert "float16" not in str(raised.value)


def test_a_guidance_scale_that_overflows_is_named(tiny_sd, monkeypatch):
    # conditional - unconditional = 10 everywhere, times 3.4e38: past float32's range
    fake_unet_output(tiny_sd, monkeypatch, lambda out: torch.cat([out[:1], out[:1] + 10]))
    largest = float(torch.finfo(torch.float32).max)
    with pytest.raises(FloatingPointError) as raised:
        tiny_sd("a cat", num_inference_steps=3, guidance_scale=largest)
    print(raised.value)
    assert "the UNet's predictions are finite, but guidance_scale=3.40282e+38" in str(raised.value)


def test_the_autoencoder_names_non_finite_latents_and_its_own_overflow():
    from minildm.autoencoder import check_finite

    vae = minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD).vae
    latents = torch.zeros(1, 4, 8, 8)
    latents[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"hold 1 inf/nan value\(s\) before decoding"):
        vae.decode(latents)
    with pytest.raises(FloatingPointError) as raised:
        check_finite(torch.tensor([float("inf")]))  # a float32 decode
    print(raised.value)
    assert "in torch.float32 from finite latents" in str(raised.value)
    assert "half" not in str(raised.value)
    with pytest.raises(FloatingPointError, match="overflowed the half-precision range"):
        check_finite(torch.tensor([float("inf")], dtype=torch.float16))


def test_nan_log_probabilities_in_vq_diffusion_are_named(monkeypatch):
    vq = minildm.VQDiffusionPipeline.from_pretrained(minildm.TINY_VQ_DIFFUSION)
    original = vq.transformer.forward
    monkeypatch.setattr(vq.transformer, "forward", lambda *a: original(*a) * float("nan"))
    with pytest.raises(FloatingPointError) as raised:
        vq("a cat", num_inference_steps=50)  # the NaN stops it at step 1
    print(raised.value)
    assert "log-probabilities are NaN at step 1" in str(raised.value)


def test_a_non_finite_input_image_is_refused():
    pipe = minildm.StableDiffusionImg2ImgPipeline.from_pretrained(minildm.TINY_SD)
    image = torch.full((1, 3, 64, 64), 0.5)
    image[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="image holds inf/nan values"):
        pipe("a cat", image=image, num_inference_steps=2)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_truncated_checkpoint_is_called_truncated(legacy, tmp_path):
    """A cut .ckpt used to be "not a PyTorch checkpoint (it starts with b'PK...')"; the legacy
    format's, which starts with torch's pickled magic number, was called the same."""
    path = tmp_path / "model.ckpt"
    torch.save({"weight": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=not legacy)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(minildm.CheckpointError) as raised:
        minildm.read_state_dict(path)
    print(raised.value)
    assert "is a damaged PyTorch checkpoint" in str(raised.value)
    assert "truncated by an interrupted download: delete it and download it again" in str(
        raised.value
    )


def test_image_to_image_and_inpainting_arguments():
    img2img = minildm.StableDiffusionImg2ImgPipeline.from_pretrained(minildm.TINY_SD)
    inpaint = minildm.StableDiffusionInpaintPipeline.from_pretrained(minildm.TINY_SD)
    image, mask = torch.full((1, 3, 64, 64), 0.5), torch.zeros(1, 1, 64, 64)
    cases = [
        (lambda: img2img("a cat", image=image, strength=True), "strength must lie in [0, 1]"),
        (lambda: img2img("a cat", image=image, strength=float("nan")), "strength must lie in"),
        (lambda: img2img("a cat", image=[]), "image must be a PIL image, a list of them"),
        (lambda: inpaint("a cat", image=image, mask_image=[]), "mask_image must be a PIL image"),
        (
            lambda: inpaint("a cat", image=image, mask_image=mask * float("nan")),
            "mask_image values must be finite and lie in [0, 1]",
        ),
    ]
    for call, words in cases:
        with pytest.raises(ValueError) as raised:
            call()
        print(raised.value)
        assert words in str(raised.value)


TRAIN_CASES = [
    (["train", "sd", "--out", "{tmp}/run", "--minutes", "-1"], "--minutes must be a positive"),
    (["train", "sd", "--out", "{tmp}/run", "--minutes", "nan"], "--minutes must be a positive"),
    (["train", "sd", "--out", "{tmp}/run", "--seed", "-5"], "--seed must lie in [0, 2**63)"),
    (["train", "sd", "--out", "{tmp}/a-file"], "a-file is a file; give a folder"),
    (["train", "sd", "--out", "{tmp}/a-file/run"], "a-file is a file; give a folder"),
]


@pytest.mark.parametrize("arguments, words", TRAIN_CASES, ids=lambda v: " ".join(map(str, v)))
def test_train_refuses_before_any_work(arguments, words, tmp_path, capsys):
    (tmp_path / "a-file").write_text("taken")
    with pytest.raises(SystemExit) as raised:
        main([a.format(tmp=tmp_path) for a in arguments])
    message = str(raised.value)
    print(f"{' '.join(arguments)}: {message}")
    assert message.startswith("error: ") and words in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing made


def test_download_names_the_systems_for_an_unknown_or_empty_name(capsys, tmp_path):
    for name in ("", "stable-diffusion", "stable-diffusion-v1-4/nope"):
        assert main_download_status(name, tmp_path) == 1
        error = capsys.readouterr().err
        print(f"download {name!r}: {error[:160]}")
        assert "stable-diffusion-v1-4" in error and not list(tmp_path.iterdir())


def main_download_status(name, folder):
    with pytest.raises(SystemExit) as raised:
        main(["download", name, "--dir", str(folder)])
    return raised.value.code


def test_an_empty_out_is_refused_not_read_as_the_current_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as raised:
        main(["sd", "a cat", "--out", ""])
    print(raised.value)
    assert "--out is empty" in str(raised.value) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("system", ["sd", "ldm"])
def test_other_weights_draw_at_the_size_their_unet_was_trained_at(system, tmp_path, capsys):
    """A folder that is not the embedded one (here a copy of it) used to be drawn at the official
    size (512 or 256): now at its UNet's sample_size times the autoencoder's factor, as the API
    does; the LDM pipeline's own default follows the model too."""
    import shutil

    import minildm

    copy = tmp_path / "weights"
    shutil.copytree(minildm.TINY_MODELS[system], copy)
    main([system, "a red circle", "--weights", str(copy), "--steps", "2", "--out", str(tmp_path)])
    written = sorted(tmp_path.glob("*.png"))
    sizes = [Image.open(path).size for path in written]
    print(f"{system} --weights {copy.name}: {sizes}")
    assert sizes == [(64, 64)]
    if system == "ldm":
        pipe = minildm.LDMTextToImagePipeline.from_pretrained(minildm.TINY_LDM)
        image = pipe("a red circle", num_inference_steps=1).images[0]
        assert image.size == (64, 64)


def test_a_scheduler_that_cannot_sample_here_is_refused_before_work():
    """DDIMInverseScheduler used to run as a sampler and return garbage; a diffusers scheduler
    failed inside step(); VQ-Diffusion's and the latent samplers belong to different pipelines."""
    from conftest import oracle

    from minildm import schedulers

    diffusers = oracle("diffusers")
    sd = minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)
    vq = minildm.VQDiffusionPipeline.from_pretrained(minildm.TINY_VQ_DIFFUSION)
    ldm = minildm.LDMPipeline.from_pretrained(minildm.TINY_LDM_UNCOND)
    cases = [
        (sd, schedulers.DDIMInverseScheduler(), "cannot generate one"),
        (sd, diffusers.DDIMScheduler(), "diffusers' DDIMScheduler: minildm's pipelines take"),
        (sd, vq.scheduler, "this pipeline samples with a latent sampler"),
        (ldm, schedulers.DDIMInverseScheduler(), "cannot generate one"),
        (vq, schedulers.DDIMScheduler(), "this pipeline samples with VQDiffusionScheduler"),
        (sd, object(), "expected one of minildm.schedulers"),
    ]
    for pipe, scheduler, words in cases:
        original = pipe.scheduler
        pipe.scheduler = scheduler
        with pytest.raises(ValueError) as raised:
            if pipe is ldm:
                pipe(batch_size=1, num_inference_steps=2)
            else:
                pipe("a red circle", num_inference_steps=2)
        pipe.scheduler = original
        print(f"{type(pipe).__name__} with {type(scheduler).__name__}: {raised.value}")
        assert words in str(raised.value)


# --- images of every PIL mode, by their own range (16-bit and float images were clipped to white
# or black by convert("RGB")) ----------------------------------------------------------------------


def gradient_images():
    """One picture in several modes: (mode, image, its values in [0, 1] as (H, W))."""
    import numpy as np

    ramp = np.tile(np.linspace(0, 1, 64), (64, 1))  # (64, 64), left black, right white
    images = [
        ("L", Image.fromarray(np.round(ramp * 255).astype(np.uint8)), np.round(ramp * 255) / 255),
        (
            "I;16",
            Image.fromarray(np.round(ramp * 65535).astype(np.uint16)),
            np.round(ramp * 65535) / 65535,
        ),
        ("F", Image.fromarray(ramp.astype(np.float32)), ramp.astype(np.float32)),
    ]
    sixteen = images[1][1]
    images.append(("I", sixteen.convert("I"), images[1][2]))
    return images


@pytest.mark.parametrize("mode", ["L", "I;16", "I", "F"])
def test_every_image_mode_is_read_with_its_range(mode, tmp_path):
    import numpy as np

    from minildm.pipelines.common import image_array

    _, image, expected = next(case for case in gradient_images() if case[0] == mode)
    path = tmp_path / ("image.tiff" if mode in ("F", "I") else "image.png")
    image.save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode or (mode == "I" and opened.mode.startswith("I"))
        got = image_array(opened)
    error = float(np.abs(got - expected[..., None]).max())
    print(f"{mode}: read back within {error:.2e}, range [{got.min():.3f}, {got.max():.3f}]")
    assert got.shape == (64, 64, 3) and error < 1e-6


def test_img2img_and_masks_read_a_16_bit_or_float_image_as_its_8_bit_twin():
    import numpy as np

    img2img = minildm.StableDiffusionImg2ImgPipeline.from_pretrained(minildm.TINY_SD)
    inpaint = minildm.StableDiffusionInpaintPipeline.from_pretrained(minildm.TINY_SD)
    images = {mode: image for mode, image, _ in gradient_images()}

    def draw(image):
        generator = torch.Generator().manual_seed(0)
        return img2img(
            "a red circle",
            image=image,
            strength=0.5,
            num_inference_steps=4,
            generator=generator,
            output_type="np",
        ).images[0]

    reference = draw(images["L"].convert("RGB"))
    for mode in ("I;16", "I", "F"):
        difference = float(np.abs(draw(images[mode]) - reference).max())
        print(f"img2img of the {mode} image against the 8-bit one: max difference {difference:.4f}")
        assert difference < 0.02  # 16-bit against 8-bit rounding; a clipped image differs by ~1
    half = np.zeros((64, 64), np.float32)
    half[:, 32:] = 1

    def repaint(mask):
        generator = torch.Generator().manual_seed(0)
        return inpaint(
            "a red circle",
            image=images["L"].convert("RGB"),
            mask_image=mask,
            num_inference_steps=4,
            generator=generator,
            output_type="np",
        ).images[0]

    reference = repaint(Image.fromarray((half * 255).astype(np.uint8)))
    for mask in (Image.fromarray(half), Image.fromarray((half * 65535).astype(np.uint16))):
        difference = float(np.abs(repaint(mask) - reference).max())
        print(f"inpainting with a mode-{mask.mode} mask: max difference {difference:.2e}")
        assert difference < 1e-6


def test_an_image_outside_its_modes_range_is_refused_before_loading(monkeypatch, tmp_path):
    import numpy as np

    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    path = tmp_path / "bright.tiff"
    Image.fromarray(np.full((64, 64), 255.0, np.float32)).save(path)  # float, but 0..255
    with pytest.raises(SystemExit) as raised:
        main(["sd", "a red circle", "--invert", str(path), "--out", str(tmp_path)])
    print(raised.value)
    assert "mode-F image must hold values in [0, 1], this one holds [255, 255]" in str(raised.value)
