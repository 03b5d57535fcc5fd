"""The teaching trainer: a tiny Stable Diffusion trained from scratch on the shapes world.

    python -m minildm train sd --out runs/tiny-sd --minutes 84 --seed 0

It trains the same three models Stable Diffusion v1 is made of, with minildm's own classes at small
configs, in the two stages of latent diffusion (Rombach et al. 2022, arXiv:2112.10752, section 3):

1. The autoencoder (`AutoencoderKL`, f8: 64x64x3 images <-> 8x8x4 latents) learns to reconstruct
   drawn images: L1 and squared pixel losses plus a tiny KL term towards N(0, I) (the paper's "KL-reg",
   section 3.1, weight 1e-6 as in CompVis/latent-diffusion `configs/autoencoder/*kl*.yaml`) that keeps
   the latent space smooth without costing detail. SD's GAN and LPIPS terms are left out: on flat
   synthetic shapes a pixel loss is enough, and each would double the step time.
2. The whole training set is encoded once (the posterior's mean and std are cached), and the UNet and
   a CLIP text encoder are trained jointly on SD v1's noise schedule (scaled_linear betas
   0.00085-0.012, 1000 steps) with the simplified DDPM objective (Ho et al. 2020, arXiv:2006.11239,
   eq. 14): noise the scaled latent to a random timestep t,

       x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,     loss = || eps - unet(x_t, t, text) ||^2

   10% of captions are replaced by the empty caption so the same model also predicts without text,
   which classifier-free guidance needs (Ho & Salimans 2022, arXiv:2207.12598, section 3.2). The
   weights shipped are an exponential moving average of the trained ones (Ho et al. 2020, appendix B).

Time, not steps, is the budget: `--minutes` is shared between the stages (40% for the
autoencoder: with 25%, 20 minutes, it kept all four attributes of only 85% of drawings, rounding
triangles into blobs), the learning rate warms up and then follows a cosine to 5% of its peak over each
stage's time, so a slower machine takes fewer steps but still ends with a decayed learning rate.
A checkpoint is written every few minutes; running the same command again resumes from it.

The output folder is a diffusers-layout Stable Diffusion folder (model_index.json, tokenizer/,
text_encoder/, vae/, unet/, scheduler/) that both minildm's and diffusers' StableDiffusionPipeline
load, plus training.json (the run's settings, losses and scores), README.md and checkpoint.pt.
"""

import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from minildm import shapes
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, diffusers_name as vae_file_name
from minildm.clip import CLIPTextConfig, CLIPTextModel, transformers_name
from minildm.pipelines.stable_diffusion import StableDiffusionPipeline
from minildm.schedulers import DDIMScheduler
from minildm.tokenizer import CLIPTokenizer
from minildm.unet import UNet, UNetConfig, diffusers_name as unet_file_name

# --- the models: sizes chosen from measured throughput on 2 CPU cores --------------------------
# f8 like SD's own autoencoder. GroupNorm in 4 groups rather than one per channel: a plain
# background is one flat colour, and normalising each channel alone would erase it.
VAE = AutoencoderConfig(
    channels=(16, 32, 64, 64), layers_per_level=1, latent_channels=4, norm_groups=4
)
# No attention at the 8x8 level (it costs a third of the step time); the 4x4 and 2x2 levels and the
# middle block attend to the caption, and self-attention there already sees the whole latent.
UNET = UNetConfig(
    channels=(64, 96, 96),
    layers_per_level=1,
    attention_levels=(1, 2),
    context_dim=64,
    heads=4,
    sample_size=8,
)
# CLIP's full 49,408-token vocabulary (the shipped BPE), 64 wide: the token embedding is 3.2 M of its
# 3.3 M parameters. 16 positions: the longest caption is 13 tokens with start and end.
TEXT = CLIPTextConfig(max_length=16, width=64, layers=2, heads=4, mlp_width=256)

# --quick: the same pipeline at toy sizes, to check the whole path in about a minute.
QUICK_VAE = AutoencoderConfig(
    channels=(8, 16, 16, 16), layers_per_level=1, latent_channels=4, norm_groups=4
)
QUICK_UNET = UNetConfig(
    channels=(32, 32),
    layers_per_level=1,
    attention_levels=(1,),
    context_dim=32,
    heads=2,
    sample_size=8,
)
QUICK_TEXT = CLIPTextConfig(max_length=16, width=32, layers=1, heads=2, mlp_width=64)

# SD v1's training noise schedule (CompVis/stable-diffusion `configs/stable-diffusion/v1-inference.yaml`)
SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)
# the shipped sampler: DDIM with SD's settings (diffusers' scheduler_config.json of stable-diffusion-v1-4)
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.42.1",
    **SCHEDULE,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


class Settings:
    """What one run does; `--quick` only shrinks it."""

    def __init__(self, minutes: float, seed: int, quick: bool):
        self.minutes = minutes
        self.seed = seed
        self.quick = quick
        if quick:
            self.vae, self.unet, self.text = QUICK_VAE, QUICK_UNET, QUICK_TEXT
        else:
            self.vae, self.unet, self.text = VAE, UNET, TEXT
        # drawn once; stage 2 sees each image about 30 times, newly noised each time
        self.images = 1024 if quick else 10000
        self.autoencoder_share = 0.4  # of the minutes: the autoencoder is the first gate
        self.vae_batch = 16  # small batches, many updates: they helped most in our measurements
        self.vae_lr = 1e-3
        self.unet_batch = 64
        self.unet_lr = 1e-3
        self.kl_weight = 1e-6
        self.caption_dropout = 0.1  # empty caption: the unconditional prediction for guidance
        self.background_dropout = 0.1  # "a red circle" alone: any background
        self.ema_decay = 0.999
        self.checkpoint_every = 120 if quick else 300  # seconds

    def sizes(self) -> dict:
        """The model configs, as stored in checkpoints and compared on resume."""
        return {
            "vae": asdict(self.vae),
            "unet": asdict(self.unet),
            "text_encoder": asdict(self.text),
        }


# --- the output folder: refuse what is not ours, resume what is -----------------------------------

MARKER = "training.json"


def check_output_folder(out: Path, settings: Settings) -> dict | None:
    """-> the checkpoint to resume from, or None for a fresh start. Errors before any work is done."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (new, or one this trainer wrote)")
    if not out.exists() or not any(out.iterdir()):
        return None
    if not (out / MARKER).is_file():
        raise ValueError(
            f"--out {out} exists and is not a minildm training folder (it has no {MARKER}): "
            "give a new folder, or the folder of a run to resume"
        )
    path = out / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(
            f"{out} is a minildm training folder without checkpoint.pt, nothing to resume: give a new folder"
        )
    checkpoint = torch.load(
        path, map_location="cpu", weights_only=True
    )  # tensors and plain values only, never code
    stored = json.loads(checkpoint["sizes"])
    if stored != json.loads(json.dumps(settings.sizes())):
        what = [
            name
            for name in stored
            if stored[name] != json.loads(json.dumps(settings.sizes()))[name]
        ]
        raise ValueError(
            f"{path} holds models of other sizes ({', '.join(what)} differ; it was made "
            f"{'with' if checkpoint['quick'] else 'without'} --quick): resume with the same flags, "
            "or start a new --out folder"
        )
    if checkpoint["seed"] != settings.seed:
        raise ValueError(
            f"{path} was trained with --seed {checkpoint['seed']}, not {settings.seed}: resume with the same seed"
        )
    return checkpoint


def save_checkpoint(out: Path, state: dict):
    """Atomically: a crash while writing leaves the previous checkpoint intact."""
    temporary = out / "checkpoint.pt.tmp"
    torch.save(state, temporary)
    os.replace(temporary, out / "checkpoint.pt")


# --- small helpers --------------------------------------------------------------------------------


def learning_rate(peak: float, fraction: float, step: int, warmup_steps: int = 100) -> float:
    """Linear warm-up over the first steps, then a cosine from peak to 5% of it as time runs out."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(fraction, 1.0))))


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], channels_last (faster convolutions on CPU)."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.contiguous(memory_format=torch.channels_last)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class Progress:
    """One line every `every` seconds: step, loss, images per second, time left in the stage."""

    def __init__(self, stage: str, budget_s: float, batch: int, every: float):
        self.stage, self.budget_s, self.batch, self.every = stage, budget_s, batch, every
        self.last_print, self.last_step, self.losses = time.perf_counter(), 0, []

    def update(self, step: int, loss: float, elapsed_s: float, lr: float):
        self.losses.append(loss)
        now = time.perf_counter()
        if now - self.last_print >= self.every:
            rate = (step - self.last_step) * self.batch / (now - self.last_print)
            left = max(self.budget_s - elapsed_s, 0)
            print(
                f"{self.stage} step {step:6d} | loss {np.mean(self.losses[-50:]):.4f} | {rate:6.1f} img/s | "
                f"lr {lr:.2e} | {left / 60:5.1f} min left",
                flush=True,
            )
            self.last_print, self.last_step = now, step


def ema_update(ema: list, params: list, decay: float):
    """ema <- decay * ema + (1 - decay) * params, in place."""
    with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 - decay)


# --- stage 1: the autoencoder ---------------------------------------------------------------------


def train_autoencoder(
    vae, images: torch.Tensor, settings: Settings, state: dict, out: Path, history: dict
):
    """Reconstruction (L1 + squared) + KL, Adam, for this stage's share of the time; resumes from
    `state`."""
    budget_s = settings.minutes * 60 * settings.autoencoder_share
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed)
    step, elapsed_s = 0, 0.0
    # Start nearly deterministic: with the default init the posterior's std is about 1, as large as
    # the mean, and the 1e-6 KL weight leaves the log-variance to fall by itself over thousands of
    # steps while the noise hides every detail from the decoder (measured: std 0.68 against a mean
    # spread of 2.8 after 424 steps). A log-variance bias of -6 gives std 0.05 from the first step.
    latent = settings.vae.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[latent:].fill_(-6.0)
    if "vae_step" in state:
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["vae_optimizer"])
        generator.set_state(state["vae_rng"])
        step, elapsed_s = state["vae_step"], state["vae_seconds"]
    vae.train()
    progress = Progress(
        "autoencoder", budget_s, settings.vae_batch, every=10 if settings.quick else 30
    )
    last_checkpoint = time.perf_counter()
    while elapsed_s < budget_s:
        started = time.perf_counter()
        index = torch.randint(len(images), (settings.vae_batch,), generator=generator)
        x = to_model_input(images[index])  # (B, 3, 64, 64)
        if torch.rand((), generator=generator) < 0.5:
            x = x.flip(3)  # mirror left-right: still a scene of the world
        mean, logvar = vae.encode(x)  # each (B, 4, 8, 8)
        noise = torch.randn(mean.shape, generator=generator)
        z = mean + torch.exp(0.5 * logvar) * noise  # the reparameterised sample
        reconstruction = vae.decode(z)
        # KL(N(mean, var) || N(0, 1)) summed over the latent, averaged over the batch (as in CompVis'
        # DiagonalGaussianDistribution.kl); L1 averaged over pixels
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        # L1 keeps flat colours exact; the squared error adds a stronger pull on large colour errors
        loss = (
            F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x) + settings.kl_weight * kl
        )
        lr = learning_rate(settings.vae_lr, elapsed_s / budget_s, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        elapsed_s += time.perf_counter() - started
        progress.update(step, loss.item(), elapsed_s, lr)
        if step % 10 == 0:
            history["vae_loss"].append((step, float(np.mean(progress.losses[-10:]))))
        if time.perf_counter() - last_checkpoint > settings.checkpoint_every:
            state.update(
                vae=vae.state_dict(),
                vae_optimizer=optimizer.state_dict(),
                vae_rng=generator.get_state(),
                vae_step=step,
                vae_seconds=elapsed_s,
                history=json.dumps(history),
            )
            save_checkpoint(out, state)
            last_checkpoint = time.perf_counter()
    vae.eval()
    state.update(
        vae=vae.state_dict(),
        vae_step=step,
        vae_seconds=elapsed_s,
        vae_done=True,
        history=json.dumps(history),
    )
    state.pop("vae_optimizer", None)
    save_checkpoint(out, state)
    print(f"autoencoder: {step} steps in {elapsed_s / 60:.1f} min", flush=True)


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch: int = 250):
    """The posterior of every image: mean and std, each (N, 4, 8, 8). Stage 2 samples from them."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        mean, logvar = vae.encode(to_model_input(images[start : start + batch]))
        means.append(mean)
        stds.append(torch.exp(0.5 * logvar))
    return torch.cat(means), torch.cat(stds)


# --- stage 2: the text encoder and the UNet -------------------------------------------------------


def caption_table(scenes: list, tokenizer: CLIPTokenizer) -> torch.Tensor:
    """Token ids of each image's three captions: (N, 3, L) for full, without background, empty."""
    full = [shapes.caption(s["colour"], s["shape"], s["background"], s["position"]) for s in scenes]
    short = [shapes.caption(s["colour"], s["shape"], None, s["position"]) for s in scenes]
    return torch.stack([tokenizer(full), tokenizer(short), tokenizer([""] * len(scenes))], dim=1)


def train_diffusion(
    unet, text_encoder, latents, captions, settings: Settings, state: dict, out: Path, history: dict
):
    """eps-prediction MSE on SD v1's schedule; UNet and text encoder together; EMA of both."""
    budget_s = settings.minutes * 60 * (1 - settings.autoencoder_share)
    means, stds, scaling_factor = latents
    alphas_cumprod = DDIMScheduler(**SCHEDULE).alphas_cumprod  # (1000,) float32
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.unet_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    ema = [p.detach().clone() for p in params]
    step, elapsed_s = 0, 0.0
    if "unet_step" in state:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["unet_optimizer"])
        generator.set_state(state["unet_rng"])
        ema = [t.clone() for t in state["ema"]]
        step, elapsed_s = state["unet_step"], state["unet_seconds"]
    unet.train()
    text_encoder.train()
    progress = Progress(
        "diffusion", budget_s, settings.unet_batch, every=10 if settings.quick else 30
    )
    last_checkpoint = time.perf_counter()
    B = settings.unet_batch
    while elapsed_s < budget_s:
        started = time.perf_counter()
        index = torch.randint(len(means), (B,), generator=generator)
        # which caption: 0 full (u above both thresholds), 1 without background, 2 empty
        u = torch.rand(B, generator=generator)
        without_background = u < settings.caption_dropout + settings.background_dropout
        empty = u < settings.caption_dropout
        variant = without_background.long() + empty.long()
        ids = captions[index, variant]  # (B, L)
        # a fresh sample of each image's posterior, scaled to unit variance as SD's latents are
        posterior_noise = torch.randn(means[index].shape, generator=generator)
        x0 = (means[index] + stds[index] * posterior_noise) * scaling_factor  # (B, 4, 8, 8)
        t = torch.randint(0, len(alphas_cumprod), (B,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(B, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise  # Ho et al. 2020, eq. 4
        loss = F.mse_loss(unet(noisy, t, text_encoder(ids)), noise)  # eq. 14
        lr = learning_rate(settings.unet_lr, elapsed_s / budget_s, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        # a short memory early (the weights change fast), the full decay later
        ema_update(ema, params, min(settings.ema_decay, (1 + step) / (10 + step)))
        elapsed_s += time.perf_counter() - started
        progress.update(step, loss.item(), elapsed_s, lr)
        if step % 10 == 0:
            history["unet_loss"].append((step, float(np.mean(progress.losses[-10:]))))
        if time.perf_counter() - last_checkpoint > settings.checkpoint_every:
            state.update(
                unet=unet.state_dict(),
                text_encoder=text_encoder.state_dict(),
                unet_optimizer=optimizer.state_dict(),
                unet_rng=generator.get_state(),
                ema=ema,
                unet_step=step,
                unet_seconds=elapsed_s,
                history=json.dumps(history),
            )
            save_checkpoint(out, state)
            last_checkpoint = time.perf_counter()
    with torch.no_grad():  # the shipped weights are the average
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    state.update(
        unet=unet.state_dict(),
        text_encoder=text_encoder.state_dict(),
        ema=ema,
        unet_step=step,
        unet_seconds=elapsed_s,
        unet_done=True,
        history=json.dumps(history),
    )
    state.pop("unet_optimizer", None)
    save_checkpoint(out, state)
    print(f"diffusion: {step} steps in {elapsed_s / 60:.1f} min", flush=True)


# --- evaluation: the scorer reads back what was asked for -----------------------------------------


@torch.no_grad()
def autoencoder_scores(vae, per_combination: int = 1, seed: int = 12345) -> dict:
    """Encode and decode freshly drawn images of every (colour, shape, background) in every
    position, held-out triples included; the scorer reads the reconstructions."""
    images, scenes = shapes.every_combination(per_combination, seed)
    images = torch.from_numpy(images)
    decoded = []
    for start in range(0, len(images), 200):
        mean, _ = vae.encode(to_model_input(images[start : start + 200]))
        decoded.append(vae.decode(mean))  # the posterior mean, as a sampler's latents would be
    decoded = torch.cat(decoded)
    return shapes.score(to_uint8(decoded), scenes)


def prompt_scenes(triples: list) -> list:
    """Each triple in each of the three positions, as the scorer's scenes."""
    return [
        dict(colour=c, shape=s, background=b, position=p)
        for c, s, b in triples
        for p in shapes.POSITIONS
    ]


def pipeline_scores(
    pipe, triples: list, seeds=(0, 1), steps: int = 25, guidance: float = 4.0
) -> dict:
    """Generate every triple x position x seed with the pipeline and score the images."""
    scenes = prompt_scenes(triples)
    prompts = [
        shapes.caption(s["colour"], s["shape"], s["background"], s["position"]) for s in scenes
    ]
    images = []
    for seed in seeds:
        out = pipe(
            prompts,
            height=shapes.SIZE,
            width=shapes.SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        )
        images.append((np.asarray(out.images) * 255).round().astype(np.uint8))
    return shapes.score(np.concatenate(images), scenes * len(seeds))


def held_out_grid(pipe, seed: int = 0, steps: int = 25, guidance: float = 4.0):
    """A picture of the held-out triples: one column per triple, rows left / center / right, 2x size."""
    from PIL import Image

    scenes = prompt_scenes(list(shapes.HELD_OUT))
    prompts = [
        shapes.caption(s["colour"], s["shape"], s["background"], s["position"]) for s in scenes
    ]
    images = pipe(
        prompts,
        height=shapes.SIZE,
        width=shapes.SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
    ).images
    S = shapes.SIZE
    grid = Image.new("RGB", (len(shapes.HELD_OUT) * S, len(shapes.POSITIONS) * S))
    for i, image in enumerate(images):  # scenes run triple by triple, three positions each
        grid.paste(image, ((i // 3) * S, (i % 3) * S))
    return grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST)


# six training triples for the "seen" table: every colour, every shape, varied backgrounds
SEEN_TRIPLES = [
    ("red", "circle", "blue"),
    ("green", "square", "white"),
    ("blue", "triangle", "yellow"),
    ("yellow", "circle", "purple"),
    ("purple", "square", "orange"),
    ("orange", "triangle", "gray"),
]


# --- saving the diffusers folder ------------------------------------------------------------------


def _half(state: dict, rename) -> dict:
    """fp16, contiguous, renamed to the official layout: what the shipped files hold."""
    return {
        rename(name): tensor.detach().to(torch.float16).contiguous()
        for name, tensor in state.items()
    }


def save_pipeline_folder(
    out: Path, vae, text_encoder, unet, tokenizer_folder_source: CLIPTokenizer
):
    """Write model_index.json and the five component folders in diffusers' layout, weights in fp16."""
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name, config, weights, file in [
        (
            "vae",
            vae.config.to_diffusers(sample_size=shapes.SIZE),
            _half(vae.state_dict(), vae_file_name),
            "diffusion_pytorch_model",
        ),
        (
            "unet",
            unet.config.to_diffusers(),
            _half(unet.state_dict(), lambda n: unet_file_name(n, unet.config)),
            "diffusion_pytorch_model",
        ),
        (
            "text_encoder",
            text_encoder.config.to_diffusers(),
            _half(text_encoder.state_dict(), transformers_name),
            "model",
        ),
    ]:
        (out / name).mkdir(exist_ok=True)
        (out / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(weights, out / name / f"{file}.safetensors", metadata={"format": "pt"})
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(SCHEDULER_CONFIG, indent=2) + "\n"
    )
    save_tokenizer_folder(out / "tokenizer", tokenizer_folder_source)


def save_tokenizer_folder(folder: Path, tokenizer: CLIPTokenizer):
    """vocab.json + merges.txt made from the shipped BPE file, and SD's padding at the short length."""
    folder.mkdir(exist_ok=True)
    vocab, merges = CLIPTokenizer._vocab_from_bpe_file(
        Path(shapes.__file__).parent / "assets" / "clip_bpe_simple_vocab_16e6.txt.gz"
    )
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    end = CLIPTokenizer.END
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": tokenizer.max_length,
        "bos_token": CLIPTokenizer.START,
        "eos_token": end,
        "pad_token": end,
        "unk_token": end,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": CLIPTokenizer.START,
                "eos_token": end,
                "pad_token": end,
                "unk_token": end,
            },
            indent=2,
        )
        + "\n"
    )


# --- the whole run --------------------------------------------------------------------------------


def host_description() -> str:
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        + ("AVX-512 with native bf16" if bf16 else "no native bf16 (AVX2-class)")
        + f", torch {torch.__version__}"
    )


def train_sd(out, minutes: float | None = None, seed: int = 0, quick: bool = False) -> dict:
    """Train the tiny Stable Diffusion into `out` (see the module docstring). Returns training.json's content."""
    if minutes is None:
        minutes = 0.75 if quick else 84.0
    if not (isinstance(minutes, (int, float)) and minutes > 0 and math.isfinite(minutes)):
        raise ValueError(
            f"--minutes must be a positive number of minutes of training, got {minutes!r}"
        )
    out = Path(out)
    settings = Settings(float(minutes), seed, quick)
    checkpoint = check_output_folder(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    command = f"python -m minildm train sd --out {out} --minutes {minutes:g} --seed {seed}" + (
        " --quick" if quick else ""
    )
    (out / MARKER).write_text(
        json.dumps({"trainer": "minildm train sd", "command": command}, indent=2) + "\n"
    )
    started = time.perf_counter()
    torch.manual_seed(seed)
    state = checkpoint or {"sizes": json.dumps(settings.sizes()), "quick": quick, "seed": seed}
    history = (
        json.loads(state["history"]) if "history" in state else {"vae_loss": [], "unet_loss": []}
    )
    print(
        f"{'resuming' if checkpoint else 'training'} tiny Stable Diffusion in {out}: {minutes:g} min, seed {seed}"
        f"{', quick' if quick else ''}; host: {host_description()}",
        flush=True,
    )

    # (N, 64, 64, 3) uint8, training triples only
    images, scenes = shapes.make_dataset(settings.images, seed)
    images = torch.from_numpy(images)

    vae = AutoencoderKL(settings.vae).to(memory_format=torch.channels_last)
    if state.get("vae_done"):
        vae.load_state_dict(state["vae"])
        vae.eval()
    else:
        train_autoencoder(vae, images, settings, state, out, history)
    vae.requires_grad_(False)

    if "scaling_factor" not in state:
        means, stds = encode_dataset(vae, images)
        # SD's scale_factor: 1 / std of the latents, so the diffusion model sees unit variance (Rombach
        # et al. 2022, appendix D.1: 0.18215 for SD's autoencoder, measured the same way)
        sampled = means + stds * torch.randn(
            means.shape, generator=torch.Generator().manual_seed(seed)
        )
        state.update(scaling_factor=float(1.0 / sampled.std()), means=means, stds=stds)
    means, stds, scaling_factor = state["means"], state["stds"], state["scaling_factor"]
    vae = _with_scaling_factor(vae, scaling_factor)
    print(f"latents cached: {tuple(means.shape)}, scaling factor {scaling_factor:.4f}", flush=True)

    tokenizer = CLIPTokenizer(max_length=settings.text.max_length)
    unet, text_encoder = UNet(settings.unet), CLIPTextModel(settings.text)
    if state.get("unet_done"):
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
    else:
        train_diffusion(
            unet,
            text_encoder,
            (means, stds, scaling_factor),
            caption_table(scenes, tokenizer),
            settings,
            state,
            out,
            history,
        )
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)

    save_pipeline_folder(out, vae, text_encoder, unet, tokenizer)
    training_s = state["vae_seconds"] + state["unet_seconds"]
    print("saved the pipeline folder; evaluating", flush=True)

    # Score what was saved, read back as a user would (fp16 weights), with the folder's scheduler.
    pipe = StableDiffusionPipeline.from_pretrained(out)
    seeds, steps = ((0,), 5) if quick else ((0, 1), 25)
    held_out = list(shapes.HELD_OUT[:2]) if quick else list(shapes.HELD_OUT)
    seen = SEEN_TRIPLES[:2] if quick else SEEN_TRIPLES
    report = {
        "command": command,
        "seed": seed,
        "minutes": minutes,
        "quick": quick,
        "host": host_description(),
        "training_minutes": round(training_s / 60, 1),
        "vae_steps": state["vae_step"],
        "unet_steps": state["unet_step"],
        "scaling_factor": scaling_factor,
        "evaluation_steps": steps,
        "evaluation_seeds": list(seeds),
        "sizes": settings.sizes(),
        "parameters": {
            name: sum(p.numel() for p in m.parameters())
            for name, m in [("vae", vae), ("unet", unet), ("text_encoder", text_encoder)]
        },
        "autoencoder_scores": autoencoder_scores(pipe.vae, per_combination=1),
        "held_out_triples": len(held_out),
        "held_out_scores": pipeline_scores(pipe, held_out, seeds, steps),
        "seen_triples": len(seen),
        "seen_scores": pipeline_scores(pipe, seen, seeds, steps),
        "history": history,
    }
    held_out_grid(pipe, steps=steps).save(out / "samples.png", optimize=True)
    report["wall_minutes"] = round((time.perf_counter() - started) / 60, 1)
    (out / MARKER).write_text(
        json.dumps({"trainer": "minildm train sd", **report}, indent=2) + "\n"
    )
    (out / "README.md").write_text(folder_readme(report))
    for title, key in [
        ("autoencoder (all triples)", "autoencoder_scores"),
        ("held-out triples", "held_out_scores"),
        ("seen triples", "seen_scores"),
    ]:
        print(shapes.format_scores(title, report[key]), flush=True)
    return report


def _with_scaling_factor(vae, scaling_factor: float):
    """The config is frozen: rebuild it with the measured factor, keeping the weights."""
    config = AutoencoderConfig(**{**asdict(vae.config), "scaling_factor": round(scaling_factor, 5)})
    vae.config = config
    return vae


def folder_readme(report: dict) -> str:
    """The shipped folder's README: how it was made and what it scores."""

    def row(key):
        scores = report[key]
        return " | ".join(f"{scores[name]:.3f}" for name in shapes.ATTRIBUTES + ("all",)) + " |"

    p = report["parameters"]
    vae, unet, text = (
        report["sizes"]["vae"],
        report["sizes"]["unet"],
        report["sizes"]["text_encoder"],
    )
    million = sum(p.values()) / 1e6
    latent = shapes.SIZE // 8
    attends = " and ".join(
        f"{latent >> level}x{latent >> level}" for level in unet["attention_levels"]
    )
    steps, seeds = report["evaluation_steps"], len(report["evaluation_seeds"])
    return f"""# tiny-sd: Stable Diffusion v1 at {million:.1f} M parameters, trained by minildm on the shapes world

Made by `{report["command"]}` (minildm/train.py), seed {report["seed"]},
on {report["host"]}: {report["training_minutes"]} min of training ({report["vae_steps"]} autoencoder
steps, {report["unet_steps"]} UNet + text-encoder steps), {report["wall_minutes"]} min in all with
drawing, caching and scoring.

SD v1's three models at small sizes, in diffusers' layout, fp16 weights:
- vae: `AutoencoderKL`, block_out_channels {vae["channels"]}, f8, 4 latent channels,
  {p["vae"]:,} parameters, scaling_factor {report["scaling_factor"]:.5f} (1 / std of the latents)
- unet: `UNet2DConditionModel`, block_out_channels {unet["channels"]}, cross-attention at the
  {attends} levels and in the middle block, context width {unet["context_dim"]}, {p["unet"]:,} parameters
- text_encoder: `CLIPTextModel`, width {text["width"]}, {text["layers"]} layers, CLIP's full BPE
  vocabulary, {text["max_length"]} positions, {p["text_encoder"]:,} parameters
- scheduler: DDIM on SD v1's training schedule (scaled_linear 0.00085-0.012, 1000 steps, epsilon)

Scores (minildm/shapes.py's scorer; {steps} DDIM steps, guidance 4.0, 3 positions x {seeds} seeds):

| images | colour | shape | background | position | all four |
|---|---|---|---|---|---|
| autoencoder round trip, every triple and position | {row("autoencoder_scores")}
| {report["held_out_triples"]} held-out triples (never seen in training) | {row("held_out_scores")}
| {report["seen_triples"]} training triples | {row("seen_scores")}

![the 12 held-out triples, left / center / right, seed 0](samples.png)

`samples.png`: the 12 held-out (colour, shape, background) triples, one per column, in the order of
`minildm.shapes.HELD_OUT` (red triangle on white first), left / center / right by row; seed 0, {steps}
DDIM steps, guidance 4.0, shown at twice their 64x64 size. `training.json` holds the run's settings,
loss curves and scores.
"""


def main_train(system: str, out: str, minutes: float | None, seed: int, quick: bool) -> int:
    if system != "sd":
        raise ValueError(f"train {system!r}: only 'sd' is implemented so far")
    train_sd(out, minutes=minutes, seed=seed, quick=quick)
    return 0
