"""Time one Stable Diffusion UNet step: 64x64 latents (512x512 images), batch 2 (classifier-free
guidance), fp32 and bf16, minildm and diffusers on the same weights in one run.

Not a test: `python tests/benchmark_unet.py [--repeats N]`. Prints seconds per step (the median of
N timed calls after one warm-up) and the two outputs' max relative difference.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


def seconds_per_call(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import diffusers

    from minildm.checkpoints.unet import load_unet
    from minildm.unet import SD_V1

    config = dict(
        attention_head_dim=8,
        block_out_channels=[320, 640, 1280, 1280],
        cross_attention_dim=768,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        sample_size=64,
    )
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**config).eval()
    state = reference.state_dict()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 64, 64, generator=generator)
    context = torch.randn(2, 77, 768, generator=generator)
    t = torch.tensor([981, 981])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"diffusers {diffusers.__version__}"
    )
    for dtype in (torch.float32, torch.bfloat16):
        ours = load_unet(SD_V1, state, dtype=dtype)
        compare(ours, reference.to(dtype), sample.to(dtype), t, context.to(dtype), args.repeats)
        del ours


def compare(ours, theirs, x, t, c, repeats: int) -> None:
    """Time one step of each UNet on the same inputs and print how far their outputs differ."""
    with torch.no_grad():
        ours_s = seconds_per_call(lambda: ours(x, t, c), repeats)
        theirs_s = seconds_per_call(lambda: theirs(x, t, encoder_hidden_states=c).sample, repeats)
        expected = theirs(x, t, encoder_hidden_states=c).sample.float()
        difference = ((ours(x, t, c).float() - expected).abs().max() / expected.abs().max()).item()
    print(
        f"SD UNet step, 64x64 latents, batch 2, {str(x.dtype).removeprefix('torch.')}: "
        f"minildm {ours_s:.2f} s, diffusers {theirs_s:.2f} s, "
        f"max relative difference {difference:.1e}"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
