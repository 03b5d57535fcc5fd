"""`python -m minildm bench`: minildm's speed against diffusers' on the same work.

Each part is built at Stable Diffusion v1's official size with random weights: diffusers' model
when diffusers is installed (minildm's then reads the same weights through its key maps, so both
compute the same function), minildm's own initialisation otherwise. Both run on the same inputs,
timed interleaved (A B A B ...) in one process so that a slow stretch of a shared machine hits both
alike; the report gives each one's median, their ratio, the outputs' max difference, and the
achieved GFLOP/s against a large matrix product timed in the same run, the most this CPU does.

    python -m minildm bench --part unet --compare-diffusers         # one UNet step, 64x64 latents
    python -m minildm bench --part vae --size 256 --repeats 5

Parts: `unet` (one step, batch 2 as classifier-free guidance runs it), `vae` (decoding one latent
to a size x size image), `text` (CLIP ViT-L/14 on a batch of 2 prompts), `pipeline` (a whole
generation, PNDM, guidance 7.5), `load` (reading a pipeline folder of the official size).
"""

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from minildm.autoencoder import KL_F8
from minildm.checkpoints.autoencoder import config_to_diffusers as vae_config_to_diffusers
from minildm.checkpoints.autoencoder import load_autoencoder
from minildm.checkpoints.clip import load_clip_text_model, text_config_to_diffusers
from minildm.checkpoints.unet import config_to_diffusers as unet_config_to_diffusers
from minildm.checkpoints.unet import load_unet
from minildm.clip import CLIP_VIT_L_14
from minildm.cpu_speed import (
    native_bf16,
    plain_pytorch,
    retain_freed_memory,
    speed_up,
    warn_if_slow_precision,
)
from minildm.tools.generate import DTYPES, check_device
from minildm.unet import SD_V1

PARTS = ("unet", "vae", "text", "pipeline", "load")
PROMPT = "a photograph of an astronaut riding a horse"


def host() -> str:
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (
        f"{cpu_model()} ({platform.machine()}), {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {bf16}, torch {torch.__version__}"
    )


def cpu_model() -> str:
    """The CPU's name as the kernel reports it (speed figures hold for one kind of host only)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def matmul_gflops(
    dtype: torch.dtype, device, n: int = 2048, repeats: int = 3, onednn: bool = False
) -> float:
    """What this machine reaches on the operation it runs fastest: an n x n matrix product; on
    the CPU torch's (MKL in the CPU wheels), or with onednn=True oneDNN's, which minildm's linear
    layers run on (cpu_speed.py)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def product():
        if onednn:  # a b^T, as a linear layer computes it: the same work as a b
            return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
        return a @ b

    product()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / min(seconds) / 1e9


# The attention probe: SD's largest attention, the self-attention of the 64x64 level at 512x512
# (4,096 pixels, 8 heads of 40 channels), batch 2 as classifier-free guidance runs it.
ATTENTION_SHAPE = (2, 8, 4096, 40)


def attention_probe(dtype: torch.dtype, device, repeats: int = 3) -> tuple:
    """(seconds, GFLOP/s) of the attention kernel the models call, F.scaled_dot_product_attention,
    on ATTENTION_SHAPE: 4 B H N^2 d floating-point operations (the two products; the softmax's
    exponentials come on top)."""
    B, H, N, d = ATTENTION_SHAPE
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(ATTENTION_SHAPE, generator=generator).to(device, dtype) for _ in "qkv")
    seconds = []
    with torch.inference_mode():
        F.scaled_dot_product_attention(q, k, v)  # warm-up
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    return min(seconds), 4 * B * H * N * N * d / min(seconds) / 1e9


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def count_flops(run) -> int:
    """Floating-point operations of one call (matrix products, convolutions, attention), as
    torch's FlopCounterMode counts them: 2 per multiply-add."""
    with FlopCounterMode(display=False) as counter, plain_pytorch():  # it counts aten's ops
        run()
    return counter.get_total_flops()


def interleaved_seconds(runs: dict, repeats: int, device) -> dict:
    """{name: [seconds of each timed call]}: one warm-up call each (allocator, kernel choice), then
    the implementations in turn, `repeats` rounds."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def max_difference(ours: torch.Tensor, theirs: torch.Tensor) -> tuple:
    """(max abs difference, the same relative to theirs' largest magnitude)."""
    ours, theirs = ours.float(), theirs.float()
    absolute = (ours - theirs).abs().max().item()
    return absolute, absolute / max(theirs.abs().max().item(), 1e-30)


def without_private_keys(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_unet(dtype, device, diffusers):
    """(minildm's SD v1 UNet, diffusers' or None), same random weights."""
    if diffusers is None:
        from minildm.unet import UNet

        torch.manual_seed(0)
        return speed_up(UNet(SD_V1).to(device, dtype).eval()), None
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**without_private_keys(unet_config_to_diffusers(SD_V1)))
    ours = load_unet(SD_V1, theirs.state_dict(), device=device, dtype=dtype)
    return ours.eval(), theirs.to(device, dtype).eval()


def build_vae(dtype, device, diffusers):
    if diffusers is None:
        from minildm.autoencoder import AutoencoderKL

        torch.manual_seed(0)
        return speed_up(AutoencoderKL(KL_F8).to(device, dtype).eval()), None
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(**without_private_keys(vae_config_to_diffusers(KL_F8)))
    ours = load_autoencoder(KL_F8, theirs.state_dict(), device=device, dtype=dtype)
    return ours.eval(), theirs.to(device, dtype).eval()


def build_text_encoder(dtype, device, transformers):
    if transformers is None:
        from minildm.clip import CLIPTextModel

        torch.manual_seed(0)
        return speed_up(CLIPTextModel(CLIP_VIT_L_14).to(device, dtype).eval()), None
    config = text_config_to_diffusers(CLIP_VIT_L_14)
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    theirs = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    ours = load_clip_text_model(CLIP_VIT_L_14, theirs.state_dict(), device=device, dtype=dtype)
    return ours.eval(), theirs.to(device, dtype).eval()


def unet_work(size: int, dtype, device, diffusers) -> dict:
    """One UNet step on (2, 4, size/8, size/8) latents: the batch of classifier-free guidance."""
    ours, theirs = build_unet(dtype, device, diffusers)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size // 8, size // 8, generator=generator).to(device, dtype)
    context = torch.randn(2, 77, 768, generator=generator).to(device, dtype)
    t = torch.tensor([981, 981], device=device)
    runs = {"minildm": lambda: ours(latents, t, context)}
    if theirs is not None:
        runs["diffusers"] = lambda: theirs(latents, t, encoder_hidden_states=context).sample
    return {"what": f"UNet step, latents (2, 4, {size // 8}, {size // 8})", "runs": runs}


def vae_work(size: int, dtype, device, diffusers) -> dict:
    ours, theirs = build_vae(dtype, device, diffusers)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, size // 8, size // 8, generator=generator).to(device, dtype)
    runs = {"minildm": lambda: ours.decode(latents)}
    if theirs is not None:
        runs["diffusers"] = lambda: theirs.decode(latents).sample
    return {"what": f"autoencoder decode to {size}x{size}", "runs": runs}


def text_work(size: int, dtype, device, diffusers) -> dict:
    try:
        import transformers
    except ImportError:
        transformers = None
    if diffusers is None:
        transformers = None
    ours, theirs = build_text_encoder(dtype, device, transformers)
    from minildm.tokenizer import CLIPTokenizer

    ids = CLIPTokenizer()([PROMPT, ""]).to(device)  # (2, 77)
    runs = {"minildm": lambda: ours(ids)}
    if theirs is not None:
        runs["diffusers"] = lambda: theirs(ids).last_hidden_state
    return {"what": "CLIP ViT-L/14 text encoder, (2, 77) ids", "runs": runs}


def pipeline_work(size: int, dtype, device, diffusers, steps: int) -> dict:
    """A whole generation: PNDM (SD v1's scheduler), guidance 7.5, the same seed for both."""
    from minildm.pipelines import StableDiffusionPipeline
    from minildm.pipelines.stable_diffusion import SINGLE_FILE_SCHEDULER
    from minildm.schedulers import PNDMScheduler
    from minildm.tokenizer import CLIPTokenizer

    unet, their_unet = build_unet(dtype, device, diffusers)
    vae, their_vae = build_vae(dtype, device, diffusers)
    transformers = None
    if diffusers is not None:
        import transformers
    text_encoder, their_text_encoder = build_text_encoder(dtype, device, transformers)
    ours = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer(),
        unet=unet,
        scheduler=PNDMScheduler.from_config(SINGLE_FILE_SCHEDULER),
    )
    call = dict(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, output_type="pt")
    runs = {"minildm": lambda: ours(generator=torch.Generator().manual_seed(0), **call).images}
    if diffusers is not None:
        theirs = diffusers.StableDiffusionPipeline(
            vae=their_vae,
            text_encoder=their_text_encoder,
            tokenizer=their_tokenizer(transformers),
            unet=their_unet,
            scheduler=diffusers.PNDMScheduler.from_config(SINGLE_FILE_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        theirs.set_progress_bar_config(disable=True)
        runs["diffusers"] = lambda: (
            theirs(generator=torch.Generator().manual_seed(0), **call).images
        )
    return {"what": f"{steps}-step {size}x{size} generation (PNDM, guidance 7.5)", "runs": runs}


def their_tokenizer(transformers):
    """transformers' CLIPTokenizer on minildm's shipped vocabulary (SD's tokenizer folder)."""
    from minildm.checkpoints.save import save_tokenizer_folder
    from minildm.tokenizer import CLIPTokenizer

    folder = Path(tempfile.mkdtemp(prefix="minildm-bench-tokenizer-"))
    save_tokenizer_folder(folder, CLIPTokenizer())
    return transformers.CLIPTokenizer.from_pretrained(folder)


def peak_memory_kb() -> int:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def measure_loading(folder: str, implementation: str):
    """In a fresh process (run by `load_work`): load the folder, run one small UNet step (every
    weight read once), print seconds and peak memory growth as JSON."""
    latents = torch.zeros(2, 4, 8, 8)
    context = torch.zeros(2, 77, 768)
    t = torch.tensor([981, 981])
    if implementation == "diffusers":
        import diffusers

        before = peak_memory_kb()
        start = time.perf_counter()
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            pipe.unet(latents, t, encoder_hidden_states=context)
    else:
        from minildm.pipelines import StableDiffusionPipeline

        before = peak_memory_kb()
        start = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(folder)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            pipe.unet(latents, t, context)
    print(json.dumps({"seconds": seconds, "growth_kb": peak_memory_kb() - before}))


def load_work(repeats: int, with_diffusers: bool) -> dict:
    """Loading an official-size SD v1 folder (fp32 safetensors, written here from random weights)
    in fresh processes, alternately; also the peak memory growth through the first UNet step."""
    from minildm.checkpoints.save import save_pipeline_folder
    from minildm.tokenizer import CLIPTokenizer
    from minildm.train.recipes import SCHEDULER_CONFIG

    names = ["minildm"] + (["diffusers"] if with_diffusers else [])
    with tempfile.TemporaryDirectory(prefix="minildm-bench-") as tmp:
        folder = Path(tmp) / "sd"
        folder.mkdir()
        unet, _ = build_unet(torch.float32, "cpu", None)
        vae, _ = build_vae(torch.float32, "cpu", None)
        text_encoder, _ = build_text_encoder(torch.float32, "cpu", None)
        components = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
        save_pipeline_folder(
            folder, "sd", components, CLIPTokenizer(), SCHEDULER_CONFIG, dtype=torch.float32
        )
        del unet, vae, text_encoder, components
        weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        results = {name: [] for name in names}
        for _ in range(repeats):
            for name in names:
                command = [sys.executable, "-m", "minildm.tools.bench", str(folder), name]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results[name].append(json.loads(out.strip().splitlines()[-1]))
    return {"weights_bytes": weights, "results": results}


def run_part(
    part: str, size: int, dtype, device, steps: int, compare: bool, compile: bool = False
) -> dict:
    diffusers = None
    if compare:
        import diffusers

        # its note that `.to(dtype)` on an AutoencoderKL may cast modules kept in float32 (there are
        # none in SD's) would otherwise be printed into the report
        diffusers.utils.logging.set_verbosity_error()
    make = {"unet": unet_work, "vae": vae_work, "text": text_work}
    if part == "pipeline":
        return pipeline_work(size, dtype, device, diffusers, steps)
    work = make[part](size, dtype, device, diffusers)
    if compile:  # torch.compile traces the call through the model; the first call compiles
        work["runs"]["minildm"] = torch.compile(work["runs"]["minildm"])
        work["compiled"] = True
    return work


def report(work: dict, dtype, device, repeats: int, probe: float) -> dict:
    """Times the work's runs interleaved and prints medians, ratio, GFLOP/s, difference."""
    runs = work["runs"]
    with torch.inference_mode():
        outputs, first_call = {}, {}
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()
            synchronize(device)
            first_call[name] = time.perf_counter() - start
        flops = count_flops(runs["minildm"])
        times = interleaved_seconds(runs, repeats, device)
    name = str(dtype).removeprefix("torch.")
    print(f"{work['what']}, {name} on {device}, {repeats} timed rounds interleaved:")
    if work.get("compiled"):
        print(
            f"  minildm compiled with torch.compile: its first call, compilation included, took "
            f"{first_call['minildm']:.1f} s"
        )
    medians = {}
    for implementation, seconds in times.items():
        medians[implementation] = statistics.median(seconds)
        achieved = flops / medians[implementation] / 1e9
        print(
            f"  {implementation:<10} {medians[implementation]:8.3f} s (median; all: "
            f"{', '.join(f'{s:.3f}' for s in seconds)})  {achieved:6.1f} GFLOP/s, "
            f"{100 * achieved / probe:4.1f}% of the matmul probe"
        )
    result = {"what": work["what"], "medians": medians, "gflop": flops / 1e9}
    result["first_call"] = first_call
    if "diffusers" in medians:
        result["ratio"] = medians["minildm"] / medians["diffusers"]
        absolute, relative = max_difference(outputs["minildm"], outputs["diffusers"])
        result["max_abs_difference"] = absolute
        print(
            f"  minildm / diffusers: {result['ratio']:.2f}x the time; outputs differ by at most "
            f"{absolute:.1e} ({relative:.1e} of the largest value)"
        )
    return result


def report_loading(loading: dict) -> dict:
    weights = loading["weights_bytes"]
    print(f"loading an SD v1 folder ({weights / 1e9:.2f} GB of fp32 weights) in a fresh process:")
    medians = {}
    for implementation, rounds in loading["results"].items():
        seconds = statistics.median(r["seconds"] for r in rounds)
        growth = max(r["growth_kb"] for r in rounds) * 1e3 / weights
        medians[implementation] = seconds
        print(
            f"  {implementation:<10} {seconds:6.2f} s (median), peak memory growth through the "
            f"first UNet step {growth:.2f}x the weights' bytes"
        )
    return {"what": "load", "medians": medians}


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


def main_bench(args):
    """`python -m minildm bench`: checks the arguments, then the GPU check (its exit status) or
    the timings."""
    check_bench_arguments(args)
    if args.gpu_check:
        return gpu_check(args.device, repeats=args.repeats)["status"]
    bench(
        args.part,
        args.size,
        DTYPES[args.dtype],
        args.device,
        args.steps,
        args.repeats,
        args.compare_diffusers,
        args.compile,
        api_path=not args.no_api_path,
    )
    return None


def bench(
    part,
    size=512,
    dtype=torch.float32,
    device="cpu",
    steps=20,
    repeats=3,
    compare=False,
    compile=False,
    api_path=True,
):
    """Prints the host, the probes and the part's timings; on the CPU first the same timings in a
    fresh process that leaves malloc as Python does (the API path: a script or notebook that does
    not call retain_freed_memory), then in this one, which calls it as the command line does.
    Returns the command line's result, with the API path's under "api_path"."""
    print(f"host: {host()}")
    if part == "load":
        return report_loading(load_work(repeats, compare))
    on_cpu = torch.device(device).type == "cpu"
    arguments = dict(part=part, size=size, dtype=str(dtype).removeprefix("torch."), steps=steps)
    arguments.update(repeats=repeats, compare=compare, compile=compile)
    api = api_path_timings(arguments) if on_cpu and api_path else None  # before this one is big
    name = str(dtype).removeprefix("torch.")
    probe = matmul_gflops(dtype, device)
    if on_cpu:
        onednn = matmul_gflops(dtype, device, onednn=True) if onednn_probe_runs(dtype) else None
        print(
            f"GEMM probes (2048 x 2048, {name}): torch/MKL {probe:.0f} GFLOP/s, oneDNN "
            + (f"{onednn:.0f} GFLOP/s" if onednn else "not run (no native kernels for it)")
        )
    else:
        print(f"matmul probe (2048 x 2048, {name}): {probe:.0f} GFLOP/s")
    seconds, attention = attention_probe(dtype, device)
    shape = ", ".join(map(str, ATTENTION_SHAPE))
    print(
        f"attention kernel (scaled_dot_product_attention, q k v ({shape}), SD's 4,096-pixel "
        f"self-attention): {1e3 * seconds:.0f} ms, {attention:.0f} GFLOP/s"
    )
    if on_cpu and retain_freed_memory():
        print(
            "command-line path: glibc malloc keeps freed memory for reuse "
            "(cpu_speed.retain_freed_memory), for both implementations: the process is shared"
        )
    work = run_part(part, size, dtype, device, steps, compare, compile)
    result = report(work, dtype, device, repeats, probe)
    if api is not None:
        result["api_path"] = api
        print("API path against the command line (medians):")
        for implementation, seconds in result["medians"].items():
            theirs = api["medians"][implementation]
            print(
                f"  {implementation:<10} {theirs:8.3f} s against {seconds:8.3f} s "
                f"({theirs / seconds:.2f}x)"
            )
    return result


def onednn_probe_runs(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (dtype == torch.bfloat16 and native_bf16())


def api_path_timings(arguments: dict) -> dict:
    """The part timed in a fresh process that never calls retain_freed_memory, as a user's script
    or notebook runs: its report is printed here, its result returned."""
    print(
        "API path (a fresh process, malloc as Python leaves it, as in a script or notebook that "
        "does not call minildm.cpu_speed.retain_freed_memory()):"
    )
    arguments = arguments | {"threads": torch.get_num_threads()}  # the same as this process's
    command = [sys.executable, "-m", "minildm.tools.bench", "api-path", json.dumps(arguments)]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(
            f"the API path's process exited with {run.returncode}; its last words:\n"
            + "\n".join(run.stderr.strip().splitlines()[-8:])
            + "\n(--no-api-path times the command-line path alone)"
        )
    lines = run.stdout.strip().splitlines()
    for line in lines[:-1]:
        print(f"  {line}")
    return json.loads(lines[-1])


def time_api_path(arguments: dict):
    """The fresh process of api_path_timings: the part's report, then its result as JSON."""
    torch.set_num_threads(arguments["threads"])
    dtype = DTYPES[arguments["dtype"]]
    part, size, steps = arguments["part"], arguments["size"], arguments["steps"]
    work = run_part(part, size, dtype, "cpu", steps, arguments["compare"], arguments["compile"])
    result = report(work, dtype, "cpu", arguments["repeats"], probe=matmul_gflops(dtype, "cpu"))
    print(json.dumps(result))


# --- The GPU check ----------------------------------------------------------------------------
# float16 on the device must stay within what the precision tests allow float16 against float32
# (5e-3 of the output's largest value: tests/test_clip.py, test_ldm_bert.py, test_autoencoder.py),
# twice that for the autoencoders' decodes (the deepest stacks of convolutions at full resolution:
# the tiny KL decoder reached 5.1e-3 in float16 on the CPU), float32 within the parity tests'
# 1e-4, with TF32 off so that float32 means float32 on the GPU.
GPU_CHECK_TOLERANCE = {torch.float16: 5e-3, torch.float32: 1e-4}
DECODE_FLOAT16_TOLERANCE = 1e-2


def gpu_check_tolerance(name: str, dtype: torch.dtype) -> float:
    if dtype == torch.float16 and name.endswith("decode"):
        return DECODE_FLOAT16_TOLERANCE
    return GPU_CHECK_TOLERANCE[dtype]


def gpu_check_models(small: bool) -> list:
    """(name, build, call) for every model of the four systems, at official size or (`small`) at
    the embedded tiny models' sizes, which the tests run on the CPU. `build()` makes the model with
    minildm's random initialisation; `call(model, device, dtype)` runs it on inputs drawn from a
    fixed seed (latents at the size its pipeline uses)."""
    from minildm.autoencoder import VQ_F4_CELEBAHQ, VQ_F8_ITHQ, AutoencoderKL, VQModel
    from minildm.clip import CLIP_VIT_B_32, CLIPTextModel
    from minildm.ldm_bert import LDMBert, LDMBertConfig
    from minildm.train import recipes
    from minildm.unet import CELEBAHQ, LDM_TEXT2IM, UNet
    from minildm.vq_transformer import ITHQ, VQTransformer

    if small:
        sd, ldm, uncond, transformer = (
            recipes.UNET,
            recipes.LDM_UNET,
            recipes.UNCOND_UNET,
            recipes.TRANSFORMER,
        )
        kl, vq_f4, vq_f8 = recipes.VAE, recipes.VQ_VAE, recipes.VQ_VAE
        clip_l, clip_b, bert = recipes.TEXT, recipes.QUICK_TEXT, recipes.BERT
    else:
        sd, ldm, uncond, transformer = SD_V1, LDM_TEXT2IM, CELEBAHQ, ITHQ
        kl, vq_f4, vq_f8 = KL_F8, VQ_F4_CELEBAHQ, VQ_F8_ITHQ
        clip_l, clip_b, bert = CLIP_VIT_L_14, CLIP_VIT_B_32, LDMBertConfig()

    def draw(shape, device, dtype):
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def ids(high, shape, device):
        return torch.randint(high, shape, generator=torch.Generator().manual_seed(0)).to(device)

    def unet(config):  # one guided step: batch 2
        def call(model, device, dtype):
            size = config.sample_size
            latents = draw((2, config.in_channels, size, size), device, dtype)
            t = torch.tensor([981, 981], device=device)
            if config.context_dim is None:
                return model(latents, t)
            return model(latents, t, draw((2, 77, config.context_dim), device, dtype))

        return call

    def decode(config, size):
        def call(model, device, dtype):
            latents = draw((1, config.latent_channels, size, size), device, dtype)
            if config.is_vq:  # without the snap to the nearest code, which rounding can flip
                return model.decode(latents, quantize=False)
            return model.decode(latents)

        return call

    def text(config):
        def call(model, device, dtype):
            return model(ids(config.vocab_size, (2, config.max_length), device))

        return call

    def vq_transformer(model, device, dtype):
        codes = ids(transformer.num_classes, (2, transformer.height * transformer.width), device)
        context = draw((2, 77, transformer.context_dim), device, dtype)
        t = transformer.num_timesteps // 2
        return model(codes, context, torch.tensor([t, t], device=device))

    return [
        ("SD v1 UNet step", lambda: UNet(sd), unet(sd)),
        ("KL-f8 decode", lambda: AutoencoderKL(kl), decode(kl, sd.sample_size)),
        ("CLIP ViT-L/14 text encoder", lambda: CLIPTextModel(clip_l), text(clip_l)),
        ("LDM text-to-image UNet step", lambda: UNet(ldm), unet(ldm)),
        ("LDMBert", lambda: LDMBert(bert), text(bert)),
        ("CelebA-HQ UNet step", lambda: UNet(uncond), unet(uncond)),
        ("VQ-f4 decode", lambda: VQModel(vq_f4), decode(vq_f4, uncond.sample_size)),
        ("VQ-Diffusion transformer", lambda: VQTransformer(transformer), vq_transformer),
        ("VQ-f8 decode", lambda: VQModel(vq_f8), decode(vq_f8, transformer.height)),
        ("CLIP ViT-B/32 text encoder", lambda: CLIPTextModel(clip_b), text(clip_b)),
    ]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|, as the parity tests measure."""
    got, expected = got.detach().float().cpu(), expected.detach().float().cpu()
    return ((got - expected).abs().max() / expected.abs().max()).item()


def gpu_check(device="cuda", repeats: int = 3, small: bool = False) -> dict:
    """Every model on `device` in float16 and float32 against the CPU's float32 result, then the SD
    UNet's steps per second against diffusers' on the same weights in float16. Prints a table;
    returns the errors, the speeds and `status`: 0 when every error is within
    GPU_CHECK_TOLERANCE, else 1 (the command's exit status)."""
    sizes = "the embedded tiny models' sizes" if small else "official sizes"
    print(f"host: {host()}; device: {describe_device(device)}; models at {sizes}")
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows, failed = [], False
    try:
        with torch.inference_mode():
            for name, build, call in gpu_check_models(small):
                torch.manual_seed(0)
                model = speed_up(build().eval())
                expected = call(model, "cpu", torch.float32)
                errors = {}
                # float32 first: once cast to float16 the weights are rounded for good
                for dtype in (torch.float32, torch.float16):
                    model.to(device, dtype)
                    errors[dtype] = relative_error(call(model, device, dtype), expected)
                    failed |= not errors[dtype] <= gpu_check_tolerance(name, dtype)  # NaN fails
                rows.append((name, errors))
                cells = ", ".join(
                    f"{str(d).removeprefix('torch.')} {e:.1e} (tolerance "
                    f"{gpu_check_tolerance(name, d):.0e})"
                    for d, e in errors.items()
                )
                print(f"  {name:<28} max error against the CPU's float32: {cells}", flush=True)
                del model, expected
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allow_tf32
    speed = unet_steps_per_second(device, repeats, small)
    print("every model within tolerance" if not failed else "SOME MODELS BEYOND TOLERANCE")
    return {"rows": rows, "failed": failed, "steps_per_second": speed, "status": int(failed)}


def describe_device(device) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return str(device)


def unet_steps_per_second(device, repeats: int, small: bool) -> dict | None:
    """The SD UNet's steps per second in float16 (float32 on the CPU), minildm and diffusers on the
    same weights, interleaved; None without diffusers."""
    try:
        import diffusers
    except ImportError:
        print("diffusers is not installed: no steps-per-second comparison")
        return None
    from minildm.train import recipes

    config = recipes.UNET if small else SD_V1
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(
        **without_private_keys(unet_config_to_diffusers(config))
    )
    ours = load_unet(config, theirs.state_dict(), device=device, dtype=dtype).eval()
    theirs = theirs.to(device, dtype).eval()
    size = config.sample_size
    latents = torch.randn(2, config.in_channels, size, size).to(device, dtype)
    context = torch.randn(2, 77, config.context_dim).to(device, dtype)
    t = torch.tensor([981, 981], device=device)
    runs = {
        "minildm": lambda: ours(latents, t, context),
        "diffusers": lambda: theirs(latents, t, encoder_hidden_states=context).sample,
    }
    with torch.inference_mode():
        times = interleaved_seconds(runs, repeats, device)
    speed = {name: 1 / statistics.median(seconds) for name, seconds in times.items()}
    name = str(dtype).removeprefix("torch.")
    print(
        f"SD UNet step ({size}x{size} latents, batch 2, {name}): minildm {speed['minildm']:.2f} "
        f"steps/s, diffusers {speed['diffusers']:.2f} steps/s "
        f"({speed['minildm'] / speed['diffusers']:.2f}x)"
    )
    return speed


if __name__ == "__main__":  # the fresh processes of api_path_timings and load_work
    if sys.argv[1] == "api-path":
        time_api_path(json.loads(sys.argv[2]))
    else:
        measure_loading(*sys.argv[1:3])
