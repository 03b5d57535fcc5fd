"""One pipeline per system, each reading like the Stable Diffusion blog post's denoising loop."""

from minildm.pipelines.attention_maps import AttentionMaps, attention_maps
from minildm.pipelines.common import PipelineOutput
from minildm.pipelines.ldm_text2im import LDMTextToImagePipeline
from minildm.pipelines.ldm_uncond import LDMPipeline
from minildm.pipelines.stable_diffusion import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionOutput,
    StableDiffusionPipeline,
)
from minildm.pipelines.vq_diffusion import VQDiffusionPipeline

__all__ = [
    "AttentionMaps",
    "LDMPipeline",
    "LDMTextToImagePipeline",
    "PipelineOutput",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionOutput",
    "StableDiffusionPipeline",
    "VQDiffusionPipeline",
    "attention_maps",
]
