"""The commands that load no model and only print: `tokenize` (the token ids a text encoder sees)
and, with no command, the overview of what minildm holds (STATUS)."""

import warnings

from minildm.tokenizer import BertTokenizer, CLIPTokenizer


def print_tokens(prompt: str, bert: bool):
    """Print the ids of `prompt` and the fixed-length row the text encoder gets. A long prompt's ids
    are shown up to the row's length, and the rest counted: the encoder never sees them."""
    tokenizer = BertTokenizer() if bert else CLIPTokenizer()
    ids = tokenizer.encode(prompt)
    row = tokenizer.max_length
    more = f" ... and {len(ids) - row} more, dropped" if len(ids) > row else ""
    print(f"{len(ids)} tokens (with start/end): {ids[:row]}{more}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the line above already said what is dropped
        print("row given to the text encoder:", tokenizer([prompt])[0].tolist())


STATUS = """\
minildm {version}: latent diffusion from scratch, checked against diffusers and transformers.

pipelines       StableDiffusionPipeline (+ Img2Img, Inpaint; from_pretrained, from_single_file),
                LDMTextToImagePipeline, LDMPipeline, VQDiffusionPipeline
models          CLIPTextModel, LDMBert, AutoencoderKL, VQModel, UNet, VQTransformer
schedulers      {schedulers}
weights         safetensors (memory-mapped), sharded, .bin/.ckpt read with weights_only=True,
                component and pipeline folders, the local Hugging Face cache, `download` with sha256

  python -m minildm sd "a red circle on a blue background"   (the embedded tiny model, offline)
  python -m minildm sd "a photograph of an astronaut riding a horse" \\
                    --weights CompVis/stable-diffusion-v1-4
  python -m minildm train sd --out runs/tiny-sd               (how the tiny model was made, 84 min)
  python -m minildm download stable-diffusion-v1-4 --dir weights
  python -m minildm sd --help
  python -m pytest -s tests
"""
