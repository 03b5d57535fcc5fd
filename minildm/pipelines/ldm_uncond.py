"""The unconditional CompVis LDM (ldm-celebahq-256): faces from noise, in a VQ-f4 latent space.

Rombach et al. 2022 (arXiv:2112.10752), section 4.1. The UNet denoises continuous 3x64x64 latents
(self-attention only, no text); at the end the latents are snapped to the VQ codebook and decoded,
as the original's `decode_first_stage` does. Keeps diffusers' LDMPipeline call.

Latent scale: the original trains on unscaled VQ latents (scale_factor 1.0); the hub's vqvae config
names no scaling_factor, so minildm's VQModel takes 1.0 where diffusers' takes its default 0.18215
and, since 2023, multiplies the final latents by 1/0.18215 before decoding
(docs/parity/pipelines.md, "LDM CelebA-HQ: the latent scale is 1, not 0.18215").
"""

from pathlib import Path

import torch

from minildm.checkpoints.load import load_component, load_scheduler, read_model_index
from minildm.checkpoints.weights import resolve_folder
from minildm.cpu_speed import warn_if_models_slow
from minildm.pipelines.common import (
    PipelineOutput,
    check_count,
    check_eta,
    check_finite_step,
    check_generator,
    check_output_type,
    check_sampler,
    images_out,
    initial_noise,
    move_models,
    step_options,
)


class LDMPipeline:
    def __init__(self, vqvae, unet, scheduler):
        self.vqvae = vqvae
        self.unet = unet
        self.scheduler = scheduler

    @classmethod
    def from_pretrained(
        cls, name_or_path, device=None, dtype=None, variant: str | None = None
    ) -> "LDMPipeline":
        """From a hub-layout folder or `CompVis/ldm-celebahq-256` in the Hugging Face cache."""
        folder = Path(resolve_folder(name_or_path))
        read_model_index(folder, "LDMPipeline")
        parts = {
            name: load_component(folder / name, device=device, dtype=dtype, variant=variant)
            for name in ("vqvae", "unet")
        }
        return cls(scheduler=load_scheduler(folder / "scheduler"), **parts)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device=None, dtype=None):
        """Every model to `device` and/or `dtype`, as diffusers' pipe.to("cuda"),
        pipe.to(torch.float16) or pipe.to("cuda", torch.float16). -> the pipeline."""
        move_models([self.vqvae, self.unet], device, dtype)
        return self

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
    ):
        """callback(i, t, latents) after every step (minildm's addition, for progress reports)."""
        self.check_inputs(batch_size, eta, generator, output_type)
        dtype = next(self.unet.parameters()).dtype
        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, size, size)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = initial_noise(shape, generator, self.device, dtype)
        latents = latents * self.scheduler.init_noise_sigma
        options = step_options(self.scheduler, eta, generator)
        for i, t in enumerate(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            noise_prediction = self.unet(model_input, t)  # no text: self-attention only
            latents = self.scheduler.step(noise_prediction, t, latents, **options)
            check_finite_step(
                latents, model_input, noise_prediction, noise_prediction, None, i, t, self.scheduler
            )
            if callback is not None:
                callback(i, t, latents)

        vae_dtype = next(self.vqvae.parameters()).dtype
        latents = latents.to(vae_dtype) / self.vqvae.config.scaling_factor
        images = self.vqvae.decode(latents, quantize=True)  # snap to the codebook, then decode
        images = images_out((images.float() / 2 + 0.5).clamp(0, 1), output_type)
        return PipelineOutput(images) if return_dict else (images,)

    def check_inputs(self, batch_size, eta, generator, output_type):
        """What __call__ refuses before any work (and a warning for a precision that would run
        slowly here)."""
        warn_if_models_slow(self.unet, self.vqvae)
        check_count("batch_size", batch_size)
        check_output_type(output_type)
        check_eta(eta)
        check_generator(generator)
        check_sampler(self.scheduler)
