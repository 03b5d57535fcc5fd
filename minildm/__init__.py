"""minildm: a minimal, readable PyTorch reference implementation of latent diffusion.

Stable Diffusion v1.x, the CompVis LDM text-to-image and unconditional models, and VQ-Diffusion,
written from scratch, loading the official weights and checked numerically against diffusers and
transformers.
"""

from minildm import schedulers
from minildm.autoencoder import (
    KL_F8,
    VQ_F4_CELEBAHQ,
    VQ_F8_ITHQ,
    AutoencoderConfig,
    AutoencoderKL,
    VQModel,
)
from minildm.checkpoints.embeddings import read_embedding, write_embedding
from minildm.checkpoints.load import load_component
from minildm.checkpoints.lora import apply_lora, read_lora, write_lora
from minildm.checkpoints.weights import (
    CheckpointError,
    read_state_dict,
)
from minildm.clip import (
    CLIP_VIT_B_32,
    CLIP_VIT_L_14,
    CLIPTextConfig,
    CLIPTextModel,
)
from minildm.ldm_bert import (
    LDMBert,
    LDMBertConfig,
)
from minildm.pipelines import (
    AttentionMaps,
    LDMPipeline,
    LDMTextToImagePipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    VQDiffusionPipeline,
    attention_maps,
)
from minildm.tokenizer import (
    ASSETS,
    BertTokenizer,
    CLIPTokenizer,
)
from minildm.unet import (
    CELEBAHQ,
    LDM_TEXT2IM,
    SD_V1,
    UNet,
    UNetConfig,
)
from minildm.vq_transformer import (
    ITHQ,
    VQTransformer,
    VQTransformerConfig,
)

__version__ = "0.1.0"

# The embedded teaching model: a tiny Stable Diffusion trained by minildm/train/ on the shapes
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

__all__ = [
    # pipelines
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "LDMTextToImagePipeline",
    "LDMPipeline",
    "VQDiffusionPipeline",
    "attention_maps",
    "AttentionMaps",
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
    # LoRA and textual-inversion files (the pipelines' load_lora and load_embedding read them)
    "read_lora",
    "apply_lora",
    "write_lora",
    "read_embedding",
    "write_embedding",
    "TINY_SD",
    "TINY_LDM",
    "TINY_LDM_UNCOND",
    "TINY_VQ_DIFFUSION",
    "TINY_MODELS",
]
