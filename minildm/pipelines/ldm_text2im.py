"""The CompVis LDM text-to-image model (ldm-text2im-large-256): LDMBert text, KL-f8 latents, 256 px.

Rombach et al. 2022 (arXiv:2112.10752), section 4.3.1. The same loop as Stable Diffusion with a
BERT tokenizer and the 32-layer LDMBert encoder (1280-wide context); the unconditional branch of
classifier-free guidance is the empty prompt run through LDMBert ([CLS] [SEP] [PAD]...), and the
default guidance scale is 1.0 (none), as in diffusers' LDMTextToImagePipeline, whose call this
keeps.

Divergences from diffusers, on purpose: the loop scales the model input and the starting noise as
the scheduler asks (`scale_model_input`, `init_noise_sigma`), so Euler-type schedulers work too
(diffusers' LDM pipeline skips both, which is only right for DDIM/PNDM); and DDIM's eta > 0 noise
comes from `generator` (diffusers draws it from torch's global generator).
"""

from pathlib import Path

import torch

from minildm.checkpoints.load import (
    load_component,
    load_scheduler,
    load_tokenizer,
    read_model_index,
)
from minildm.checkpoints.weights import resolve_folder
from minildm.cpu_speed import warn_if_models_slow
from minildm.pipelines.common import (
    PipelineOutput,
    check_eta,
    check_finite_step,
    check_finite_text,
    check_generator,
    check_guidance_scale,
    check_image_size,
    check_latents,
    check_output_type,
    check_sampler,
    images_out,
    initial_noise,
    move_models,
    prompt_list,
    step_options,
)


class LDMTextToImagePipeline:
    def __init__(self, vqvae, bert, tokenizer, unet, scheduler):
        # "vqvae" is diffusers' name for this model's KL autoencoder
        self.vqvae = vqvae
        self.bert = bert
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler

    @classmethod
    def from_pretrained(
        cls, name_or_path, device=None, dtype=None, variant: str | None = None
    ) -> "LDMTextToImagePipeline":
        """From a hub-layout folder or `CompVis/ldm-text2im-large-256` in the Hugging Face cache."""
        folder = Path(resolve_folder(name_or_path))
        read_model_index(folder, "LDMTextToImagePipeline")
        parts = {
            name: load_component(folder / name, device=device, dtype=dtype, variant=variant)
            for name in ("vqvae", "bert", "unet")
        }
        return cls(
            tokenizer=load_tokenizer(folder / "tokenizer"),
            scheduler=load_scheduler(folder / "scheduler"),
            **parts,
        )

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device=None, dtype=None):
        """Every model to `device` and/or `dtype`, as diffusers' pipe.to("cuda"),
        pipe.to(torch.float16) or pipe.to("cuda", torch.float16). -> the pipeline."""
        move_models([self.vqvae, self.bert, self.unet], device, dtype)
        return self

    @torch.no_grad()
    def __call__(
        self,
        prompt,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
    ):
        """callback(i, t, latents) after every step (minildm's addition, for progress reports).
        height and width default to the size the UNet was trained at (256 for the official LDM,
        64 for the embedded one), as in diffusers."""
        f = self.vqvae.config.downsampling_factor
        height = self.unet.config.sample_size * f if height is None else height
        width = self.unet.config.sample_size * f if width is None else width
        self.check_inputs(
            prompt, height, width, guidance_scale, eta, generator, latents, output_type
        )
        prompts = prompt_list(prompt)
        shape = (len(prompts), self.unet.config.in_channels, height // f, width // f)
        dtype = next(self.unet.parameters()).dtype
        guided = guidance_scale != 1.0  # as in diffusers: any scale but 1 runs the empty prompt too

        # the schedule first: it checks num_inference_steps before any work
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        context = self.bert(self.tokenizer(prompts).to(self.device))  # (B, 77, 1280)
        if guided:
            no_text = self.tokenizer([""] * len(prompts)).to(self.device)
            empty = self.bert(no_text)  # LDMBert's own "no text": [CLS] [SEP] [PAD]...
            context = torch.cat([empty, context])  # (2B, 77, 1280)
        check_finite_text(context, "text encoder (LDMBert)")
        context = context.to(dtype)

        if latents is None:
            latents = initial_noise(shape, generator, self.device, dtype)
        latents = latents.to(self.device, dtype) * self.scheduler.init_noise_sigma
        options = step_options(self.scheduler, eta, generator)
        for i, t in enumerate(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            model_output = self.unet(model_input, t, context)  # (B or 2B, C, h, w)
            noise_prediction = model_output
            if guided:
                unconditional, conditional = model_output.chunk(2)
                noise_prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(noise_prediction, t, latents, **options)
            scale = guidance_scale if guided else None
            check_finite_step(
                latents, model_input, model_output, noise_prediction, scale, i, t, self.scheduler
            )
            if callback is not None:
                callback(i, t, latents)

        vae_dtype = next(self.vqvae.parameters()).dtype
        latents = latents.to(vae_dtype) / self.vqvae.config.scaling_factor
        images = self.vqvae.decode(latents)  # (B, 3, H, W) in about [-1, 1]
        images = images_out((images.float() / 2 + 0.5).clamp(0, 1), output_type)
        return PipelineOutput(images) if return_dict else (images,)

    def check_inputs(
        self, prompt, height, width, guidance_scale, eta, generator, latents, output_type
    ):
        """What __call__ refuses before any work (and a warning for a precision that would run
        slowly here)."""
        warn_if_models_slow(self.unet, self.vqvae, self.bert)
        prompts = prompt_list(prompt)
        f = self.vqvae.config.downsampling_factor
        check_image_size(height, width, f)  # any multiple of f: see unet.Upsample
        check_guidance_scale(guidance_scale)
        check_output_type(output_type)
        check_eta(eta)
        check_generator(generator)
        check_sampler(self.scheduler)
        shape = (len(prompts), self.unet.config.in_channels, height // f, width // f)
        check_latents(latents, shape)
