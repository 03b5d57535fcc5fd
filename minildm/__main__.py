"""The command line.

    python -m minildm                                  what is implemented
    python -m minildm vq-diffusion "a teddy bear playing in the pool" --weights microsoft/vq-diffusion-ithq
    python -m minildm tokenize "a photograph of an astronaut riding a horse"

Weights come from a local folder or a repo already in the Hugging Face cache; minildm never
downloads. The Stable Diffusion and LDM pipelines arrive with their own subcommands.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from minildm import __version__
from minildm.tokenizer import BertTokenizer, CLIPTokenizer

STATUS = """minildm {version}: latent diffusion from scratch, checked against diffusers and transformers.

implemented and tested:
  pipelines       VQDiffusionPipeline (microsoft/vq-diffusion-ithq)
  tokenizers      CLIPTokenizer (BPE, SD / VQ-Diffusion), BertTokenizer (WordPiece, LDM)
  text encoders   CLIPTextModel (ViT-L/14, ViT-B/32), LDMBert (LDM text-to-image)
  autoencoders    AutoencoderKL (KL-f8: SD, LDM text-to-image), VQModel (VQ-f4 CelebA-HQ, VQ-f8 VQ-Diffusion)
  unet            UNet (SD v1, LDM text-to-image with cross-attention; CelebA-HQ with self-attention)
  transformer     VQTransformer (VQ-Diffusion), learned classifier-free embeddings
  schedulers      {schedulers}
  weights         safetensors (memory-mapped), sharded, .bin/.ckpt read with weights_only=True,
                  diffusers/transformers component folders, the local Hugging Face cache
not yet: the Stable Diffusion and LDM pipelines

  python -m minildm vq-diffusion "a teddy bear playing in the pool" --weights microsoft/vq-diffusion-ithq
  python -m minildm tokenize "a photograph of an astronaut riding a horse"
  python -m pytest -s tests
"""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def vq_diffusion(args):
    from minildm.pipelines import VQDiffusionPipeline

    print(f"loading {args.weights} ({args.dtype} on {args.device})")
    pipe = VQDiffusionPipeline.from_pretrained(args.weights, device=args.device, dtype=DTYPES[args.dtype])
    start = time.perf_counter()

    def progress(i, t, sample):
        done = i + 1
        rate = done / (time.perf_counter() - start)
        print(f"\rstep {done}/{args.steps}  {rate:.2f} steps/s  {(args.steps - done) / rate:.0f} s left", end="", flush=True)

    images = pipe([args.prompt] * args.n, num_inference_steps=args.steps, guidance_scale=args.guidance, truncation_rate=args.truncation,
                  generator=torch.Generator().manual_seed(args.seed), callback=progress).images
    print()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out / f"vq_diffusion_seed{args.seed}_{i}.png"
        image.save(path)
        print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minildm", description="minildm: minimal latent diffusion")
    commands = parser.add_subparsers(dest="command")

    vq = commands.add_parser("vq-diffusion", help="text to image with VQ-Diffusion", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    vq.add_argument("prompt", help="what the image should show")
    vq.add_argument("--weights", default="microsoft/vq-diffusion-ithq", help="pipeline folder, or repo id in the Hugging Face cache")
    vq.add_argument("--steps", type=int, default=100, help="denoising steps (VQ-Diffusion was trained with 100 and does not subsample)")
    vq.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale; 1 turns it off")
    vq.add_argument("--truncation", type=float, default=1.0, help="keep the most likely codes up to this cumulative probability")
    vq.add_argument("--seed", type=int, default=0, help="seed of the CPU generator for the sampling noise")
    vq.add_argument("-n", type=int, default=1, help="number of images")
    vq.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    vq.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and activations; log-space math stays float32")
    vq.add_argument("--out", default="outputs", help="folder for the PNG files")

    tokenize = commands.add_parser("tokenize", help="print the 77 token ids a text encoder would see")
    tokenize.add_argument("prompt")
    tokenize.add_argument("--bert", action="store_true", help="the LDM BERT WordPiece tokenizer instead of CLIP's")
    args = parser.parse_args(argv)

    if args.command == "vq-diffusion":
        try:
            vq_diffusion(args)
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
    elif args.command == "tokenize":
        tokenizer = BertTokenizer() if args.bert else CLIPTokenizer()
        ids = tokenizer.encode(args.prompt)
        print(f"{len(ids)} tokens (with start/end): {ids}")
        print("row given to the text encoder:", tokenizer([args.prompt])[0].tolist())
    else:
        from minildm import schedulers

        print(STATUS.format(version=__version__, schedulers=", ".join(schedulers.__all__)))


if __name__ == "__main__":
    main()
