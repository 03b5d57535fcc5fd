"""The command line: one subcommand per system, plus download, train and tokenize.

    python -m minildm sd "a red circle on a blue background"        SD v1.x, the embedded tiny model
    python -m minildm sd "an astronaut riding a horse" --weights DIR  ... with official weights
    python -m minildm ldm "A painting of a squirrel eating a burger"  LDM text-to-image
    python -m minildm ldm-uncond -n 4                                 LDM unconditional: shapes
    python -m minildm vq-diffusion "a teddy bear playing in the pool" VQ-Diffusion
    python -m minildm download stable-diffusion-v1-4 --dir weights    fetch + verify weights
    python -m minildm tokenize "a photograph of an astronaut riding a horse"
    python -m minildm train sd --out runs/tiny-sd                     retrain the tiny model
    torchrun --standalone --nproc_per_node 2 -m minildm train sd ...  ... in 2 processes (DDP)
    python -m minildm sd --prompts prompts.txt                        one image set per line
    python -m minildm finetune lora --out star.safetensors            teach it a star (LoRA)
    python -m minildm trace sd "a red circle" --out ours.safetensors  record a parity trace
    python -m minildm compare ours.safetensors theirs.safetensors     find where two runs part

`--weights` takes a pipeline folder, a repo id already in the Hugging Face cache, or (for `sd`) an
original single-file checkpoint. Images are written as PNGs, with a grid when there are several.

This file is the parser and the dispatch, nothing else: the commands run in minildm/tools/
(generate.py: sd, ldm, ldm-uncond, vq-diffusion; trace.py: trace, compare; bench.py: bench; info.py:
tokenize and the overview; finetune.py: finetune; errors.py: the error boundary every command
runs in), download in minildm/checkpoints/download.py, train in minildm/train/.
"""

import argparse
import sys

from minildm import __version__
from minildm.tools.errors import EXIT_CODES_HELP, error_boundary
from minildm.tools.finetune import add_finetune_command, main_finetune
from minildm.tools.generate import (
    DEFAULT_WEIGHTS,
    DTYPES,
    EMBEDDED_DEFAULTS,
    OFFICIAL_DEFAULTS,
    add_adapter_arguments,
    add_prompt_arguments,
    check_utf8,
    generate,
)
from minildm.tools.info import STATUS, print_tokens


def add_generation_arguments(parser, command: str):
    if command != "ldm-uncond":
        add_prompt_arguments(parser)  # PROMPT or --prompts FILE: tools/generate.py
    # --steps, --guidance, --height, --width and --truncation default to None: their values depend
    # on the weights and are filled in by fill_defaults
    embedded = EMBEDDED_DEFAULTS[command]
    official = OFFICIAL_DEFAULTS[command]
    settings = ", ".join(f"{name} {value}" for name, value in embedded.items())
    official_settings = ", ".join(f"{name} {value}" for name, value in official.items())
    single_file = ", or an original .ckpt/.safetensors file" if command == "sd" else ""
    trained = ", at the size their UNet was trained at" if command in ("sd", "ldm") else ""
    weights_help = (
        f"pipeline folder, repo id in the Hugging Face cache{single_file} (default: the embedded "
        f"tiny-{command}, at {settings}; other weights default to {official_settings}{trained})"
    )
    parser.add_argument("--weights", help=weights_help)
    parser.add_argument("--steps", type=int, help="denoising steps")
    if command != "ldm-uncond":
        guidance_help = (
            "classifier-free guidance scale: 1 turns it off, above 1 follows the prompt more "
            "closely; below 1, sd and vq-diffusion run unguided as at 1 (as diffusers does; with a "
            "warning), ldm blends toward the unconditional image (0: the prompt is ignored)"
        )
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
    parser = build_parser()
    args = parser.parse_args(argv)
    with error_boundary(args.command, getattr(args, "debug", False)):
        status = run(args, parser)
    if status:
        sys.exit(status)
    return 0


def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the command: every parser takes it from this parent
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on an error, show the full Python traceback",
    )
    parser = argparse.ArgumentParser(
        prog="python -m minildm",
        description="minildm: minimal latent diffusion",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command")
    defaults = argparse.ArgumentDefaultsHelpFormatter
    sd_help = "Stable Diffusion v1.x text to image"
    sd = commands.add_parser("sd", help=sd_help, formatter_class=defaults, parents=[common])
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
    add_adapter_arguments(sd)  # --lora, --embedding: tools/generate.py
    ldm_help = "LDM text to image (LDMBert; 256 px with the official weights)"
    ldm = commands.add_parser("ldm", help=ldm_help, formatter_class=defaults, parents=[common])
    add_generation_arguments(ldm, "ldm")
    uncond_help = (
        "LDM unconditional: the embedded model draws one shape on a plain background; "
        "--weights CompVis/ldm-celebahq-256 draws CelebA-HQ faces"
    )
    uncond = commands.add_parser(
        "ldm-uncond", help=uncond_help, formatter_class=defaults, parents=[common]
    )
    add_generation_arguments(uncond, "ldm-uncond")
    vq_help = "VQ-Diffusion text to image"
    vq = commands.add_parser(
        "vq-diffusion", help=vq_help, formatter_class=defaults, parents=[common]
    )
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
        parents=[common],
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
        help="train a tiny model on the shapes world (minildm/train/)",
        formatter_class=defaults,
        parents=[common],
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
        "--quick", action="store_true", help="toy sizes and 250 steps a stage: the whole path"
    )
    train.add_argument("--steps", type=int, help="stop each stage after STEPS steps (or sooner)")
    train.add_argument(
        "--timeline",
        type=float,
        metavar="MINUTES",
        help="sd and ldm: every MINUTES of the UNet's training, draw and score the held-out "
        "triples and measure the loss per timestep band, into timeline.json, timeline/ and "
        "timeline.png (train/timeline.py)",
    )

    add_finetune_command(commands, defaults, common)  # tools/finetune.py

    bench = commands.add_parser(
        "bench",
        help="time minildm (and diffusers) on the same work at SD v1's official sizes",
        formatter_class=defaults,
        parents=[common],
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
        "--no-api-path",
        action="store_true",
        help="on the CPU, skip the second timing in a fresh process without "
        "retain_freed_memory (what a script or notebook gets)",
    )
    bench.add_argument(
        "--gpu-check",
        action="store_true",
        help="every model at official size in float16 and float32 on --device against the CPU's "
        "float32 result, and the SD UNet's steps per second against diffusers' in float16",
    )

    add_trace_commands(commands, defaults, common)

    explore = commands.add_parser(
        "explore",
        help="a live explorer in the browser: the image building up, a step scrubber, per-word "
        "attention maps, image-to-image and inpainting, on the CPU",
        formatter_class=defaults,
        parents=[common],
    )
    explore.add_argument("--port", type=int, default=8765, help="0: any free port")
    explore.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (others reach it only if set)"
    )
    explore.add_argument(
        "--weights",
        action="append",
        metavar="SYSTEM=FOLDER",
        help="official weights for a system, e.g. sd=weights/stable-diffusion-v1-4 (repeatable; "
        "default: the embedded tiny models)",
    )

    tokenize = commands.add_parser(
        "tokenize", help="print the 77 token ids a text encoder would see", parents=[common]
    )
    tokenize.add_argument("prompt")
    tokenize.add_argument(
        "--bert", action="store_true", help="the LDM BERT WordPiece tokenizer instead of CLIP's"
    )
    return parser


def run(args, parser) -> int:
    """Run the parsed command; -> its exit status. Errors are raised, for error_boundary."""
    if args.command in DEFAULT_WEIGHTS:
        generate(args)
    elif args.command == "download":
        from minildm.checkpoints.download import main_download, main_list

        if args.list:
            return main_list()
        if args.name is None:
            parser.error("download: name a system or SYSTEM/PATH (or --list to see them)")
        return main_download(args.name, args.dir)
    elif args.command == "train":
        from minildm.train.run import main_train

        if not 0 <= args.seed < 2**63:
            raise ValueError(f"--seed must lie in [0, 2**63), got {args.seed}")
        return main_train(
            args.system,
            args.out,
            args.minutes,
            args.seed,
            args.quick,
            args.autoencoder,
            args.timeline,
            args.steps,
        )
    elif args.command == "finetune":
        main_finetune(args)
    elif args.command == "bench":
        from minildm.tools.bench import main_bench

        return main_bench(args)
    elif args.command == "trace":
        from minildm.tools.trace import main_trace

        main_trace(args)
    elif args.command == "compare":
        from minildm.tools.trace import main_compare

        return main_compare(args)
    elif args.command == "explore":
        from minildm.tools.explore import main_explore

        main_explore(args)
    elif args.command == "tokenize":
        check_utf8(args.prompt, "prompt")
        print_tokens(args.prompt, args.bert)
    else:
        from minildm import schedulers

        print(STATUS.format(version=__version__, schedulers=", ".join(schedulers.__all__)))
    return 0


def add_trace_commands(commands, formatter, common):
    trace = commands.add_parser(
        "trace",
        help="run a pipeline and record every named intermediate to a safetensors file",
        formatter_class=formatter,
        parents=[common],
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
        parents=[common],
    )
    compare.add_argument("a", help="a trace file")
    compare.add_argument("b", help="the trace to compare it with")
    compare.add_argument(
        "--rtol",
        type=float,
        default=1e-4,
        help="largest max|a - b| / max(|a|, |b|) of a stage that agrees (integer stages: equal)",
    )


if __name__ == "__main__":
    main()
