"""minildm/cpu_speed.py: the oneDNN forwards compute what the plain PyTorch modules compute, only
where they should (CPU inference), keep every parameter as it was, and the allocator setting does
what it claims. Their speed is measured by `python -m minildm bench` (docs/speed.md)."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from minildm import cpu_speed
from minildm.checkpoints.unet import load_unet
from minildm.cpu_speed import FusedGEGLU, OneDNNConv2d, OneDNNLinear, plain_pytorch, speed_up
from minildm.train.recipes import UNET
from minildm.unet import GEGLU, UNet

NATIVE_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def relative_error(got, expected):
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def sped_up_copy(module):
    """A sped-up copy with the same parameter values; `module` itself stays plain PyTorch."""
    return speed_up(copy.deepcopy(module))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_equals_f_linear(dtype):
    if dtype == torch.bfloat16 and not NATIVE_BF16:
        pytest.skip("bf16 runs on oneDNN only where the CPU has it natively")
    torch.manual_seed(0)
    plain = nn.Linear(320, 1280).to(dtype)
    fast = sped_up_copy(plain)
    x = torch.randn(2, 100, 320).to(dtype)
    with torch.inference_mode():
        expected, got = plain(x), fast(x)
    error = relative_error(got, expected)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    print(f"OneDNNLinear {dtype}: max relative error {error:.1e} (tolerance {tolerance:.0e})")
    assert isinstance(fast, OneDNNLinear) and got.shape == expected.shape and error < tolerance


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(64, 96, 3, padding=1),
        nn.Conv2d(64, 64, 3, stride=2),  # the autoencoder's downsampler, padded by hand before
        nn.Conv2d(64, 32, 1),
        nn.Conv2d(4, 64, 3, padding=1, bias=False),
    ],
    ids=["3x3", "stride 2", "1x1", "no bias"],
)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_convolution_equals_f_conv2d_and_returns_channels_last(conv, layout):
    torch.manual_seed(0)
    fast = sped_up_copy(conv)
    x = torch.randn(2, conv.in_channels, 17, 16).contiguous(memory_format=layout)
    with torch.inference_mode():
        expected, got = conv(x), fast(x)
    error = relative_error(got, expected)
    print(f"OneDNNConv2d {conv}: max relative error {error:.1e} (tolerance 1e-5)")
    assert isinstance(fast, OneDNNConv2d) and got.shape == expected.shape and error < 1e-5
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_fused_geglu_equals_geglu():
    torch.manual_seed(0)
    plain = GEGLU(64)
    fast = sped_up_copy(plain)
    x = torch.randn(2, 50, 64)
    with torch.inference_mode():
        expected, got = plain(x), fast(x)
    error = relative_error(got, expected)
    print(f"FusedGEGLU: max relative error {error:.1e} (tolerance 1e-5)")
    assert isinstance(fast, FusedGEGLU) and error < 1e-5


def test_fused_geglu_applies_a_lora_on_its_projection():
    """A LoRA on ff.proj (kohya files adapt ff.net.0.proj) wraps the layer: the fused path, which
    reads proj.weight directly, must step aside and let the update act."""
    from minildm.lora import add_lora

    torch.manual_seed(0)
    plain = GEGLU(64)
    fast = sped_up_copy(plain)
    x = torch.randn(2, 50, 64)
    with torch.inference_mode():
        before = fast(x)
    for model in (plain, fast):
        torch.manual_seed(1)  # the same random A and B in both
        nn.init.normal_(add_lora(model, ["proj"], rank=4)["proj"].up.weight)
    with torch.inference_mode():
        expected, got = plain(x), fast(x)
    error = relative_error(got, expected)
    print(f"FusedGEGLU with a LoRA on proj: max relative error {error:.1e} (tolerance 1e-5)")
    assert isinstance(fast, FusedGEGLU) and error < 1e-5
    assert relative_error(before, expected) > 1e-2  # the update does change the output


def test_training_takes_the_plain_path_with_the_same_gradients():
    """With autograd on, the sped-up modules run PyTorch's own ops: bit-equal outputs and
    gradients (oneDNN's pointwise ops have no backward)."""
    torch.manual_seed(0)
    plain = UNet(UNET)
    fast = speed_up(UNet(UNET))
    fast.load_state_dict(plain.state_dict())
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 16, UNET.context_dim)
    t = torch.tensor([10, 900])
    plain(x, t, context).square().mean().backward()
    fast(x, t, context).square().mean().backward()
    pairs = list(zip(plain.named_parameters(), fast.parameters()))
    largest = max((p.grad - q.grad).abs().max().item() for (_, p), q in pairs)
    print(
        f"training through a sped-up tiny UNet: {len(pairs)} gradients, largest difference {largest}"
    )
    for (name, p), q in pairs:
        assert torch.equal(p.grad, q.grad), name


def test_a_sped_up_unet_equals_the_plain_one_and_keeps_its_parameters():
    torch.manual_seed(0)
    plain = UNet(UNET).eval()
    parameters = {name: p.data_ptr() for name, p in plain.named_parameters()}
    keys = list(plain.state_dict())
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 16, UNET.context_dim)
    t = torch.tensor([10, 900])
    with torch.inference_mode():
        expected = plain(x, t, context)
        fast = speed_up(plain)
        got = fast(x, t, context)
        with plain_pytorch():
            again = fast(x, t, context)
    error = relative_error(got, expected)
    print(f"tiny SD UNet sped up: max relative error {error:.1e} (tolerance 1e-5)")
    assert fast is plain and error < 1e-5 and torch.equal(again, expected)
    assert list(fast.state_dict()) == keys
    assert {name: p.data_ptr() for name, p in fast.named_parameters()} == parameters
    kinds = {type(m) for m in fast.modules()}
    assert {OneDNNLinear, OneDNNConv2d, FusedGEGLU} <= kinds
    assert nn.Linear not in kinds and nn.Conv2d not in kinds and GEGLU not in kinds
    assert speed_up(fast) is fast and {type(m) for m in fast.modules()} == kinds  # idempotent


def test_the_loaders_hand_out_sped_up_models():
    torch.manual_seed(0)
    model = load_unet(UNET, UNet(UNET).state_dict())
    assert any(isinstance(m, OneDNNConv2d) for m in model.modules())


def test_bf16_without_native_support_takes_the_plain_path(monkeypatch):
    """oneDNN's bf16 on such a CPU falls back to a reference path; F.linear is no worse there."""
    monkeypatch.setattr(cpu_speed, "native_bf16", lambda: False)
    x, w = torch.randn(2, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    with torch.inference_mode():
        assert not cpu_speed.onednn_runs(x, w)
        assert cpu_speed.onednn_runs(x.float(), w.float())
    assert not cpu_speed.onednn_runs(x.float(), w.float())  # autograd on


def test_another_dtype_or_a_mismatch_takes_the_plain_path():
    with torch.inference_mode():
        assert not cpu_speed.onednn_runs(torch.randn(2).half(), torch.randn(2).half())
        assert not cpu_speed.onednn_runs(torch.randn(2), torch.randn(2).double())


FAULTS = """
import resource, sys, torch
from minildm.cpu_speed import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def step():
    for _ in range(10):
        torch.ones(64 * 2**20 // 4)  # 64 MiB, freed at once
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retaining_freed_memory_stops_the_page_faults():
    """Ten 64 MiB tensors allocated and freed: by default each is a fresh mapping (glibc maps
    blocks over 32 MiB whatever it has learnt) the kernel faults in page by page; with
    retain_freed_memory the second round reuses the first's pages."""
    faults = {}
    for mode in ("default", "retain"):
        command = [sys.executable, "-c", FAULTS, mode]
        faults[mode] = int(subprocess.run(command, check=True, capture_output=True).stdout)
    print(f"minor page faults of ten 64 MiB allocations: {faults}")
    assert faults["default"] > 10 * 16384 * 0.9  # about one per 4 KiB page
    assert faults["retain"] < 100


def test_torch_compile_of_a_sped_up_model_leaves_the_kernels_to_inductor():
    """`bench --compile`: under torch.compile the oneDNN calls step aside (inductor's own mkldnn
    lowering accepts only the weights it packs itself), and the compiled model computes the same."""
    torch.manual_seed(0)
    model = speed_up(
        nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 5))
    )
    x = torch.randn(2, 4, 6, 6)
    with torch.inference_mode():
        expected = model(x)
        got = torch.compile(model)(x)
    error = relative_error(got, expected)
    print(f"torch.compile of a sped-up model: max relative error {error:.1e} (tolerance 1e-5)")
    assert error < 1e-5
