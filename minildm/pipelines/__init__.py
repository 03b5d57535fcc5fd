"""One pipeline per system, each reading like the Stable Diffusion blog post's denoising loop."""

from minildm.pipelines.common import PipelineOutput
from minildm.pipelines.vq_diffusion import VQDiffusionPipeline

__all__ = ["PipelineOutput", "VQDiffusionPipeline"]
