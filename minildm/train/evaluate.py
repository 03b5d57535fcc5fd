"""Evaluating a trained folder: the shapes world's scorer reads back what was asked for.

The scores (autoencoder round trips of every triple, generated images of held-out and seen
triples, unconditional samples), the sample grids saved as samples.png, and what the folder tells
its reader: README.md (`folder_readme`) and the report that train/run.py writes as training.json.
"""

import math
import platform
from pathlib import Path

import numpy as np
import torch

from minildm import shapes
from minildm.autoencoder import AutoencoderKL, VQModel
from minildm.checkpoints.files import write_file
from minildm.clip import CLIPTextModel
from minildm.ldm_bert import LDMBert
from minildm.pipelines import (
    LDMPipeline,
    LDMTextToImagePipeline,
    StableDiffusionPipeline,
    VQDiffusionPipeline,
)
from minildm.tokenizer import ASSETS
from minildm.train.loop import to_model_input
from minildm.train.recipes import (
    SAMPLING,
    SCHEDULER_CONFIGS,
    SEEN_TRIPLES,
    TRANSFORMER,
    Settings,
)
from minildm.unet import UNet
from minildm.vq_transformer import VQTransformer


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


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

        grid = image_grid([Image.fromarray(image) for image in images], columns=8)
        write_file(out / "samples.png", lambda temporary: grid.save(temporary, optimize=True))
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
    grid = held_out_grid(pipe, steps=steps, **sampling)
    write_file(out / "samples.png", lambda temporary: grid.save(temporary, optimize=True))
    for title, key in [("held-out triples", "held_out_scores"), ("seen triples", "seen_scores")]:
        print(shapes.format_scores(title, report[key]), flush=True)
    return report


# --- the folder's README --------------------------------------------------------------------------


def host_description() -> str:
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        + ("thread, " if torch.get_num_threads() == 1 else "threads, ")
        + ("AVX-512 with native bf16" if bf16 else "no native bf16 (AVX2-class)")
        + f", torch {torch.__version__}"
    )


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

Made by `{report["command"]}` (minildm/train/), seed {report["seed"]},
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
