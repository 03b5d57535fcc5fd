"""A whole training run: the stages of one system in order, then evaluation and the folder.

    python -m minildm train sd --out runs/tiny-sd --minutes 80 --seed 0
    python -m minildm train ldm --out runs/tiny-ldm --minutes 30 --seed 0
    python -m minildm train ldm-uncond --out runs/tiny-ldm-uncond --minutes 42 --seed 0
    python -m minildm train vq-diffusion --out runs/tiny-vq-diffusion --minutes 32 --seed 0

Stage 1 trains the autoencoder, or reuses a finished one: ldm builds on the tiny SD's KL
autoencoder (both systems use a KL-f8 autoencoder), vq-diffusion on the tiny unconditional LDM's
VQ autoencoder and the tiny SD's CLIP, frozen. The training set is then encoded once, and stage 2
trains the denoising model on the cached latents (with the text encoder, for sd and ldm: LDMBert
is trained from scratch with the UNet, as the original was). The loop and the losses are in
train/loop.py, the sizes and settings in train/recipes.py.

Time, not steps, is the budget: `--minutes` is shared between the stages, and the learning rate
follows each stage's time, so a slower machine takes fewer steps but still ends with a decayed
learning rate. A checkpoint is written every few minutes; running the same command again resumes
from it.

The output folder is a diffusers-layout pipeline folder that both minildm's and diffusers' matching
pipeline load (checkpoints/save.py), plus training.json (the run's settings, losses and scores),
README.md, samples.png (train/evaluate.py) and checkpoint.pt.

Under torchrun every rank runs this same function; train/distributed.py splits each batch between
them, and only rank 0 writes the folder, prints and evaluates.
"""

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from minildm import shapes
from minildm.autoencoder import AutoencoderKL, VQModel
from minildm.checkpoints.files import check_writable_folder, write_text
from minildm.checkpoints.load import load_component, load_tokenizer
from minildm.checkpoints.save import save_component, save_pipeline_folder
from minildm.checkpoints.weights import read_config
from minildm.clip import CLIPTextModel
from minildm.ldm_bert import LDMBert
from minildm.tokenizer import ASSETS, BertTokenizer, CLIPTokenizer
from minildm.train import distributed
from minildm.train.evaluate import describe_model, evaluate, folder_readme, host_description
from minildm.train.loop import (
    epsilon_loss,
    kl_autoencoder_loss,
    start_nearly_deterministic,
    text_context,
    to_model_input,
    train_stage,
    vq_autoencoder_loss,
    vq_diffusion_loss,
)
from minildm.train.recipes import (
    DEFAULT_MINUTES,
    QUICK_MINUTES,
    SCHEDULE,
    SCHEDULER_CONFIGS,
    SYSTEMS,
    TRANSFORMER,
    UNCOND_SCHEDULE,
    Settings,
)
from minildm.train.timeline import SYSTEMS as TIMELINE_SYSTEMS
from minildm.train.timeline import Timeline
from minildm.unet import UNet
from minildm.vq_transformer import LearnedClassifierFreeEmbeddings, VQTransformer

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
    check_writable_folder(out, "--out")  # made now: an unwritable --out fails before any work
    if not any(out.iterdir()):
        return None
    if not (out / MARKER).is_file():
        raise ValueError(
            f"--out {out} exists and is not a minildm training folder (it has no {MARKER}): "
            "give a new folder, or the folder of a run to resume"
        )
    path = out / "checkpoint.pt"
    if not path.is_file():
        print(f"{out} stopped before its first checkpoint: starting it again", flush=True)
        return None
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


# --- the whole run --------------------------------------------------------------------------------


def train(
    system: str,
    out,
    minutes: float | None = None,
    seed: int = 0,
    quick: bool = False,
    autoencoder_from=None,
    timeline_minutes: float | None = None,
    steps: int | None = None,
) -> dict | None:
    """Train the tiny `system` into `out` (see the module docstring). Returns training.json's
    content (under torchrun: rank 0; the other ranks None). `steps`: each stage stops after that
    many steps, or sooner when its share of the minutes is spent."""
    distributed.start()  # under torchrun: join the other ranks (train/distributed.py)
    if system not in SYSTEMS:
        raise ValueError(f"train {system!r}: expected one of {', '.join(SYSTEMS)}")
    if minutes is None:
        minutes = QUICK_MINUTES if quick else DEFAULT_MINUTES[system]
    if not (isinstance(minutes, (int, float)) and minutes > 0 and math.isfinite(minutes)):
        raise ValueError(
            f"--minutes must be a positive number of minutes of training, got {minutes!r}"
        )
    out = Path(out)
    timeline = None
    if timeline_minutes is not None:
        if not (timeline_minutes > 0 and math.isfinite(timeline_minutes)):
            raise ValueError(
                f"--timeline must be a positive number of minutes between points, got "
                f"{timeline_minutes!r}"
            )
        if system not in TIMELINE_SYSTEMS:
            raise ValueError(
                f"--timeline records text-to-image samples: it is kept for "
                f"{' and '.join(TIMELINE_SYSTEMS)}, not {system}"
            )
    if steps is not None and not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"--steps must be a positive number of steps per stage, got {steps!r}")
    reused = reused_folders(system, autoencoder_from)
    settings = Settings(system, float(minutes), seed, quick, "autoencoder" in reused)
    settings.max_steps = steps or settings.max_steps
    distributed.check_batch(settings.unet_batch, f"train {system}")
    distributed.check_batch(settings.vae_batch, f"train {system}'s autoencoder")
    checkpoint = check_output_folder(out, settings)
    distributed.barrier()  # every rank has read the folder before rank 0 writes to it
    main = distributed.is_main()
    if timeline_minutes is not None and main:
        timeline = Timeline(out, system, timeline_minutes, resuming=checkpoint is not None)
    command = f"python -m minildm train {system} --out {out} --minutes {minutes:g} --seed {seed}"
    if autoencoder_from is not None:
        command += f" --autoencoder {autoencoder_from}"
    command += " --quick" if quick else ""
    command += f" --steps {steps}" if steps is not None else ""
    command += f" --timeline {timeline_minutes:g}" if timeline_minutes is not None else ""
    if main:
        write_text(
            out / MARKER,
            json.dumps({"trainer": f"minildm train {system}", "command": command}, indent=2) + "\n",
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
    processes = f", {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    if main:
        print(
            f"{'resuming' if checkpoint else 'training'} tiny {system} in {out}: {minutes:g} min, "
            f"seed {seed}{', quick' if quick else ''}{processes}; host: {host_description()}",
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
        # the world's drawings and other colours and outlines (shapes.py; settings.other_share)
        extra = round(len(images) * settings.other_share / (1 - settings.other_share))
        others = torch.from_numpy(shapes.other_drawings(extra, seed + 1))
        loss = kl_autoencoder_loss(autoencoder, torch.cat([images, others]), settings)
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
    if stage == "vqvae" and main:  # written now: vq-diffusion can start from it meanwhile
        save_component(out / "vqvae", autoencoder)
    if main:
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
        if timeline is not None:
            timeline.prepare(
                autoencoder,
                text_encoder,
                tokenizer,
                unet,
                (latents["means"], latents["stds"], scale),
                caption_table(scenes, tokenizer),
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
        timeline=timeline,
    )
    for module in models.values():
        module.requires_grad_(False)
    if not main:
        return None  # rank 0 writes the folder and evaluates

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
    save_pipeline_folder(out, system, components, tokenizer, SCHEDULER_CONFIGS[system])
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
    write_text(
        out / MARKER, json.dumps({"trainer": f"minildm train {system}", **report}, indent=2) + "\n"
    )
    write_text(out / "README.md", folder_readme(report))
    return report


def train_sd(out, minutes: float | None = None, seed: int = 0, quick: bool = False) -> dict:
    """Train the tiny Stable Diffusion (the shipped minildm/assets/tiny-sd)."""
    return train("sd", out, minutes=minutes, seed=seed, quick=quick)


def main_train(
    system: str,
    out: str,
    minutes: float | None,
    seed: int,
    quick: bool,
    autoencoder_from: str | None = None,
    timeline_minutes: float | None = None,
    steps: int | None = None,
) -> int:
    try:
        train(
            system,
            out,
            minutes=minutes,
            seed=seed,
            quick=quick,
            autoencoder_from=autoencoder_from,
            timeline_minutes=timeline_minutes,
            steps=steps,
        )
    finally:
        distributed.stop()
    return 0
