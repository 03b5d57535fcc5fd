"""Exact attention on the CPU, path by path: is there one faster than the kernel the models call?

Not a test: `python tests/benchmark_attention.py [--repeats N]`. Times each way of computing
softmax(q k^T / sqrt(d)) v at SD v1's attention shapes against F.scaled_dot_product_attention
(PyTorch's flash kernel on the CPU), interleaved round by round in one process, and checks each
against a float64 reference. Prints the median time, its ratio to the kernel's, GFLOP/s (the two
products: 4 B H N M d operations) and the error relative to the output's largest value. What it
found is in docs/speed.md ("The attention kernel").

The paths, each exact up to rounding:

- the kernel in bfloat16 (where the CPU has native bf16);
- the kernel with the head width padded with zeros to a multiple of 16 channels (the floats of
  an AVX-512 register: 40 -> 48) or of 64 (40 -> 64, 80 -> 128); zero columns add nothing to
  q k^T, and the padded output columns are cut off;
- torch.compile of the kernel call, and of `flex_attention` (inductor writes its own C++ loop);
- the products written out a block of queries at a time (`blocked`): the scores of 256 or 1,024
  queries against every key, the softmax computed in place (subtract the row maximum, exp, and
  divide the small output by the row sums instead of the large score block), in float32, or with
  the products in bfloat16 and the softmax's statistics in float32; also through torch.compile.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent.parent))

from minildm import cpu_speed  # noqa: E402
from minildm.tools.bench import cpu_model  # noqa: E402
from minildm.unet import MultiHeadAttention  # noqa: E402

# (what, B, heads, queries N, keys M, head width d): SD v1 at 512x512, batch 2 (guidance)
SHAPES = [
    ("64x64 self-attention", 2, 8, 4096, 4096, 40),
    ("32x32 self-attention", 2, 8, 1024, 1024, 80),
    ("64x64 cross-attention, 77 tokens", 2, 8, 4096, 77, 40),
]


def kernel(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def padded(multiple):
    """The kernel on q, k, v padded with zero channels to a multiple of `multiple`."""

    def attention(q, k, v):
        d = q.shape[-1]
        q, k, v = (F.pad(x, (0, -d % multiple)) for x in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, scale=d**-0.5)[..., :d]

    return attention


def blocked(block, product_dtype=None):
    """Queries `block` at a time; products in `product_dtype` (None: the inputs'), the softmax's
    maximum, exponentials and sums in float32."""

    def attention(q, k, v):
        B, H, N, d = q.shape
        dtype = product_dtype or q.dtype
        q = (q * d**-0.5).reshape(B * H, N, d).to(dtype)  # (BH, N, d)
        keys = k.reshape(B * H, -1, d).transpose(1, 2).to(dtype)  # (BH, d, M)
        values = v.reshape(B * H, -1, d).to(dtype)  # (BH, M, d)
        out = torch.empty(B * H, N, d, dtype=torch.float32)
        for start in range(0, N, block):
            scores = torch.bmm(q[:, start : start + block], keys).float()  # (BH, block, M)
            scores.sub_(scores.amax(-1, keepdim=True)).exp_()  # in place: no second block
            sums = scores.sum(-1, keepdim=True)  # (BH, block, 1)
            products = torch.bmm(scores.to(dtype), values).float()  # (BH, block, d)
            out[:, start : start + block] = products / sums
        return out.reshape(B, H, N, d).to(v.dtype)

    return attention


def flex(q, k, v):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v)


def paths(bf16: bool) -> dict:
    """{name: (function, input dtype)}; bfloat16 entries only on a CPU with native bf16."""
    found = {
        "scaled_dot_product_attention (today)": (kernel, torch.float32),
        "  head width padded to a multiple of 16": (padded(16), torch.float32),
        "  head width padded to a multiple of 64": (padded(64), torch.float32),
        "  torch.compile": (torch.compile(kernel), torch.float32),
        "flex_attention, torch.compile": (torch.compile(flex), torch.float32),
        "blocked 256 queries, softmax in place": (blocked(256), torch.float32),
        "blocked 1,024 queries, softmax in place": (blocked(1024), torch.float32),
        "  the same through torch.compile": (torch.compile(blocked(1024)), torch.float32),
    }
    if bf16:
        found |= {
            "scaled_dot_product_attention, bf16": (kernel, torch.bfloat16),
            "  head width padded to a multiple of 16, bf16": (padded(16), torch.bfloat16),
            "flex_attention, torch.compile, bf16": (torch.compile(flex), torch.bfloat16),
            "blocked 1,024, bf16 products, fp32 softmax": (
                blocked(1024, torch.bfloat16),
                torch.float32,
            ),
        }
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    print(
        f"host: {cpu_model()}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {bf16}, torch {torch.__version__}"
    )
    found = paths(bf16)
    for what, B, H, N, M, d in SHAPES:
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, N, d, generator=generator)
        k, v = (torch.randn(B, H, M, d, generator=generator) for _ in "kv")
        reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        largest = reference.abs().max().item()
        flop = 4 * B * H * N * M * d
        inputs = {dtype: tuple(x.to(dtype) for x in (q, k, v)) for _, dtype in found.values()}
        times = {name: [] for name in found}
        errors = {}
        with torch.inference_mode():
            for name, (attention, dtype) in found.items():  # warm-up (and compilation)
                out = attention(*inputs[dtype])
                errors[name] = (out.double() - reference).abs().max().item() / largest
            for _ in range(args.repeats):  # interleaved: a slow stretch hits every path
                for name, (attention, dtype) in found.items():
                    start = time.perf_counter()
                    attention(*inputs[dtype])
                    times[name].append(time.perf_counter() - start)
        print(f"\n{what}: q ({B}, {H}, {N}, {d}), keys {M}, {flop / 1e9:.1f} GFLOP")
        print("| path | ms | speed-up | GFLOP/s | error |\n|---|---|---|---|---|")
        today = statistics.median(times["scaled_dot_product_attention (today)"])
        for name, seconds in times.items():
            median = statistics.median(seconds)
            print(
                f"| {name.strip()} | {1e3 * median:.1f} | {today / median:.2f}x | "
                f"{flop / median / 1e9:.0f} | {errors[name]:.1e} |"
            )


def block_paths(repeats: int):
    """The 64x64 level's self-attention block, eager with cpu_speed's levers and compiled."""
    import torch._inductor.config as inductor

    torch.manual_seed(0)
    block = MultiHeadAttention(320, 8).eval()  # plain PyTorch modules
    sped_up = cpu_speed.speed_up(MultiHeadAttention(320, 8).eval())
    sped_up.load_state_dict(block.state_dict())
    x = torch.randn(2, 4096, 320, generator=torch.Generator().manual_seed(0))
    found = {"eager, cpu_speed's oneDNN projections (today)": sped_up, "eager, plain": block}
    found["torch.compile of the plain block"] = torch.compile(block)
    times = {name: [] for name in found}
    errors = {}
    with torch.inference_mode():
        reference = block.double()(x.double())
        block.float()
        for name, run in found.items():
            errors[name] = (run(x).double() - reference).abs().max().item()
        inductor.freezing = True  # constant weights, prepacked at compile time
        frozen = MultiHeadAttention(320, 8).eval()
        frozen.load_state_dict(block.state_dict())
        found["torch.compile, freezing"] = torch.compile(frozen)
        times["torch.compile, freezing"] = []
        errors["torch.compile, freezing"] = (
            (found["torch.compile, freezing"](x).double() - reference).abs().max().item()
        )
        for _ in range(repeats):
            for name, run in found.items():
                start = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - start)
    largest = reference.abs().max().item()
    print("\nthe 64x64 level's attention block, projections included: x (2, 4096, 320)")
    print("| path | ms | speed-up | error |\n|---|---|---|---|")
    today = statistics.median(next(iter(times.values())))
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(
            f"| {name} | {1e3 * median:.1f} | {today / median:.2f}x | "
            f"{errors[name] / largest:.1e} |"
        )


if __name__ == "__main__":
    main()
    block_paths(repeats=3)
