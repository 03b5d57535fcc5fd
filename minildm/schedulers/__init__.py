"""Samplers: the update rules that walk a model's noise predictions back from noise to an image.

One file per algorithm; class names, constructor keywords and methods follow diffusers so a
`scheduler_config.json` loads with `from_config` and the blog post's loop reads the same.
"""

from minildm.schedulers.ddim import DDIMScheduler
from minildm.schedulers.ddpm import DDPMScheduler
from minildm.schedulers.vq_diffusion import VQDiffusionScheduler

__all__ = ["DDIMScheduler", "DDPMScheduler", "VQDiffusionScheduler"]
