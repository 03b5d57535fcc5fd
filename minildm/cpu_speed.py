"""What makes minildm's inference on a CPU faster than the same model in plain PyTorch, all in one
place, so that the model files read as the papers do.

The loaders in checkpoints/ (`load_unet`, `load_autoencoder`, the text encoders', VQ-Diffusion's)
hand every model to `speed_up`, which changes how three kinds of module compute, never what:

- Linear layers run on oneDNN (`torch.ops.mkldnn._linear_pointwise`) instead of the BLAS behind
  `F.linear` (MKL in the CPU wheels). On the 2-core AMD EPYC (AVX-512) host a 4096 x 320 -> 2560
  product ran at 253 GFLOP/s against MKL's 146; the weights are read as they are (no packed copy).
- Convolutions run on oneDNN with channels-last activations (`_convolution_pointwise`): the first
  convolution turns its input channels-last and every later layer keeps that layout, so the
  (B, C, H, W) -> (B, HW, C) rearrangement before attention costs nothing and no convolution
  reorders its activations to and from oneDNN's layout. `F.conv2d` on a channels-last input with a
  plain weight copies the weight to channels-last on every call first; this op reads it directly.
- The transformer's GEGLU (Shazeer 2020) runs as two products whose oneDNN post-ops apply the gelu
  and the multiply while each tile is still in cache, instead of materialising the 2 x 4C
  projection, its gelu and their product as three tensors.

Each applies only where it computes the same thing: on the CPU, in float32 (or bfloat16 where
the CPU has native bf16), and with autograd off (`torch.no_grad()` or `torch.inference_mode()`,
as every pipeline runs); training and every other device take the unchanged PyTorch path. The
results differ from PyTorch's by the rounding of another summation order (about 1e-6 relative
in float32); the parity tests against diffusers run on these models at their usual tolerances.

Outputs of sped-up convolutional models are channels-last tensors: the same values and shape, other
strides (`.contiguous()` gives the usual layout; `.reshape` works either way, `.view` may not).

Also here, not applied by the loaders because it changes the whole process: `retain_freed_memory`;
and the warning before half-precision work on a CPU without native kernels for it
(`warn_if_slow_precision`, called by the command line and the pipelines).
"""

import contextlib
import ctypes
import ctypes.util
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from minildm.unet import GEGLU

_enabled = True


@contextlib.contextmanager
def plain_pytorch():
    """Within it, sped-up models compute as plain PyTorch would: to time what `speed_up` gains,
    and for torch's FlopCounterMode, which counts aten operations and not oneDNN's."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def onednn_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN computes this call: CPU inference in float32, or bfloat16 on a CPU with
    native bf16 (elsewhere oneDNN's bf16 falls back to a slow reference path)."""
    if not _enabled or x.device.type != "cpu" or torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():  # torch.compile chooses its own kernels (and fuses them)
        return False
    if x.dtype != weight.dtype:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if x.dtype == torch.float32:
        return True
    return x.dtype == torch.bfloat16 and native_bf16()


def native_bf16() -> bool:
    """AVX512-BF16 or AMX (`warn_if_slow_precision` warns before bf16 work on a CPU without)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


class OneDNNLinear(nn.Linear):
    """nn.Linear whose CPU inference runs on oneDNN; the same parameters and state dict."""

    def forward(self, x):
        if onednn_runs(x, self.weight):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class OneDNNConv2d(nn.Conv2d):
    """nn.Conv2d whose CPU inference runs on oneDNN with channels-last activations; the same
    parameters and state dict. Only zero padding given as numbers (all of minildm's)."""

    def forward(self, x):
        if x.ndim == 4 and onednn_runs(x, self.weight):
            x = x.contiguous(memory_format=torch.channels_last)  # free after the first layer
            return torch.ops.mkldnn._convolution_pointwise(
                x,
                self.weight,
                self.bias,
                list(self.padding),
                list(self.stride),
                list(self.dilation),
                self.groups,
                "none",
                [],
                "",
            )
        return super().forward(x)


class FusedGEGLU(GEGLU):
    """GEGLU (value * gelu(gate), [value, gate] = x W^T + b, then the output layer) with the gelu
    fused into the gate's product and the multiply into the value's. When `proj` is no longer a
    plain linear layer (a LoRA adapts it: a `minildm.lora.LoRALayer`), the unfused GEGLU runs, so
    that the update is applied."""

    def forward(self, x):
        if not isinstance(self.proj, nn.Linear) or not onednn_runs(x, self.proj.weight):
            return super().forward(x)
        weight, bias = self.proj.weight, self.proj.bias
        half = weight.shape[0] // 2  # rows [0, 4C) give the value, [4C, 8C) the gate: .chunk(2)
        # "none": gelu with erf, F.gelu's default
        gate = torch.ops.mkldnn._linear_pointwise(x, weight[half:], bias[half:], "gelu", [], "none")
        hidden = torch.ops.mkldnn._linear_pointwise.binary(
            x, gate, weight[:half], bias[:half], "mul"
        )  # (x W_value^T + b_value) * gate
        return self.out(hidden)


def speed_up(model: nn.Module) -> nn.Module:
    """Gives every plain nn.Linear and nn.Conv2d of `model` its oneDNN forward, and every GEGLU its
    fused one (by changing the module's class: parameters, buffers and state dict stay as they
    are, and `isinstance(m, nn.Linear)` still holds). Returns the model."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
        elif type(module) is nn.Conv2d and _onednn_can_convolve(module):
            module.__class__ = OneDNNConv2d
        elif type(module) is GEGLU:
            module.__class__ = FusedGEGLU
    return model


def _onednn_can_convolve(conv: nn.Conv2d) -> bool:
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def retain_freed_memory() -> bool:
    """Asks glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    By default every allocation above 128 KiB (rising to 32 MiB as the process frees such blocks)
    is a fresh mmap, and the heap's free top is trimmed: each activation of a UNet step comes from
    pages the kernel must fault in and zero again, about 830,000 page faults (3.3 GB) and 1.5-2 s
    of system time per SD UNet step at 64x64 on the 2-core host, a fifth of the step. With mmap
    off and no trimming, the pages a step freed serve the next. The cost: the process keeps its
    peak working set. Process-wide (every library in the process gains, diffusers too), so
    minildm never calls it on import: the command line, `bench` and the lessons do, and a script
    that wants their speed calls it first (docs/speed.md: without it the SD UNet step took 1.08x
    as long in fp32, the 512x512 decode 1.35x). Returns whether it applied (glibc on Linux
    only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# --- slow precisions: warned about before any work ------------------------------------------
# Half precision on a CPU runs at full speed only where oneDNN has native kernels for it; elsewhere a
# convolution falls back to a reference path two orders of magnitude slower than float32, so that a
# run of minutes takes hours. Measured on this project's 2-core hosts, torch 2.13 (CPU build):
SLOW_CPU_PRECISION = {
    torch.bfloat16: (
        torch.ops.mkldnn._is_mkldnn_bf16_supported,
        "AVX512-BF16 or AMX",
        "one 320-channel 3x3 convolution at 64x64 took 64 s against 0.33 s in float32 on an AVX2 "
        "host, about 200x",
    ),
    torch.float16: (
        torch.ops.mkldnn._is_mkldnn_fp16_supported,
        "AVX512-FP16 or AMX-FP16",
        "a 128-channel 3x3 convolution at 32x32 took 0.28 s against 0.0021 s in float32 on an "
        "AVX-512 host without FP16, about 135x",
    ),
}
_warned_precisions = set()  # each slow dtype is warned about once per process


def slow_precision_message(dtype: torch.dtype, device) -> str | None:
    """Why `dtype` on `device` will be far slower than float32, or None when it will not."""
    if torch.device(device).type != "cpu" or dtype not in SLOW_CPU_PRECISION:
        return None
    is_native, instructions, measured = SLOW_CPU_PRECISION[dtype]
    if is_native():
        return None
    name = str(dtype).removeprefix("torch.")
    return (
        f"{name} on this CPU has no native support (oneDNN needs {instructions}): its "
        f"convolutions take a fallback path far slower than float32 ({measured}). Use float32 "
        "on this machine (dtype=torch.float32, --dtype float32), or a GPU for half precision."
    )


def warn_if_slow_precision(dtype: torch.dtype, device):
    """Warns, once per dtype and process, when this CPU runs `dtype` only on the slow path. Called
    before any work: by the command line before it loads, by every pipeline call before it runs."""
    if dtype in _warned_precisions:
        return
    message = slow_precision_message(dtype, device)
    if message:
        _warned_precisions.add(dtype)
        warnings.warn(message, stacklevel=3)


def warn_if_models_slow(*models: torch.nn.Module):
    for model in models:
        parameter = next(model.parameters(), None)
        if parameter is not None:
            warn_if_slow_precision(parameter.dtype, parameter.device)
