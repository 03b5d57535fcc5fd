"""VQ-Diffusion text-to-image: unmask a grid of VQ codes step by step, then decode it.

Gu et al. 2022 (arXiv:2111.14822) with Improved VQ-Diffusion's learned classifier-free guidance
(Tang et al. 2022, arXiv:2205.16007). Matches diffusers' VQDiffusionPipeline on
microsoft/vq-diffusion-ithq, whose call signature this keeps:

    tokenize -> CLIP ViT-B/32 -> normalise every token vector
    start from a 32x32 grid of [MASK] codes
    for t = 99 ... 0:
        log p(x0) = transformer(codes, text, t)              (and with the learned "empty" text)
        guidance in log space, renormalise, truncate, clamp at -70
        codes = scheduler.step(log p(x0), t, codes)           (sample x_{t-1})
    decode the codes through the VQ-VAE's codebook

Precision: the text encoder and transformer may run in bf16/fp16; the transformer returns float32
log-probabilities (its log-softmax runs in float64) and all log-space arithmetic after it (guidance,
truncation, the scheduler's posterior) stays in float32, where half precision would lose the small
probabilities that decide which codes get unmasked.
"""

from pathlib import Path

import torch

from minildm.checkpoints.load import (
    load_component,
    load_scheduler,
    load_tokenizer,
    read_model_index,
)
from minildm.checkpoints.weights import read_config, resolve_folder
from minildm.cpu_speed import warn_if_models_slow
from minildm.pipelines.common import (
    PipelineOutput,
    check_count,
    check_finite_text,
    check_generator,
    check_guidance_scale,
    check_output_type,
    check_sampler,
    images_out,
    is_number,
    move_models,
    prompt_list,
)


def truncate(log_p_x_0: torch.Tensor, truncation_rate: float) -> torch.Tensor:
    """Keep, at every position, the most likely codes whose cumulative probability stays below
    `truncation_rate` (and always the single most likely one); the rest get log-probability -inf.
    1.0 keeps everything but codes beyond a total of 1 (rounding); the paper suggests 0.86 without
    classifier-free guidance. log_p_x_0: (B, K, N)."""
    sorted_log_p, order = torch.sort(log_p_x_0, dim=1, descending=True)
    keep = sorted_log_p.exp().cumsum(dim=1) < truncation_rate  # (B, K, N), in sorted order
    # shift by one so the code that crosses the threshold is kept too, and the top code always is
    keep = torch.cat((torch.ones_like(keep[:, :1]), keep[:, :-1]), dim=1)
    # back to code order: position order[i] gets keep[i] (a scatter; inverting the permutation
    # with argsort and gathering gives the same, at the cost of a second sort)
    keep = torch.empty_like(keep).scatter_(1, order, keep)
    return log_p_x_0.masked_fill(~keep, float("-inf"))


class VQDiffusionPipeline:
    def __init__(
        self,
        vqvae,
        text_encoder,
        tokenizer,
        transformer,
        scheduler,
        learned_classifier_free_sampling_embeddings=None,
    ):
        self.vqvae = vqvae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.scheduler = scheduler
        # None: the unconditional branch encodes the empty prompt instead (hub branches without it)
        embeddings = learned_classifier_free_sampling_embeddings
        self.learned_classifier_free_sampling_embeddings = embeddings

    @classmethod
    def from_pretrained(
        cls, name_or_path, device=None, dtype=None, variant: str | None = None
    ) -> "VQDiffusionPipeline":
        """From a hub-layout folder (or `microsoft/vq-diffusion-ithq` in the Hugging Face cache)."""
        folder = Path(resolve_folder(name_or_path))
        index = read_model_index(folder, "VQDiffusionPipeline")
        parts = {
            name: load_component(folder / name, device=device, dtype=dtype, variant=variant)
            for name in ("vqvae", "text_encoder", "transformer")
        }
        # None where the folder has none: the fp16 branch of the hub's microsoft/vq-diffusion-ithq,
        # whose model_index.json lists no learned_classifier_free_sampling_embeddings
        embeddings = None
        embeddings_folder = folder / "learned_classifier_free_sampling_embeddings"
        listed = "learned_classifier_free_sampling_embeddings" in index
        if listed and read_config(embeddings_folder).get("learnable"):
            embeddings = load_component(
                embeddings_folder, device=device, dtype=dtype, variant=variant
            )
        return cls(
            tokenizer=load_tokenizer(folder / "tokenizer"),
            scheduler=load_scheduler(folder / "scheduler"),
            learned_classifier_free_sampling_embeddings=embeddings,
            **parts,
        )

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device=None, dtype=None):
        """Every model to `device` and/or `dtype`, as diffusers' pipe.to("cuda"),
        pipe.to(torch.float16) or pipe.to("cuda", torch.float16). -> the pipeline."""
        embeddings = self.learned_classifier_free_sampling_embeddings
        move_models([self.vqvae, self.text_encoder, self.transformer, embeddings], device, dtype)
        return self

    @torch.no_grad()
    def __call__(
        self,
        prompt,
        num_inference_steps: int = 100,
        guidance_scale: float = 5.0,
        truncation_rate: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        callback_steps: int = 1,
    ):
        self.check_inputs(
            prompt,
            guidance_scale,
            truncation_rate,
            num_images_per_prompt,
            generator,
            latents,
            output_type,
            callback_steps,
        )
        prompts = prompt_list(prompt)
        config = self.transformer.config
        batch = len(prompts) * num_images_per_prompt
        shape = (batch, config.height * config.width)  # (B, N): one code per latent position
        guided = guidance_scale > 1.0

        # start from all [MASK] (the state at the last diffusion step), or the caller's codes
        if latents is None:
            sample = torch.full(shape, config.mask_index, device=self.device)
        else:
            sample = latents.to(self.device)
        # the schedule first: it checks num_inference_steps before any work
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        context = self.encode_prompt(prompts, num_images_per_prompt, guided)

        for i, t in enumerate(self.scheduler.timesteps):
            model_input = torch.cat([sample] * 2) if guided else sample
            log_p_x_0 = self.transformer(model_input, context, t)  # (B or 2B, K, N), float32
            check_log_probabilities(log_p_x_0, i, t)
            if guided:  # classifier-free guidance on log-probabilities, then renormalise
                unconditional, conditional = log_p_x_0.chunk(2)
                log_p_x_0 = unconditional + guidance_scale * (conditional - unconditional)
                log_p_x_0 = log_p_x_0 - torch.logsumexp(log_p_x_0, dim=1, keepdim=True)
            log_p_x_0 = truncate(log_p_x_0, truncation_rate)
            log_p_x_0 = log_p_x_0.clamp(min=-70)  # -70: exp() is 0 in float32 anyway
            # sample x_{t-1}: (B, N) codes
            sample = self.scheduler.step(log_p_x_0, t, sample, generator=generator)
            if callback is not None and i % callback_steps == 0:
                callback(i, t, sample)

        images = self.vqvae.decode_indices(sample, (config.height, config.width))  # (B, 3, H, W)
        images = images_out((images.float() / 2 + 0.5).clamp(0, 1), output_type)  # from [-1, 1]
        return PipelineOutput(images) if return_dict else (images,)

    def encode_prompt(self, prompts: list, num_images_per_prompt: int, guided: bool):
        """-> (B, 77, D) text context, or (2B, 77, D) with the unconditional half first when
        guided."""
        dtype = next(self.transformer.parameters()).dtype
        text = self.text_encoder(self.tokenizer(prompts).to(self.device))  # (P, 77, D)
        check_finite_text(text)
        text = text / text.norm(dim=-1, keepdim=True)  # unit length per token, as in training
        text = text.repeat_interleave(num_images_per_prompt, dim=0)  # (B, 77, D)
        if not guided:
            return text.to(dtype)
        if self.learned_classifier_free_sampling_embeddings is not None:
            # the learned "no text", used as is (not normalised)
            empty = self.learned_classifier_free_sampling_embeddings.embeddings[None]  # (1, 77, D)
        else:
            empty = self.text_encoder(self.tokenizer([""]).to(self.device))
            empty = empty / empty.norm(dim=-1, keepdim=True)
        return torch.cat([empty.expand_as(text).to(text.dtype), text]).to(dtype)  # (2B, 77, D)

    def check_inputs(
        self,
        prompt,
        guidance_scale,
        truncation_rate,
        num_images_per_prompt,
        generator,
        latents,
        output_type,
        callback_steps,
    ):
        """What __call__ refuses before any work (and a warning for a precision that would run
        slowly here)."""
        warn_if_models_slow(self.transformer, self.vqvae, self.text_encoder)
        prompts = prompt_list(prompt)
        check_count("num_images_per_prompt", num_images_per_prompt)
        check_truncation_rate(truncation_rate)
        check_guidance_scale(guidance_scale, off_below_one=True)
        check_count("callback_steps", callback_steps)
        check_output_type(output_type)
        check_generator(generator)
        check_sampler(self.scheduler, discrete=True)
        config = self.transformer.config
        check_scheduler_fits(self.scheduler, config)
        shape = (len(prompts) * num_images_per_prompt, config.height * config.width)
        check_codes(latents, shape, config.height, config.width, config.mask_index)


def check_scheduler_fits(scheduler, config):
    """The scheduler's classes and steps must be the transformer's: another model's scheduler
    would index past its code or step embeddings."""
    classes, steps = scheduler.mask_class + 1, scheduler.num_train_timesteps
    if classes != config.num_classes or steps != (config.num_timesteps or steps):
        raise ValueError(
            f"the scheduler has {classes} classes and {steps} steps, the transformer "
            f"{config.num_classes} (num_vector_embeds) and {config.num_timesteps} "
            "(num_embeds_ada_norm): the scheduler is another model's; use the folder's "
            "scheduler/scheduler_config.json"
        )


def check_log_probabilities(log_p_x_0: torch.Tensor, step: int, t):
    """A NaN in the transformer's log-probabilities would be sampled from without a word (the codes
    drawn from NaN weights are arbitrary); name it at the step it appears."""
    if torch.isnan(log_p_x_0).any():
        raise FloatingPointError(
            f"the transformer's log-probabilities are NaN at step {step + 1} (timestep {int(t)}): "
            "its activations overflowed (if it runs in float16, run it in float32) or its weights "
            "are damaged (download them again)"
        )


def check_truncation_rate(truncation_rate: float):
    if not is_number(truncation_rate) or not 0 < truncation_rate <= 1:
        raise ValueError(
            "truncation_rate must lie in (0, 1] (a cumulative probability), "
            f"got {truncation_rate!r}"
        )


def check_codes(latents: torch.Tensor | None, shape: tuple, height: int, width: int, mask: int):
    """The caller's starting codes, if any: `shape` (images, height * width positions), integers
    in [0, mask] (mask = [MASK])."""
    if latents is None:
        return
    if tuple(latents.shape) != shape:
        raise ValueError(
            f"latents must have shape {shape} (images x {height}*{width} code positions), "
            f"got {tuple(latents.shape)}"
        )
    if latents.dtype != torch.long or latents.min() < 0 or latents.max() > mask:
        raise ValueError(
            f"latents must be integer code indices in [0, {mask}] ({mask} = [MASK]), "
            f"got {latents.dtype} in [{latents.min().item()}, {latents.max().item()}]"
        )
