"""A 20-step 512x512 Stable Diffusion generation at the official component sizes (random weights),
minildm and diffusers on the same folder in one run, fp32 and bf16 on the CPU, and the peak memory
of loading minildm's pipeline.

Not a test: `python tests/benchmark_pipeline.py [--steps 20] [--size 512]`. It writes a
random-weight SD v1 folder to a temporary directory, then for each dtype times minildm's and
diffusers' pipelines (same prompt, seed, PNDM scheduler) and prints seconds and the images' max abs
difference. Loading memory is measured in a fresh process (VmHWM growth over the post-import size,
divided by the weights' bytes).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def write_folder(folder: Path):
    import diffusers
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import SCHEDULER_CONFIGS, write_clip_hub_folder
    from test_autoencoder import HUB_CONFIGS as VAE_CONFIGS
    from test_unet import SD_CONFIG

    torch.manual_seed(0)
    parts = dict(
        unet=diffusers.UNet2DConditionModel(
            **{k: v for k, v in SD_CONFIG.items() if not k.startswith("_")}
        ),
        vae=diffusers.AutoencoderKL(
            **{
                k: v
                for k, v in VAE_CONFIGS["KL-f8 (SD v1, LDM text2im)"].items()
                if not k.startswith("_")
            }
        ),
        text_encoder=transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                hidden_act="quick_gelu",
            )
        ),
        scheduler=diffusers.PNDMScheduler.from_config(
            {k: v for k, v in SCHEDULER_CONFIGS["SD v1-4 (PNDM)"].items() if not k.startswith("_")}
        ),
    )
    for name, part in parts.items():
        part.save_pretrained(folder / name)
    write_clip_hub_folder(folder / "tokenizer")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77})
    )  # as the hub's
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "safety_checker": [None, None],
                **{
                    name: [type(part).__module__.split(".")[0], type(part).__name__]
                    for name, part in parts.items()
                },
                "tokenizer": ["transformers", "CLIPTokenizer"],
            }
        )
    )


def peak_kb() -> int:
    return next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )


def measure_loading(folder: Path):
    from minildm.pipelines import StableDiffusionPipeline

    before = peak_kb()
    start = time.perf_counter()
    StableDiffusionPipeline.from_pretrained(folder)
    seconds = time.perf_counter() - start
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    growth_kb = peak_kb() - before
    print(
        f"loading minildm's pipeline: {seconds:.1f} s, peak memory growth {growth_kb / 1e6:.2f} GB "
        f"for {weights / 1e9:.2f} GB of weights ({growth_kb * 1e3 / weights:.2f}x)"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--measure-loading", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.measure_loading:
        return measure_loading(Path(args.measure_loading))

    import diffusers

    from minildm.pipelines import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd"
        write_folder(folder)
        subprocess.run([sys.executable, __file__, "--measure-loading", str(folder)], check=True)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"{args.steps} PNDM steps at {args.size}x{args.size}, guidance 7.5"
        )
        call = dict(
            prompt="a photograph of an astronaut riding a horse",
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            output_type="np",
        )
        for dtype in (torch.float32, torch.bfloat16):
            ours = StableDiffusionPipeline.from_pretrained(
                folder, dtype=dtype, safety_checker=False
            )
            theirs = diffusers.StableDiffusionPipeline.from_pretrained(
                folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
            )
            theirs.set_progress_bar_config(disable=True)
            start = time.perf_counter()
            ours_image = ours(generator=torch.Generator().manual_seed(0), **call).images
            ours_seconds = time.perf_counter() - start
            start = time.perf_counter()
            theirs_image = theirs(generator=torch.Generator().manual_seed(0), **call).images
            theirs_seconds = time.perf_counter() - start
            difference = float(abs(ours_image.astype("float64") - theirs_image).max())
            print(
                f"{str(dtype).removeprefix('torch.')}: minildm {ours_seconds:.1f} s, "
                f"diffusers {theirs_seconds:.1f} s, images max abs difference {difference:.1e}"
            )
            del ours, theirs


if __name__ == "__main__":
    main()
