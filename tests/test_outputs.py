"""Every output minildm writes (PNG, trace, checkpoint, pipeline folder, training folder, download)
goes through minildm/checkpoints/files.py: written under a hidden temporary name in the same folder
and renamed when complete, its destination checked writable before the work, its final names
claimed exclusively. One table per guarantee, one row per writer.
"""

import errno
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import minildm
from minildm.__main__ import main
from minildm.checkpoints import files
from minildm.checkpoints.save import save_component
from minildm.tools import generate, trace
from minildm.train import loop, run
from minildm.train.recipes import Settings
from minildm.vq_transformer import LearnedClassifierFreeEmbeddings

REPO = Path(__file__).parent.parent


def full_disk(after: bytes = b"the first bytes"):
    """A writer that starts its file, then meets a full disk: what a half-written file looks
    like."""

    def write(*args, **kwargs):
        target = next(a for a in (*args, *kwargs.values()) if isinstance(a, (str, Path)))
        Path(target).write_bytes(after)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def left_in(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def write_png(folder):
    args = generate_arguments(folder)
    return generate.write_images(args, [Image.new("RGB", (8, 8), "red")], run=1)


def generate_arguments(folder, n=1, overwrite=False):
    import argparse

    return argparse.Namespace(
        command="sd", prompt="a red circle", seed=0, n=n, out=str(folder), overwrite=overwrite
    )


# (writer, what it writes into a folder, the low-level call to break, the final name)
WRITERS = [
    ("png", write_png, (Image.Image, "save"), "sd_a-red-circle_seed0_0.png"),
    (
        "png --overwrite",
        lambda folder: generate.write_images(
            generate_arguments(folder, overwrite=True), [Image.new("RGB", (8, 8))], run=1
        ),
        (Image.Image, "save"),
        "sd_a-red-circle_seed0_0.png",
    ),
    (
        "checkpoint",
        lambda folder: loop.save_checkpoint(folder, {"step": torch.tensor(7)}),
        (torch, "save"),
        "checkpoint.pt",
    ),
    (
        "trace",
        lambda folder: trace.write(folder / "t.safetensors", {"x": torch.zeros(3)}, {}),
        (trace, "save_file"),
        "t.safetensors",
    ),
    (
        "component",
        lambda folder: save_component(folder / "embeddings", LearnedClassifierFreeEmbeddings(4, 8)),
        (minildm.checkpoints.save, "save_file"),
        "embeddings/diffusion_pytorch_model.safetensors",
    ),
    (
        "text file",
        lambda folder: files.write_text(folder / "training.json", "{}\n"),
        (Path, "write_text"),
        "training.json",
    ),
]


@pytest.mark.parametrize("name, writer, broken, final", WRITERS, ids=[w[0] for w in WRITERS])
@pytest.mark.parametrize("before", ["absent", "an earlier file"])
def test_a_failed_write_leaves_no_partial_file(
    name, writer, broken, final, before, tmp_path, monkeypatch
):
    """A full disk mid-write: the final name keeps what it held (nothing, or the earlier file),
    no temporary is left, and the error names the file the user asked for."""
    target = tmp_path / final
    if before != "absent":
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"the earlier run's file")
    monkeypatch.setattr(*broken, full_disk())
    with pytest.raises(OSError) as raised:
        writer(tmp_path)
    print(f"{name}, {before}: {raised.value}; left {left_in(tmp_path)}")
    assert raised.value.errno == errno.ENOSPC
    assert "could not write" in str(raised.value) and final.split("/")[-1] in str(raised.value)
    assert "no partial file was left" in str(raised.value)
    left = left_in(tmp_path)
    assert not [n for n in left if ".partial" in n]  # no temporary
    if before == "absent":
        assert not target.exists()
    else:
        assert target.read_bytes() == b"the earlier run's file"


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, MemoryError])
def test_an_interrupted_write_leaves_no_partial_file(interruption, tmp_path, monkeypatch):
    def interrupted(self, target, *args, **kwargs):
        Path(target).write_bytes(b"\x89PNG half")
        raise interruption

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(interruption):
        write_png(tmp_path)
    print(f"{interruption.__name__}: left {left_in(tmp_path)}")
    assert left_in(tmp_path) == []


def test_a_full_disk_on_the_command_line_is_exit_3_and_no_png(tmp_path, monkeypatch, capsys):
    """The whole command: the image is drawn, saving it fails; one line, status 3, no PNG (the
    next run used to write _run2 beside a 0-byte PNG)."""
    monkeypatch.setattr(Image.Image, "save", full_disk(b""))
    with pytest.raises(SystemExit) as raised:
        main(["ldm-uncond", "--steps", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().err.strip()
    print(f"exit {raised.value.code}: {printed}")
    assert raised.value.code == 3 and "Traceback" not in printed
    assert "could not write" in printed and "ldm-uncond_seed0_0.png" in printed
    assert "No space left on device" in printed and ".partial" not in printed
    assert left_in(tmp_path) == []


# --- the destination is checked before the work ---------------------------------------------


@pytest.fixture
def read_only(monkeypatch, tmp_path_factory):
    """-> a folder nobody may write into. Root writes anywhere despite chmod, so the test makes
    the file system say EROFS for it, as a read-only mount does."""
    folder = tmp_path_factory.mktemp("read-only")
    real = tempfile.TemporaryFile

    def temporary_file(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    yield folder


def no_work(*args, **kwargs):
    raise AssertionError("the work started before the destination was checked")


# (arguments with {ro} for the read-only folder and {tmp} for a writable one, what stops the work,
#  words of the error)
DESTINATIONS = [
    (["sd", "a red circle", "--out", "{ro}"], (generate, "load_pipeline"), "cannot write into"),
    (["ldm-uncond", "--out", "{ro}/new"], (generate, "load_pipeline"), "cannot write into"),
    (
        ["trace", "sd", "a red circle", "--out", "{ro}/t.safetensors"],
        (trace, "record"),
        "cannot write into",
    ),
    (["trace", "sd", "a red circle", "--out", "{tmp}"], (trace, "record"), "is a folder; give a"),
    (
        ["trace", "sd", "a red circle", "--out", "{tmp}/no/t.safetensors"],
        (trace, "record"),
        "does not exist",
    ),
    (["train", "sd", "--quick", "--out", "{ro}/run"], (run, "load_component"), "cannot write into"),
    (["train", "ldm", "--quick", "--out", "{ro}"], (run, "load_component"), "cannot write into"),
]


@pytest.mark.parametrize(
    "arguments, work, words", DESTINATIONS, ids=[" ".join(d[0]) for d in DESTINATIONS]
)
def test_an_unwritable_destination_fails_before_the_work(
    arguments, work, words, read_only, tmp_path, monkeypatch
):
    monkeypatch.setattr(*work, no_work)
    arguments = [a.format(ro=read_only, tmp=tmp_path) for a in arguments]
    with pytest.raises(SystemExit) as raised:
        main(arguments)
    print(f"{' '.join(arguments)}: {raised.value}")
    assert raised.value.code == 2 and words in str(raised.value)


def test_a_download_into_an_unwritable_folder_fails_before_the_transfer(read_only, tmp_path):
    from minildm.checkpoints.download import DownloadError, download

    manifest = tmp_path / "manifest.txt"
    manifest.write_text(f"toy owner/toy main weights.bin 10 {'0' * 64}\n")
    with pytest.raises(DownloadError) as raised:
        download("toy", read_only, base_url="http://127.0.0.1:9/", manifest=manifest)
    print(raised.value)
    assert "cannot write into the folder" in str(raised.value) and "--dir" in str(raised.value)


# --- a training folder stopped early starts again ---------------------------------------------


def test_a_training_folder_stopped_before_its_first_checkpoint_starts_again(tmp_path, capsys):
    settings = Settings("sd", 1.0, 0, quick=True)
    (tmp_path / run.MARKER).write_text('{"trainer": "minildm train sd"}\n')
    (tmp_path / "timeline.json").write_text('{"points": [{"step": 5}]}\n')
    assert run.check_output_folder(tmp_path, settings) is None  # a fresh start, not a refusal
    printed = capsys.readouterr().out
    print(printed)
    assert "stopped before its first checkpoint: starting it again" in printed
    timeline = minildm.train.timeline.Timeline(tmp_path, "sd", 1.0, resuming=False)
    assert timeline.points == []  # the stale points of the stopped run are not kept
    # a folder this trainer did not write is still refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a minildm training folder|was not written"):
        run.check_output_folder(other, settings)


# --- concurrent runs never claim the same name ------------------------------------------------


def test_concurrent_writers_claim_distinct_names(tmp_path):
    """8 threads write the same three names at once, 25 rounds: each round's writers get runs
    1..8, every file holds its own writer's bytes, no temporary is left."""
    rounds, writers = 25, 8
    for round_ in range(rounds):
        folder = tmp_path / f"round{round_}"
        folder.mkdir()
        got, start = {}, threading.Barrier(writers)

        def names(k, folder=folder):
            stem = "img" if k == 1 else f"img_run{k}"
            return [folder / f"{stem}_{i}.png" for i in range(2)] + [folder / f"{stem}_grid.png"]

        def writer(who, got=got, start=start, names=names):
            def write_all(temporaries):
                start.wait()  # all at once, after every temporary is written
                for t in temporaries:
                    t.write_text(f"writer {who}")

            got[who] = files.claim_files(write_all, names)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        runs = sorted(tuple(paths) for paths in got.values())
        assert len(set(runs)) == writers and sorted(map(tuple, map(names, range(1, 9)))) == runs
        for who, paths in got.items():
            assert all(p.read_text() == f"writer {who}" for p in paths)
        assert len(left_in(folder)) == 3 * writers
    print(f"{rounds} rounds x {writers} writers: every name claimed once")


def test_a_name_taken_after_planning_moves_the_run_on(tmp_path, capsys):
    """The names are planned before the (long) run; another run takes them meanwhile."""
    args = generate_arguments(tmp_path, n=2)
    run_planned, planned = generate.first_free_run(args), generate.output_files(args)
    planned[0].write_bytes(b"the other run's")  # one of the three: the set moves on, whole
    images = [Image.new("RGB", (8, 8))] * 2 + [Image.new("RGB", (16, 8))]
    written = generate.write_images(args, images, run_planned)
    print([p.name for p in written])
    assert [p.name for p in written] == [
        "sd_a-red-circle_seed0_run2_0.png",
        "sd_a-red-circle_seed0_run2_1.png",
        "sd_a-red-circle_seed0_run2_grid.png",
    ]
    assert planned[0].read_bytes() == b"the other run's" and not planned[1].exists()


def test_two_commands_at_once_with_one_prompt_and_seed_write_two_files(tmp_path):
    command = [
        sys.executable,
        "-m",
        "minildm",
        "ldm-uncond",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
    ]
    processes = [
        subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    names = left_in(tmp_path)
    print(names, [p.returncode for p in processes])
    assert all(p.returncode == 0 for p in processes), outputs
    assert names == ["ldm-uncond_seed0_0.png", "ldm-uncond_seed0_run2_0.png"]
    pictures = [Image.open(tmp_path / name) for name in names]
    assert all(p.size == (64, 64) for p in pictures)
    assert pictures[0].tobytes() == pictures[1].tobytes()  # same seed, same image, two names
