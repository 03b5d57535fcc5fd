"""The generation commands: `sd`, `ldm`, `ldm-uncond` and `vq-diffusion` (and `sd --invert IMAGE`),
what `python -m minildm sd "a red circle on a blue background"` runs to write PNGs. In order:

1. check: all that can be checked before any weights load (minutes with the official ones): counts,
   seed, text, device, the output folder, --invert's image, what --weights names, and the
   scheduler, built from the folder's config and set to --steps; the file names are chosen now too;
2. load: the pipeline, with that scheduler in place of the folder's;
3. run: the pipeline's call with a progress line (--invert: DDIM inversion, then sampling back);
4. write: the PNGs, COMMAND_PROMPT_seedSEED_I.png, with a grid when there are several.

`--prompts FILE` runs 3-4 once per line of FILE on the one loaded pipeline; under torchrun the
lines are dealt out between the processes, and each image is the one a single process writes.

With no --weights the embedded tiny models run, at the settings they were scored at
(EMBEDDED_DEFAULTS); official weights get their own systems' defaults (OFFICIAL_DEFAULTS).
"""

import inspect
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

from minildm import shapes
from minildm.checkpoints.embeddings import read_embedding
from minildm.checkpoints.files import check_writable_folder, claim_files, write_file
from minildm.checkpoints.load import (
    build_scheduler,
    missing_model_index_message,
    read_component_config,
    read_scheduler_config,
    translated,
)
from minildm.checkpoints.lora import read_lora
from minildm.checkpoints.weights import resolve_folder, usable_device
from minildm.cpu_speed import warn_if_slow_precision
from minildm.pipelines.common import image_array
from minildm.train.distributed import rank, world_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_WEIGHTS = {
    "sd": "CompVis/stable-diffusion-v1-4",
    "ldm": "CompVis/ldm-text2im-large-256",
    "ldm-uncond": "CompVis/ldm-celebahq-256",
    "vq-diffusion": "microsoft/vq-diffusion-ithq",
}


# The embedded teaching models (minildm/assets/tiny-*, trained by minildm/train/ on the shapes
# world) run when no --weights are given, with the settings they were scored at; official weights
# get their own systems' defaults.
EMBEDDED_DEFAULTS = {
    "sd": {"steps": 25, "guidance": 4.0, "height": 64, "width": 64},
    "ldm": {"steps": 25, "guidance": 4.0, "height": 64, "width": 64},
    "ldm-uncond": {"steps": 25},
    # VQ-Diffusion's best measured settings (train/recipes.py, SAMPLING, says how they were found)
    "vq-diffusion": {"steps": 50, "guidance": 2.0, "truncation": 0.9},
}
# (height and width, for any --weights: the size the folder's UNet was trained at, trained_size)
OFFICIAL_DEFAULTS = {
    "sd": {"steps": 50, "guidance": 7.5},
    "ldm": {"steps": 50, "guidance": 1.0},
    "ldm-uncond": {"steps": 50},
    "vq-diffusion": {"steps": 100, "guidance": 5.0, "truncation": 1.0},
}


def generate(args):
    """The command: its checks, then the images. The thread count it may lower for the tiny
    models (use_one_thread_for_tiny_models) is restored after it, for callers in one process."""
    threads = torch.get_num_threads()
    try:
        generate_images(args)
    finally:
        torch.set_num_threads(threads)


def generate_images(args):
    check_generation_arguments(args)
    if getattr(args, "invert", None):
        check_inversion_arguments(args)
    # (prompt, seed) of each image set: one, or a line of --prompts each, this process's share
    jobs = [(getattr(args, "prompt", None), args.seed)]
    if getattr(args, "prompts", None):
        jobs = read_prompts(args.prompts, args.seed)[rank() :: world_size()]
        if not jobs:
            print(f"process {rank()} of {world_size()}: more processes than prompts, none here")
            return
    fill_defaults(args)
    check_weights_argument(args.command, args.weights)
    if getattr(args, "ema", None) is not None and not is_single_file(args.weights):
        raise ValueError(
            f"--ema {args.ema} chooses between the two UNets of an original single-file "
            f"checkpoint; {args.weights} is a pipeline folder, which holds one"
        )
    if args.command in ("sd", "ldm"):
        size = trained_size(args.command, args.weights)
        args.height = size if args.height is None else args.height
        args.width = size if args.width is None else args.width
    for args.prompt, args.seed in jobs:
        warn_about_unknown_words(args)
    use_one_thread_for_tiny_models(args)
    scheduler = plan_scheduler(args)
    args.prompt, args.seed = jobs[0]
    run = first_free_run(args)  # the names it will most likely get (checked again at the end)
    if world_size() > 1 and args.device == "cuda":
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # torchrun: a GPU per process
    print(f"loading {args.weights} ({args.dtype} on {args.device})")
    if torch.device(args.device).type == "cpu":
        from minildm.cpu_speed import retain_freed_memory

        retain_freed_memory()  # the whole process is this command's: no page faults per step
    pipe = load_pipeline(args, scheduler)
    model_calls = len(scheduler.timesteps)
    if model_calls != args.steps:
        print(
            f"{type(scheduler).__name__} calls the model {model_calls} times for {args.steps} steps"
        )
    for number, (args.prompt, args.seed) in enumerate(jobs):
        if len(jobs) > 1:
            print(f"{number + 1}/{len(jobs)}: {args.prompt!r}, seed {args.seed}")
        images = sample(pipe, args, progress_printer(args.steps, model_calls))
        print()
        if len(images) > 1:
            images = [*images, image_grid(images)]
        files = write_images(args, images, run if number == 0 else first_free_run(args))
        print(f"wrote {len(files)} file(s):")
        for path in files:
            print(f"  {path}")


def sample(pipe, args, progress) -> list:
    """The pipeline's call for args.prompt and args.seed: -> PIL images."""
    generator = torch.Generator().manual_seed(args.seed)
    if args.command == "ldm-uncond":
        return pipe(
            batch_size=args.n,
            generator=generator,
            num_inference_steps=args.steps,
            eta=args.eta,
            callback=progress,
        ).images
    if args.command == "vq-diffusion":
        return pipe(
            [args.prompt] * args.n,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            truncation_rate=args.truncation,
            generator=generator,
            callback=progress,
        ).images
    if args.command == "ldm":
        return pipe(
            [args.prompt] * args.n,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            eta=args.eta,
            generator=generator,
            callback=progress,
        ).images
    if getattr(args, "invert", None):
        return invert_and_sample(pipe, args, progress)
    output = pipe(
        args.prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative,
        num_images_per_prompt=args.n,
        eta=args.eta,
        generator=generator,
        callback=progress,
    )
    flags = output.nsfw_content_detected
    if flags and any(flags):
        flagged = [i for i, flag in enumerate(flags) if flag]
        print(f"\nthe safety checker flagged images {flagged} (kept as generated)")
    return output.images


# check: before any weights load


def check_generation_arguments(args):
    """What a generation command can check before loading any weights (which takes minutes with
    the official ones): counts, the seed, the text, the device and the output folder."""
    for option in ("weights", "out", "scheduler", "invert"):
        value = getattr(args, option, None)
        if value is not None and not value.strip():
            raise ValueError(
                f"--{option} is empty: give it a value, or leave it out for its default"
            )
    if args.n < 1:
        raise ValueError(f"-n is the number of images, at least 1; got {args.n}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must lie in [0, 2**63), got {args.seed}")
    for option in ("prompt", "negative"):
        check_utf8(getattr(args, option, None), option)
    prompts = getattr(args, "prompts", None)
    if args.command != "ldm-uncond" and (args.prompt is None) == (prompts is None):
        given = "both" if args.prompt is not None else "neither"
        raise ValueError(
            f"give a prompt or --prompts FILE (a file of prompts, one per line); {given} given"
        )
    check_device(args.device)
    warn_if_slow_precision(DTYPES[args.dtype], args.device)
    check_output_folder(Path(args.out))
    args.loras = [lora_argument(text) for text in getattr(args, "lora", None) or []]
    args.embeddings = [embedding_argument(text) for text in getattr(args, "embedding", None) or []]


def add_adapter_arguments(sd):
    """`sd`'s --lora and --embedding (checked by lora_argument and embedding_argument)."""
    sd.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="add a LoRA (diffusers/PEFT or kohya-ss layout) at SCALE (default 1.0); repeatable",
    )
    sd.add_argument(
        "--embedding",
        action="append",
        metavar="FILE[:TOKEN]",
        help="add a textual-inversion embedding (diffusers or AUTOMATIC1111 file) as TOKEN "
        "(default: the token the file names); repeatable",
    )


def lora_argument(text: str) -> tuple:
    """--lora FILE[:SCALE] -> (file, scale): the part after the last colon is a scale if it reads
    as a number (a file name may hold colons too). The file is read and checked now, before any
    weights load."""
    path, scale = text, 1.0
    head, _, tail = text.rpartition(":")
    if head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    if not math.isfinite(scale):
        raise ValueError(f"--lora {text}: the scale must be a finite number, got {scale}")
    if not Path(path).is_file():
        raise ValueError(
            f"--lora {path}: no such file (FILE or FILE:SCALE, e.g. star.safetensors:0.8)"
        )
    return read_lora(path), scale


def embedding_argument(text: str) -> tuple:
    """--embedding FILE[:TOKEN] -> (file, token or None), read and checked now."""
    path, token = text, None
    if not Path(text).is_file() and ":" in text:
        path, _, token = text.rpartition(":")
    if not Path(path).is_file():
        raise ValueError(f"--embedding {path}: no such file (FILE or FILE:TOKEN)")
    token, _ = read_embedding(path, token)  # refuses a damaged or ambiguous file now
    return path, token


def check_utf8(text: str | None, option: str):
    """Python hands a command-line byte that is not UTF-8 over as a lone surrogate U+DC80-U+DCFF
    (PEP 383); the tokenizer could only refuse it later, as a surrogate the user never typed."""
    if text is None:
        return
    for i, character in enumerate(text):
        if "\udc80" <= character <= "\udcff":
            byte = ord(character) - 0xDC00
            name = "the prompt" if option == "prompt" else f"--{option}"
            raise ValueError(
                f"{name} holds the byte 0x{byte:02X} at character {i + 1}, which is not UTF-8: "
                "pass the text in UTF-8 (check the terminal's or the script's encoding)"
            )


def add_prompt_arguments(parser):
    """PROMPT, or --prompts FILE (read by read_prompts), for the commands that take a prompt."""
    prompt_help = (
        "what the image should show (the embedded model knows only the shapes world's "
        "words: a colour, a shape, left/right, a background colour)"
    )
    parser.add_argument("prompt", nargs="?", help=prompt_help)
    parser.add_argument(
        "--prompts",
        metavar="FILE",
        help="instead of PROMPT: a UTF-8 file of prompts, one per line (blank lines and lines "
        "starting with # are skipped), each optionally ending in --seed N (otherwise --seed "
        "plus the prompt's number, from 0); under torchrun the processes share the lines",
    )


def read_prompts(path: str, first_seed: int) -> list:
    """--prompts FILE -> [(prompt, seed)], in the file's order, all checked before any weights
    load: the file is UTF-8, holds at least one prompt, each seed is valid and no (prompt, seed)
    comes twice (the same image twice, and two processes racing for one file name)."""
    if not Path(path).is_file():
        raise ValueError(f"--prompts {path}: no such file (a text file, one prompt per line)")
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"--prompts {path}: line {line} holds the byte 0x{data[e.start]:02X}, which is not "
            "UTF-8: save the file as UTF-8"
        ) from None
    jobs, seen = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt, seed = line, first_seed + len(jobs)
        match = re.fullmatch(r"(.*?)\s*--seed\s+(\S+)", line)
        if match:
            prompt, given = match.groups()
            if not given.isdigit() or int(given) >= 2**63:
                raise ValueError(
                    f"--prompts {path}, line {number}: --seed {given} is not a seed in [0, 2**63)"
                )
            seed = int(given)
        elif "--seed" in line:  # not silently part of the prompt
            raise ValueError(
                f"--prompts {path}, line {number}: --seed goes at the end of the line, followed "
                "by one number: PROMPT --seed N"
            )
        if not prompt:
            raise ValueError(f"--prompts {path}, line {number}: a --seed with no prompt before it")
        if (prompt, seed) in seen:
            raise ValueError(
                f"--prompts {path}, line {number}: the same prompt and seed as line "
                f"{seen[prompt, seed]}, so the same image: give it another --seed"
            )
        seen[prompt, seed] = number
        jobs.append((prompt, seed))
    if not jobs:
        raise ValueError(f"--prompts {path}: the file holds no prompt (one per line)")
    return jobs


def check_device(name: str):
    usable_device(name, "--device")


def check_output_folder(out: Path):
    """The folder must be one we can write the PNGs into: made now, so a bad --out fails at once."""
    check_writable_folder(out, "--out")


def check_inversion_arguments(args):
    """`sd --invert IMAGE`: the image, and the settings inversion fixes, before any weights load.
    Fills in what it decides: guidance 1.0, the DDIM scheduler, the image's size."""
    from PIL import Image, UnidentifiedImageError

    path = Path(args.invert)
    if not path.is_file():
        raise ValueError(f"--invert {path}: no such image file")
    try:
        with Image.open(path) as image:
            size = image.size  # (width, height)
            image_array(image)  # its mode's range, checked before the weights load
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--invert {path}: not an image PIL can read ({e})") from e
    except ValueError as e:
        raise ValueError(f"--invert {path}: {e}") from None
    if size[0] % 8 or size[1] % 8:
        raise ValueError(
            f"--invert {path}: {size[0]}x{size[1]} pixels; the autoencoder needs multiples of 8 "
            "(crop or resize the image first: minildm does not resize silently)"
        )
    fixed = [
        (args.n != 1, f"-n {args.n}: an inversion gives back one image"),
        (args.eta != 0, f"--eta {args.eta}: inversion follows DDIM's deterministic path (eta 0)"),
        (args.negative is not None, "--negative: the inversion encodes only the prompt"),
        (
            getattr(args, "prompts", None) is not None,
            "--prompts: it inverts one image, described by one prompt",
        ),
        (
            args.scheduler not in (None, "DDIMScheduler"),
            f"--scheduler {args.scheduler}: inversion runs DDIM backwards and samples with DDIM",
        ),
        (
            (args.height, args.width) not in ((None, None), (size[1], size[0])),
            f"--height/--width: the image is {size[1]}x{size[0]} (height x width)",
        ),
    ]
    for wrong, message in fixed:
        if wrong:
            raise ValueError(f"sd --invert does not take {message}")
    args.scheduler = "DDIMScheduler"
    args.height, args.width = size[1], size[0]
    if args.guidance is None:
        args.guidance = 1.0  # guidance bends the path away from the ODE the inversion follows


def fill_defaults(args):
    import minildm

    if args.weights is None:
        folder = minildm.TINY_MODELS[args.command]
        args.weights = str(folder)
        print(
            f"no --weights given: using the embedded {folder.name} model "
            f"({folder}; see its README.md)"
        )
        defaults = EMBEDDED_DEFAULTS[args.command]
    else:
        defaults = OFFICIAL_DEFAULTS[args.command]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def use_one_thread_for_tiny_models(args):
    """The embedded models are so small that torch's per-op overhead dominates: more threads only
    add synchronisation (an sd image took 22 s with torch's default threads on our busy 2-core
    machine against 4.4 s with one). One thread for them, unless OMP_NUM_THREADS says otherwise."""
    import os

    import minildm

    embedded = {folder.resolve() for folder in minildm.TINY_MODELS.values()}
    if "OMP_NUM_THREADS" not in os.environ and Path(args.weights).resolve() in embedded:
        torch.set_num_threads(1)


def warn_about_unknown_words(args):
    """The embedded models learned the shapes world's captions and no other words: one line names
    the prompt's words they never saw, before anything runs, and one says when the prompt names
    more than one shape (every training picture held one). Official weights (any --weights but the
    embedded folders) get no such lines."""
    import minildm

    embedded = {folder.resolve() for folder in minildm.TINY_MODELS.values()}
    if args.command == "ldm-uncond" or Path(args.weights).resolve() not in embedded:
        return
    texts = [args.prompt, getattr(args, "negative", None)]
    unknown = shapes.unknown_words(" ".join(text for text in texts if text))
    # an --embedding's token is a word the model now has
    learned = {
        w for _, token in getattr(args, "embeddings", []) for w in shapes.caption_words(token)
    }
    unknown = [word for word in unknown if word not in learned]
    if unknown:
        print(
            f"warning: the embedded {Path(args.weights).name} model never saw "
            f"{', '.join(repr(word) for word in unknown)} in training: it knows only the shapes "
            f"world's {len(shapes.VOCABULARY)} words ({', '.join(sorted(shapes.VOCABULARY))}; "
            "minildm/shapes.py), so expect an image that ignores them"
            + (" (unless a --lora taught them)" if getattr(args, "loras", None) else ""),
            file=sys.stderr,
        )
    named = shapes.shape_words(args.prompt)
    if len(named) > 1:
        print(
            f"warning: the embedded {Path(args.weights).name} model saw one shape per picture, "
            f"and the prompt names {len(named)} ({', '.join(named)}): expect the first, with the "
            "next colour word as the background",
            file=sys.stderr,
        )


def check_weights_argument(command: str, weights: str) -> Path:
    """--weights names something this command can load: a pipeline folder (or a cached repo id) for
    every system, an original single file for sd. Checked before anything loads; -> the folder or
    file."""
    path = Path(weights).expanduser()
    if path.is_file():
        if command == "sd" and is_single_file(weights):
            return path
        takes = (
            "a pipeline folder, a repo id in the Hugging Face cache, or an original "
            ".ckpt/.safetensors file"
            if command == "sd"
            else "a pipeline folder or a repo id in the Hugging Face cache"
        )
        raise ValueError(
            f"--weights {weights} is a {path.suffix or 'plain'} file: {command} takes {takes}"
        )
    folder = resolve_folder(weights)  # a missing folder or repo: FileNotFoundError with a hint
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(missing_model_index_message(folder))
    return folder


def trained_size(command: str, weights: str) -> int:
    """The image size the UNet of `weights` was trained at, sd and ldm: its sample_size times the
    autoencoder's downsampling factor, from the folder's configs (512 for SD v1, 256 for the LDM,
    64 for the embedded models); 512 for an original SD v1 single file."""
    from minildm.checkpoints.autoencoder import config_from_diffusers as autoencoder_config
    from minildm.checkpoints.unet import config_from_diffusers as unet_config

    if is_single_file(weights):
        return 512
    folder = resolve_folder(weights)
    unet_folder, autoencoder_folder = (
        folder / "unet",
        folder / ("vae" if command == "sd" else "vqvae"),
    )
    unet = translated(unet_config, read_component_config(unet_folder), unet_folder / "config.json")
    autoencoder = translated(
        autoencoder_config,
        read_component_config(autoencoder_folder),
        autoencoder_folder / "config.json",
    )
    return unet.sample_size * autoencoder.downsampling_factor


def is_single_file(weights: str) -> bool:
    path = Path(weights)
    return path.suffix in (".ckpt", ".safetensors") and path.is_file()


def plan_scheduler(args):
    """The scheduler the run will use, built from the folder's scheduler_config.json (or, for a
    single file, the values diffusers gives it) and set to --steps now, so that a bad --scheduler,
    a broken config or a step count the scheduler refuses is reported before the weights load."""
    from minildm import schedulers
    from minildm.pipelines.stable_diffusion import SINGLE_FILE_SCHEDULER

    if args.command == "sd" and is_single_file(args.weights):
        config = {"_class_name": "PNDMScheduler", **SINGLE_FILE_SCHEDULER}
        source = "the single file's default scheduler"
    else:
        folder = resolve_folder(args.weights) / "scheduler"
        config, source = read_scheduler_config(folder), folder / "scheduler_config.json"
    chosen = getattr(args, "scheduler", None)  # --scheduler (sd, ldm, ldm-uncond only)
    name = chosen or config.get("_class_name")
    if name not in schedulers.__all__:
        option = "--scheduler" if chosen else "the folder's scheduler"
        raise ValueError(
            f"{option}: unknown scheduler {name!r}; choose one of {schedulers.__all__}"
        )
    if name == "DDIMInverseScheduler":
        raise ValueError(
            "DDIMInverseScheduler runs from an image towards noise and cannot generate one: "
            "sd --invert IMAGE uses it (and DDIM to sample back)"
        )
    cls = getattr(schedulers, name)
    if chosen:
        # the new scheduler takes the folder's training schedule, as diffusers'
        # from_config(pipe.scheduler.config) does; the options of the folder's own scheduler (DDIM's
        # set_alpha_to_one, PNDM's skip_prk_steps) do not carry over, and are left out silently:
        # swapping the scheduler is what the user asked for
        accepted = inspect.signature(cls).parameters
        config = {key: value for key, value in config.items() if key in accepted}
    scheduler = build_scheduler(cls, config, source)
    scheduler.set_timesteps(args.steps)  # refuses what the scheduler cannot do, e.g. PNDM's 2 steps
    return scheduler


# load


def load_pipeline(args, scheduler):
    """The pipeline the command runs, with `scheduler` (built and checked by plan_scheduler before
    any weights load) in place of the folder's."""
    from minildm import pipelines

    dtype = DTYPES[args.dtype]
    if args.command == "sd" and is_single_file(args.weights):
        ema = None if args.ema is None else args.ema == "true"
        pipe = pipelines.StableDiffusionPipeline.from_single_file(
            args.weights, device=args.device, dtype=dtype, ema=ema
        )
    else:
        cls = {
            "sd": pipelines.StableDiffusionPipeline,
            "ldm": pipelines.LDMTextToImagePipeline,
            "ldm-uncond": pipelines.LDMPipeline,
            "vq-diffusion": pipelines.VQDiffusionPipeline,
        }[args.command]
        pipe = cls.from_pretrained(args.weights, device=args.device, dtype=dtype)
    pipe.scheduler = scheduler
    for path, token in getattr(args, "embeddings", []):
        print(f"embedding {path}: {pipe.load_embedding(path, token)!r}")
    for lora, scale in getattr(args, "loras", []):
        name = pipe.load_lora(lora.path, scale=scale)
        print(f"LoRA {lora.path}: {name!r} at scale {scale:g}")
    return pipe


# run


def progress_printer(steps: int, model_calls: int):
    """A callback printing the step reached and the time left. The pipelines call it once per model
    call,
    which is not always once per step: PNDM's warm-up makes 51 calls for 50 steps, Heun two a step.
    The line counts steps, as --steps does."""
    start = time.perf_counter()

    def report(i, t, sample):
        done = math.ceil((i + 1) * steps / model_calls)  # the steps these calls have completed
        rate = (i + 1) / (time.perf_counter() - start)
        left = (model_calls - i - 1) / rate
        print(f"\rstep {done}/{steps}  {left:.0f} s left ", end="", flush=True)

    return report


def invert_and_sample(pipe, args, progress) -> list:
    """DDIM inversion of --invert's image, then DDIM sampling from the latents it gives; prints
    how close the round trip comes."""
    import numpy as np
    from PIL import Image

    with Image.open(args.invert) as opened:
        original = image_array(opened)  # (H, W, 3) in [0, 1], 16-bit and float images included
    image = torch.from_numpy(original).permute(2, 0, 1)[None]  # (1, 3, H, W)
    print(f"inverting {args.invert} ({args.steps} steps, guidance {args.guidance:g})")
    latents = pipe.invert(image, args.prompt, args.steps, args.guidance, callback=progress)
    print(
        f"\nlatents {tuple(latents.shape)}, std {latents.float().std().item():.3f}; sampling back"
    )
    out = pipe(
        args.prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        latents=latents,
        callback=progress,
        output_type="np",
    )
    error = out.images[0] - original
    psnr = 10 * np.log10(1 / max(float(np.mean(error**2)), 1e-12))
    print(
        f"\nround trip against {args.invert}: PSNR {psnr:.1f} dB, "
        f"mean abs {np.abs(error).mean():.4f}, max abs {np.abs(error).max():.3f} "
        "(the autoencoder's own loss included)"
    )
    return [Image.fromarray((image * 255).round().astype("uint8")) for image in out.images]


# write


def output_names(args):
    """-> names(k): the PNGs run k of this command writes, COMMAND_PROMPT_seedSEED_I.png (k = 1)
    or COMMAND_PROMPT_seedSEED_runK_I.png, and a _grid.png for several images."""
    out = Path(args.out)
    command = "sd-invert" if getattr(args, "invert", None) else args.command
    stem = command if command == "ldm-uncond" else f"{command}_{slug(args.prompt)}"
    stem = f"{stem}_seed{args.seed}"

    def names(run: int) -> list:
        run_stem = stem if run == 1 else f"{stem}_run{run}"
        paths = [out / f"{run_stem}_{i}.png" for i in range(args.n)]
        return paths + [out / f"{run_stem}_grid.png"] if args.n > 1 else paths

    return names


def first_free_run(args) -> int:
    """The run whose names are all free now (1 with --overwrite, whose names are reused)."""
    names, run = output_names(args), 1
    while not args.overwrite and any(path.exists() for path in names(run)):
        run += 1
    return run


def output_files(args) -> list:
    """The PNGs this run plans to write, chosen before it runs. A run never overwrites another's:
    when any of the names is taken, the run gets the first free _runK suffix (write_images claims
    them exclusively at the end, and moves on if a concurrent run took them meanwhile)."""
    return output_names(args)(first_free_run(args))


def write_images(args, images: list, run: int) -> list:
    """Each PNG written whole under a temporary name, then given its final name (a full disk or
    Ctrl-C leaves no partial PNG). -> the paths written."""
    names = output_names(args)
    if not args.overwrite:
        return claim_files(
            lambda temporaries: [image.save(t) for image, t in zip(images, temporaries)],
            names,
            run,
        )
    planned = names(1)
    for image, path in zip(images, planned):
        write_file(path, image.save)
    # the files an earlier run of the same names wrote beyond this run's count (its _3.png, its
    # grid) are removed, so that the folder does not mix two runs
    stem = planned[0].name.rsplit("_", 1)[0]
    for old in sorted(Path(args.out).glob(f"{stem}_*.png")):
        if old not in planned and re.fullmatch(rf"{re.escape(stem)}_(\d+|grid)\.png", old.name):
            old.unlink()
            print(f"--overwrite: removed {old} (an earlier run's)")
    return planned


def slug(text: str, most: int = 40) -> str:
    """A file-name piece from a prompt: lower-case letters and digits, words joined by '-'."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    name = ""
    for word in words:
        if len(name) + len(word) + 1 > most:
            break
        name = f"{name}-{word}" if name else word
    return name or "prompt"


def image_grid(images):
    from PIL import Image

    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid
