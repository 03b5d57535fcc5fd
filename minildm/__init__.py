"""minildm: a minimal, readable PyTorch reference implementation of latent diffusion.

Stable Diffusion v1.x, the CompVis LDM text-to-image and unconditional models, and VQ-Diffusion,
written from scratch, loading the official weights and checked numerically against diffusers and
transformers.
"""

import importlib

from minildm.tokenizer import ASSETS, BertTokenizer, CLIPTokenizer

__version__ = "0.1.0"

# The embedded teaching model: a tiny Stable Diffusion trained by minildm/train.py on the shapes
# world (minildm/shapes.py), a diffusers-layout folder that StableDiffusionPipeline.from_pretrained
# reads as it reads the official weights.
TINY_SD = ASSETS / "tiny-sd"
# ... and one for each of the other three systems, trained on the same world
TINY_LDM = ASSETS / "tiny-ldm"
TINY_LDM_UNCOND = ASSETS / "tiny-ldm-uncond"
TINY_VQ_DIFFUSION = ASSETS / "tiny-vq-diffusion"
TINY_MODELS = {
    "sd": TINY_SD,
    "ldm": TINY_LDM,
    "ldm-uncond": TINY_LDM_UNCOND,
    "vq-diffusion": TINY_VQ_DIFFUSION,
}

# Every other public name is imported on first use (PEP 562 module __getattr__): `import
# minildm.clip` loads CLIP alone, not the UNet, the pipelines and the checkpoint loaders, while
# `minildm.UNet` and `from minildm import UNet` work as always. Public name -> its module:
_SOURCES = {
    "KL_F8": "minildm.autoencoder",
    "VQ_F4_CELEBAHQ": "minildm.autoencoder",
    "VQ_F8_ITHQ": "minildm.autoencoder",
    "AutoencoderConfig": "minildm.autoencoder",
    "AutoencoderKL": "minildm.autoencoder",
    "VQModel": "minildm.autoencoder",
    "load_component": "minildm.checkpoints.load",
    "CheckpointError": "minildm.checkpoints.weights",
    "read_state_dict": "minildm.checkpoints.weights",
    "CLIP_VIT_B_32": "minildm.clip",
    "CLIP_VIT_L_14": "minildm.clip",
    "CLIPTextConfig": "minildm.clip",
    "CLIPTextModel": "minildm.clip",
    "LDMBert": "minildm.ldm_bert",
    "LDMBertConfig": "minildm.ldm_bert",
    "LDMPipeline": "minildm.pipelines",
    "LDMTextToImagePipeline": "minildm.pipelines",
    "StableDiffusionImg2ImgPipeline": "minildm.pipelines",
    "StableDiffusionInpaintPipeline": "minildm.pipelines",
    "StableDiffusionPipeline": "minildm.pipelines",
    "VQDiffusionPipeline": "minildm.pipelines",
    "CELEBAHQ": "minildm.unet",
    "LDM_TEXT2IM": "minildm.unet",
    "SD_V1": "minildm.unet",
    "UNet": "minildm.unet",
    "UNetConfig": "minildm.unet",
    "ITHQ": "minildm.vq_transformer",
    "VQTransformer": "minildm.vq_transformer",
    "VQTransformerConfig": "minildm.vq_transformer",
}


def __getattr__(name: str):
    if name in _SOURCES:
        value = getattr(importlib.import_module(_SOURCES[name]), name)
    else:  # a submodule not imported yet: `import minildm` then `minildm.shapes.caption(...)`
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = [
    # pipelines
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "LDMTextToImagePipeline",
    "LDMPipeline",
    "VQDiffusionPipeline",
    "schedulers",
    # models and their configs
    "CLIPTextModel",
    "CLIPTextConfig",
    "CLIP_VIT_L_14",
    "CLIP_VIT_B_32",
    "LDMBert",
    "LDMBertConfig",
    "AutoencoderKL",
    "VQModel",
    "AutoencoderConfig",
    "KL_F8",
    "VQ_F4_CELEBAHQ",
    "VQ_F8_ITHQ",
    "UNet",
    "UNetConfig",
    "SD_V1",
    "LDM_TEXT2IM",
    "CELEBAHQ",
    "VQTransformer",
    "VQTransformerConfig",
    "ITHQ",
    # tokenizers and loading
    "CLIPTokenizer",
    "BertTokenizer",
    "load_component",
    "read_state_dict",
    "CheckpointError",
    "TINY_SD",
    "TINY_LDM",
    "TINY_LDM_UNCOND",
    "TINY_VQ_DIFFUSION",
    "TINY_MODELS",
]
