"""The command line: one subcommand per system, plus download, train and tokenize.

    python -m minildm sd "a red circle on a blue background"        SD v1.x, the embedded tiny model
    python -m minildm sd "an astronaut riding a horse" --weights DIR  ... with official weights
    python -m minildm ldm "A painting of a squirrel eating a burger"  LDM text-to-image
    python -m minildm ldm-uncond -n 4                                 LDM CelebA-HQ faces
    python -m minildm vq-diffusion "a teddy bear playing in the pool" VQ-Diffusion
    python -m minildm download stable-diffusion-v1-4 --dir weights    fetch + verify weights
    python -m minildm tokenize "a photograph of an astronaut riding a horse"
    python -m minildm train sd --out runs/tiny-sd                     retrain the tiny model
    python -m minildm trace sd "a red circle" --out ours.safetensors  record a parity trace
    python -m minildm compare ours.safetensors theirs.safetensors     find where two runs part

`--weights` takes a pipeline folder, a repo id already in the Hugging Face cache, or (for `sd`) an
original single-file checkpoint. Images are written as PNGs, with a grid when there are several.
"""

import argparse
import inspect
import math
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from minildm import __version__
from minildm.checkpoints.load import missing_model_index_message
from minildm.checkpoints.weights import read_json, resolve_folder
from minildm.cpu_speed import warn_if_slow_precision
from minildm.tokenizer import BertTokenizer, CLIPTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_WEIGHTS = {
    "sd": "CompVis/stable-diffusion-v1-4",
    "ldm": "CompVis/ldm-text2im-large-256",
    "ldm-uncond": "CompVis/ldm-celebahq-256",
    "vq-diffusion": "microsoft/vq-diffusion-ithq",
}


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
    return pipe


def is_single_file(weights: str) -> bool:
    path = Path(weights)
    return path.suffix in (".ckpt", ".safetensors") and path.is_file()


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


def plan_scheduler(args):
    """The scheduler the run will use, built from the folder's scheduler_config.json (or, for a
    single file, the values diffusers gives it) and set to --steps now, so that a bad --scheduler,
    a broken config or a step count the scheduler refuses is reported before the weights load."""
    from minildm import schedulers
    from minildm.pipelines.stable_diffusion import SINGLE_FILE_SCHEDULER

    if args.command == "sd" and is_single_file(args.weights):
        config = {"_class_name": "PNDMScheduler", **SINGLE_FILE_SCHEDULER}
    else:
        config = read_json(resolve_folder(args.weights) / "scheduler" / "scheduler_config.json")
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
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(args.steps)  # refuses what the scheduler cannot do, e.g. PNDM's 2 steps
    return scheduler


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


# The embedded teaching models (minildm/assets/tiny-*, trained by minildm/train.py on the shapes
# world) run when no --weights are given, with the settings they were scored at; official weights
# get their own systems' defaults.
EMBEDDED_DEFAULTS = {
    "sd": {"steps": 25, "guidance": 4.0, "height": 64, "width": 64},
    "ldm": {"steps": 25, "guidance": 4.0, "height": 64, "width": 64},
    "ldm-uncond": {"steps": 25},
    # VQ-Diffusion's best measured settings (minildm/train.py, SAMPLING, says how they were found)
    "vq-diffusion": {"steps": 50, "guidance": 2.0, "truncation": 0.9},
}
OFFICIAL_DEFAULTS = {
    "sd": {"steps": 50, "guidance": 7.5, "height": 512, "width": 512},
    "ldm": {"steps": 50, "guidance": 1.0, "height": 256, "width": 256},
    "ldm-uncond": {"steps": 50},
    "vq-diffusion": {"steps": 100, "guidance": 5.0, "truncation": 1.0},
}


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


def check_generation_arguments(args):
    """What a generation command can check before loading any weights (which takes minutes with
    the official ones): counts, the seed, the text, the device and the output folder."""
    if args.n < 1:
        raise ValueError(f"-n is the number of images, at least 1; got {args.n}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must lie in [0, 2**63), got {args.seed}")
    for option in ("prompt", "negative"):
        check_utf8(getattr(args, option, None), option)
    check_device(args.device)
    warn_if_slow_precision(DTYPES[args.dtype], args.device)
    check_output_folder(Path(args.out))


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


def check_device(name: str):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"--device {name!r} is not a device: expected cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: minildm runs on cpu or cuda")


def check_output_folder(out: Path):
    """The folder must be one we can write the PNGs into: made now, so a bad --out fails at once."""
    for path in [out, *out.parents]:
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {out}: {path} is a file, not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    # a file made and removed: os.access alone says yes to root, even on a read-only file system
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(
            f"--out {out}: cannot write into the folder ({e.strerror}); choose another --out"
        ) from None


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
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--invert {path}: not an image PIL can read ({e})") from e
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


def generate(args):
    check_generation_arguments(args)
    if getattr(args, "invert", None):
        check_inversion_arguments(args)
    fill_defaults(args)
    check_weights_argument(args.command, args.weights)
    scheduler = plan_scheduler(args)
    files = output_files(args)
    print(f"loading {args.weights} ({args.dtype} on {args.device})")
    if torch.device(args.device).type == "cpu":
        from minildm.cpu_speed import retain_freed_memory

        retain_freed_memory()  # the whole process is this command's: no page faults per step
    pipe = load_pipeline(args, scheduler)
    generator = torch.Generator().manual_seed(args.seed)
    model_calls = len(scheduler.timesteps)
    if model_calls != args.steps:
        print(
            f"{type(scheduler).__name__} calls the model {model_calls} times for {args.steps} steps"
        )
    progress = progress_printer(args.steps, model_calls)
    if args.command == "ldm-uncond":
        images = pipe(
            batch_size=args.n,
            generator=generator,
            num_inference_steps=args.steps,
            eta=args.eta,
            callback=progress,
        ).images
    elif args.command == "vq-diffusion":
        images = pipe(
            [args.prompt] * args.n,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            truncation_rate=args.truncation,
            generator=generator,
            callback=progress,
        ).images
    elif args.command == "ldm":
        images = pipe(
            [args.prompt] * args.n,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            eta=args.eta,
            generator=generator,
            callback=progress,
        ).images
    elif getattr(args, "invert", None):
        images = invert_and_sample(pipe, args, progress)
    else:
        images = pipe(
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
        flags = images.nsfw_content_detected
        if flags and any(flags):
            flagged = [i for i, flag in enumerate(flags) if flag]
            print(f"\nthe safety checker flagged images {flagged} (kept as generated)")
        images = images.images
    print()
    if len(images) > 1:
        images = [*images, image_grid(images)]
    for image, path in zip(images, files):
        image.save(path)
    print(f"wrote {len(files)} file(s):")
    for path in files:
        print(f"  {path}")


def invert_and_sample(pipe, args, progress) -> list:
    """DDIM inversion of --invert's image, then DDIM sampling from the latents it gives; prints
    how close the round trip comes."""
    import numpy as np
    from PIL import Image

    with Image.open(args.invert) as image:
        image = image.convert("RGB")
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
    original = np.asarray(image, dtype=np.float32) / 255
    error = out.images[0] - original
    psnr = 10 * np.log10(1 / max(float(np.mean(error**2)), 1e-12))
    print(
        f"\nround trip against {args.invert}: PSNR {psnr:.1f} dB, "
        f"mean abs {np.abs(error).mean():.4f}, max abs {np.abs(error).max():.3f} "
        "(the autoencoder's own loss included)"
    )
    return [Image.fromarray((image * 255).round().astype("uint8")) for image in out.images]


def slug(text: str, most: int = 40) -> str:
    """A file-name piece from a prompt: lower-case letters and digits, words joined by '-'."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    name = ""
    for word in words:
        if len(name) + len(word) + 1 > most:
            break
        name = f"{name}-{word}" if name else word
    return name or "prompt"


def output_files(args) -> list:
    """The PNGs this run will write, chosen before it runs: COMMAND_PROMPT_seedSEED_I.png, and a
    _grid.png for several images. A run never overwrites another's: when any of the names is taken,
    the run gets the first free _runK suffix. With --overwrite the names are reused, and the files
    an earlier run of the same names wrote beyond this run's count (its _3.png, its grid) are
    removed, so that the folder does not mix two runs."""
    out = Path(args.out)
    command = "sd-invert" if getattr(args, "invert", None) else args.command
    stem = command if command == "ldm-uncond" else f"{command}_{slug(args.prompt)}"
    stem = f"{stem}_seed{args.seed}"

    def names(stem):
        paths = [out / f"{stem}_{i}.png" for i in range(args.n)]
        return paths + [out / f"{stem}_grid.png"] if args.n > 1 else paths

    if args.overwrite:
        ours = set(names(stem))
        for old in sorted(out.glob(f"{stem}_*.png")):
            if old not in ours and re.fullmatch(rf"{re.escape(stem)}_(\d+|grid)\.png", old.name):
                old.unlink()
                print(f"--overwrite: removed {old} (an earlier run's)")
        return names(stem)
    run, run_stem = 1, stem
    while any(path.exists() for path in names(run_stem)):
        run += 1
        run_stem = f"{stem}_run{run}"
    return names(run_stem)


def image_grid(images):
    from PIL import Image

    columns = min(4, len(images))
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def add_generation_arguments(parser, command: str):
    if command != "ldm-uncond":
        parser.add_argument("prompt", help="what the image should show")
    # --steps, --guidance, --height, --width and --truncation default to None: their values depend
    # on the weights and are filled in by fill_defaults
    embedded = EMBEDDED_DEFAULTS[command]
    official = OFFICIAL_DEFAULTS[command]
    settings = ", ".join(f"{name} {value}" for name, value in embedded.items())
    official_settings = ", ".join(f"{name} {value}" for name, value in official.items())
    single_file = ", or an original .ckpt/.safetensors file" if command == "sd" else ""
    weights_help = (
        f"pipeline folder, repo id in the Hugging Face cache{single_file} (default: the embedded "
        f"tiny-{command}, at {settings}; official weights default to {official_settings})"
    )
    parser.add_argument("--weights", help=weights_help)
    parser.add_argument("--steps", type=int, help="denoising steps")
    if command != "ldm-uncond":
        guidance_help = "classifier-free guidance scale; 1 turns it off"
        parser.add_argument("--guidance", type=float, help=guidance_help)
    if command in ("sd", "ldm"):
        parser.add_argument("--height", type=int, help="image height, a multiple of 8")
        parser.add_argument("--width", type=int, help="image width, a multiple of 8")
    if command in ("sd", "ldm", "ldm-uncond"):
        parser.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0: deterministic)")
        parser.add_argument(
            "--scheduler",
            help="e.g. DDIMScheduler, EulerAncestralDiscreteScheduler (default: the folder's)",
        )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the CPU generator for all the noise"
    )
    parser.add_argument("-n", type=int, default=1, help="number of images")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="weights and activations"
    )
    parser.add_argument("--out", default="outputs", help="folder for the PNG files")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="reuse the file names of an earlier run with the same settings (default: a new _runK)",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m minildm", description="minildm: minimal latent diffusion"
    )
    commands = parser.add_subparsers(dest="command")
    defaults = argparse.ArgumentDefaultsHelpFormatter
    sd_help = "Stable Diffusion v1.x text to image"
    sd = commands.add_parser("sd", help=sd_help, formatter_class=defaults)
    add_generation_arguments(sd, "sd")
    sd.add_argument("--negative", help="negative prompt: what the image should not show")
    ema_help = "for a single file holding both the EMA and the trained UNet"
    sd.add_argument("--ema", choices=["true", "false"], help=ema_help)
    sd.add_argument(
        "--invert",
        metavar="IMAGE",
        help="DDIM inversion: turn IMAGE (which the prompt describes) into the latents DDIM "
        "samples it from, then sample them back and write the reconstruction (guidance "
        "defaults to 1.0, the scheduler is DDIM, the size is the image's)",
    )
    ldm_help = "LDM text to image (256 px, LDMBert)"
    ldm = commands.add_parser("ldm", help=ldm_help, formatter_class=defaults)
    add_generation_arguments(ldm, "ldm")
    uncond_help = "LDM unconditional CelebA-HQ faces"
    uncond = commands.add_parser("ldm-uncond", help=uncond_help, formatter_class=defaults)
    add_generation_arguments(uncond, "ldm-uncond")
    vq_help = "VQ-Diffusion text to image"
    vq = commands.add_parser("vq-diffusion", help=vq_help, formatter_class=defaults)
    add_generation_arguments(vq, "vq-diffusion")
    vq.add_argument(
        "--truncation",
        type=float,
        help="keep the most likely codes up to this cumulative probability (default: 0.9 for the "
        "embedded model, 1.0 with --weights)",
    )

    download = commands.add_parser(
        "download",
        help="fetch official weights listed in weights_manifest.txt, verified by sha256",
        formatter_class=defaults,
    )
    name_help = (
        "a system (stable-diffusion-v1-4, sd-v1-4-ckpt, ldm-text2im-large-256, ldm-celebahq-256, "
        "vq-diffusion-ithq) or SYSTEM/PATH"
    )
    download.add_argument("name", nargs="?", help=name_help)
    download.add_argument("--dir", default="weights", help="files go to DIR/SYSTEM/PATH")
    download.add_argument(
        "--list",
        action="store_true",
        help="list the manifest's systems and sizes, download nothing",
    )

    train = commands.add_parser(
        "train",
        help="train a tiny model on the shapes world (minildm/train.py)",
        formatter_class=defaults,
    )
    train.add_argument(
        "system", choices=["sd", "ldm", "ldm-uncond", "vq-diffusion"], help="which system to train"
    )
    train.add_argument(
        "--out", required=True, help="a new folder, or the folder of a run to resume"
    )
    train.add_argument(
        "--minutes",
        type=float,
        help="training time, shared by the stages (default: sd 84, ldm 30, ldm-uncond 42, "
        "vq-diffusion 32; with --quick each stage runs 250 steps, within at most 5 minutes)",
    )
    train.add_argument(
        "--autoencoder",
        metavar="FOLDER",
        help="ldm and vq-diffusion: the pipeline folder whose autoencoder to reuse "
        "(default: the embedded tiny-sd, resp. tiny-ldm-uncond)",
    )
    train.add_argument(
        "--seed", type=int, default=0, help="seed of the drawn data and of every random choice"
    )
    train.add_argument(
        "--quick",
        action="store_true",
        help="toy sizes and 250 steps a stage: the whole path in a minute",
    )

    bench = commands.add_parser(
        "bench",
        help="time minildm (and diffusers) on the same work at SD v1's official sizes",
        formatter_class=defaults,
    )
    bench.add_argument(
        "--part", choices=["unet", "vae", "text", "pipeline", "load"], default="unet"
    )
    bench.add_argument("--size", type=int, default=512, help="image size (latents: size / 8)")
    bench.add_argument("--steps", type=int, default=20, help="--part pipeline: sampling steps")
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    bench.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    bench.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up")
    bench.add_argument(
        "--compare-diffusers",
        action="store_true",
        help="also time diffusers on the same weights and inputs (needs diffusers, transformers)",
    )
    bench.add_argument(
        "--compile",
        action="store_true",
        help="--part unet, vae or text: run minildm's model through torch.compile (the first "
        "call's time, compilation included, is reported)",
    )
    bench.add_argument(
        "--gpu-check",
        action="store_true",
        help="every model at official size in float16 and float32 on --device against the CPU's "
        "float32 result, and the SD UNet's steps per second against diffusers' in float16",
    )

    add_trace_commands(commands, defaults)

    tokenize = commands.add_parser(
        "tokenize", help="print the 77 token ids a text encoder would see"
    )
    tokenize.add_argument("prompt")
    tokenize.add_argument(
        "--bert", action="store_true", help="the LDM BERT WordPiece tokenizer instead of CLIP's"
    )
    args = parser.parse_args(argv)

    if args.command in DEFAULT_WEIGHTS:
        try:
            generate(args)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
    elif args.command == "download":
        from minildm.checkpoints.download import main_download, main_list

        if args.list:
            sys.exit(main_list())
        if args.name is None:
            parser.error("download: name a system or SYSTEM/PATH (or --list to see them)")
        sys.exit(main_download(args.name, args.dir))
    elif args.command == "train":
        from minildm.train.run import main_train

        try:
            if not 0 <= args.seed < 2**63:
                raise ValueError(f"--seed must lie in [0, 2**63), got {args.seed}")
            status = main_train(
                args.system, args.out, args.minutes, args.seed, args.quick, args.autoencoder
            )
            sys.exit(status)
        except ValueError as e:
            sys.exit(f"error: {e}")
    elif args.command == "bench":
        try:
            check_bench_arguments(args)
        except ValueError as e:
            sys.exit(f"error: {e}")
        from minildm.bench import bench, gpu_check

        if args.gpu_check:
            sys.exit(gpu_check(args.device, repeats=args.repeats)["status"])
        bench(
            args.part,
            args.size,
            DTYPES[args.dtype],
            args.device,
            args.steps,
            args.repeats,
            args.compare_diffusers,
            args.compile,
        )
    elif args.command == "trace":
        try:
            main_trace(args)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
    elif args.command == "compare":
        sys.exit(main_compare(args))
    elif args.command == "tokenize":
        try:
            check_utf8(args.prompt, "prompt")
            print_tokens(args.prompt, args.bert)
        except ValueError as e:
            sys.exit(f"error: {e}")
    else:
        from minildm import schedulers

        print(STATUS.format(version=__version__, schedulers=", ".join(schedulers.__all__)))


def add_trace_commands(commands, formatter):
    trace = commands.add_parser(
        "trace",
        help="run a pipeline and record every named intermediate to a safetensors file",
        formatter_class=formatter,
    )
    trace.add_argument("system", choices=list(DEFAULT_WEIGHTS))
    trace.add_argument("prompt", nargs="?", help="the prompt (not for ldm-uncond)")
    trace.add_argument("--out", help="the trace file (default: SYSTEM-IMPLEMENTATION.safetensors)")
    trace.add_argument(
        "--weights", help="pipeline folder or cached repo id (default: the embedded tiny model)"
    )
    trace.add_argument("--steps", type=int, help="denoising steps (default: as generation)")
    trace.add_argument("--seed", type=int, default=0, help="seed of the CPU generator")
    trace.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    trace.add_argument("--height", type=int, help="sd, ldm: image height")
    trace.add_argument("--width", type=int, help="sd, ldm: image width")
    trace.add_argument("--truncation", type=float, help="vq-diffusion: truncation rate")
    trace.add_argument(
        "--layers",
        action="store_true",
        help="also record the output of every block of the denoiser in step --layers-step",
    )
    trace.add_argument("--layers-step", type=int, help="the step --layers records (default 0)")
    trace.add_argument(
        "--reference",
        choices=["diffusers"],
        help="record diffusers' pipeline on the same folder instead of minildm's",
    )
    trace.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    trace.add_argument("--dtype", choices=sorted(DTYPES), default="float32")

    compare = commands.add_parser(
        "compare",
        help="compare two traces stage by stage; exit 0 when all agree, 1 when not, 2 on bad input",
        formatter_class=formatter,
    )
    compare.add_argument("a", help="a trace file")
    compare.add_argument("b", help="the trace to compare it with")
    compare.add_argument(
        "--rtol",
        type=float,
        default=1e-4,
        help="largest max|a - b| / max(|a|, |b|) of a stage that agrees (integer stages: equal)",
    )


def trace_settings(args):
    """The traced run's settings: the generation commands' defaults for the weights, and only the
    options the system has."""
    import minildm
    from minildm.trace import Settings

    defaults = (EMBEDDED_DEFAULTS if args.weights is None else OFFICIAL_DEFAULTS)[args.system]
    values = {}
    for name in ("steps", "guidance", "height", "width", "truncation"):
        given = getattr(args, name)
        if name not in defaults:
            if given is not None:
                raise ValueError(f"trace {args.system} has no --{name}")
            continue
        values[name] = defaults[name] if given is None else given
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must lie in [0, 2**63), got {args.seed}")
    check_utf8(args.prompt, "prompt")
    folder = minildm.TINY_MODELS[args.system] if args.weights is None else args.weights
    return folder, Settings(prompt=args.prompt, seed=args.seed, **values)


def main_trace(args):
    from minildm import trace

    folder, settings = trace_settings(args)
    implementation = args.reference or "minildm"
    if args.layers_step is not None and not args.layers:
        raise ValueError("--layers-step chooses the step --layers records: add --layers")
    layers_step = (args.layers_step or 0) if args.layers else None
    trace.check_settings(args.system, settings, layers_step)
    check_device(args.device)
    out = Path(args.out or f"{args.system}-{implementation}.safetensors")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    folder = resolve_folder(folder)
    started = time.perf_counter()
    tensors, metadata = trace.record(
        args.system, folder, settings, implementation, layers_step, args.device, DTYPES[args.dtype]
    )
    trace.write(out, tensors, metadata)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(
        f"{out}: {len(tensors)} tensors ({size / 1e6:.1f} MB) from the {implementation} "
        f"{args.system} pipeline on {folder}, {settings.steps} steps, "
        f"{time.perf_counter() - started:.1f} s"
    )


def main_compare(args) -> int:
    from minildm import trace

    try:
        comparison = trace.compare(args.a, args.b, args.rtol)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(trace.report(comparison))
    return 0 if comparison.agree else 1


def check_bench_arguments(args):
    """Before the official-size models are built (a minute, gigabytes)."""
    if args.size < 8 or args.size % 8:
        raise ValueError(f"--size must be a positive multiple of 8, got {args.size}")
    if args.steps < 1 or args.repeats < 1:
        raise ValueError(
            f"--steps and --repeats must be at least 1, got {args.steps}, {args.repeats}"
        )
    if args.gpu_check:
        given = [
            option
            for option, value, default in (
                ("--part", args.part, "unet"),
                ("--size", args.size, 512),
                ("--dtype", args.dtype, "float32"),
                ("--steps", args.steps, 20),
                ("--compile", args.compile, False),
                ("--compare-diffusers", args.compare_diffusers, False),
            )
            if value != default
        ]
        if given:
            raise ValueError(
                f"--gpu-check runs every model at official size in float16 and float32 and "
                f"compares with diffusers when installed: {', '.join(given)} would be ignored; "
                "leave them out"
            )
    check_device(args.device)
    if args.gpu_check and torch.device(args.device).type != "cuda":
        raise ValueError(
            "--gpu-check compares a CUDA device with this CPU: give --device cuda "
            "(tests/test_bench.py runs the same check on the CPU with the tiny models)"
        )
    if args.compile and args.part not in ("unet", "vae", "text"):
        raise ValueError(
            f"--compile times one model (--part unet, vae or text), not --part {args.part}"
        )
    if args.compare_diffusers:
        try:
            import diffusers  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise ValueError(
                f'--compare-diffusers needs diffusers and transformers ({e}): pip install ".[test]"'
            ) from e
    warn_if_slow_precision(DTYPES[args.dtype], args.device)


def print_tokens(prompt: str, bert: bool):
    """Print the ids of `prompt` and the fixed-length row the text encoder gets. A long prompt's ids
    are shown up to the row's length, and the rest counted: the encoder never sees them."""
    tokenizer = BertTokenizer() if bert else CLIPTokenizer()
    ids = tokenizer.encode(prompt)
    row = tokenizer.max_length
    more = f" ... and {len(ids) - row} more, dropped" if len(ids) > row else ""
    print(f"{len(ids)} tokens (with start/end): {ids[:row]}{more}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the line above already said what is dropped
        print("row given to the text encoder:", tokenizer([prompt])[0].tolist())


STATUS = """\
minildm {version}: latent diffusion from scratch, checked against diffusers and transformers.

pipelines       StableDiffusionPipeline (+ Img2Img, Inpaint; from_pretrained, from_single_file),
                LDMTextToImagePipeline, LDMPipeline, VQDiffusionPipeline
models          CLIPTextModel, LDMBert, AutoencoderKL, VQModel, UNet, VQTransformer
schedulers      {schedulers}
weights         safetensors (memory-mapped), sharded, .bin/.ckpt read with weights_only=True,
                component and pipeline folders, the local Hugging Face cache, `download` with sha256

  python -m minildm sd "a red circle on a blue background"   (the embedded tiny model, offline)
  python -m minildm sd "a photograph of an astronaut riding a horse" \\
                    --weights CompVis/stable-diffusion-v1-4
  python -m minildm train sd --out runs/tiny-sd               (how the tiny model was made, 84 min)
  python -m minildm download stable-diffusion-v1-4 --dir weights
  python -m minildm sd --help
  python -m pytest -s tests
"""


if __name__ == "__main__":
    main()
