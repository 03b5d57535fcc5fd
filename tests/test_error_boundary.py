"""The command line's error boundary (minildm/tools/errors.py): every error that ends a command
becomes one or two lines on stderr and a documented exit status; a traceback appears only for a
bug, and with --debug.

One case per cause, raised where the command's work would run, then real commands for the causes
a user meets: a bad argument, a non-finite result, a reader that closes the pipe.
"""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed

import minildm.__main__ as command_line
from minildm.checkpoints.weights import CheckpointError

REPO = Path(__file__).parent.parent

# (what the command's work raises, the exit status, words of the one line on stderr)
CAUSES = [
    (ValueError("--steps must be at least 1, got 0"), 2, "error: --steps must be at least 1"),
    (FileNotFoundError("weights/sd is neither a local folder nor a cached repo"), 2, "error: "),
    (CheckpointError("unet/model.safetensors: missing keys"), 2, "error: unet/model.safetensors"),
    (FloatingPointError("the latents became inf/nan at step 2"), 4, "error: the latents became"),
    (OSError(errno.ENOSPC, "No space left on device", "outputs/a.png"), 3, "No space left"),
    (PermissionError(errno.EACCES, "Permission denied", "outputs"), 3, "Permission denied"),
    (KeyboardInterrupt(), 130, "interrupted"),
    # under torchrun, a rank whose partner died while it waited at a gradient average
    (
        torch.distributed.DistBackendError("Connection closed by peer [127.0.0.1]:29500"),
        5,
        "another process of this torchrun run stopped or cannot be reached (DistBackendError",
    ),
    (TypeError("unsupported operand type(s)"), 70, "This is a bug in minildm: please report it"),
    (AssertionError("shapes differ"), 70, "internal error: AssertionError: shapes differ"),
]


@pytest.mark.parametrize(
    "error, status, words", CAUSES, ids=[type(error).__name__ for error, _, _ in CAUSES]
)
def test_each_cause_ends_in_its_status_and_one_message(error, status, words, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(command_line, "generate", fail)
    with pytest.raises(SystemExit) as raised:
        command_line.main(["sd", "a red circle"])
    printed = capsys.readouterr().err
    print(f"{type(error).__name__} -> {raised.value.code}: {printed.strip()}")
    assert raised.value.code == status and words in printed and "Traceback" not in printed
    assert len(printed.strip().splitlines()) <= 2
    assert str(status) in command_line.EXIT_CODES_HELP  # documented in --help


def test_an_interrupted_training_run_says_how_to_resume(monkeypatch, capsys, tmp_path):
    import minildm.train.run

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(minildm.train.run, "main_train", interrupted)
    with pytest.raises(SystemExit) as raised:
        command_line.main(["train", "sd", "--out", str(tmp_path / "run")])
    printed = capsys.readouterr().err
    print(printed.strip())
    assert raised.value.code == 130 and "run the same command again to resume" in printed


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_lets_the_error_and_its_traceback_through(where, monkeypatch):
    def fail(args):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(command_line, "generate", fail)
    arguments = ["sd", "a red circle"]
    arguments = ["--debug", *arguments] if where == "before" else [*arguments, "--debug"]
    with pytest.raises(TypeError, match="unsupported operand"):
        command_line.main(arguments)


def run(*arguments, **options):
    return subprocess.run(
        [sys.executable, "-m", "minildm", *arguments],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        **options,
    )


@pytest.mark.parametrize(
    "arguments, status, words",
    [
        (["sd", "a red circle", "--steps", "0"], 2, "error: --steps must be at least 1, got 0"),
        (["sd", "a red circle", "--steps", "2", "--guidance", "1e30"], 4, "became inf/nan"),
        (["trace", "sd"], 2, "trace sd needs a prompt"),
        (["compare", "missing.safetensors", "other.safetensors"], 2, "error: "),
    ],
    ids=["bad argument", "non-finite result", "trace without a prompt", "compare missing files"],
)
def test_real_commands_end_without_a_traceback(arguments, status, words, tmp_path):
    result = run(*arguments, "--out", str(tmp_path)) if arguments[0] == "sd" else run(*arguments)
    print(f"{' '.join(arguments)} -> {result.returncode}: {result.stderr.strip()[-300:]}")
    assert result.returncode == status and words in result.stderr
    assert "Traceback" not in result.stderr


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly():
    """`minildm tokenize ... | head -c 1`: the reader is gone before minildm writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run(
        [sys.executable, "-m", "minildm", "tokenize", "a red circle on a blue background"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    os.close(write_end)
    print(f"exit {result.returncode}, stderr {result.stderr!r}")
    assert result.returncode == 141 and result.stderr == ""
