"""Half precision on a CPU without native kernels for it: a warning before any work, saying how
much slower it will be and suggesting float32. The host's support is simulated (both ways), so the
test holds on every machine; its real answer is printed."""

import warnings

import pytest
import torch

import minildm
import minildm.__main__ as cli
import minildm.cpu_speed as cpu_speed
from minildm.tools import generate


def simulate_cpu(monkeypatch, native: bool):
    """This host as one with (or without) native bf16 and fp16 kernels; forgets earlier warnings."""
    for dtype, (_, instructions, measured) in cpu_speed.SLOW_CPU_PRECISION.items():
        monkeypatch.setitem(
            cpu_speed.SLOW_CPU_PRECISION, dtype, (lambda: native, instructions, measured)
        )
    monkeypatch.setattr(cpu_speed, "_warned_precisions", set())


def test_this_host():
    for dtype, (is_native, instructions, _) in cpu_speed.SLOW_CPU_PRECISION.items():
        print(f"{dtype}: native on this CPU: {is_native()} ({instructions})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_message_names_the_slowdown_and_float32(dtype, monkeypatch):
    simulate_cpu(monkeypatch, native=False)
    message = cpu_speed.slow_precision_message(dtype, "cpu")
    print(message)
    name = str(dtype).removeprefix("torch.")
    assert message.startswith(f"{name} on this CPU has no native support")
    assert "--dtype float32" in message and "x)" in message
    assert cpu_speed.slow_precision_message(torch.float32, "cpu") is None
    assert cpu_speed.slow_precision_message(dtype, "cuda") is None  # no CPU fallback on a GPU
    simulate_cpu(monkeypatch, native=True)
    assert cpu_speed.slow_precision_message(dtype, "cpu") is None


def test_a_pipeline_warns_once_before_any_work(monkeypatch):
    """Loaded in bf16, called with a bad step count: the warning comes first, the error next, so no
    bf16 work runs (it would take minutes on an AVX2 host)."""
    pipe = minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD, dtype=torch.bfloat16)
    simulate_cpu(monkeypatch, native=False)
    for expect_warning in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ValueError, match="num_inference_steps"):
                pipe("a red circle", num_inference_steps=0)
        slow = [w for w in caught if "no native support" in str(w.message)]
        print(f"call {'1' if expect_warning else '2'}: {[str(w.message)[:60] for w in slow]}")
        assert len(slow) == (1 if expect_warning else 0)
    simulate_cpu(monkeypatch, native=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError):
            pipe("a red circle", num_inference_steps=0)
    assert not [w for w in caught if "no native support" in str(w.message)]


def test_the_command_line_warns_before_loading(monkeypatch, tmp_path):
    simulate_cpu(monkeypatch, native=False)

    def refuse_to_load(args, scheduler):
        raise AssertionError("the weights were loaded before the warning")

    monkeypatch.setattr(generate, "load_pipeline", refuse_to_load)
    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.warns(UserWarning, match="bfloat16 on this CPU has no native support"):
        with pytest.raises(SystemExit, match="is a file"):
            cli.main(["sd", "a cat", "--dtype", "bfloat16", "--out", str(taken)])
