"""`python -m minildm bench`: the timing is interleaved, the two implementations compute the same
function on the same weights, and bad arguments are refused before the models are built."""

import pytest
import torch
from conftest import oracle

from minildm.__main__ import main
from minildm.tools import bench


def test_runs_are_timed_in_turn_after_one_warm_up_each():
    calls = []
    runs = {"minildm": lambda: calls.append("A"), "diffusers": lambda: calls.append("B")}
    times = bench.interleaved_seconds(runs, repeats=3, device="cpu")
    assert calls == ["A", "B"] + ["A", "B"] * 3
    assert [len(t) for t in times.values()] == [3, 3]


def test_flops_of_a_matrix_product():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert bench.count_flops(lambda: a @ b) == 2 * 64 * 32 * 16


def test_the_autoencoder_decode_against_diffusers_on_the_same_weights(capsys):
    """The official KL-f8 decoder at 64x64 (small enough for CI): both implementations are timed
    and their outputs agree, which is what makes the time ratio a comparison of the same work;
    the same again in a fresh process without retain_freed_memory (the API path), and the host's
    CPU, both GEMM probes and the attention kernel's speed printed first."""
    oracle("diffusers")
    result = bench.bench("vae", size=64, repeats=1, compare=True)
    printed = capsys.readouterr().out
    with capsys.disabled():
        print(printed)
    assert set(result["medians"]) == {"minildm", "diffusers"}
    assert result["max_abs_difference"] < 1e-4
    assert result["gflop"] > 1  # about 39 GFLOP for one 64x64 decode
    assert result["ratio"] == pytest.approx(
        result["medians"]["minildm"] / result["medians"]["diffusers"]
    )
    api = result["api_path"]  # measured in another process: the same work, its own times
    assert set(api["medians"]) == {"minildm", "diffusers"}
    assert api["max_abs_difference"] < 1e-4
    assert api["gflop"] == pytest.approx(result["gflop"])
    assert bench.cpu_model() in printed.splitlines()[0]
    for words in ("GEMM probes (2048 x 2048, float32): torch/MKL", "attention kernel", "API path"):
        assert words in printed


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["--size", "100"], "--size must be a positive multiple of 8, got 100"),
        (["--repeats", "0"], "--steps and --repeats must be at least 1"),
        (["--device", "gpu"], "--device 'gpu' is not a device"),
        (["--gpu-check"], "--gpu-check compares a CUDA device with this CPU"),
        (
            ["--gpu-check", "--part", "vae", "--dtype", "bfloat16"],
            "--part, --dtype would be ignored",
        ),
        (["--part", "pipeline", "--compile"], "--compile times one model"),
    ],
)
def test_bad_arguments_are_refused_before_any_model_is_built(arguments, words, monkeypatch):
    monkeypatch.setattr(bench, "bench", lambda *a: pytest.fail("ran with bad arguments"))
    monkeypatch.setattr(bench, "gpu_check", lambda *a, **k: pytest.fail("ran with bad arguments"))
    with pytest.raises(SystemExit) as raised:
        main(["bench", *arguments])
    print(raised.value.code)
    assert words in str(raised.value)


def test_the_gpu_check_runs_on_the_cpu_with_the_tiny_models():
    """`bench --gpu-check`'s code path, on the CPU (CI has no GPU): every model's float16 result
    against float32 within the float16 tolerance, and the UNet steps-per-second comparison."""
    oracle("diffusers")
    result = bench.gpu_check("cpu", repeats=1, small=True)
    names = [name for name, _ in result["rows"]]
    assert len(names) == 10 and "VQ-Diffusion transformer" in names and "LDMBert" in names
    for name, errors in result["rows"]:
        assert set(errors) == {torch.float16, torch.float32}
        assert errors[torch.float32] == 0.0, name  # the CPU against itself: the same kernels
        assert 0 < errors[torch.float16] < bench.gpu_check_tolerance(name, torch.float16), name
    assert result["status"] == 0 and not result["failed"]
    assert result["steps_per_second"]["minildm"] > 0 and result["steps_per_second"]["diffusers"] > 0


def test_the_gpu_check_fails_a_model_beyond_tolerance(monkeypatch):
    models = bench.gpu_check_models(small=True)[:1]
    name, build, call = models[0]

    def off_in_float16(model, device, dtype):  # a device kernel that is wrong in float16
        out = call(model, device, dtype)
        return out + 1e-2 * out.abs().max() if dtype == torch.float16 else out

    monkeypatch.setattr(bench, "gpu_check_models", lambda small: [(name, build, off_in_float16)])
    monkeypatch.setattr(bench, "unet_steps_per_second", lambda device, repeats, small: None)
    result = bench.gpu_check("cpu", repeats=1, small=True)
    assert result["status"] == 1 and result["rows"][0][1][torch.float16] > 5e-3


def test_a_failed_api_path_process_says_why(monkeypatch):
    """The fresh process's error reaches the user, with the way to time without it."""
    import subprocess

    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="Traceback\nMemoryError: out")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError) as raised:
        bench.api_path_timings(dict(part="vae", size=64, dtype="float32", steps=1, repeats=1))
    print(raised.value)
    assert "exited with 1" in str(raised.value) and "MemoryError: out" in str(raised.value)
    assert "--no-api-path" in str(raised.value)
