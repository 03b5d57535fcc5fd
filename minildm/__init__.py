"""minildm: a minimal, readable PyTorch reference implementation of latent diffusion.

Stable Diffusion v1.x, the CompVis LDM text-to-image and unconditional models, and VQ-Diffusion,
written from scratch, loading the official weights and checked numerically against diffusers and
transformers.
"""

from minildm.autoencoder import KL_F8, VQ_F4_CELEBAHQ, VQ_F8_ITHQ, AutoencoderConfig, AutoencoderKL, VQModel
from minildm.clip import CLIP_VIT_B_32, CLIP_VIT_L_14, CLIPTextConfig, CLIPTextModel
from minildm.ldm_bert import LDMBert, LDMBertConfig
from minildm.load import load_component
from minildm.unet import CELEBAHQ, LDM_TEXT2IM, SD_V1, UNet, UNetConfig
from minildm.tokenizer import BertTokenizer, CLIPTokenizer
from minildm.weights import CheckpointError, read_state_dict

__version__ = "0.1.0"

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "KL_F8",
    "VQModel",
    "VQ_F4_CELEBAHQ",
    "VQ_F8_ITHQ",
    "BertTokenizer",
    "CLIPTokenizer",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIP_VIT_B_32",
    "CLIP_VIT_L_14",
    "CheckpointError",
    "LDMBert",
    "LDMBertConfig",
    "load_component",
    "UNet",
    "UNetConfig",
    "SD_V1",
    "LDM_TEXT2IM",
    "CELEBAHQ",
    "read_state_dict",
]
