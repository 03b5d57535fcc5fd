"""Samplers: the update rules that walk a model's noise predictions back from noise to an image.

One file per algorithm; class names, constructor keywords and methods follow diffusers so a
`scheduler_config.json` loads with `from_config` and the blog post's loop reads the same. common.py
holds the training noise schedule (betas) and config reading, sigmas.py the noise levels of the
sigma-parameterised samplers.
"""

from minildm.schedulers.ddim import DDIMScheduler
from minildm.schedulers.ddim_inverse import DDIMInverseScheduler
from minildm.schedulers.ddpm import DDPMScheduler
from minildm.schedulers.deis import DEISMultistepScheduler
from minildm.schedulers.dpm_solver import DPMSolverMultistepScheduler
from minildm.schedulers.dpm_solver_singlestep import DPMSolverSinglestepScheduler
from minildm.schedulers.euler import EulerDiscreteScheduler
from minildm.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from minildm.schedulers.heun import HeunDiscreteScheduler
from minildm.schedulers.kdpm2 import KDPM2DiscreteScheduler
from minildm.schedulers.kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from minildm.schedulers.lms import LMSDiscreteScheduler
from minildm.schedulers.pndm import PNDMScheduler
from minildm.schedulers.unipc import UniPCMultistepScheduler
from minildm.schedulers.vq_diffusion import VQDiffusionScheduler

__all__ = [
    "DDIMInverseScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
    "VQDiffusionScheduler",
]
