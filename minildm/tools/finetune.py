"""`python -m minildm finetune textual-inversion|lora --out FILE`: fine-tune an SD pipeline (the
embedded tiny SD by default) on a world extension of the shapes world or on a folder of pictures,
and write the file `sd --embedding` / `sd --lora` (and diffusers' load_textual_inversion /
load_lora_weights) read. In order: every argument checked and the output claimed before anything
loads; the pipeline; the pictures; the training (minildm/train/finetune.py); the file; with a
world, the held-out scores before and after.
"""

import time
from pathlib import Path

import numpy as np
from PIL import Image

from minildm import shapes
from minildm.checkpoints.embeddings import write_embedding
from minildm.checkpoints.files import check_writable_file
from minildm.checkpoints.lora import write_lora
from minildm.train import finetune

DEFAULT_MINUTES = {"textual-inversion": 3.0, "lora": 5.0}
DEFAULT_WORLD = {"textual-inversion": "pink", "lora": "star"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def main_finetune(args):
    check_finetune_arguments(args)
    import minildm

    weights = args.weights or minildm.TINY_SD
    pipe = minildm.StableDiffusionPipeline.from_pretrained(weights)
    size = pipe.unet.config.sample_size * 8  # the latent size it was trained at, times SD's f8
    if args.images:
        images, captions = read_pictures(Path(args.images), args.caption, size)
        scenes = None
    else:
        if size != shapes.SIZE:
            raise ValueError(
                f"--world draws {shapes.SIZE}x{shapes.SIZE} pictures; {weights} makes {size}x"
                f"{size} ones: give --images DIR for it"
            )
        count = 16 if args.method == "textual-inversion" else 32
        images, captions, scenes = finetune.world_examples(args.world, count, args.seed)
    print(f"{args.method}: {len(images)} pictures, e.g. {captions[0]!r}; {args.minutes:g} min")
    before = world_scores(pipe, args) if scenes is not None else None
    start = time.perf_counter()
    latents = finetune.encoder_latents(pipe.vae, images)  # (N, 4, 8, 8), as training saw them
    encoding = time.perf_counter() - start
    left = args.minutes * 60 - encoding
    if left < 1:  # no step would run, and the file would hold the untrained start
        raise ValueError(
            f"encoding the {len(images)} pictures took {encoding:.0f} s of the {args.minutes:g} "
            "minutes, leaving none to train: give more --minutes or fewer pictures"
        )
    if args.method == "textual-inversion":
        report = finetune.textual_inversion(
            pipe, latents, captions, args.token, args.init_word, seconds=left, seed=args.seed
        )
        vectors = pipe.text_encoder.token_embedding.weight[report["ids"]]
        write_embedding(args.out, args.token, vectors.detach())
    else:
        adapter = Path(args.out).stem
        report = finetune.lora_finetune(
            pipe, latents, captions, args.rank, seconds=left, seed=args.seed, adapter=adapter
        )
        write_lora(args.out, pipe.unet, pipe.text_encoder, adapter=adapter)
    seconds = time.perf_counter() - start
    losses = report["losses"]
    print(
        f"trained {report['steps']} steps in {seconds:.0f} s; loss {np.mean(losses[:20]):.4f} -> "
        f"{np.mean(losses[-20:]):.4f}; wrote {args.out} ({Path(args.out).stat().st_size:,} bytes)"
    )
    if before is not None:
        after = world_scores(pipe, args)
        for title, scores in (("before", before), ("after", after)):
            for name, values in scores.items():
                print(shapes.format_scores(f"{title}: {name}", values))


def world_scores(pipe, args) -> dict:
    """The world's held-out scores (and, for LoRA, the original held-out triples')."""
    if args.world == "pink":
        word = args.token if args.token in getattr(pipe.tokenizer, "added", {}) else "pink"
        return {"held-out pink": finetune.finetune_scores(pipe, finetune.pink_held_out(), word)}
    return {
        "held-out stars": finetune.finetune_scores(pipe, list(shapes.STAR_HELD_OUT)),
        "original held-out": finetune.finetune_scores(pipe, list(shapes.HELD_OUT)),
    }


def add_finetune_command(commands, formatter, common):
    """The `finetune` subcommand's parser (__main__.py builds the others)."""
    finetune = commands.add_parser(
        "finetune",
        help="teach an SD model a new word (textual inversion) or shape (LoRA) from a few "
        "pictures, on a CPU in minutes (minildm/train/finetune.py)",
        formatter_class=formatter,
        parents=[common],
    )
    finetune.add_argument("method", choices=["textual-inversion", "lora"])
    finetune.add_argument(
        "--out", required=True, help="the file to write, NAME.safetensors (diffusers' layout)"
    )
    finetune.add_argument(
        "--world",
        choices=["pink", "star"],
        help="the shapes world's extension to learn, drawn and scored on its held-out set "
        "(default: pink for textual-inversion, star for lora)",
    )
    finetune.add_argument(
        "--images", metavar="DIR", help="learn from the PNG/JPEG pictures in DIR instead"
    )
    finetune.add_argument(
        "--caption",
        help="with --images: the caption of every picture (a NAME.txt beside a picture gives "
        "its own); textual inversion's must hold the --token",
    )
    finetune.add_argument(
        "--token", help="textual inversion with --images: the placeholder (default <pink>)"
    )
    finetune.add_argument(
        "--init-word", help="textual inversion: the word its vector starts from (default red)"
    )
    finetune.add_argument(
        "--minutes",
        type=float,
        help="the whole run's time (default: textual-inversion 3, lora 5)",
    )
    finetune.add_argument("--rank", type=int, help="LoRA: the rank r of B A (default 4)")
    finetune.add_argument(
        "--weights", help="the SD pipeline folder to fine-tune (default: the embedded tiny SD)"
    )
    finetune.add_argument("--seed", type=int, default=0, help="seed of the data and the training")


def check_finetune_arguments(args):
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: expected a NAME.safetensors file")
    if out.exists():
        raise ValueError(f"--out {out} exists; give a new file name (nothing is overwritten)")
    check_writable_file(out, "--out")
    if args.minutes is None:
        args.minutes = DEFAULT_MINUTES[args.method]
    if not 0.1 <= args.minutes <= 600:
        raise ValueError(f"--minutes must lie in [0.1, 600], got {args.minutes}")
    # an option of the other method would be ignored: refused instead
    other = ["--rank"] if args.method == "textual-inversion" else ["--token", "--init-word"]
    given = [o for o in other if getattr(args, o[2:].replace("-", "_")) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} does not go with {args.method}")
    args.rank = 4 if args.rank is None else args.rank
    args.init_word = args.init_word or "red"
    if args.token is not None and not args.images:
        raise ValueError(
            f"--token goes with --images: the pink world's captions say {finetune.PINK_TOKEN}"
        )
    args.token = args.token or finetune.PINK_TOKEN
    if not 1 <= args.rank <= 64:
        raise ValueError(f"--rank must lie in [1, 64], got {args.rank}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must lie in [0, 2**63), got {args.seed}")
    if args.images and args.world:
        raise ValueError("give --world or --images, not both")
    if args.images:
        if not Path(args.images).is_dir():
            raise ValueError(f"--images {args.images} is not a folder")
    else:
        args.world = args.world or DEFAULT_WORLD[args.method]
        if args.caption:
            raise ValueError("--caption goes with --images (a world draws its own captions)")
    if args.method == "textual-inversion":
        if args.world == "star":
            raise ValueError(
                "--world star with textual-inversion: a new word cannot teach a shape the model "
                "cannot draw; use lora for the star"
            )
        if args.caption and args.token not in args.caption:
            raise ValueError(
                f"--caption {args.caption!r} does not hold the placeholder --token {args.token!r}"
            )
    if args.weights is not None and not Path(args.weights).is_dir():
        raise ValueError(f"--weights {args.weights} is not a pipeline folder")


def read_pictures(folder: Path, caption: str | None, size: int):
    """The pictures in `folder` as (N, size, size, 3) uint8 and their captions: NAME.txt beside
    NAME.png, else --caption. A picture of another size is resized, with a note."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--images {folder} holds no .png or .jpg pictures")
    if len(files) > 1000:
        raise ValueError(f"--images {folder} holds {len(files)} pictures; at most 1000")
    images, captions, resized = [], [], 0
    for path in files:
        text_file = path.with_suffix(".txt")
        text = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else caption
        if not text:
            raise ValueError(f"{path.name} has no caption: give --caption or {text_file.name}")
        try:
            with Image.open(path) as picture:
                picture = picture.convert("RGB")
        except OSError as error:
            raise ValueError(f"{path} is not a picture PIL can read: {error}") from None
        if picture.size != (size, size):
            picture = picture.resize((size, size), Image.Resampling.BICUBIC)
            resized += 1
        images.append(np.asarray(picture))
        captions.append(text)
    if resized:
        print(f"note: {resized} of {len(files)} pictures resized to {size}x{size}")
    return np.stack(images), captions
