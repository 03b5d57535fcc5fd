"""A parity trace: every named intermediate of one pipeline run, written to a safetensors file,
and the comparer that says where two runs part.

When a port of these models (to JAX, MLX, C++, a GPU kernel library) gives another image, the final
pictures say only that something differs. A trace records, under stable names, each stage a porter
checks in turn: the token ids, the text context, the starting latents, and per denoising step the
model's input, its unconditional and conditional predictions, the guided prediction the scheduler
receives, the latents after the step (for VQ-Diffusion also the Gumbel noise of the sampling), then
the decoded image. With `layers_step`, the output of every block of the denoiser in that step too.
`compare` reads two traces and names the first stage, and the first block, beyond tolerance.
`python -m minildm trace` and `compare` run main_trace and main_compare, at the end of this file.

The recording changes no model or pipeline code: it runs the pipeline as it is and listens with
forward hooks on the text encoder, the denoiser and its blocks, and with wrappers around the
scheduler's `step` and the autoencoder's decode (removed afterwards). The same hooks fit diffusers'
pipelines, which keep their parts under the same attribute names, so `record(...,
implementation="diffusers")` traces the reference on the same folder.

The format (docs/trace.md, "Trace format"): one safetensors file; tensors named as below, in
run order (the metadata's `order`); metadata `format` = FORMAT, `system`, `steps`, and for
information `implementation`, `versions`, `dtype`, `device`, `seed`, `arguments`, `layers_step`.

    text/input_ids, text/encoder_output                 the prompt's token ids (B, L), the text
                                                        encoder's output for them (B, L, D)
    text/uncond_input_ids, text/uncond_encoder_output   the same for the empty prompt (guided
                                                        SD and LDM; VQ-Diffusion's is learned)
    text/context                                        what the denoiser is given (2B rows when
                                                        guided, the unconditional ones first)
    latents/initial                                     the latents (codes) entering step 0
    step/NNN/model_input, step/NNN/timestep             the denoiser's input at step NNN
    step/NNN/pred_uncond, step/NNN/pred_cond            its output, split (guided); unguided:
                                                        step/NNN/pred
    step/NNN/scheduler_input                            the guided prediction the scheduler steps
                                                        with (VQ-Diffusion: renormalised, truncated)
    step/NNN/gumbel                                     VQ-Diffusion: the Gumbel noise it
                                                        samples with
    step/NNN/latents                                    the latents (codes) after the step
    image/decoded                                       the autoencoder's output (B, 3, H, W)
    image                                               the pipeline's output (B, H, W, 3) in [0, 1]
    layers/<name>                                       with layers_step: each block's output, under
                                                        its diffusers module name
"""

import contextlib
import inspect
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minildm import pipelines
from minildm.checkpoints.files import check_writable_file, write_file
from minildm.checkpoints.unet import config_from_diffusers as unet_config_from_diffusers
from minildm.checkpoints.unet import diffusers_name as unet_diffusers_name
from minildm.checkpoints.vq_transformer import config_from_diffusers as vq_config_from_diffusers
from minildm.checkpoints.vq_transformer import diffusers_name as vq_diffusers_name
from minildm.checkpoints.weights import resolve_folder
from minildm.tools.generate import (
    DTYPES,
    EMBEDDED_DEFAULTS,
    OFFICIAL_DEFAULTS,
    check_device,
    check_utf8,
    trained_size,
)
from minildm.unet import (
    Downsample,
    ResBlock,
    SelfAttentionBlock,
    SpatialTransformer,
    TimestepMLP,
    UNet,
    Upsample,
)
from minildm.vq_transformer import Block, VQTransformer

FORMAT = "minildm-trace/1"
SYSTEMS = ("sd", "ldm", "ldm-uncond", "vq-diffusion")
IMPLEMENTATIONS = ("minildm", "diffusers")
MOST_STEPS = 999  # step names have three digits

# Each pipeline's parts, under the same attribute names in minildm and diffusers.
TEXT_ENCODER = {"sd": "text_encoder", "ldm": "bert", "vq-diffusion": "text_encoder"}
DENOISER = {"sd": "unet", "ldm": "unet", "ldm-uncond": "unet", "vq-diffusion": "transformer"}
AUTOENCODER = {"sd": "vae", "ldm": "vqvae", "ldm-uncond": "vqvae", "vq-diffusion": "vqvae"}
# The method that turns the final latents into pixels. minildm's VQ-Diffusion decodes its codes
# directly; diffusers' looks the codes up in the codebook first and then decodes those vectors.
DECODE = {"minildm": {"vq-diffusion": "decode_indices"}, "diffusers": {}}
# When guided, the order in which each pipeline encodes the prompt and the empty prompt (read
# from their __call__); unguided, or with VQ-Diffusion's learned "no text", there is one call.
TEXT_CALL_ORDER = {
    "minildm": {"sd": ("cond", "uncond"), "ldm": ("cond", "uncond")},
    "diffusers": {"sd": ("cond", "uncond"), "ldm": ("uncond", "cond")},
}
for order in TEXT_CALL_ORDER.values():
    order["vq-diffusion"] = ("cond", "uncond")  # a folder without learned embeddings
DIFFUSERS_PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "ldm": "LDMTextToImagePipeline",
    "ldm-uncond": "LDMPipeline",
    "vq-diffusion": "VQDiffusionPipeline",
}
MINILDM_PIPELINES = {
    "sd": pipelines.StableDiffusionPipeline,
    "ldm": pipelines.LDMTextToImagePipeline,
    "ldm-uncond": pipelines.LDMPipeline,
    "vq-diffusion": pipelines.VQDiffusionPipeline,
}


# --- recording --------------------------------------------------------------------------------


def first_tensor(output) -> torch.Tensor:
    """A module's result as one tensor: minildm returns tensors, diffusers tuples (return_dict=
    False) or output classes whose first field is the tensor (`.sample`, `.prev_sample`,
    `.last_hidden_state`)."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


class Recorder:
    """The named tensors of one run, in the order they were made."""

    def __init__(self, guided: bool, layers_step: int | None):
        self.guided = guided
        self.layers_step = layers_step
        self.tensors = {}
        self.step = -1  # the denoiser call under way: one per step in all four pipelines
        self.text_calls = []  # (input_ids, output) of each text encoder call, until step 0

    def add(self, name: str, tensor: torch.Tensor):
        if name in self.tensors:
            raise RuntimeError(
                f"trace: {name} was produced twice: the pipeline called this part more than once "
                "in one model call, which the trace format has no names for"
            )
        # a copy: pipelines update some results in place (diffusers' VQ-Diffusion renormalises
        # the transformer's output with -=)
        self.tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()

    def step_name(self, stage: str) -> str:
        return f"step/{self.step:03d}/{stage}"


def text_names(implementation: str, system: str, calls: int) -> tuple:
    if calls == 0:
        return ()
    if calls == 1:
        return ("cond",)
    if calls == 2:
        return TEXT_CALL_ORDER[implementation][system]
    raise RuntimeError(f"trace: the text encoder ran {calls} times before step 0, expected 0 to 2")


@contextlib.contextmanager
def listening(recorder: Recorder, pipe, system: str, implementation: str, blocks: dict):
    """Hooks `recorder` into `pipe` for one run; everything is removed on leaving.
    blocks: {module of the denoiser: its diffusers name}, recorded in `recorder.layers_step`."""
    handles, wrapped = [], []

    def wrap(owner, attribute: str, make_wrapper):
        original = getattr(owner, attribute)
        setattr(owner, attribute, make_wrapper(original))
        wrapped.append((owner, attribute, original))

    encoder = getattr(pipe, TEXT_ENCODER[system]) if system in TEXT_ENCODER else None
    if encoder is not None:

        def after_text(module, args, kwargs, output):
            ids = args[0] if args else kwargs["input_ids"]
            recorder.text_calls.append((ids, first_tensor(output)))

        handles.append(encoder.register_forward_hook(after_text, with_kwargs=True))

    def before_denoiser(module, args, kwargs):
        recorder.step += 1
        sample, timestep, context = denoiser_arguments(implementation, system, args, kwargs)
        if recorder.step == 0:
            names = text_names(implementation, system, len(recorder.text_calls))
            for (ids, output), which in sorted(zip(recorder.text_calls, names), key=cond_first):
                prefix = "text/" if which == "cond" else "text/uncond_"
                recorder.add(prefix + "input_ids", ids)
                recorder.add(prefix + "encoder_output", output)
            if context is not None:
                recorder.add("text/context", context)
        recorder.add(recorder.step_name("model_input"), sample)
        recorder.add(recorder.step_name("timestep"), torch.as_tensor(timestep).double().reshape(1))

    def after_denoiser(module, args, kwargs, output):
        output = first_tensor(output)
        if recorder.guided:
            unconditional, conditional = output.chunk(2)
            recorder.add(recorder.step_name("pred_uncond"), unconditional)
            recorder.add(recorder.step_name("pred_cond"), conditional)
        else:
            recorder.add(recorder.step_name("pred"), output)

    denoiser = getattr(pipe, DENOISER[system])
    handles.append(denoiser.register_forward_pre_hook(before_denoiser, with_kwargs=True))
    handles.append(denoiser.register_forward_hook(after_denoiser, with_kwargs=True))

    for module, name in blocks.items():

        def after_block(module, args, output, name=name):
            if recorder.step == recorder.layers_step:
                recorder.add(f"layers/{name}", first_tensor(output))

        handles.append(module.register_forward_hook(after_block))

    def recording_step(step):
        parameters = inspect.signature(step).parameters

        def step_and_record(*args, **kwargs):
            # the first three parameters: model output, timestep, sample (names differ)
            bound = inspect.signature(step).bind(*args, **kwargs)
            model_output, _, sample = [bound.arguments[name] for name in list(parameters)[:3]]
            if recorder.step == 0:
                recorder.add("latents/initial", sample)
            recorder.add(recorder.step_name("scheduler_input"), model_output)
            result = step(*args, **kwargs)
            recorder.add(recorder.step_name("latents"), first_tensor(result))
            return result

        return step_and_record

    wrap(pipe.scheduler, "step", recording_step)

    if system == "vq-diffusion":
        if implementation == "minildm":

            def recording_gumbel(draw):
                def draw_and_record(*args, **kwargs):
                    noise = draw(*args, **kwargs)
                    recorder.add(recorder.step_name("gumbel"), noise)
                    return noise

                return draw_and_record

            wrap(pipe.scheduler, "_gumbel_noise", recording_gumbel)
        else:
            from diffusers.schedulers import scheduling_vq_diffusion

            def recording_noised(noised):
                def noise_and_record(logits, generator):
                    # the same draw from the generator, on zeros: the noise alone, exactly
                    noise = noised(torch.zeros_like(logits), generator)
                    recorder.add(recorder.step_name("gumbel"), noise)
                    return logits + noise

                return noise_and_record

            wrap(scheduling_vq_diffusion, "gumbel_noised", recording_noised)

    def recording_decode(decode):
        def decode_and_record(*args, **kwargs):
            result = decode(*args, **kwargs)
            recorder.add("image/decoded", first_tensor(result))
            return result

        return decode_and_record

    decode = DECODE[implementation].get(system, "decode")
    wrap(getattr(pipe, AUTOENCODER[system]), decode, recording_decode)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, attribute, original in reversed(wrapped):
            if inspect.ismodule(owner):
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)  # the class's method shows through again


def cond_first(call_and_name) -> int:
    return 0 if call_and_name[1] == "cond" else 1


def denoiser_arguments(implementation: str, system: str, args: tuple, kwargs: dict) -> tuple:
    """(sample, timestep, context or None) from a call of the denoiser.
    minildm: unet(sample, t, context), transformer(indices, context, t);
    diffusers: unet(sample, t, encoder_hidden_states=...), transformer(indices,
    encoder_hidden_states=..., timestep=t)."""
    if implementation == "minildm":
        if system == "vq-diffusion":
            return args[0], args[2], args[1]
        return args[0], args[1], args[2] if len(args) > 2 else None
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
    return args[0], timestep, kwargs.get("encoder_hidden_states")


# --- the denoiser's blocks, under diffusers' names ---------------------------------------------

UNET_BLOCKS = (TimestepMLP, ResBlock, SpatialTransformer, SelfAttentionBlock, Downsample, Upsample)


def denoiser_blocks(model) -> dict:
    """{our module name: diffusers' module name} of the blocks `--layers` records: for the UNet
    the time embedding, conv_in, every ResBlock, attention and resampler, conv_out; for
    VQ-Diffusion's transformer every block, norm_out and out. The names are diffusers' (the
    official weights' layout, the names a porter knows), found through the key maps: a module is
    named by where its parameters go."""
    if isinstance(model, UNet):

        def official(key):
            return unet_diffusers_name(key, model.config)

        picked = [
            name
            for name, module in model.named_modules()
            if isinstance(module, UNET_BLOCKS) or name in ("conv_in", "conv_out")
        ]
    elif isinstance(model, VQTransformer):
        official = vq_diffusers_name
        picked = [
            name
            for name, module in model.named_modules()
            if isinstance(module, Block) or name in ("norm_out", "out")
        ]
    else:
        raise TypeError(f"no blocks known for a {type(model).__name__}")
    modules = dict(model.named_modules())
    return {name: official_module_name(name, modules[name], official) for name in picked}


def official_module_name(name: str, module: torch.nn.Module, official) -> str:
    """Our module's name in the official layout: where a parameter whose own name the key map
    keeps (norm1.weight) goes, less that name; otherwise the common start of all its
    parameters' official names (time_embedding.linear1.* -> time_embedding.linear_1.*)."""
    relative = [key for key, _ in module.named_parameters()]
    for key in relative:
        mapped = official(f"{name}.{key}")
        if mapped.endswith("." + key):
            return mapped[: -len(key) - 1]
    mapped = [official(f"{name}.{key}").split(".") for key in relative]
    return ".".join(os.path.commonprefix(mapped))


def meta_denoiser(system: str, config: dict):
    """minildm's denoiser for a diffusers config, without weights: to name diffusers' blocks."""
    config = dict(config)
    with torch.device("meta"):
        if system == "vq-diffusion":
            return VQTransformer(vq_config_from_diffusers(config))
        return UNet(unet_config_from_diffusers(config))


# --- one run ----------------------------------------------------------------------------------


@dataclass
class Settings:
    """What a traced run does; `None` where the system has no such setting."""

    prompt: str | None
    steps: int
    seed: int = 0
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    truncation: float | None = None


def is_guided(system: str, guidance: float | None) -> bool:
    if system == "ldm":
        return guidance != 1.0  # diffusers' LDM pipeline runs the empty prompt at any scale but 1
    return guidance is not None and guidance > 1.0


def pipeline_call(system: str, settings: Settings) -> dict:
    """The keyword arguments of the run; the same names in minildm and diffusers."""
    call = dict(
        num_inference_steps=settings.steps,
        generator=torch.Generator().manual_seed(settings.seed),
        output_type="np",
    )
    if system == "ldm-uncond":
        return dict(call, batch_size=1)
    call.update(prompt=settings.prompt, guidance_scale=settings.guidance)
    if system in ("sd", "ldm"):
        call.update(height=settings.height, width=settings.width)
    if system == "vq-diffusion":
        call.update(truncation_rate=settings.truncation)
    return call


def check_settings(system: str, settings: Settings, layers_step: int | None):
    if system not in SYSTEMS:
        raise ValueError(f"trace: the system must be one of {', '.join(SYSTEMS)}, got {system!r}")
    if (system == "ldm-uncond") != (settings.prompt is None):
        want = "takes no prompt" if system == "ldm-uncond" else "needs a prompt"
        raise ValueError(f"trace {system} {want}")
    if not 1 <= settings.steps <= MOST_STEPS:
        raise ValueError(f"trace: steps must lie in [1, {MOST_STEPS}], got {settings.steps}")
    if layers_step is not None and not 0 <= layers_step < settings.steps:
        raise ValueError(
            f"trace: the layers step must be one of the run's steps, 0 to {settings.steps - 1}, "
            f"got {layers_step}"
        )


def load(system: str, folder, implementation: str, device, dtype):
    folder = Path(folder)
    if implementation == "minildm":
        return MINILDM_PIPELINES[system].from_pretrained(folder, device=device, dtype=dtype)
    if implementation != "diffusers":
        raise ValueError(
            f"trace: the implementation must be minildm or diffusers, got {implementation!r}"
        )
    try:
        import diffusers
    except ImportError as e:
        raise ValueError(
            "trace --reference diffusers needs diffusers and transformers: "
            "pip install -r requirements-dev.txt"
        ) from e
    cls = getattr(diffusers, DIFFUSERS_PIPELINES[system])
    extra = dict(safety_checker=None, requires_safety_checker=False) if system == "sd" else {}
    with diffusers_quiet():
        pipe = cls.from_pretrained(folder, torch_dtype=dtype or torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or "cpu")


@contextlib.contextmanager
def diffusers_quiet():
    """Without the progress bars, load reports and deprecation notices of diffusers and
    transformers (a trace's output is its report)."""
    import warnings

    import diffusers
    import transformers

    levels = diffusers.logging.get_verbosity(), transformers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()
    transformers.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
        diffusers.logging.enable_progress_bar()
        transformers.logging.enable_progress_bar()


def record(
    system: str,
    folder,
    settings: Settings,
    implementation: str = "minildm",
    layers_step: int | None = None,
    device=None,
    dtype=None,
) -> tuple:
    """Loads `implementation`'s pipeline of `system` from `folder`, runs it and returns (tensors,
    metadata): the trace, in run order, ready for `write`."""
    check_settings(system, settings, layers_step)
    pipe = load(system, folder, implementation, device, dtype)
    tensors, metadata = record_pipeline(pipe, system, settings, implementation, layers_step)
    metadata["arguments"] = json.dumps(dict(vars(settings), weights=str(folder)))
    return tensors, metadata


def record_pipeline(
    pipe, system: str, settings: Settings, implementation: str, layers_step: int | None = None
) -> tuple:
    """The trace of one run of a loaded pipeline (minildm's, or diffusers' when `implementation`
    says so); the pipeline is as before afterwards."""
    check_settings(system, settings, layers_step)
    denoiser = getattr(pipe, DENOISER[system])
    modules = dict(denoiser.named_modules())
    if layers_step is None:
        blocks = {}
    elif implementation == "minildm":
        blocks = {modules[ours]: theirs for ours, theirs in denoiser_blocks(denoiser).items()}
    else:  # the same blocks, found by the names minildm's model of this config gives them
        names = denoiser_blocks(meta_denoiser(system, denoiser.config)).values()
        missing = [name for name in names if name not in modules]
        if missing:
            raise RuntimeError(f"trace: diffusers' {DENOISER[system]} has no {missing[:3]}")
        blocks = {modules[name]: name for name in names}

    recorder = Recorder(is_guided(system, settings.guidance), layers_step)
    with listening(recorder, pipe, system, implementation, blocks), torch.no_grad():
        if implementation == "diffusers":
            with diffusers_quiet():
                output = pipe(**pipeline_call(system, settings))
        else:
            output = pipe(**pipeline_call(system, settings))
    recorder.add("image", torch.from_numpy(np.asarray(output.images, dtype=np.float32)))

    tensors = recorder.tensors
    order = list(tensors)
    # the starting latents are seen at the first scheduler step; they come before step 0
    order.remove("latents/initial")
    order.insert(order.index("step/000/model_input"), "latents/initial")
    parameter = next(denoiser.parameters())
    metadata = dict(
        format=FORMAT,
        system=system,
        steps=str(settings.steps),
        implementation=implementation,
        versions=json.dumps(versions(implementation)),
        dtype=str(parameter.dtype).removeprefix("torch."),
        device=str(parameter.device),
        seed=str(settings.seed),
        arguments=json.dumps(vars(settings)),
        layers_step="" if layers_step is None else str(layers_step),
        order=json.dumps(order),
    )
    return {name: tensors[name] for name in order}, metadata


def versions(implementation: str) -> dict:
    import minildm

    found = dict(python=platform.python_version(), torch=torch.__version__)
    found["minildm"] = minildm.__version__
    if implementation == "diffusers":
        import diffusers
        import transformers

        found.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    return found


def write(path, tensors: dict, metadata: dict):
    write_file(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


# --- reading and comparing ----------------------------------------------------------------------


@dataclass
class Trace:
    path: str
    tensors: dict
    metadata: dict
    order: list


def read(path) -> Trace:
    """A trace file: a safetensors file whose metadata says `format` minildm-trace/1 and names the
    `system` and the number of `steps`. `order` (a JSON list) is optional: without it the stages are
    put in run order by their names."""
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a safetensors file ({e}), so not a trace") from e
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a minildm trace: its metadata's format is "
            f"{metadata.get('format')!r}, expected {FORMAT!r} (docs/trace.md, 'Trace format', "
            "says what a trace holds)"
        )
    for key in ("system", "steps"):
        if key not in metadata:
            raise ValueError(f"{path}: a trace's metadata must say its {key!r}")
    if metadata["system"] not in SYSTEMS:
        raise ValueError(f"{path}: system {metadata['system']!r} is none of {', '.join(SYSTEMS)}")
    if not metadata["steps"].isdigit():
        raise ValueError(f"{path}: steps must be a whole number, got {metadata['steps']!r}")
    if "order" in metadata:
        order = json.loads(metadata["order"])
        unlisted = sorted(set(tensors) - set(order))
        absent = sorted(set(order) - set(tensors))
        if unlisted or absent:
            raise ValueError(
                f"{path}: the metadata's order and the tensors disagree (not in order: "
                f"{unlisted[:3]}, no tensor: {absent[:3]})"
            )
    else:
        order = sorted(tensors, key=run_position)
    return Trace(path, tensors, metadata, order)


STAGE_POSITION = ["input_ids", "encoder_output", "uncond_input_ids", "uncond_encoder_output"]
STEP_POSITION = ["model_input", "timestep", "pred_uncond", "pred_cond", "pred", "scheduler_input"]
STEP_POSITION += ["gumbel", "latents"]


def run_position(name: str) -> tuple:
    """Where a stage comes in a run, from its name alone (for traces written without `order`)."""
    parts = name.split("/")
    if parts[0] == "text":
        inner = (
            STAGE_POSITION.index(parts[1]) if parts[1] in STAGE_POSITION else len(STAGE_POSITION)
        )
        return (0, inner, name)
    if name == "latents/initial":
        return (1, 0, name)
    if parts[0] == "step" and len(parts) == 3 and parts[1].isdigit():
        inner = STEP_POSITION.index(parts[2]) if parts[2] in STEP_POSITION else len(STEP_POSITION)
        return (2, int(parts[1]) * 100 + inner, name)
    if parts[0] == "image":
        return (3, 0 if name == "image/decoded" else 1, name)
    return (4, 0, name)  # layers/...: their order is the run's only with `order`


@dataclass
class StageResult:
    name: str
    verdict: str  # "ok", or what is wrong
    shape: str = ""
    max_abs: float = float("nan")
    max_rel: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


def check_comparable(a: Trace, b: Trace):
    """Traces of different systems, step counts or settings cannot be compared stage by stage."""
    for key in ("system", "steps"):
        if a.metadata[key] != b.metadata[key]:
            raise ValueError(
                f"the traces are of different runs: {key} {a.metadata[key]} in {a.path}, "
                f"{b.metadata[key]} in {b.path}; record both with the same system and --steps"
            )
    arguments_a = json.loads(a.metadata.get("arguments", "{}"))
    arguments_b = json.loads(b.metadata.get("arguments", "{}"))
    for key in ("prompt", "seed", "guidance", "height", "width", "truncation"):
        if key in arguments_a and key in arguments_b and arguments_a[key] != arguments_b[key]:
            raise ValueError(
                f"the traces are of different runs: {key} {arguments_a[key]!r} in {a.path}, "
                f"{arguments_b[key]!r} in {b.path}"
            )
    layers_a, layers_b = a.metadata.get("layers_step", ""), b.metadata.get("layers_step", "")
    if layers_a and layers_b and layers_a != layers_b:
        raise ValueError(
            f"the traces hold the layers of different steps: {layers_a} in {a.path}, {layers_b} "
            f"in {b.path}; record both with the same --layers-step"
        )


def compare_tensors(name: str, x: torch.Tensor, y: torch.Tensor, rtol: float) -> StageResult:
    """max |x - y| and that over the larger of the two's largest magnitude; integer stages (token
    ids, codes) must be equal."""
    if tuple(x.shape) != tuple(y.shape):
        return StageResult(name, f"shape {tuple(x.shape)} vs {tuple(y.shape)}")
    shape = f"{tuple(x.shape)}"
    exact = not (x.is_floating_point() and y.is_floating_point())
    x, y = x.double(), y.double()
    if torch.isnan(x).any() or torch.isnan(y).any():
        return StageResult(name, "NaN", shape)
    if x.numel() == 0:
        return StageResult(name, "ok", shape, 0.0, 0.0)
    difference = (x - y).abs()
    difference[x == y] = 0  # equal infinities
    max_abs = float(difference.max())
    scale = float(torch.maximum(x.abs().max(), y.abs().max()))
    max_rel = max_abs / scale if scale > 0 and math.isfinite(scale) else max_abs
    if exact:
        unequal = int((x != y).sum())
        verdict = "ok" if unequal == 0 else f"{unequal} of {x.numel()} differ"
    else:
        verdict = "ok" if max_rel <= rtol else f"beyond rtol {rtol:.0e}"
    return StageResult(name, verdict, shape, max_abs, max_rel)


@dataclass
class Comparison:
    a: Trace
    b: Trace
    rtol: float
    stages: list  # StageResult per stage, in run order
    layers: list  # StageResult per block of the layers step
    notes: list

    @property
    def agree(self) -> bool:
        return all(result.ok for result in self.stages + self.layers)

    def first(self, results) -> StageResult | None:
        return next((result for result in results if not result.ok), None)


def compare(a_path, b_path, rtol: float = 1e-4) -> Comparison:
    """Every stage of trace `a` against trace `b`, in `a`'s run order (then what only `b` has)."""
    if not (rtol > 0 and math.isfinite(rtol)):
        raise ValueError(f"--rtol must be a positive number, got {rtol}")
    a, b = read(a_path), read(b_path)
    check_comparable(a, b)
    names = a.order + [name for name in b.order if name not in a.tensors]
    notes = []
    a_layers = any(name.startswith("layers/") for name in a.order)
    b_layers = any(name.startswith("layers/") for name in b.order)
    if a_layers != b_layers:
        only = a.path if a_layers else b.path
        notes.append(f"only {only} has layers; record both with --layers to compare blocks")
        names = [name for name in names if not name.startswith("layers/")]
    stages, layers = [], []
    for name in names:
        if name not in a.tensors:
            result = StageResult(name, f"missing in {a.path}")
        elif name not in b.tensors:
            result = StageResult(name, f"missing in {b.path}")
        else:
            result = compare_tensors(name, a.tensors[name], b.tensors[name], rtol)
        (layers if name.startswith("layers/") else stages).append(result)
    return Comparison(a, b, rtol, stages, layers, notes)


def describe(trace: Trace) -> str:
    m = trace.metadata
    what = [m.get("implementation", "?"), m["system"], f"{m['steps']} steps"]
    what += [m[key] for key in ("dtype", "device") if key in m]
    return f"{trace.path} ({', '.join(what)})"


def report(comparison: Comparison) -> str:
    lines = [f"a: {describe(comparison.a)}", f"b: {describe(comparison.b)}", ""]
    lines.append(f"{'stage':48} {'shape':20} {'max abs':>9} {'max rel':>9}  verdict")
    for result in comparison.stages + comparison.layers:
        errors = [
            f"{e:9.2e}" if math.isfinite(e) else f"{'-':>9}"
            for e in (result.max_abs, result.max_rel)
        ]
        lines.append(
            f"{result.name:48} {result.shape:20} {errors[0]} {errors[1]}  {result.verdict}"
        )
    lines += [""] + comparison.notes
    first_stage = comparison.first(comparison.stages)
    first_block = comparison.first(comparison.layers)
    if comparison.agree:
        count = len(comparison.stages) + len(comparison.layers)
        lines.append(f"all {count} stages agree (rtol {comparison.rtol:.0e})")
    if first_stage is not None:
        lines.append(f"first stage beyond tolerance: {first_stage.name} ({first_stage.verdict})")
    if first_block is not None:
        step = comparison.a.metadata.get("layers_step")
        lines.append(
            f"first block beyond tolerance in step {step}: {first_block.name} "
            f"({first_block.verdict})"
        )
    return "\n".join(lines)


# the commands: python -m minildm trace, python -m minildm compare


def trace_settings(args):
    """The traced run's settings: the generation commands' defaults for the weights, and only the
    options the system has."""
    import minildm

    defaults = dict((EMBEDDED_DEFAULTS if args.weights is None else OFFICIAL_DEFAULTS)[args.system])
    if args.weights is not None and args.system in ("sd", "ldm"):
        size = trained_size(args.system, args.weights)  # the size the folder's UNet was trained at
        defaults.update(height=size, width=size)
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
    folder, settings = trace_settings(args)
    implementation = args.reference or "minildm"
    if args.layers_step is not None and not args.layers:
        raise ValueError("--layers-step chooses the step --layers records: add --layers")
    layers_step = (args.layers_step or 0) if args.layers else None
    check_settings(args.system, settings, layers_step)
    check_device(args.device)
    out = Path(args.out or f"{args.system}-{implementation}.safetensors")
    check_writable_file(out, "--out")  # before the recording, which can take minutes
    folder = resolve_folder(folder)
    started = time.perf_counter()
    tensors, metadata = record(
        args.system, folder, settings, implementation, layers_step, args.device, DTYPES[args.dtype]
    )
    write(out, tensors, metadata)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(
        f"{out}: {len(tensors)} tensors ({size / 1e6:.1f} MB) from the {implementation} "
        f"{args.system} pipeline on {folder}, {settings.steps} steps, "
        f"{time.perf_counter() - started:.1f} s"
    )


def main_compare(args) -> int:
    try:
        comparison = compare(args.a, args.b, args.rtol)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(comparison))
    return 0 if comparison.agree else 1
