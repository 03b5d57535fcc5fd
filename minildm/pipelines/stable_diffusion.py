"""Stable Diffusion v1.x text-to-image: the denoising loop of the Stable Diffusion blog post.

Rombach et al. 2022 (arXiv:2112.10752) with classifier-free guidance (Ho & Salimans 2022,
arXiv:2207.12598). Matches diffusers' StableDiffusionPipeline on CompVis/stable-diffusion-v1-4:

    tokenize the prompt and the negative (or empty) prompt -> CLIP ViT-L/14 -> (2B, 77, 768)
    latents ~ N(0, I) * init_noise_sigma, (B, 4, H/8, W/8)
    for t in scheduler.timesteps:
        eps_uncond, eps_text = unet(scale_model_input([latents] * 2, t), t, context)
        eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
        latents = scheduler.step(eps, t, latents)
    image = vae.decode(latents / 0.18215)

The safety checker, when the folder has one, only reports: `nsfw_content_detected` lists a flag per
image, and minildm never replaces an image by a black one.
"""

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from minildm import lora
from minildm.autoencoder import KL_F8
from minildm.checkpoints.autoencoder import load_autoencoder
from minildm.checkpoints.clip import load_clip_text_model
from minildm.checkpoints.embeddings import read_embedding
from minildm.checkpoints.load import (
    load_component,
    load_scheduler,
    load_tokenizer,
    read_model_index,
    split_stable_diffusion_checkpoint,
)
from minildm.checkpoints.lora import LoRAFile, apply_lora
from minildm.checkpoints.unet import load_unet
from minildm.checkpoints.weights import read_state_dict, resolve_folder
from minildm.clip import CLIP_VIT_L_14
from minildm.cpu_speed import warn_if_models_slow
from minildm.pipelines.common import (
    check_count,
    check_eta,
    check_finite_step,
    check_finite_text,
    check_generator,
    check_guidance_scale,
    check_image_size,
    check_latents,
    check_output_type,
    check_sampler,
    image_array,
    images_out,
    initial_noise,
    is_number,
    move_models,
    prompt_list,
    step_options,
)
from minildm.schedulers import DDIMInverseScheduler, DDIMScheduler, PNDMScheduler
from minildm.textual_inversion import add_placeholder
from minildm.tokenizer import CLIPTokenizer
from minildm.unet import SD_V1

# The scheduler diffusers gives an original single file, which holds none: PNDM (PLMS steps only)
# on SD v1's training schedule (diffusers' loaders/single_file_utils.py, SCHEDULER_DEFAULT_CONFIG).
# The command line builds any other scheduler for such a file from the same values.
SINGLE_FILE_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


@dataclass
class StableDiffusionOutput:
    images: object  # list of PIL images, (B, H, W, 3) numpy, or (B, 3, H, W) torch, in [0, 1]
    nsfw_content_detected: list | None  # one flag per image, or None without a safety checker


class StableDiffusionPipeline:
    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None):
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler
        self.safety_checker = safety_checker

    @classmethod
    def from_pretrained(
        cls,
        name_or_path,
        device=None,
        dtype=None,
        variant: str | None = None,
        safety_checker: bool = True,
    ):
        """From a hub-layout folder or a repo in the Hugging Face cache
        (`CompVis/stable-diffusion-v1-4`). safety_checker=False skips loading it even when the
        folder has one."""
        folder = Path(resolve_folder(name_or_path))
        index = read_model_index(folder, "StableDiffusionPipeline")
        parts = {
            name: load_component(folder / name, device=device, dtype=dtype, variant=variant)
            for name in ("vae", "text_encoder", "unet")
        }
        checker = None
        listed = index.get("safety_checker", [None])[0] is not None
        if safety_checker and listed and (folder / "safety_checker").is_dir():
            checker = load_component(
                folder / "safety_checker", device=device, dtype=dtype, variant=variant
            )
        return cls(
            tokenizer=load_tokenizer(folder / "tokenizer"),
            scheduler=load_scheduler(folder / "scheduler"),
            safety_checker=checker,
            **parts,
        )

    @classmethod
    def from_single_file(
        cls,
        path,
        device=None,
        dtype=None,
        ema: bool | None = None,
        unet_config=SD_V1,
        vae_config=KL_F8,
        text_encoder_config=CLIP_VIT_L_14,
    ) -> "StableDiffusionPipeline":
        """From an original single-file checkpoint (sd-v1-4.ckpt, SD 1.x fine-tunes as .ckpt or
        .safetensors): the three models are split by key prefix and read through their own key maps;
        the tokenizer is the shipped CLIP vocabulary and the scheduler diffusers' default for such
        files, SINGLE_FILE_SCHEDULER. `ema` chooses the weights of a file holding both copies.
        The configs are SD v1's; others are for tests with small models."""
        parts = split_stable_diffusion_checkpoint(read_state_dict(path))
        scheduler = PNDMScheduler.from_config(SINGLE_FILE_SCHEDULER)
        stored = parts["schedule"].get("alphas_cumprod")
        expected = scheduler.alphas_cumprod
        if stored is not None and not torch.allclose(stored.double(), expected.double(), rtol=1e-5):
            warnings.warn(
                f"{path} stores a training noise schedule different from SD v1's "
                f"(alphas_cumprod[-1] {stored[-1].item():.6g} vs {expected[-1].item():.6g}): "
                "samples may be off; set pipe.scheduler to one built from the right betas",
                stacklevel=2,
            )
        return cls(
            vae=load_autoencoder(vae_config, parts["vae"], device=device, dtype=dtype),
            text_encoder=load_clip_text_model(
                text_encoder_config, parts["text_encoder"], device=device, dtype=dtype
            ),
            tokenizer=CLIPTokenizer(),
            unet=load_unet(unet_config, parts["unet"], device=device, dtype=dtype, ema=ema),
            scheduler=scheduler,
        )

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device=None, dtype=None):
        """Every model to `device` and/or `dtype`, as diffusers' pipe.to("cuda"),
        pipe.to(torch.float16) or pipe.to("cuda", torch.float16). -> the pipeline."""
        move_models([self.vae, self.text_encoder, self.unet, self.safety_checker], device, dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @torch.no_grad()
    def __call__(
        self,
        prompt,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
    ):
        self.check_inputs(
            prompt,
            height,
            width,
            guidance_scale,
            negative_prompt,
            num_images_per_prompt,
            eta,
            generator,
            latents,
            output_type,
            callback_steps,
        )
        prompts = prompt_list(prompt)
        batch = len(prompts) * num_images_per_prompt
        shape = self.latent_shape(batch, height, width)  # (B, 4, H / 8, W / 8)
        guided = guidance_scale > 1.0  # classifier-free guidance; 1.0: the conditional prediction

        # 1. the noise schedule (first: it checks num_inference_steps before any work)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        # 2. the text condition and the starting noise
        context = self.encode_prompt(prompts, negative_prompt, num_images_per_prompt, guided)
        if latents is None:
            latents = initial_noise(shape, generator, self.device, self.dtype)
        latents = latents.to(self.device, self.dtype) * self.scheduler.init_noise_sigma
        # 3. the denoising loop
        options = step_options(self.scheduler, eta, generator)
        timesteps = self.scheduler.timesteps
        latents = self.denoise(
            latents, timesteps, context, guidance_scale, options, callback, callback_steps
        )
        # 4. back to pixels
        return self.decode(latents, output_type, return_dict)

    @torch.no_grad()
    def invert(
        self,
        image,
        prompt="",
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        callback=None,
    ) -> torch.Tensor:
        """DDIM inversion (schedulers/ddim_inverse.py): image(s) -> the latents x_T from which this
        pipeline's DDIM sampling, with the same prompt, steps and guidance, draws them back:
        `pipe(prompt, latents=pipe.invert(image, prompt), guidance_scale=1.0)`. The image is
        encoded to the mean of the VAE's Gaussian (no sampling noise). Guidance above 1 makes the
        round trip less faithful (the path then leaves the ODE the inversion follows).
        callback(i, t, latents) after every step."""
        if not isinstance(self.scheduler, DDIMScheduler):
            raise ValueError(
                "invert runs DDIM backwards, and DDIM sampling brings the image back: set "
                "pipe.scheduler = DDIMScheduler(...) with the folder's training schedule first "
                f"(this pipeline's is a {type(self.scheduler).__name__})"
            )
        check_guidance_scale(guidance_scale, off_below_one=True)
        factor = self.vae.config.downsampling_factor
        pixels = image_tensor(image, self.device, next(self.vae.parameters()).dtype, factor)
        prompts = prompt_list(prompt)
        if len(prompts) == 1:
            prompts = prompts * pixels.shape[0]
        if len(prompts) != pixels.shape[0]:
            raise ValueError(
                f"{len(prompts)} prompts for {pixels.shape[0]} images: give one, or one per image"
            )
        inverse = DDIMInverseScheduler.inverting(self.scheduler)
        inverse.set_timesteps(num_inference_steps, device=self.device)
        guided = guidance_scale > 1.0
        context = self.encode_prompt(prompts, None, 1, guided)  # (B or 2B, 77, 768)
        mean, _ = self.vae.encode(pixels)
        latents = (mean * self.vae.config.scaling_factor).to(self.dtype)  # x_0, (B, 4, h, w)
        for i, t in enumerate(inverse.timesteps):  # cleanest first: x_0 -> x_T
            model_input = torch.cat([latents] * 2) if guided else latents
            model_output = self.unet(model_input, t, context)
            noise_prediction = model_output
            if guided:
                unconditional, conditional = model_output.chunk(2)
                noise_prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = inverse.step(noise_prediction, t, latents)
            scale = guidance_scale if guided else None
            check_finite_step(
                latents, model_input, model_output, noise_prediction, scale, i, t, inverse
            )
            if callback is not None:
                callback(i, t, latents)
        return latents

    def encode_prompt(
        self, prompts: list, negative_prompt, num_images_per_prompt: int, guided: bool
    ) -> torch.Tensor:
        """-> (B, 77, 768) text context, B = prompts x images per prompt; (2B, 77, 768) with the
        negative (or empty) prompts first when guided."""

        def encode(texts):
            context = self.text_encoder(self.tokenizer(texts).to(self.device))  # (P, 77, 768)
            check_finite_text(context)
            # (B, 77, 768), each prompt's images together
            return context.repeat_interleave(num_images_per_prompt, dim=0)

        text = encode(prompts)
        if not guided:
            return text.to(self.dtype)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = negative_prompt
        return torch.cat([encode(negatives), text]).to(self.dtype)

    def image_batch(self, image, batch: int) -> torch.Tensor:
        """The input image(s) in [-1, 1], checked against the number of outputs."""
        factor = self.vae.config.downsampling_factor
        pixels = image_tensor(image, self.device, next(self.vae.parameters()).dtype, factor)
        if batch % pixels.shape[0]:
            raise ValueError(
                f"{pixels.shape[0]} images for {batch} outputs (prompts x images per prompt): "
                "give one image, or one per output"
            )
        return pixels

    def timesteps_from_strength(self, num_inference_steps: int, strength: float) -> torch.Tensor:
        """Start `strength` of the way up the schedule: set it, then skip its first
        (1 - strength) share."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        steps_to_run = min(int(num_inference_steps * strength), num_inference_steps)
        calls_per_step = getattr(self.scheduler, "order", 1)  # Heun calls the model twice per step
        return self.scheduler.timesteps[(num_inference_steps - steps_to_run) * calls_per_step :]

    def denoise(
        self,
        latents,
        timesteps,
        context,
        guidance_scale: float,
        options: dict,
        callback=None,
        callback_steps: int = 1,
        extra_input=None,
        after_step=None,
    ):
        """The loop of the blog post: at every timestep predict the noise (twice, with and without
        the text, when guided), combine the two predictions, and let the scheduler take one step.
        Inpainting adds `extra_input` channels to the UNet's input (the 9-channel model) or blends
        the known region back in `after_step(i, latents)` (the base model)."""
        guided = guidance_scale > 1.0
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            if extra_input is not None:
                model_input = torch.cat([model_input, extra_input], dim=1)  # (B or 2B, 4 + 5, h, w)
            model_output = self.unet(model_input, t, context)  # (B or 2B, 4, h, w)
            noise_prediction = model_output
            if guided:
                unconditional, conditional = model_output.chunk(2)
                noise_prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(noise_prediction, t, latents, **options)
            scale = guidance_scale if guided else None
            check_finite_step(
                latents, model_input, model_output, noise_prediction, scale, i, t, self.scheduler
            )
            if after_step is not None:
                latents = after_step(i, latents)
            if callback is not None and i % callback_steps == 0:
                callback(i, t, latents)
        return latents

    def encode_image(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents, a draw from the encoder's Gaussian
        (with `generator`)."""
        mean, logvar = self.vae.encode(pixels)
        latents = self.vae.sample(mean, logvar, generator) * self.vae.config.scaling_factor
        return latents.to(self.dtype)

    def latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple:
        """(B, C, h, w) of the latents for images of height x width pixels (by default the size
        the UNet was trained at)."""
        f = self.vae.config.downsampling_factor  # 8 for SD's KL-f8
        if height is None:
            height = self.unet.config.sample_size * f
        if width is None:
            width = self.unet.config.sample_size * f
        return (batch, self.unet.config.in_channels, height // f, width // f)

    def decode(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Latents -> images in [0, 1], the safety checker's flags, the requested output type."""
        vae_dtype = next(self.vae.parameters()).dtype
        latents = latents.to(vae_dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(latents)  # (B, 3, H, W) in about [-1, 1]
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        flags = None
        if self.safety_checker is not None:
            flags = self.safety_checker.check(images)
        images = images_out(images, output_type)
        return StableDiffusionOutput(images, flags) if return_dict else (images, flags)

    def check_inputs(
        self,
        prompt,
        height,
        width,
        guidance_scale,
        negative_prompt,
        num_images_per_prompt,
        eta,
        generator,
        latents,
        output_type,
        callback_steps,
    ):
        """What __call__ refuses before any work (and a warning for a precision that would run
        slowly here)."""
        prompts = self.check_common_inputs(
            prompt,
            guidance_scale,
            negative_prompt,
            num_images_per_prompt,
            eta,
            generator,
            output_type,
            callback_steps,
        )
        f = self.vae.config.downsampling_factor
        if height is None:
            height = self.unet.config.sample_size * f
        if width is None:
            width = self.unet.config.sample_size * f
        # any multiple of f: the UNet upsamples to its skips' sizes (unet.Upsample)
        check_image_size(height, width, f)
        batch = len(prompts) * num_images_per_prompt
        check_latents(latents, self.latent_shape(batch, height, width))

    def check_common_inputs(
        self,
        prompt,
        guidance_scale,
        negative_prompt,
        num_images_per_prompt,
        eta,
        generator,
        output_type,
        callback_steps,
    ) -> list:
        """The checks text-to-image, image-to-image and inpainting share; returns the prompts."""
        warn_if_models_slow(self.unet, self.vae, self.text_encoder)
        prompts = prompt_list(prompt)
        check_count("num_images_per_prompt", num_images_per_prompt)
        check_count("callback_steps", callback_steps)
        check_output_type(output_type)
        check_guidance_scale(guidance_scale, off_below_one=True)
        check_eta(eta)
        check_generator(generator)
        check_negative_prompt(negative_prompt, len(prompts), guidance_scale)
        check_sampler(self.scheduler)
        return prompts

    # --- LoRA and textual inversion: what fine-tuning adds, from files -------------------------
    # checkpoints/lora.py and checkpoints/embeddings.py read the files; minildm/lora.py and
    # minildm/textual_inversion.py hold the math.

    def load_lora(self, path, *, scale: float = 1.0, adapter_name: str | None = None) -> str:
        """Add the LoRA in `path` (a diffusers/PEFT or kohya-ss file, or what `read_lora` made of
        one) to the UNet and the text encoder, unfused, at `scale` (0: off, 1: as trained).
        Several may be loaded, each under its own name with its own scale. -> the adapter's name
        (by default the file's stem). Nothing changes when the file is refused. diffusers:
        `load_lora_weights`."""
        if adapter_name is None:
            stem = Path(path.path if isinstance(path, LoRAFile) else path).stem
            adapter_name = re.sub(r"\W", "_", stem)
        apply_lora(self.unet, self.text_encoder, path, scale=scale, adapter=adapter_name)
        return adapter_name

    def set_lora_scale(self, adapter_name: str, scale: float):
        """The weight of one loaded (unfused) LoRA from now on. diffusers:
        `set_adapters([adapter_name], adapter_weights=[scale])`."""
        loaded = self.lora_names()
        if adapter_name not in loaded:
            raise ValueError(
                f"no unfused LoRA called {adapter_name!r} is loaded (loaded: {loaded or 'none'}; "
                "a fused LoRA is part of the weights and keeps the scale it was fused at)"
            )
        if not is_number(scale) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        for model in (self.unet, self.text_encoder):
            lora.set_lora_scale(model, adapter_name, scale)

    def lora_names(self) -> list:
        """The names of the unfused LoRAs loaded, sorted."""
        names = set()
        for model in (self.unet, self.text_encoder):
            for layer in lora.lora_layers(model).values():
                names.update(layer.updates)
        return sorted(names)

    def fuse_lora(self):
        """Write every loaded LoRA, at its scale, into the weights: no cost per step from now on,
        and no way back short of loading the model again. diffusers: `fuse_lora`."""
        for model in (self.unet, self.text_encoder):
            lora.fuse_lora(model)

    def unload_lora(self):
        """Take every unfused LoRA out: the UNet and text encoder as they were loaded (fused ones
        stay). diffusers: `unload_lora_weights`."""
        for model in (self.unet, self.text_encoder):
            lora.remove_lora(model)

    def load_embedding(self, path, token: str | None = None) -> str:
        """Add the textual-inversion embedding in `path` (diffusers, AUTOMATIC1111 or kohya-ss
        file) as a new token, by default the one the file names. -> the token to write in
        prompts. diffusers: `load_textual_inversion`."""
        token, vectors = read_embedding(path, token)
        add_placeholder(self.tokenizer, self.text_encoder, token, vectors)
        return token

    # diffusers' names for the same calls, so that code written for one reads on the other
    load_lora_weights = load_lora
    unload_lora_weights = unload_lora
    load_textual_inversion = load_embedding


def check_negative_prompt(negative_prompt, count: int, guidance_scale: float):
    """None, one string for every prompt, or a list of `count` strings; only with guidance."""
    if negative_prompt is None:
        return
    if guidance_scale <= 1.0:
        raise ValueError(
            "negative_prompt has no effect without guidance "
            f"(guidance_scale={guidance_scale} <= 1): drop it or raise the scale"
        )
    if isinstance(negative_prompt, str):
        return
    if (
        not isinstance(negative_prompt, list)
        or len(negative_prompt) != count
        or not all(isinstance(n, str) for n in negative_prompt)
    ):
        raise ValueError(
            f"negative_prompt must be a string or a list of {count} strings (one per prompt), "
            f"got {negative_prompt!r}"
        )


def image_tensor(image, device, dtype, factor: int = 8) -> torch.Tensor:
    """PIL image(s) or a (B, 3, H, W) tensor in [0, 1] -> (B, 3, H, W) in [-1, 1], the autoencoder's
    range. Sizes must already be multiples of the autoencoder's factor: minildm does not resize
    silently."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, list) and image and all(isinstance(i, Image.Image) for i in image):
        arrays = [image_array(i) for i in image]  # (H, W, 3) in [0, 1], by the image's mode
        image = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(
            "image must be a PIL image, a list of them, or a (B, 3, H, W) tensor in [0, 1]; "
            f"got {type(image).__name__} {tuple(getattr(image, 'shape', ()))}"
        )
    if not torch.isfinite(image).all():
        raise ValueError("image holds inf/nan values: pass a finite image tensor in [0, 1]")
    if image.min() < 0 or image.max() > 1:
        raise ValueError(
            "image tensor values must lie in [0, 1], "
            f"got [{image.min().item():.3g}, {image.max().item():.3g}]"
        )
    check_image_size(image.shape[2], image.shape[3], factor)
    return (image * 2 - 1).to(device=device, dtype=dtype)


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """Image-to-image (SDEdit, Meng et al. 2022, arXiv:2108.01073): encode the image, noise it to
    an intermediate timestep chosen by `strength`, and run the rest of the loop from there.
    strength 1.0 starts from (almost) pure noise; a strength that leaves no step to run
    (int(num_inference_steps * strength) == 0) is refused, as diffusers refuses it."""

    @torch.no_grad()
    def __call__(
        self,
        prompt,
        image,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
    ):
        self.check_inputs(
            prompt,
            strength,
            guidance_scale,
            negative_prompt,
            num_images_per_prompt,
            eta,
            generator,
            output_type,
            callback_steps,
        )
        prompts = prompt_list(prompt)
        batch = len(prompts) * num_images_per_prompt
        guided = guidance_scale > 1.0

        timesteps = self.timesteps_from_strength(num_inference_steps, strength)
        check_steps_left(strength, num_inference_steps)
        pixels = self.image_batch(image, batch)
        context = self.encode_prompt(prompts, negative_prompt, num_images_per_prompt, guided)
        # the image's latents, noised to the first timestep we run (drawn from `generator` in
        # diffusers' order)
        latents = self.encode_image(pixels, generator)
        latents = torch.cat([latents] * (batch // latents.shape[0]))  # (B, 4, h, w)
        noise = initial_noise(latents.shape, generator, self.device, self.dtype)
        latents = self.scheduler.add_noise(latents, noise, timesteps[:1].repeat(batch))
        options = step_options(self.scheduler, eta, generator)
        latents = self.denoise(
            latents, timesteps, context, guidance_scale, options, callback, callback_steps
        )
        return self.decode(latents, output_type, return_dict)

    def check_inputs(
        self,
        prompt,
        strength,
        guidance_scale,
        negative_prompt,
        num_images_per_prompt,
        eta,
        generator,
        output_type,
        callback_steps,
    ):
        """What __call__ refuses before any work (the image itself is checked as it is read)."""
        self.check_common_inputs(
            prompt,
            guidance_scale,
            negative_prompt,
            num_images_per_prompt,
            eta,
            generator,
            output_type,
            callback_steps,
        )
        check_strength(strength)


def mask_tensor(mask_image, image_shape, device, dtype) -> torch.Tensor:
    """A PIL mask (white = repaint) or a (B, 1, H, W) tensor in [0, 1] -> (B, 1, H, W) of 0s and 1s,
    the size of the image (binarised at 0.5 as diffusers does)."""
    import numpy as np
    from PIL import Image

    if isinstance(mask_image, Image.Image):
        mask_image = [mask_image]
    is_list = isinstance(mask_image, list) and mask_image
    if is_list and all(isinstance(m, Image.Image) for m in mask_image):
        arrays = [image_array(m, channels=1) for m in mask_image]  # (H, W, 1)
        mask_image = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 1, H, W)
    if not isinstance(mask_image, torch.Tensor) or mask_image.ndim != 4 or mask_image.shape[1] != 1:
        raise ValueError(
            "mask_image must be a PIL image, a list of them, or a (B, 1, H, W) tensor in [0, 1]; "
            f"got {tuple(getattr(mask_image, 'shape', ()))}"
        )
    if not torch.isfinite(mask_image).all() or mask_image.min() < 0 or mask_image.max() > 1:
        raise ValueError("mask_image values must be finite and lie in [0, 1] (1: repaint)")
    if mask_image.shape[2:] != image_shape[2:] or mask_image.shape[0] not in (1, image_shape[0]):
        raise ValueError(
            f"the mask is {tuple(mask_image.shape)}, the image {tuple(image_shape)}: "
            "give one mask, or one per image, of the image's size"
        )
    return (mask_image >= 0.5).to(device=device, dtype=dtype)


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    """Inpainting: repaint where the mask is white, keep the rest.

    Two models work: the dedicated 9-channel inpainting UNet (runwayml's SD inpainting) sees the
    mask and the latents of the masked image as 5 extra input channels; the base 4-channel UNet is
    steered by blending: after every step the unmasked region is replaced by the original image's
    latents, noised to the next timestep (RePaint-style, Lugmayr et al. 2022, arXiv:2201.09865,
    without resampling).
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt,
        image,
        mask_image,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
    ):
        self.check_inputs(
            prompt,
            strength,
            guidance_scale,
            negative_prompt,
            num_images_per_prompt,
            eta,
            generator,
            output_type,
            callback_steps,
        )
        prompts = prompt_list(prompt)
        batch = len(prompts) * num_images_per_prompt
        guided = guidance_scale > 1.0
        channels = self.unet.config.in_channels

        timesteps = self.timesteps_from_strength(num_inference_steps, strength)
        check_steps_left(strength, num_inference_steps)
        pixels = self.image_batch(image, batch)
        mask = mask_tensor(mask_image, pixels.shape, self.device, pixels.dtype)  # 1 = repaint
        context = self.encode_prompt(prompts, negative_prompt, num_images_per_prompt, guided)
        f = self.vae.config.downsampling_factor
        shape = (batch, 4, pixels.shape[2] // f, pixels.shape[3] // f)
        # random draws in diffusers' order: the image's latents, the noise, the masked image's
        # latents
        image_latents = None
        if channels == 4 or strength < 1:
            image_latents = self.encode_image(pixels, generator)
            image_latents = image_latents.repeat(batch // pixels.shape[0], 1, 1, 1)  # (B, 4, h, w)
        noise = initial_noise(shape, generator, self.device, self.dtype)
        if strength == 1:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
        masked_latents = self.encode_image(pixels * (mask < 0.5), generator)  # the hole blanked
        masked_latents = masked_latents.repeat(batch // masked_latents.shape[0], 1, 1, 1)
        latent_mask = torch.nn.functional.interpolate(mask, size=shape[2:])  # (Bm, 1, h, w) nearest
        latent_mask = latent_mask.to(self.dtype).repeat(batch // latent_mask.shape[0], 1, 1, 1)

        extra_input = None
        after_step = None
        if channels == 9:  # the inpainting UNet reads the mask and the masked image
            extra_input = torch.cat([latent_mask, masked_latents], dim=1)  # (B, 1 + 4, h, w)
            extra_input = torch.cat([extra_input] * 2) if guided else extra_input
        else:  # the base UNet: keep the known region, noised to where the loop now is

            def after_step(i, latents):
                known = image_latents
                if i < len(timesteps) - 1:
                    known = self.scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
                return (1 - latent_mask) * known + latent_mask * latents

        options = step_options(self.scheduler, eta, generator)
        latents = self.denoise(
            latents,
            timesteps,
            context,
            guidance_scale,
            options,
            callback,
            callback_steps,
            extra_input=extra_input,
            after_step=after_step,
        )
        return self.decode(latents, output_type, return_dict)

    def check_inputs(
        self,
        prompt,
        strength,
        guidance_scale,
        negative_prompt,
        num_images_per_prompt,
        eta,
        generator,
        output_type,
        callback_steps,
    ):
        """What __call__ refuses before any work (the image itself is checked as it is read)."""
        self.check_common_inputs(
            prompt,
            guidance_scale,
            negative_prompt,
            num_images_per_prompt,
            eta,
            generator,
            output_type,
            callback_steps,
        )
        check_inpainting_unet(self.unet.config.in_channels)
        check_strength(strength)


def check_inpainting_unet(channels: int):
    if channels not in (4, 9):
        raise ValueError(
            "inpainting needs a 4-channel (base) or 9-channel (inpainting) UNet, "
            f"this one takes {channels}"
        )


def check_strength(strength):
    if not is_number(strength) or not 0 <= strength <= 1:
        raise ValueError(
            f"strength must lie in [0, 1] (how far to noise the image), got {strength!r}"
        )


def check_steps_left(strength: float, num_inference_steps: int):
    """Image-to-image and inpainting need at least one step: without one they would hand back the
    image through the autoencoder, which nobody asks for with a prompt."""
    if int(num_inference_steps * strength) < 1:  # diffusers' count, whatever the scheduler
        raise ValueError(
            f"strength {strength} with {num_inference_steps} steps leaves no step to run: "
            "raise either"
        )
