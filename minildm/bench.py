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
from torch.utils.flop_counter import FlopCounterMode

from minildm.autoencoder import KL_F8, load_autoencoder
from minildm.clip import CLIP_VIT_L_14, load_clip_text_model
from minildm.unet import SD_V1, load_unet

PARTS = ("unet", "vae", "text", "pipeline", "load")
PROMPT = "a photograph of an astronaut riding a horse"


def host() -> str:
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (
        f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {bf16}, torch {torch.__version__}"
    )


def matmul_gflops(dtype: torch.dtype, device, n: int = 2048, repeats: int = 3) -> float:
    """What this machine reaches on the operation it runs fastest: an n x n matrix product."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / min(seconds) / 1e9


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def count_flops(run) -> int:
    """Floating-point operations of one call (matrix products, convolutions, attention), as
    torch's FlopCounterMode counts them: 2 per multiply-add."""
    with FlopCounterMode(display=False) as counter:
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
        return UNet(SD_V1).to(device, dtype).eval(), None
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**without_private_keys(SD_V1.to_diffusers()))
    ours = load_unet(SD_V1, theirs.state_dict(), device=device, dtype=dtype)
    return ours.eval(), theirs.to(device, dtype).eval()


def build_vae(dtype, device, diffusers):
    if diffusers is None:
        from minildm.autoencoder import AutoencoderKL

        torch.manual_seed(0)
        return AutoencoderKL(KL_F8).to(device, dtype).eval(), None
    torch.manual_seed(0)
    theirs = diffusers.AutoencoderKL(**without_private_keys(KL_F8.to_diffusers()))
    ours = load_autoencoder(KL_F8, theirs.state_dict(), device=device, dtype=dtype)
    return ours.eval(), theirs.to(device, dtype).eval()


def build_text_encoder(dtype, device, transformers):
    if transformers is None:
        from minildm.clip import CLIPTextModel

        torch.manual_seed(0)
        return CLIPTextModel(CLIP_VIT_L_14).to(device, dtype).eval(), None
    config = CLIP_VIT_L_14.to_diffusers()
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
    from minildm.tokenizer import CLIPTokenizer
    from minildm.train import save_tokenizer_folder

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
    from minildm.tokenizer import CLIPTokenizer
    from minildm.train import save_pipeline_folder

    names = ["minildm"] + (["diffusers"] if with_diffusers else [])
    with tempfile.TemporaryDirectory(prefix="minildm-bench-") as tmp:
        folder = Path(tmp) / "sd"
        folder.mkdir()
        unet, _ = build_unet(torch.float32, "cpu", None)
        vae, _ = build_vae(torch.float32, "cpu", None)
        text_encoder, _ = build_text_encoder(torch.float32, "cpu", None)
        components = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
        save_pipeline_folder(folder, "sd", components, CLIPTokenizer(), dtype=torch.float32)
        del unet, vae, text_encoder, components
        weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        results = {name: [] for name in names}
        for _ in range(repeats):
            for name in names:
                command = [sys.executable, "-m", "minildm.bench", str(folder), name]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results[name].append(json.loads(out.strip().splitlines()[-1]))
    return {"weights_bytes": weights, "results": results}


def run_part(part: str, size: int, dtype, device, steps: int, compare: bool) -> dict:
    diffusers = None
    if compare:
        import diffusers

        # its note that `.to(dtype)` on an AutoencoderKL may cast modules kept in float32 (there are
        # none in SD's) would otherwise be printed into the report
        diffusers.utils.logging.set_verbosity_error()
    make = {"unet": unet_work, "vae": vae_work, "text": text_work}
    if part == "pipeline":
        return pipeline_work(size, dtype, device, diffusers, steps)
    return make[part](size, dtype, device, diffusers)


def report(work: dict, dtype, device, repeats: int, probe: float) -> dict:
    """Times the work's runs interleaved and prints medians, ratio, GFLOP/s, difference."""
    runs = work["runs"]
    with torch.inference_mode():
        outputs = {name: run() for name, run in runs.items()}
        flops = count_flops(runs["minildm"])
        times = interleaved_seconds(runs, repeats, device)
    name = str(dtype).removeprefix("torch.")
    print(f"{work['what']}, {name} on {device}, {repeats} timed rounds interleaved:")
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


def bench(part, size=512, dtype=torch.float32, device="cpu", steps=20, repeats=3, compare=False):
    print(f"host: {host()}")
    if part == "load":
        return report_loading(load_work(repeats, compare))
    probe = matmul_gflops(dtype, device)
    print(f"matmul probe (2048 x 2048, {str(dtype).removeprefix('torch.')}): {probe:.0f} GFLOP/s")
    return report(
        run_part(part, size, dtype, device, steps, compare), dtype, device, repeats, probe
    )


if __name__ == "__main__":  # the fresh process of load_work
    measure_loading(*sys.argv[1:3])
