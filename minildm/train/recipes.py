"""The embedded models' recipes: their sizes, noise schedules and training settings (what
nanoGPT keeps in config/). train/run.py builds a run from these; `--quick` swaps in the QUICK_
sizes and a fixed number of steps, to check the whole path in about a minute.
"""

from dataclasses import asdict, replace

from minildm.autoencoder import AutoencoderConfig
from minildm.clip import CLIPTextConfig
from minildm.ldm_bert import LDMBertConfig
from minildm.unet import UNetConfig
from minildm.vq_transformer import VQTransformerConfig

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
        self.autoencoder_share = {"sd": 0.5, "ldm": 0.0, "ldm-uncond": 0.6, "vq-diffusion": 0.0}[
            system
        ]
        if reuse_autoencoder:
            self.autoencoder_share = 0.0
        # the tiny SD's autoencoder also learns other colours and outlines (shapes.py,
        # other_drawing): this share of its drawings, never the UNet's (with a quarter of them
        # and 0.4 of 84 minutes it still decoded pink half the time as purple, and no star)
        self.other_share = 0.4 if system == "sd" else 0.0
        # drawn once; the second stage sees each image about 30 times, newly noised each time
        self.images = 1024 if quick else 10000
        self.vae_batch = 16  # small batches, many updates: they helped most in our measurements
        self.vae_lr = 1e-3
        self.unet_batch = 64
        self.unet_lr = 1e-3
        self.kl_weight = 1e-6
        self.commitment_weight = 0.25  # beta of the VQ-VAE loss (van den Oord et al. 2017, eq. 3)
        # VQ-Diffusion's auxiliary x0 term: loop.py's vq_diffusion_loss says why it is above 5e-4
        self.auxiliary_weight = 1.0
        self.caption_dropout = 0.1  # empty caption: the unconditional prediction for guidance
        self.background_dropout = 0.1  # "a red circle" alone: any background
        self.ema_decay = 0.999
        self.checkpoint_every = 120 if quick else 300  # seconds
        self.max_steps = QUICK_STEPS if quick else None  # per stage; otherwise the minutes decide

    def sizes(self) -> dict:
        """The model configs, as stored in checkpoints and compared on resume."""
        return {name: asdict(config) for name, config in self.models.items()}


# How each text-to-image model is scored and sampled (the command line's defaults for the embedded
# models, tools/generate.py's EMBEDDED_DEFAULTS, are the same). The tiny VQ-Diffusion samples best
# with mild guidance and truncation: over guidance {1, 2, 3, 4} x truncation {0.8, 0.9, 1.0}, 72
# held-out images each, all four attributes right in 0.986 at 2.0 / 0.9 against 0.472 at 4.0 / 1.0,
# the settings it was first scored at (docs/embedded-models.md, tiny-vq-diffusion: stray codes
# around the shape).
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
