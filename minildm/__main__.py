"""The command line: `python -m minildm` says what is implemented; `tokenize` shows token ids.

Image generation (`python -m minildm generate ...`) arrives with the pipelines; until then the
command lists the parts that exist and how to check them.
"""

import argparse

from minildm import __version__
from minildm.tokenizer import BertTokenizer, CLIPTokenizer

STATUS = """minildm {version}: latent diffusion from scratch, checked against diffusers and transformers.

implemented and tested:
  tokenizers      CLIPTokenizer (BPE, SD / VQ-Diffusion), BertTokenizer (WordPiece, LDM)
  text encoders   CLIPTextModel (ViT-L/14, ViT-B/32), LDMBert (LDM text-to-image)
  autoencoders    AutoencoderKL (KL-f8: SD, LDM text-to-image), VQModel (VQ-f4 CelebA-HQ, VQ-f8 VQ-Diffusion)
  unet            UNet (SD v1, LDM text-to-image with cross-attention; CelebA-HQ with self-attention)
  weights         safetensors (memory-mapped), sharded, .bin/.ckpt read with weights_only=True,
                  diffusers/transformers component folders, the local Hugging Face cache
not yet: schedulers, VQ-Diffusion transformer, pipelines (image generation)

  python -m minildm tokenize "a photograph of an astronaut riding a horse"
  python -m pytest -s tests
"""


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minildm", description="minildm: minimal latent diffusion")
    commands = parser.add_subparsers(dest="command")
    tokenize = commands.add_parser("tokenize", help="print the 77 token ids a text encoder would see")
    tokenize.add_argument("prompt")
    tokenize.add_argument("--bert", action="store_true", help="the LDM BERT WordPiece tokenizer instead of CLIP's")
    args = parser.parse_args(argv)

    if args.command == "tokenize":
        tokenizer = BertTokenizer() if args.bert else CLIPTokenizer()
        ids = tokenizer.encode(args.prompt)
        print(f"{len(ids)} tokens (with start/end): {ids}")
        print("row given to the text encoder:", tokenizer([args.prompt])[0].tolist())
    else:
        print(STATUS.format(version=__version__))


if __name__ == "__main__":
    main()
