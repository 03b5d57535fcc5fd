"""The teaching trainer: the four systems of minildm, trained from scratch on the shapes world.

    python -m minildm train sd --out runs/tiny-sd --minutes 84 --seed 0
    python -m minildm train ldm --out runs/tiny-ldm --minutes 30 --seed 0
    python -m minildm train ldm-uncond --out runs/tiny-ldm-uncond --minutes 42 --seed 0
    python -m minildm train vq-diffusion --out runs/tiny-vq-diffusion --minutes 32 --seed 0

Every system is latent diffusion in two stages (Rombach et al. 2022, arXiv:2112.10752, section 3):
an autoencoder learns to compress 64x64x3 drawings into an 8x8 latent grid, the training set is
encoded once, and a denoising model learns on the cached latents. One loop (`train_stage`) trains
every stage; what differs per system is the model, the loss and the conditioning:

- `sd`: a KL autoencoder (`AutoencoderKL`, L1 + squared pixel loss + a 1e-6 KL term towards N(0, I),
  the paper's "KL-reg", section 3.1, weight as in CompVis/latent-diffusion
  `configs/autoencoder/*kl*.yaml`), then a UNet and a CLIP text encoder trained jointly with the
  simplified DDPM objective (Ho et al. 2020, arXiv:2006.11239, eq. 14) on SD v1's noise schedule:

      x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,     loss = || eps - unet(x_t, t, text) ||^2

  SD's GAN and LPIPS terms are left out: on flat synthetic shapes a pixel loss is enough, and each
  would double the step time.
- `ldm`: the CompVis text-to-image LDM (section 4.3.1): the same objective with LDMBert, a
  bidirectional transformer over BERT WordPiece tokens trained from scratch with the UNet, as the
  original was; the autoencoder is the tiny SD's (both systems use a KL-f8 autoencoder).
- `ldm-uncond`: the unconditional LDM (section 4.1): a VQ autoencoder (`VQModel`), trained with
  the VQ-VAE losses (van den Oord et al. 2017, arXiv:1711.00937, eq. 3), and a UNet without text
  on its continuous latents before quantization, at scale 1.0 as the original; sampled latents are
  snapped to the codebook when decoded.
- `vq-diffusion` (Gu et al. 2022, arXiv:2111.14822): the same VQ autoencoder's code indices (the
  tiny unconditional LDM's autoencoder, reused), corrupted by the mask-and-replace forward process,
  and a transformer trained to predict the clean codes with the variational bound plus the
  auxiliary x0 loss (section 3.2 and appendix); the text encoder is the tiny SD's CLIP, frozen, as
  VQ-Diffusion freezes CLIP; the unconditional input is a learned embedding (Improved VQ-Diffusion,
  Tang et al. 2022, arXiv:2205.16007).

Captions: 10% of training images get the empty caption (or VQ-Diffusion's learned embedding) so
the same model also predicts without text, which classifier-free guidance needs (Ho & Salimans
2022, arXiv:2207.12598, section 3.2); 10% more get the caption without its background. The weights
shipped are an exponential moving average of the trained ones (Ho et al. 2020, appendix B).

Time, not steps, is the budget: `--minutes` is shared between the stages, the learning rate warms
up and then follows a cosine to 5% of its peak over each stage's time, so a slower machine takes
fewer steps but still ends with a decayed learning rate. A checkpoint is written every few
minutes; running the same command again resumes from it.

The output folder is a diffusers-layout pipeline folder that both minildm's and diffusers' matching
pipeline load, plus training.json (the run's settings, losses and scores), README.md, samples.png
and checkpoint.pt.
"""

import json
import math
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minildm import shapes
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL, VQModel
from minildm.checkpoints.save import save_component, save_pipeline_folder
from minildm.clip import CLIPTextConfig, CLIPTextModel
from minildm.ldm_bert import LDMBert, LDMBertConfig
from minildm.load import load_component, load_tokenizer
from minildm.pipelines import (
    LDMPipeline,
    LDMTextToImagePipeline,
    StableDiffusionPipeline,
    VQDiffusionPipeline,
)
from minildm.schedulers import DDIMScheduler, VQDiffusionScheduler
from minildm.tokenizer import ASSETS, BertTokenizer, CLIPTokenizer
from minildm.unet import UNet, UNetConfig
from minildm.vq_transformer import (
    LearnedClassifierFreeEmbeddings,
    VQTransformer,
    VQTransformerConfig,
)
from minildm.weights import read_config

SYSTEMS = ("sd", "ldm", "ldm-uncond", "vq-diffusion")
FOLDER_NAMES = {system: f"tiny-{system}" for system in SYSTEMS}  # minildm/assets/tiny-sd, ...

# --- the models: sizes chosen from measured throughput on 2 CPU cores -----------------------------
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
# CLIP's full 49,408-token vocabulary (the shipped BPE), 64 wide: the token embedding is 3.2 M of
# its 3.3 M parameters. 16 positions: the longest caption is 13 tokens with start and end.
TEXT = CLIPTextConfig(max_length=16, width=64, layers=2, heads=4, mlp_width=256)

# ldm: LDMBert over BERT's full 30,522-word vocabulary, 77 positions (diffusers' LDM pipeline pads
# every prompt to 77), and a UNet a little narrower than the tiny SD's at 8x8: all four embedded
# models must fit in 50 MB together.
BERT = LDMBertConfig(max_length=77, width=64, layers=2, heads=4, head_width=16, mlp_width=256)
LDM_UNET = replace(UNET, channels=(64, 64, 96))

# ldm-uncond and vq-diffusion: a VQ-f8 autoencoder with the tiny SD's encoder and decoder, 4-channel
# latents and 512 codes: each code stands for one 8x8 patch (flat colours and the edges of shapes).
VQ_VAE = replace(VAE, codebook_size=512, code_dim=4, scaling_factor=1.0)
# Without text the UNet needs no cross-attention. Two levels, 8x8 and 4x4, both 64 wide with
# self-attention: with (32, 64, 64) and attention only at 4x4 and 2x2 (the same 1.2 M parameters)
# 77% of 64 samples were one clean shape, the rest faint, two-coloured or with ghost outlines.
UNCOND_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    channels=(64, 64),
    layers_per_level=1,
    attention_levels=(0, 1),
    context_dim=None,
    heads=None,
    head_channels=32,
    sample_size=8,
)
# 64 tokens (the 8x8 code grid) x 128 channels, 4 blocks; 50 diffusion steps instead of 100.
TRANSFORMER = VQTransformerConfig(
    num_classes=VQ_VAE.codebook_size + 1,
    height=8,
    width=8,
    layers=4,
    heads=4,
    head_dim=32,
    context_dim=TEXT.width,
    num_timesteps=50,
)

# --quick: the same pipelines at toy sizes, to check the whole path in about a minute: each stage
# runs QUICK_STEPS steps (about 20 s on a quiet 2-core host), stopped sooner only by --minutes.
QUICK_STEPS = 250
QUICK_MINUTES = 5.0
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
QUICK_BERT = LDMBertConfig(max_length=77, width=32, layers=1, heads=2, head_width=16, mlp_width=64)
QUICK_VQ_VAE = replace(QUICK_VAE, codebook_size=64, code_dim=4, scaling_factor=1.0)
QUICK_UNCOND_UNET = replace(UNCOND_UNET, channels=(32, 32), attention_levels=(1,))
QUICK_TRANSFORMER = replace(TRANSFORMER, layers=1, heads=2, head_dim=16)

# The training noise schedules, as the original configs give them: SD v1
# (CompVis/stable-diffusion `configs/stable-diffusion/v1-inference.yaml`, also used for the tiny
# text-to-image LDM) and the unconditional LDM (CompVis/latent-diffusion
# `configs/latent-diffusion/celebahq-ldm-vq-4.yaml`: linear_start 0.0015, linear_end 0.0195).
SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)
UNCOND_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear"
)
# the shipped sampler: DDIM with SD's settings (the hub's scheduler_config.json of
# CompVis/stable-diffusion-v1-4)
DDIM_SETTINGS = {
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.42.1",
    **SCHEDULE,
    **DDIM_SETTINGS,
}
UNCOND_SCHEDULER_CONFIG = {**SCHEDULER_CONFIG, **UNCOND_SCHEDULE}
# VQ-Diffusion's mask-and-replace schedule (eq. 4-6) with the paper's end points, over 50 steps
VQ_SCHEDULER_CONFIG = {
    "_class_name": "VQDiffusionScheduler",
    "_diffusers_version": "0.42.1",
    "num_vec_classes": TRANSFORMER.num_classes,
    "num_train_timesteps": TRANSFORMER.num_timesteps,
    "alpha_cum_start": 0.99999,
    "alpha_cum_end": 0.000009,
    "gamma_cum_start": 0.000009,
    "gamma_cum_end": 0.99999,
}
DEFAULT_MINUTES = {"sd": 84.0, "ldm": 30.0, "ldm-uncond": 42.0, "vq-diffusion": 32.0}


class Settings:
    """What one run does; `--quick` only shrinks it."""

    def __init__(
        self, system: str, minutes: float, seed: int, quick: bool, reuse_autoencoder=False
    ):
        self.system = system
        self.minutes = minutes
        self.seed = seed
        self.quick = quick
        # the models this run trains, by their folder names
        if system == "sd":
            self.models = {
                "vae": QUICK_VAE if quick else VAE,
                "unet": QUICK_UNET if quick else UNET,
                "text_encoder": QUICK_TEXT if quick else TEXT,
            }
        elif system == "ldm":
            bert = QUICK_BERT if quick else BERT
            unet = QUICK_UNET if quick else LDM_UNET
            self.models = {"unet": replace(unet, context_dim=bert.width), "bert": bert}
        elif system == "ldm-uncond":
            self.models = {"unet": QUICK_UNCOND_UNET if quick else UNCOND_UNET}
            if not reuse_autoencoder:
                self.models["vqvae"] = QUICK_VQ_VAE if quick else VQ_VAE
        else:
            self.models = {"transformer": QUICK_TRANSFORMER if quick else TRANSFORMER}
        # the share of the minutes that trains an autoencoder (ldm and vq-diffusion reuse one)
        self.autoencoder_share = {"sd": 0.4, "ldm": 0.0, "ldm-uncond": 0.6, "vq-diffusion": 0.0}[
            system
        ]
        if reuse_autoencoder:
            self.autoencoder_share = 0.0
        # drawn once; the second stage sees each image about 30 times, newly noised each time
        self.images = 1024 if quick else 10000
        self.vae_batch = 16  # small batches, many updates: they helped most in our measurements
        self.vae_lr = 1e-3
        self.unet_batch = 64
        self.unet_lr = 1e-3
        self.kl_weight = 1e-6
        self.commitment_weight = 0.25  # beta of the VQ-VAE loss (van den Oord et al. 2017, eq. 3)
        # VQ-Diffusion's auxiliary x0 term: see vq_diffusion_loss for why it is larger than 5e-4
        self.auxiliary_weight = 1.0
        self.caption_dropout = 0.1  # empty caption: the unconditional prediction for guidance
        self.background_dropout = 0.1  # "a red circle" alone: any background
        self.ema_decay = 0.999
        self.checkpoint_every = 120 if quick else 300  # seconds
        self.max_steps = QUICK_STEPS if quick else None  # per stage; otherwise the minutes decide

    def sizes(self) -> dict:
        """The model configs, as stored in checkpoints and compared on resume."""
        return {name: asdict(config) for name, config in self.models.items()}


# --- the output folder: refuse what is not ours, resume what is -----------------------------------

MARKER = "training.json"


def check_output_folder(out: Path, settings: Settings) -> dict | None:
    """-> the checkpoint to resume from, or None for a fresh start. Errors before any work is
    done."""
    for path in [out, *out.parents]:
        if path.exists() and not path.is_dir():
            raise ValueError(
                f"--out {out}: {path} is a file; give a folder (new, or one this trainer wrote)"
            )
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
            f"{out} is a minildm training folder without checkpoint.pt, nothing to resume: "
            "give a new folder"
        )
    # tensors and plain values only, never code
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("system", "sd") != settings.system:
        raise ValueError(
            f"{path} is a `train {checkpoint.get('system', 'sd')}` run, not "
            f"`train {settings.system}`: give a new --out folder"
        )
    stored = json.loads(checkpoint["sizes"])
    wanted = json.loads(json.dumps(settings.sizes()))
    if stored != wanted:
        what = [name for name in stored if stored[name] != wanted.get(name)]
        made = "with" if checkpoint["quick"] else "without"
        raise ValueError(
            f"{path} holds models of other sizes ({', '.join(what)} differ; it was made "
            f"{made} --quick): resume with the same flags, or start a new --out folder"
        )
    if checkpoint["seed"] != settings.seed:
        raise ValueError(
            f"{path} was trained with --seed {checkpoint['seed']}, not {settings.seed}: "
            "resume with the same seed"
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
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1], channels_last (faster convolutions on
    CPU)."""
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
                f"{self.stage} step {step:6d} | loss {np.mean(self.losses[-50:]):.4f} | "
                f"{rate:6.1f} img/s | lr {lr:.2e} | {left / 60:5.1f} min left",
                flush=True,
            )
            self.last_print, self.last_step = now, step


def ema_update(ema: list, params: list, decay: float):
    """ema <- decay * ema + (1 - decay) * params, in place."""
    with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 - decay)


# --- the one training loop ------------------------------------------------------------------------


def train_stage(
    stage: str,
    models: dict,
    batch_loss,
    run: dict,
    *,
    lr: float,
    batch: int,
    budget_s: float,
    seed: int,
    ema_decay: float | None = None,
    clip_norm: float | None = None,
    max_steps: int | None = None,
):
    """Train `models` ({name: module}) to lower `batch_loss(generator)` for `budget_s` seconds
    (or `max_steps` steps, if that comes first: --quick runs count steps, so that what they learn
    does not depend on how busy the machine is).

    AdamW, warm-up then cosine learning rate over the stage's time, optionally gradient clipping
    and an exponential moving average of the weights (which the models hold at the end). All
    randomness of the stage comes from one generator seeded `seed`, so a stage is a function of its
    seed. Progress is kept in run["state"][stage] and checkpointed every few minutes; a resumed
    run continues from there, and a finished stage only loads its weights.
    """
    settings, state, out, history = run["settings"], run["state"], run["out"], run["history"]
    saved = state.get(stage, {})
    if saved.get("done"):
        for name, module in models.items():
            module.load_state_dict(saved["models"][name])
            module.eval()
        return
    params = [p for module in models.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    ema = [p.detach().clone() for p in params] if ema_decay else None
    step = 0
    elapsed_s = 0.0
    if saved:
        for name, module in models.items():
            module.load_state_dict(saved["models"][name])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["rng"])
        ema = [t.clone() for t in saved["ema"]] if ema_decay else None
        step = saved["step"]
        elapsed_s = saved["seconds"]
    history.setdefault(f"{stage}_loss", [])

    def snapshot(done: bool) -> dict:
        entry = {
            "models": {name: module.state_dict() for name, module in models.items()},
            "step": step,
            "seconds": elapsed_s,
            "done": done,
        }
        if not done:
            entry.update(optimizer=optimizer.state_dict(), rng=generator.get_state())
            if ema_decay:
                entry["ema"] = ema
        return entry

    for module in models.values():
        module.train()
    progress = Progress(stage, budget_s, batch, every=10 if settings.quick else 30)
    last_checkpoint = time.perf_counter()
    while elapsed_s < budget_s and (max_steps is None or step < max_steps):
        started = time.perf_counter()
        loss = batch_loss(generator)
        progress_fraction = elapsed_s / budget_s
        if max_steps is not None:
            progress_fraction = max(progress_fraction, step / max_steps)
        current_lr = learning_rate(lr, progress_fraction, step)
        for group in optimizer.param_groups:
            group["lr"] = current_lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        step += 1
        if ema_decay:  # a short memory early (the weights change fast), the full decay later
            ema_update(ema, params, min(ema_decay, (1 + step) / (10 + step)))
        elapsed_s += time.perf_counter() - started
        progress.update(step, loss.item(), elapsed_s, current_lr)
        if step % 10 == 0:
            history[f"{stage}_loss"].append((step, float(np.mean(progress.losses[-10:]))))
        if time.perf_counter() - last_checkpoint > settings.checkpoint_every:
            state[stage] = snapshot(done=False)
            state["history"] = json.dumps(history)
            save_checkpoint(out, state)
            last_checkpoint = time.perf_counter()
    if ema_decay:  # the shipped weights are the average
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    for module in models.values():
        module.eval()
    state[stage] = snapshot(done=True)
    state["history"] = json.dumps(history)
    save_checkpoint(out, state)
    print(f"{stage}: {step} steps in {elapsed_s / 60:.1f} min", flush=True)


# --- the losses: what differs per system ----------------------------------------------------------


def random_images(images: torch.Tensor, batch: int, generator) -> torch.Tensor:
    """A batch of training drawings, half of them mirrored left-right (still scenes of the
    world)."""
    index = torch.randint(len(images), (batch,), generator=generator)
    x = to_model_input(images[index])  # (B, 3, 64, 64)
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(3)
    return x


def start_nearly_deterministic(vae: AutoencoderKL) -> AutoencoderKL:
    """A fresh AutoencoderKL's posterior made narrow before training. With the default init its std
    is about 1, as large as the mean, and the 1e-6 KL weight leaves the log-variance to fall by itself
    over thousands of steps while the noise hides every detail from the decoder (measured: std 0.68
    against a mean spread of 2.8 after 424 steps). A log-variance bias of -6 gives std 0.05 from the
    first step."""
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[latent:].fill_(-6.0)  # the second half of quant_conv: the log-variance
    return vae


def kl_autoencoder_loss(vae, images: torch.Tensor, settings: Settings):
    """Reconstruction (L1 + squared) + KL for AutoencoderKL; leaves `vae` as it is."""

    def loss(generator):
        x = random_images(images, settings.vae_batch, generator)
        mean, logvar = vae.encode(x)  # each (B, 4, 8, 8)
        noise = torch.randn(mean.shape, generator=generator)
        reconstruction = vae.decode(mean + torch.exp(0.5 * logvar) * noise)  # reparameterised
        # KL(N(mean, var) || N(0, 1)) summed over the latent, averaged over the batch (as in
        # CompVis' DiagonalGaussianDistribution.kl); L1 averaged over pixels
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        # L1 keeps flat colours exact; the squared error adds a stronger pull on large colour errors
        pixels = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x)
        return pixels + settings.kl_weight * kl

    return loss


def vq_autoencoder_loss(vq, images: torch.Tensor, settings: Settings, fresh: bool):
    """Reconstruction (L1 + squared) + the VQ-VAE codebook and commitment terms (van den Oord et al.
    2017, eq. 3): ||sg[h] - e||^2 + beta ||h - sg[e]||^2, with the straight-through gradient
    (the decoder's gradient passed to the encoder as if quantization were the identity)."""
    usage = torch.zeros(vq.config.codebook_size)
    steps = [0 if fresh else 1]

    def loss(generator):
        x = random_images(images, settings.vae_batch, generator)
        h = vq.encode(x)  # (B, D, 8, 8), before quantization
        if steps[0] == 0:  # codes start as encoder outputs, not as N(0, 1) far from every latent
            _restart_codes(vq, h, torch.ones_like(usage, dtype=torch.bool), generator)
        elif steps[0] % 100 == 0:
            # Codes no latent chose for 100 steps get no gradient and stay dead; restart them at
            # random latents of this batch (the "random restart" of Dhariwal et al. 2020, Jukebox).
            _restart_codes(vq, h, usage == 0, generator)
            usage.zero_()
        steps[0] += 1
        e, indices = vq.quantize(h)  # nearest codes (B, D, 8, 8), their indices (B, 8, 8)
        usage.index_add_(0, indices.flatten(), torch.ones(indices.numel()))
        reconstruction = vq.decode(h + (e - h).detach(), quantize=False)  # straight through
        pixels = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x)
        codebook = F.mse_loss(e, h.detach())
        commitment = F.mse_loss(h, e.detach())
        return pixels + codebook + settings.commitment_weight * commitment

    return loss


def _restart_codes(vq, h: torch.Tensor, dead: torch.Tensor, generator):
    """Set the `dead` codebook rows to randomly chosen latent vectors of h (B, D, h, w)."""
    count = int(dead.sum())
    if count == 0:
        return
    vectors = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (B*h*w, D)
    chosen = vectors[torch.randint(len(vectors), (count,), generator=generator)]
    with torch.no_grad():
        vq.codebook.weight[dead] = chosen


def choose_captions(captions: torch.Tensor, index, settings: Settings, generator):
    """Token ids (B, L) for the images `index`: 0 the full caption (u above both thresholds), 1 the
    caption without background, 2 the empty one. -> (ids, which) with which (B,) in {0, 1, 2}."""
    u = torch.rand(len(index), generator=generator)
    without_background = u < settings.caption_dropout + settings.background_dropout
    empty = u < settings.caption_dropout
    which = without_background.long() + empty.long()
    return captions[index, which], which


def epsilon_loss(unet, text_encoder, latents, captions, schedule: dict, settings: Settings):
    """The simplified DDPM objective (Ho et al. 2020, eq. 14) on cached latents.

    latents: (mean, std, scale) of each image's posterior (KL autoencoders: a fresh sample each
    time; std 0 for a VQ autoencoder's deterministic latents). text_encoder and captions are None
    for an unconditional UNet.
    """
    means, stds, scale = latents
    alphas_cumprod = DDIMScheduler(**schedule).alphas_cumprod  # (1000,) float32

    def loss(generator):
        B = settings.unet_batch
        index = torch.randint(len(means), (B,), generator=generator)
        context = None
        if text_encoder is not None:
            ids, _ = choose_captions(captions, index, settings, generator)  # (B, L)
            context = text_encoder(ids)  # (B, L, D)
        # a fresh sample of each image's posterior, scaled to unit variance as SD's latents are
        posterior_noise = torch.randn(means[index].shape, generator=generator)
        x0 = (means[index] + stds[index] * posterior_noise) * scale  # (B, 4, 8, 8)
        t = torch.randint(0, len(alphas_cumprod), (B,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(B, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise  # Ho et al. 2020, eq. 4
        return F.mse_loss(unet(noisy, t, context), noise)  # eq. 14

    return loss


def text_context(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """VQ-Diffusion's condition: CLIP's token vectors, each normalised to length 1, as its
    pipeline normalises them at sampling time."""
    context = text_encoder(ids)  # (B, L, D)
    return context / context.norm(dim=-1, keepdim=True)


def vq_diffusion_loss(transformer, embeddings, text_encoder, codes, captions, settings: Settings):
    """VQ-Diffusion's training loss (Gu et al. 2022, section 3.2, and the official
    `DiffusionTransformer._train_loss` in microsoft/VQ-Diffusion), per code position:

        x_t ~ q(x_t | x0)                      (mask-and-replace in one jump, eq. 6)
        L_vb  = KL( q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t) )   for t > 0 (eq. 7-8)
              = -log p(x0 | x_1)                                  for t = 0 (the decoder term)
        L_x0  = -log p_theta(x0 | x_t)           (the auxiliary loss: predict x0 itself)
        loss  = L_vb + lambda (2 - t/T) L_x0

    where p(x_{t-1} | x_t) = sum_x0 q(x_{t-1} | x_t, x0) p_theta(x0 | x_t) (eq. 11) is the posterior
    the sampler uses. Time steps are drawn uniformly (the official code importance-samples them
    once every step has a loss history). The official configs weight the x0 term lambda = 5e-4
    relative to the bound, for models trained for days; here lambda = 1: the bound weighs each
    masked position by the chance that it is unmasked in this very step (about 1/t), so it says
    little at high t, where the layout of the image is decided, and in half an hour of training
    the direct x0 term is what teaches that. (2 - t/T) is the official "adaptive" weight.
    """
    scheduler = VQDiffusionScheduler.from_config(VQ_SCHEDULER_CONFIG)
    T, K = scheduler.num_train_timesteps, scheduler.mask_class

    def loss(generator):
        B = settings.unet_batch
        index = torch.randint(len(codes), (B,), generator=generator)
        x_0 = codes[index]  # (B, N)
        ids, which = choose_captions(captions, index, settings, generator)
        with torch.no_grad():  # the text encoder is frozen, as VQ-Diffusion freezes CLIP
            context = text_context(text_encoder, ids)  # (B, L, D)
        # the empty caption is replaced by the learned embedding, used as it is (not normalised)
        empty = (which == 2).view(B, 1, 1)
        context = torch.where(empty, embeddings.embeddings[None], context)
        t = torch.randint(0, T, (B,), generator=generator)
        log_q = scheduler.log_q_x_t_given_x_0(x_0, t)  # (B, K+1, N)
        uniform = torch.rand(log_q.shape, generator=generator)
        x_t = (log_q - torch.log(-torch.log(uniform + 1e-30) + 1e-30)).argmax(dim=1)  # Gumbel-max
        log_p_x_0 = transformer(x_t, context, t)  # (B, K, N)
        # the true and the model's posterior of x_{t-1}, both (B, K+1, N); at t = 0 both are of x0
        log_onehot_x_0 = torch.log(F.one_hot(x_0, K).permute(0, 2, 1).float().clamp(min=1e-30))
        log_true = scheduler.log_posterior(log_onehot_x_0, x_t, t).clamp(-70, 0)
        log_model = scheduler.log_posterior(log_p_x_0, x_t, t).clamp(-70, 0)
        kl = (log_true.exp() * (log_true - log_model)).sum(dim=1)  # (B, N)
        decoder_nll = -(log_onehot_x_0.exp() * log_model[:, :K]).sum(dim=1)  # (B, N)
        first = (t == 0).view(B, 1)
        vb = torch.where(first, decoder_nll, kl)
        x0_nll = -(log_onehot_x_0.exp() * log_p_x_0).sum(dim=1)  # (B, N)
        adaptive = (2 - t / T).view(B, 1)
        return (vb + settings.auxiliary_weight * adaptive * x0_nll).mean()

    return loss


# --- caching the latents --------------------------------------------------------------------------


@torch.no_grad()
def encode_dataset(autoencoder, images: torch.Tensor, batch: int = 250) -> dict:
    """What the second stage learns from, each image's latents computed once.

    KL: the posterior's mean and std (N, 4, 8, 8); VQ: the latents before quantization (the
    unconditional LDM's input) and the code indices (N, 64) of the quantized grid (VQ-Diffusion's).
    """
    parts = {"means": [], "stds": [], "codes": []}
    for start in range(0, len(images), batch):
        x = to_model_input(images[start : start + batch])
        if autoencoder.config.is_vq:
            h = autoencoder.encode(x)
            parts["means"].append(h)
            parts["stds"].append(torch.zeros_like(h))
            parts["codes"].append(autoencoder.quantize(h)[1].flatten(1))
        else:
            mean, logvar = autoencoder.encode(x)
            parts["means"].append(mean)
            parts["stds"].append(torch.exp(0.5 * logvar))
    return {name: torch.cat(values) for name, values in parts.items() if values}


def caption_table(scenes: list, tokenizer) -> torch.Tensor:
    """Token ids of each image's three captions: (N, 3, L) for full, without background, empty."""
    full = [shapes.caption(s["colour"], s["shape"], s["background"], s["position"]) for s in scenes]
    short = [shapes.caption(s["colour"], s["shape"], None, s["position"]) for s in scenes]
    return torch.stack([tokenizer(full), tokenizer(short), tokenizer([""] * len(scenes))], dim=1)


# --- evaluation: the scorer reads back what was asked for -----------------------------------------


@torch.no_grad()
def autoencoder_scores(autoencoder, per_combination: int = 1, seed: int = 12345) -> dict:
    """Encode and decode freshly drawn images of every (colour, shape, background) in every
    position, held-out triples included; the scorer reads the reconstructions."""
    images, scenes = shapes.every_combination(per_combination, seed)
    images = torch.from_numpy(images)
    decoded = []
    for start in range(0, len(images), 200):
        x = to_model_input(images[start : start + 200])
        if autoencoder.config.is_vq:  # through the codebook, as the pipelines decode
            decoded.append(autoencoder.decode(autoencoder.encode(x), quantize=True))
        else:  # the posterior mean, as a sampler's latents would be
            decoded.append(autoencoder.decode(autoencoder.encode(x)[0]))
    decoded = torch.cat(decoded)
    return shapes.score(to_uint8(decoded), scenes)


def prompt_scenes(triples: list) -> list:
    """Each triple in each of the three positions, as the scorer's scenes."""
    return [
        dict(colour=c, shape=s, background=b, position=p)
        for c, s, b in triples
        for p in shapes.POSITIONS
    ]


def generate(
    pipe,
    prompts: list,
    seed: int,
    steps: int,
    guidance: float,
    output_type="np",
    truncation: float | None = None,
):
    """One image per prompt from a text-to-image pipeline at the shapes world's size; `truncation`
    is VQ-Diffusion's truncation_rate (None: the pipeline's default, 1.0)."""
    options = dict(
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    )
    if not isinstance(pipe, VQDiffusionPipeline):  # its image size is the transformer's grid
        options.update(height=shapes.SIZE, width=shapes.SIZE)
    elif truncation is not None:
        options.update(truncation_rate=truncation)
    images = pipe(prompts, **options).images
    if output_type == "np":
        return (np.asarray(images) * 255).round().astype(np.uint8)
    return images


def pipeline_scores(
    pipe,
    triples: list,
    seeds=(0, 1),
    steps: int = 25,
    guidance: float = 4.0,
    truncation: float | None = None,
) -> dict:
    """Generate every triple x position x seed with the pipeline and score the images."""
    scenes = prompt_scenes(triples)
    prompts = [
        shapes.caption(s["colour"], s["shape"], s["background"], s["position"]) for s in scenes
    ]
    images = [
        generate(pipe, prompts, seed, steps, guidance, truncation=truncation) for seed in seeds
    ]
    return shapes.score(np.concatenate(images), scenes * len(seeds))


def unconditional_scores(pipe, count: int = 64, steps: int = 25, seed: int = 0):
    """Sample `count` images; -> (scores, images): the fraction that show one recognisable shape
    in a colour other than the background's, and which colours and shapes appear among those."""
    out = pipe(
        batch_size=count,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    images = (np.asarray(out.images) * 255).round().astype(np.uint8)
    scenes = [shapes.read_scene(image) for image in images]
    clean = [scene for scene in scenes if scene is not None]
    scores = {
        "samples": count,
        "recognisable": len(clean) / count,
        "colours": sorted({scene["colour"] for scene in clean}),
        "shapes": sorted({scene["shape"] for scene in clean}),
        "backgrounds": sorted({scene["background"] for scene in clean}),
        "positions": sorted({scene["position"] for scene in clean}),
    }
    return scores, images


def image_grid(images: list, columns: int, scale: int = 2):
    """PIL images (row-major) -> one picture, `columns` wide, at `scale` times their size."""
    from PIL import Image

    S = shapes.SIZE
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * S, rows * S))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * S, (i // columns) * S))
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)


def held_out_grid(
    pipe, seed: int = 0, steps: int = 25, guidance: float = 4.0, truncation: float | None = None
):
    """A picture of the held-out triples: one column per triple, rows left / center / right, at
    twice the size."""
    scenes = prompt_scenes(list(shapes.HELD_OUT))
    prompts = [
        shapes.caption(s["colour"], s["shape"], s["background"], s["position"]) for s in scenes
    ]
    images = generate(pipe, prompts, seed, steps, guidance, "pil", truncation)
    # scenes run triple by triple, three positions each: transpose to one column per triple
    by_row = [
        images[triple * 3 + row] for row in range(3) for triple in range(len(shapes.HELD_OUT))
    ]
    return image_grid(by_row, columns=len(shapes.HELD_OUT))


# How each text-to-image model is scored and sampled (the command line's defaults for the embedded
# models, minildm/__main__.py's EMBEDDED_DEFAULTS, are the same). The tiny VQ-Diffusion samples best
# with mild guidance and truncation: over guidance {1, 2, 3, 4} x truncation {0.8, 0.9, 1.0}, 72
# held-out images each, all four attributes right in 0.986 at 2.0 / 0.9 against 0.472 at 4.0 / 1.0,
# the settings it was first scored at (README, tiny-vq-diffusion: stray codes around the shape).
# Truncation (Tang et al. 2022, "Improved Vector Quantized Diffusion Models") keeps at each step
# only the most likely codes, up to that share of the probability.
SAMPLING = {
    "sd": {"guidance": 4.0},
    "ldm": {"guidance": 4.0},
    "vq-diffusion": {"guidance": 2.0, "truncation": 0.9},
}

# six training triples for the "seen" table: every colour, every shape, varied backgrounds
SEEN_TRIPLES = [
    ("red", "circle", "blue"),
    ("green", "square", "white"),
    ("blue", "triangle", "yellow"),
    ("yellow", "circle", "purple"),
    ("purple", "square", "orange"),
    ("orange", "triangle", "gray"),
]


# the scheduler_config.json each system's folder ships
SCHEDULER_CONFIGS = {
    "sd": SCHEDULER_CONFIG,
    "ldm": SCHEDULER_CONFIG,
    "ldm-uncond": UNCOND_SCHEDULER_CONFIG,
    "vq-diffusion": VQ_SCHEDULER_CONFIG,
}


# --- the whole run --------------------------------------------------------------------------------


def host_description() -> str:
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        + ("thread, " if torch.get_num_threads() == 1 else "threads, ")
        + ("AVX-512 with native bf16" if bf16 else "no native bf16 (AVX2-class)")
        + f", torch {torch.__version__}"
    )


def reused_folders(system: str, autoencoder_from) -> dict:
    """The shipped models a system builds on, checked before any work: ldm reuses the tiny SD's
    autoencoder, vq-diffusion the tiny unconditional LDM's VQ autoencoder and the tiny SD's CLIP."""
    wanted = {}
    if system == "ldm":
        wanted["autoencoder"] = Path(autoencoder_from or ASSETS / "tiny-sd") / "vae"
    elif system == "vq-diffusion":
        wanted["autoencoder"] = Path(autoencoder_from or ASSETS / "tiny-ldm-uncond") / "vqvae"
        wanted["text_encoder"] = ASSETS / "tiny-sd" / "text_encoder"
        wanted["tokenizer"] = ASSETS / "tiny-sd" / "tokenizer"
    elif system == "ldm-uncond" and autoencoder_from is not None:
        # a second UNet on the same latents: only the UNet is trained
        wanted["autoencoder"] = Path(autoencoder_from) / "vqvae"
    elif autoencoder_from is not None:
        raise ValueError(
            f"train {system} trains its own autoencoder: --autoencoder is for ldm, ldm-uncond "
            "and vq-diffusion"
        )
    for name, folder in wanted.items():
        if not folder.is_dir():
            raise ValueError(
                f"train {system} builds on {folder} ({name}), which does not exist: give "
                "--autoencoder the pipeline folder of a finished `train "
                f"{'sd' if system == 'ldm' else 'ldm-uncond'}` run"
            )
    if "autoencoder" in wanted:  # its kind and codebook, from config.json, before any work
        config = read_config(wanted["autoencoder"])
        kind = "AutoencoderKL" if system == "ldm" else "VQModel"
        if config.get("_class_name") != kind:
            raise ValueError(
                f"train {system} needs a {kind} autoencoder, and {wanted['autoencoder']} holds a "
                f"{config.get('_class_name')!r}"
            )
        codes = config.get("num_vq_embeddings")
        if system == "vq-diffusion" and codes + 1 != TRANSFORMER.num_classes:
            raise ValueError(
                f"{wanted['autoencoder']} has {codes} codes; the tiny VQ-Diffusion transformer "
                f"is built for {TRANSFORMER.num_classes - 1}"
            )
    return wanted


def train(
    system: str,
    out,
    minutes: float | None = None,
    seed: int = 0,
    quick: bool = False,
    autoencoder_from=None,
) -> dict:
    """Train the tiny `system` into `out` (see the module docstring). Returns training.json's
    content."""
    if system not in SYSTEMS:
        raise ValueError(f"train {system!r}: expected one of {', '.join(SYSTEMS)}")
    if minutes is None:
        minutes = QUICK_MINUTES if quick else DEFAULT_MINUTES[system]
    if not (isinstance(minutes, (int, float)) and minutes > 0 and math.isfinite(minutes)):
        raise ValueError(
            f"--minutes must be a positive number of minutes of training, got {minutes!r}"
        )
    out = Path(out)
    reused = reused_folders(system, autoencoder_from)
    settings = Settings(system, float(minutes), seed, quick, "autoencoder" in reused)
    checkpoint = check_output_folder(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    command = f"python -m minildm train {system} --out {out} --minutes {minutes:g} --seed {seed}"
    if autoencoder_from is not None:
        command += f" --autoencoder {autoencoder_from}"
    command += " --quick" if quick else ""
    (out / MARKER).write_text(
        json.dumps({"trainer": f"minildm train {system}", "command": command}, indent=2) + "\n"
    )
    started = time.perf_counter()
    torch.manual_seed(seed)
    state = checkpoint or {
        "system": system,
        "sizes": json.dumps(settings.sizes()),
        "quick": quick,
        "seed": seed,
    }
    history = json.loads(state["history"]) if "history" in state else {}
    run = dict(settings=settings, state=state, out=out, history=history)
    print(
        f"{'resuming' if checkpoint else 'training'} tiny {system} in {out}: {minutes:g} min, "
        f"seed {seed}{', quick' if quick else ''}; host: {host_description()}",
        flush=True,
    )
    budget_s = settings.minutes * 60
    autoencoder_s = budget_s * settings.autoencoder_share

    # (N, 64, 64, 3) uint8, training triples only
    images, scenes = shapes.make_dataset(settings.images, seed)
    images = torch.from_numpy(images)

    # --- stage 1: the autoencoder, trained here or reused
    if system == "sd":
        autoencoder = AutoencoderKL(settings.models["vae"]).to(memory_format=torch.channels_last)
        start_nearly_deterministic(autoencoder)  # a resumed run loads its weights over this
        loss = kl_autoencoder_loss(autoencoder, images, settings)
        stage = "vae"
    elif system == "ldm-uncond" and "autoencoder" not in reused:
        autoencoder = VQModel(settings.models["vqvae"]).to(memory_format=torch.channels_last)
        loss = vq_autoencoder_loss(autoencoder, images, settings, fresh="vqvae" not in state)
        stage = "vqvae"
    else:
        autoencoder = load_component(reused["autoencoder"]).to(memory_format=torch.channels_last)
        stage = None
    if stage is not None:
        train_stage(
            stage,
            {stage: autoencoder},
            loss,
            run,
            lr=settings.vae_lr,
            batch=settings.vae_batch,
            budget_s=autoencoder_s,
            max_steps=settings.max_steps,
            seed=seed,
        )
    autoencoder.eval().requires_grad_(False)

    if "latents" not in state:
        latents = encode_dataset(autoencoder, images)
        if system == "sd":
            # SD's scale_factor: 1 / std of the latents, so the diffusion model sees unit variance
            # (Rombach et al. 2022, arXiv:2112.10752, appendix D.1: 0.18215 for SD's autoencoder,
            # measured the same way)
            sampled = latents["means"] + latents["stds"] * torch.randn(
                latents["means"].shape, generator=torch.Generator().manual_seed(seed)
            )
            scale = round(float(1.0 / sampled.std()), 5)
        else:  # the reused autoencoder's own factor (1.0 for the VQ latents, as the original LDM)
            scale = autoencoder.config.scaling_factor
        state.update(latents=latents, scaling_factor=scale)
    latents = state["latents"]
    scale = state["scaling_factor"]
    if system == "sd":
        autoencoder.config = replace(autoencoder.config, scaling_factor=scale)
    if stage == "vqvae":  # written now: vq-diffusion can start from it while the UNet trains
        save_component(out / "vqvae", autoencoder)
    print(
        f"latents cached: {tuple(latents['means'].shape)}, std {latents['means'].std():.3f}, "
        f"scaling factor {scale:.5f}",
        flush=True,
    )

    # --- stage 2: the denoising model (and, for sd and ldm, the text encoder with it)
    if system in ("sd", "ldm"):
        if system == "sd":
            tokenizer = CLIPTokenizer(max_length=settings.models["text_encoder"].max_length)
            text_name, text_encoder = "text_encoder", CLIPTextModel(settings.models["text_encoder"])
        else:
            tokenizer = BertTokenizer(max_length=settings.models["bert"].max_length)
            text_name, text_encoder = "bert", LDMBert(settings.models["bert"])
        unet = UNet(settings.models["unet"])
        models = {"unet": unet, text_name: text_encoder}
        loss = epsilon_loss(
            unet,
            text_encoder,
            (latents["means"], latents["stds"], scale),
            caption_table(scenes, tokenizer),
            SCHEDULE,
            settings,
        )
    elif system == "ldm-uncond":
        tokenizer = None
        unet = UNet(settings.models["unet"])
        models = {"unet": unet}
        loss = epsilon_loss(
            unet, None, (latents["means"], latents["stds"], scale), None, UNCOND_SCHEDULE, settings
        )
    else:
        text_encoder = load_component(reused["text_encoder"]).eval().requires_grad_(False)
        tokenizer = load_tokenizer(reused["tokenizer"])
        transformer = VQTransformer(settings.models["transformer"])
        embeddings = LearnedClassifierFreeEmbeddings(
            length=tokenizer.max_length, hidden_size=text_encoder.config.width
        )
        with torch.no_grad():  # start from the empty caption's own encoding
            embeddings.embeddings.copy_(text_context(text_encoder, tokenizer([""]))[0])
        models = {
            "transformer": transformer,
            "learned_classifier_free_sampling_embeddings": embeddings,
        }
        loss = vq_diffusion_loss(
            transformer,
            embeddings,
            text_encoder,
            latents["codes"],
            caption_table(scenes, tokenizer),
            settings,
        )
    train_stage(
        "unet" if system != "vq-diffusion" else "transformer",
        models,
        loss,
        run,
        lr=settings.unet_lr,
        batch=settings.unet_batch,
        budget_s=budget_s - autoencoder_s,
        max_steps=settings.max_steps,
        seed=seed + 1,
        ema_decay=settings.ema_decay,
        clip_norm=1.0,
    )
    for module in models.values():
        module.requires_grad_(False)

    # --- the folder, read back as a user would (fp16 weights), with the folder's scheduler
    components = dict(models)
    if system == "sd":
        components["vae"] = autoencoder
    elif "autoencoder" in reused:
        components["vqvae"] = reused["autoencoder"]
    else:
        components["vqvae"] = autoencoder
    if system == "vq-diffusion":
        components["text_encoder"] = reused["text_encoder"]
        tokenizer = reused["tokenizer"]
    save_pipeline_folder(
        out, system, components, tokenizer, scheduler_config=SCHEDULER_CONFIGS[system]
    )
    print("saved the pipeline folder; evaluating", flush=True)
    report = evaluate(out, system, settings, state, reused)
    report.update(command=command, scaling_factor=scale, history=history)
    report["latent_std"] = round(float(latents["means"].std()), 4)
    every_model = dict(models)
    every_model["vae" if system == "sd" else "vqvae"] = autoencoder
    if system == "vq-diffusion":
        every_model["text_encoder"] = text_encoder
    sources = {"vqvae": reused.get("autoencoder"), "text_encoder": reused.get("text_encoder")}
    report["parameters"] = {
        name: sum(p.numel() for p in module.parameters()) for name, module in every_model.items()
    }
    report["models"] = [
        describe_model(name, module, sources.get(name)) for name, module in every_model.items()
    ]
    report["wall_minutes"] = round((time.perf_counter() - started) / 60, 1)
    (out / MARKER).write_text(
        json.dumps({"trainer": f"minildm train {system}", **report}, indent=2) + "\n"
    )
    (out / "README.md").write_text(folder_readme(report))
    return report


def evaluate(out: Path, system: str, settings: Settings, state: dict, reused: dict) -> dict:
    """Scores and samples.png of the saved folder."""
    quick = settings.quick
    stages = [name for name in ("vae", "vqvae", "unet", "transformer") if name in state]
    report = {
        "system": system,
        "seed": settings.seed,
        "minutes": settings.minutes,
        "quick": quick,
        "host": host_description(),
        "training_minutes": round(sum(state[name]["seconds"] for name in stages) / 60, 1),
        "steps": {name: state[name]["step"] for name in stages},
        "sizes": settings.sizes(),
    }
    pipeline = {
        "sd": StableDiffusionPipeline,
        "ldm": LDMTextToImagePipeline,
        "ldm-uncond": LDMPipeline,
        "vq-diffusion": VQDiffusionPipeline,
    }[system]
    pipe = pipeline.from_pretrained(out)
    if system in ("sd", "ldm-uncond"):
        report["autoencoder_scores"] = autoencoder_scores(
            pipe.vqvae if system != "sd" else pipe.vae
        )
        print(shapes.format_scores("autoencoder (all triples)", report["autoencoder_scores"]))
    if system == "ldm-uncond":
        if quick:
            count, steps = 8, 5
        else:
            count, steps = 64, 25
        scores, images = unconditional_scores(pipe, count=count, steps=steps)
        report.update(evaluation_steps=steps, unconditional_scores=scores)
        from PIL import Image

        image_grid([Image.fromarray(image) for image in images], columns=8).save(
            out / "samples.png", optimize=True
        )
        print(f"unconditional samples: {scores}", flush=True)
        return report
    # VQ-Diffusion samples its whole chain (50 steps); the UNets are scored at 25 DDIM steps
    sampling = SAMPLING[system]
    if system == "vq-diffusion":
        steps = TRANSFORMER.num_timesteps
    elif quick:
        steps = 5
    else:
        steps = 25
    seeds = (0,) if quick else (0, 1)
    held_out = list(shapes.HELD_OUT[:2]) if quick else list(shapes.HELD_OUT)
    seen = SEEN_TRIPLES[:2] if quick else SEEN_TRIPLES
    report.update(
        evaluation_steps=steps,
        evaluation_seeds=list(seeds),
        held_out_triples=len(held_out),
        sampling=sampling,
        held_out_scores=pipeline_scores(pipe, held_out, seeds, steps, **sampling),
        seen_triples=len(seen),
        seen_scores=pipeline_scores(pipe, seen, seeds, steps, **sampling),
    )
    held_out_grid(pipe, steps=steps, **sampling).save(out / "samples.png", optimize=True)
    for title, key in [("held-out triples", "held_out_scores"), ("seen triples", "seen_scores")]:
        print(shapes.format_scores(title, report[key]), flush=True)
    return report


def train_sd(out, minutes: float | None = None, seed: int = 0, quick: bool = False) -> dict:
    """Train the tiny Stable Diffusion (the shipped minildm/assets/tiny-sd)."""
    return train("sd", out, minutes=minutes, seed=seed, quick=quick)


SYSTEM_TITLES = {
    "sd": "Stable Diffusion v1",
    "ldm": "the CompVis LDM text-to-image model (LDMBert)",
    "ldm-uncond": "the unconditional LDM (VQ autoencoder)",
    "vq-diffusion": "VQ-Diffusion",
}


def _score_row(scores: dict) -> str:
    return " | ".join(f"{scores[name]:.3f}" for name in shapes.ATTRIBUTES + ("all",)) + " |"


def _display(path: Path) -> str:
    """A path as a reader of the folder's README can follow it: relative to the repository if
    inside."""
    try:
        return str(Path(path).resolve().relative_to(ASSETS.parent.parent))
    except ValueError:
        return str(path)


def describe_model(name: str, module, reused_from: Path | None) -> str:
    """One README line for a model of the folder: its diffusers class, size and parameters."""
    config = module.config if hasattr(module, "config") else None
    if isinstance(module, (AutoencoderKL, VQModel)):
        kind = "VQModel" if config.is_vq else "AutoencoderKL"
        detail = f"block_out_channels {config.channels}, f{config.downsampling_factor}"
        if config.is_vq:
            detail += f", {config.codebook_size} codes of {config.code_dim} channels"
    elif isinstance(module, UNet):
        kind = "UNet2DModel" if config.context_dim is None else "UNet2DConditionModel"
        where = "self-attention" if config.context_dim is None else "cross-attention"
        detail = (
            f"block_out_channels {config.channels}, {where} at levels {config.attention_levels}"
        )
    elif isinstance(module, CLIPTextModel):
        kind = "CLIPTextModel"
        detail = f"width {config.width}, {config.layers} layers, {config.max_length} positions"
    elif isinstance(module, LDMBert):
        kind = "LDMBertModel"
        detail = (
            f"width {config.width}, {config.layers} layers, BERT's WordPiece vocabulary, "
            f"{config.max_length} positions"
        )
    elif isinstance(module, VQTransformer):
        kind = "Transformer2DModel (discrete)"
        detail = (
            f"{config.layers} blocks of {config.channels} channels over the {config.height}x"
            f"{config.width} code grid, {config.num_timesteps} diffusion steps"
        )
    else:
        kind = "LearnedClassifierFreeSamplingEmbeddings"
        detail = "the learned empty caption"
    count = sum(p.numel() for p in module.parameters())
    reused = f", reused unchanged from {_display(reused_from)}" if reused_from is not None else ""
    return f"- {name}: `{kind}`, {detail}, {count:,} parameters{reused}"


def folder_readme(report: dict) -> str:
    """The shipped folder's README: how it was made and what it scores."""
    system = report["system"]
    million = sum(report["parameters"].values()) / 1e6
    steps = ", ".join(f"{count} {name} steps" for name, count in report["steps"].items())
    title = f"tiny-{system}: {SYSTEM_TITLES[system]} at {million:.1f} M parameters"
    scheduler = SCHEDULER_CONFIGS[system]["_class_name"]
    text = f"""# {title}, trained by minildm on the shapes world

Made by `{report["command"]}` (minildm/train.py), seed {report["seed"]},
on {report["host"]}: {report["training_minutes"]} min of training ({steps}),
{report["wall_minutes"]} min in all with drawing, caching and scoring.

Models, in diffusers' layout, fp16 weights:
{chr(10).join(report["models"])}
- scheduler: {scheduler}; latent scaling factor {report["scaling_factor"]:.5f}

"""
    if "autoencoder_scores" in report:
        text += f"""Autoencoder round trip (every triple and position; minildm/shapes.py's scorer):

| colour | shape | background | position | all four |
|---|---|---|---|---|
| {_score_row(report["autoencoder_scores"])}

"""
    if system == "ldm-uncond":
        s = report["unconditional_scores"]
        sampling = f"{s['samples']}, {report['evaluation_steps']} DDIM steps, seed 0"
        text += f"""Unconditional samples ({sampling}):
{s["recognisable"]:.3f} show one recognisable shape whose colour differs from its background
(`minildm.shapes.read_scene`); colours among them: {", ".join(s["colours"])}; shapes:
{", ".join(s["shapes"])}; backgrounds: {", ".join(s["backgrounds"])}.

![the 64 samples](samples.png)
"""
        return text
    sampler = "steps of its 50-step chain" if system == "vq-diffusion" else "DDIM steps"
    seeds = len(report["evaluation_seeds"])
    evaluation = (
        f"{report['evaluation_steps']} {sampler}, guidance 4.0, 3 positions x {seeds} seeds"
    )
    held_out = f"{report['held_out_triples']} held-out triples (never seen in training)"
    text += f"""Scores ({evaluation}):

| images | colour | shape | background | position | all four |
|---|---|---|---|---|---|
| {held_out} | {_score_row(report["held_out_scores"])}
| {report["seen_triples"]} training triples | {_score_row(report["seen_scores"])}

![the 12 held-out triples, left / center / right, seed 0](samples.png)

`samples.png`: the 12 held-out (colour, shape, background) triples, one per column, in the order of
`minildm.shapes.HELD_OUT` (red triangle on white first), left / center / right by row; seed 0,
guidance 4.0, shown at twice their 64x64 size. `training.json` holds the run's settings, loss
curves and scores.
"""
    return text


def main_train(
    system: str,
    out: str,
    minutes: float | None,
    seed: int,
    quick: bool,
    autoencoder_from: str | None = None,
) -> int:
    train(system, out, minutes=minutes, seed=seed, quick=quick, autoencoder_from=autoencoder_from)
    return 0
