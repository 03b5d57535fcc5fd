"""The embedded tiny Stable Diffusion (minildm/assets/tiny-sd) and the trainer that made it.

- It draws what it is asked for, held-out triples included, read back by the shapes scorer at the
  settings it ships with (25 steps of its own DDIM scheduler, guidance 4.0, 3 positions x 2 seeds).
- diffusers' StableDiffusionPipeline loads the same folder and gives the same images: the first
  parity test on trained weights.
- `python -m minildm sd "..."` with no --weights runs it offline.
- `train sd --quick` runs the whole trainer in about a minute; bad output folders, resuming a run of
  other sizes and --minutes 0 are refused before any work.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import oracle
from PIL import Image

import minildm
from minildm import shapes
from minildm.pipelines import StableDiffusionPipeline
from minildm.train.evaluate import autoencoder_scores, pipeline_scores, to_uint8
from minildm.train.loop import to_model_input
from minildm.train.recipes import SEEN_TRIPLES
from minildm.train.run import train_sd

REPO = Path(__file__).parent.parent
# the targets for held-out triples: colour, shape, background, position, all four
TARGETS = {"colour": 0.90, "shape": 0.85, "background": 0.90, "position": 0.80, "all": 0.65}


@pytest.fixture(scope="module")
def tiny_sd():
    return StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)


def test_folder_is_small_and_complete():
    files = [p for p in minildm.TINY_SD.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"tiny-sd: {len(files)} files, {size / 1e6:.1f} MB")
    assert size <= 20e6
    for part in (
        "model_index.json",
        "README.md",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "text_encoder/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "scheduler/scheduler_config.json",
    ):
        assert (minildm.TINY_SD / part).is_file(), part
    assert not (minildm.TINY_SD / "checkpoint.pt").exists()


# The target for the autoencoder round trip: 0.98 of drawings with all four attributes
# kept (the misses: small triangles and squares whose corners come back rounded).
AUTOENCODER_TARGET = 0.98


def test_autoencoder_keeps_all_four_attributes(tiny_sd):
    # 432 fresh drawings: every triple (held-out ones too) in every position
    scores = autoencoder_scores(tiny_sd.vae, per_combination=1, seed=2024)
    print(shapes.format_scores("autoencoder round trip", scores), f"(target {AUTOENCODER_TARGET})")
    assert min(scores["colour"], scores["background"], scores["position"]) >= 0.99
    assert scores["all"] >= AUTOENCODER_TARGET


def test_autoencoder_hands_pink_over_to_fine_tuning(tiny_sd):
    """Fine-tuning learns from the encoder's latents (minildm/train/finetune.py), so it can teach
    only what the frozen autoencoder brings back. Its stage also learned other colours and
    outlines, never pink nor a star (shapes.other_drawing): one that knew the world's nine colours
    alone brought pink back pink on 15% of drawings. The star is printed, not held: it still comes
    back round (docs/fine-tuning.md)."""
    images, scenes = shapes.every_combination(1, seed=2025, extended=True)
    with torch.no_grad():
        mean, _ = tiny_sd.vae.encode(to_model_input(torch.from_numpy(images)))
        back = to_uint8(tiny_sd.vae.decode(mean))
    pink = [i for i, s in enumerate(scenes) if s["colour"] == "pink" and s["shape"] != "star"]
    star = [i for i, s in enumerate(scenes) if s["shape"] == "star" and s["colour"] != "pink"]
    pink_scores = shapes.score(back[pink], [scenes[i] for i in pink], extended=True)
    star_scores = shapes.score(back[star], [scenes[i] for i in star], extended=True)
    print(shapes.format_scores(f"pink round trip ({len(pink)})", pink_scores))
    print(shapes.format_scores(f"star round trip ({len(star)})", star_scores))
    assert pink_scores["colour"] >= 0.90
    assert min(pink_scores["background"], pink_scores["position"]) >= 0.99


def test_held_out_and_seen_scores(tiny_sd):
    started = time.perf_counter()
    held_out = pipeline_scores(tiny_sd, list(shapes.HELD_OUT), seeds=(0, 1), steps=25, guidance=4.0)
    seen = pipeline_scores(tiny_sd, SEEN_TRIPLES, seeds=(0, 1), steps=25, guidance=4.0)
    print(f"\n{'':28} " + "  ".join(f"{name:>10}" for name in TARGETS))
    for title, scores in [
        ("12 held-out x 3 x 2 seeds", held_out),
        ("6 seen x 3 x 2 seeds", seen),
        ("target (held-out)", TARGETS),
    ]:
        print(f"{title:28} " + "  ".join(f"{scores[name]:10.3f}" for name in TARGETS))
    print(f"108 images in {time.perf_counter() - started:.1f} s")
    for name, target in TARGETS.items():
        assert held_out[name] >= target, f"held-out {name} {held_out[name]:.3f} < {target}"


def test_diffusers_gives_the_same_images(tiny_sd):
    diffusers = oracle("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = diffusers.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)
    reference.set_progress_bar_config(disable=True)
    assert type(reference.scheduler).__name__ == "DDIMScheduler"
    assert (
        reference.tokenizer.model_max_length == 16 and tiny_sd.tokenizer.max_length == 16
    )  # from tokenizer_config.json
    prompts = [
        "a red circle on a blue background",
        "a yellow square on the left side of a gray background",
        "",
    ]
    expected_ids = reference.tokenizer(
        prompts, padding="max_length", max_length=16, return_tensors="pt"
    ).input_ids
    assert torch.equal(tiny_sd.tokenizer(prompts), expected_ids)
    call = dict(
        prompt=[
            "a red circle on a blue background",
            "a purple triangle on the right side of a white background",
        ],
        height=64,
        width=64,
        num_inference_steps=25,
        guidance_scale=4.0,
        output_type="np",
    )
    expected = reference(generator=torch.Generator().manual_seed(0), **call).images
    got = tiny_sd(generator=torch.Generator().manual_seed(0), **call).images
    error = float(np.abs(got - expected).max())
    print(
        f"tiny-sd, minildm vs diffusers, 2 prompts, 25 DDIM steps: "
        f"image max abs difference {error:.1e} (tolerance 1e-4)"
    )
    assert error < 1e-4


def test_any_multiple_of_8_matches_diffusers_in_the_api_and_the_command_line(tiny_sd, tmp_path):
    """520x776: latents 65x97, which the UNet's stride-2 convs round up (65 -> 33) and its upsamplers
    bring back to each skip's size, as diffusers' UNet2DConditionModel does."""
    diffusers = oracle("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = diffusers.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)
    reference.set_progress_bar_config(disable=True)
    prompt = "a green triangle on the left side of a black background"
    call = dict(height=520, width=776, num_inference_steps=5, guidance_scale=4.0, output_type="np")
    expected = reference(prompt, generator=torch.Generator().manual_seed(0), **call).images
    got = tiny_sd(prompt, generator=torch.Generator().manual_seed(0), **call).images
    error = float(np.abs(got - expected).max())
    print(f"tiny-sd 520x776, minildm vs diffusers: image max abs difference {error:.1e}")
    assert got.shape == (1, 520, 776, 3) and error < 1e-4
    result = subprocess.run(
        [sys.executable, "-m", "minildm", "sd", prompt, "--height", "520", "--width", "776"]
        + ["--steps", "5", "--guidance", "4", "--seed", "0", "--out", str(tmp_path)],
        cwd=REPO,
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (png,) = tmp_path.glob("sd_*_seed0_0.png")
    written = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    expected_png = (expected[0] * 255).round().astype(np.int16)  # as diffusers' numpy_to_pil
    levels = int(np.abs(written - expected_png).max())
    print(f"command line 520x776 PNG vs diffusers' image: max difference {levels} level(s)")
    assert written.shape == (520, 776, 3) and levels <= 1


def test_readme_first_command_runs_offline(tmp_path):
    readme = (REPO / "README.md").read_text()
    first = readme.split("```bash\n")[1].splitlines()[
        0
    ]  # the README opens with install && generate
    assert first.startswith("pip install") and "&& minildm sd" in first
    # the install step is what CI has already done; from elsewhere than the checkout, only the
    # installed `minildm` command can run it
    command = first.split("#")[0].split("&&")[-1].strip()
    assert "--weights" not in command and '"a red circle on a blue background"' in command
    if shutil.which("minildm") is None:
        if os.environ.get("CI"):
            pytest.fail("the minildm command is not on PATH after pip install .")
        pytest.skip("the minildm command is not installed here (pip install -e .)")
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environment["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        command + f" --out {tmp_path}",
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    print(result.stdout[-500:], result.stderr[-500:])
    assert result.returncode == 0
    assert "embedded tiny-sd" in result.stdout
    promised = first.split("# -> outputs/")[1].split()[0]  # the file the README says it writes
    image = np.asarray(Image.open(tmp_path / promised).convert("RGB"))
    read = shapes.read_image(image)
    print("the scorer reads:", read)
    assert (read["colour"], read["shape"], read["background"], read["position"]) == (
        "red",
        "circle",
        "blue",
        "center",
    )


# --- the trainer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`train sd --quick --seed 3`: (folder, report, seconds)."""
    folder = tmp_path_factory.mktemp("quick") / "run"
    started = time.perf_counter()
    report = train_sd(folder, quick=True, seed=3)
    return folder, report, time.perf_counter() - started


def test_quick_training_run(quick_run, host_pace):
    folder, report, seconds = quick_run
    steps = report["steps"]
    print(
        f"train sd --quick: {seconds:.0f} s, "
        f"{steps['vae']} autoencoder and {steps['unet']} UNet steps "
        f"(limit 90 s x pace {host_pace:.2f})"
    )
    assert seconds <= 90 * host_pace
    for name in ("vae_loss", "unet_loss"):
        losses = [loss for _, loss in report["history"][name]]
        fifth = max(len(losses) // 5, 1)
        first = np.mean(losses[:fifth])
        last = np.mean(losses[-fifth:])
        print(f"{name}: first fifth {first:.4f}, last fifth {last:.4f}")
        assert last < 0.8 * first
    assert json.loads((folder / "training.json").read_text())["quick"] is True
    call = dict(
        prompt="a red circle on a blue background",
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=4.0,
        output_type="np",
    )
    ours = StableDiffusionPipeline.from_pretrained(folder)(
        generator=torch.Generator().manual_seed(0), **call
    ).images
    diffusers = oracle("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(generator=torch.Generator().manual_seed(0), **call).images
    print(f"quick folder, minildm vs diffusers: {np.abs(ours - theirs).max():.1e}")
    assert ours.shape == (1, 64, 64, 3) and np.abs(ours - theirs).max() < 1e-4

    # Resuming the finished run is refused at other sizes, before any work.
    with pytest.raises(ValueError, match="holds models of other sizes .*made with --quick"):
        train_sd(folder, quick=False, seed=3)
    with pytest.raises(ValueError, match="trained with --seed 3, not 4"):
        train_sd(folder, quick=True, seed=4)


def test_a_timeline_records_the_run_without_changing_it(quick_run, tmp_path):
    """--timeline draws, scores and measures the averaged weights every few (here: 0.05) minutes;
    the run's steps, and so its weights, are those of the same run without it."""
    from minildm.train.run import train

    folder, _, _ = quick_run
    timed = tmp_path / "timed"
    report = train("sd", timed, quick=True, seed=3, timeline_minutes=0.05)
    points = json.loads((timed / "timeline.json").read_text())["points"]
    for point in points:
        print(
            f"step {point['step']:4d}, {point['seconds']:5.1f} s: held-out "
            f"{point['held_out_scores']['all']:.2f}, loss by band {point['loss_by_band']}"
        )
    steps = [point["step"] for point in points]
    assert steps[0] == 0 and steps[-1] == report["steps"]["unet"] and len(points) >= 3
    assert steps == sorted(set(steps))
    # Seconds are stored to 0.1 s: compare them at that precision (6.1 - 3.1 is 2.9999999999999996).
    gaps = [round(b["seconds"] - a["seconds"], 1) for a, b in zip(points[:-2], points[1:-1])]
    assert all(gap >= 3.0 for gap in gaps), gaps
    first, last = np.mean(points[0]["loss_by_band"]), np.mean(points[-1]["loss_by_band"])
    assert len(points[-1]["loss_by_band"]) == 10 and last < 0.5 * first
    strip = Image.open(timed / "timeline.png")
    assert strip.size == (64 * len(shapes.HELD_OUT), 64 * len(points))
    assert sorted(p.name for p in (timed / "timeline").iterdir()) == [
        f"step_{step:06d}.png" for step in steps
    ]
    assert "--timeline 0.05" in report["command"]
    ours = StableDiffusionPipeline.from_pretrained(timed).unet.state_dict()
    without = StableDiffusionPipeline.from_pretrained(folder).unet.state_dict()
    differ = [name for name in ours if not torch.equal(ours[name], without[name])]
    print(f"UNet tensors that differ from the run without a timeline: {len(differ)}")
    assert not differ


def test_the_autoencoder_loss_leaves_the_model_it_scores_alone(tiny_sd):
    """Evaluating a trained autoencoder with the trainer's loss used to reset its log-variance
    bias (the fresh-model start, now start_nearly_deterministic, applied by the loss itself)."""
    from minildm.train.loop import kl_autoencoder_loss
    from minildm.train.recipes import Settings

    before = {k: v.clone() for k, v in tiny_sd.vae.state_dict().items()}
    images = torch.from_numpy(shapes.make_dataset(8, seed=0)[0])
    settings = Settings("sd", minutes=1.0, seed=0, quick=True)
    loss = kl_autoencoder_loss(tiny_sd.vae, images, settings)
    with torch.no_grad():
        value = loss(torch.Generator().manual_seed(0)).item()
    changed = [k for k, v in tiny_sd.vae.state_dict().items() if not torch.equal(v, before[k])]
    print(f"trained tiny-SD autoencoder loss {value:.4f}; parameters changed: {changed}")
    assert not changed and value < 0.1


def test_training_bad_input(tmp_path):
    somebody_elses = tmp_path / "photos"
    somebody_elses.mkdir()
    (somebody_elses / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match="exists and is not a minildm training folder"):
        train_sd(somebody_elses, quick=True)
    assert sorted(p.name for p in somebody_elses.iterdir()) == ["holiday.jpg"]  # untouched
    for minutes in (0, -5, float("nan")):
        with pytest.raises(ValueError, match="--minutes must be a positive number"):
            train_sd(tmp_path / "new", minutes=minutes, quick=True)
    assert not (tmp_path / "new").exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train_sd(a_file, quick=True)
    from minildm.train.run import train

    with pytest.raises(ValueError, match="--timeline must be a positive number of minutes"):
        train("sd", tmp_path / "timed", quick=True, timeline_minutes=0)
    with pytest.raises(ValueError, match="kept for sd and ldm, not ldm-uncond"):
        train("ldm-uncond", tmp_path / "timed", quick=True, timeline_minutes=1)
    assert not (tmp_path / "timed").exists()


def test_a_resumed_timeline_drops_the_points_after_its_checkpoint(tmp_path):
    from minildm.train.timeline import Timeline

    points = [{"step": step, "seconds": step / 10} for step in (0, 100, 200, 300)]
    (tmp_path / "timeline.json").write_text(json.dumps({"points": points}))
    assert Timeline(tmp_path, "sd", every_minutes=1).points == []  # a fresh run starts empty
    timeline = Timeline(tmp_path, "sd", every_minutes=1, resuming=True)
    timeline.forget_after(200)  # the checkpoint was written at step 250
    assert [point["step"] for point in timeline.points] == [0, 100, 200]
    assert not timeline.due(200 / 10 + 59) and timeline.due(200 / 10 + 60)


def test_training_command_line_errors(tmp_path):
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "minildm",
            "train",
            "sd",
            "--out",
            str(tmp_path / "x"),
            "--minutes",
            "0",
        ],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        timeout=60,
    )
    print(result.stderr.strip())
    assert result.returncode != 0 and "--minutes must be a positive number" in result.stderr


def test_tokenizer_folder_length_is_checked(tmp_path):
    import shutil

    folder = tmp_path / "tokenizer"
    shutil.copytree(minildm.TINY_SD / "tokenizer", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, model_max_length=1)))
    with pytest.raises(ValueError, match="model_max_length must be an integer >= 2"):
        minildm.CLIPTokenizer.from_folder(folder)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(dict(config, model_max_length=int(1e30)))
    )  # transformers' "no limit"
    assert minildm.CLIPTokenizer.from_folder(folder).max_length == 77
