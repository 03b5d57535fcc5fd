"""Parity traces (minildm/tools/trace.py): minildm's and diffusers' runs of the four embedded tiny
models, recorded stage by stage and block by block, agree; `compare` finds an edited stage or block
exactly where it was edited, names missing and reshaped stages, and refuses what is not a trace or
not the same run; the recipe of docs/trace.md for writing a trace without minildm gives a file
`compare` reads.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import oracle
from safetensors.torch import load_file, save_file

import minildm
from minildm.tools import trace
from minildm.tools.trace import Settings

REPO = Path(__file__).parent.parent
PROMPT = "a red circle on a blue background"
STEPS = {"sd": 8, "ldm": 8, "ldm-uncond": 8, "vq-diffusion": 50}  # VQ-Diffusion: its whole chain
LAYERS_STEP = 3
SETTINGS = {
    "sd": Settings(PROMPT, STEPS["sd"], guidance=4.0, height=64, width=64),
    "ldm": Settings(PROMPT, STEPS["ldm"], guidance=4.0, height=64, width=64),
    "ldm-uncond": Settings(None, STEPS["ldm-uncond"]),
    "vq-diffusion": Settings(PROMPT, STEPS["vq-diffusion"], guidance=2.0, truncation=0.9),
}


def documented_stages(system: str, steps: int, guided: bool) -> list:
    """The stage names of the Trace format section of docs/trace.md, in run order."""
    names = []
    if system != "ldm-uncond":
        names += ["text/input_ids", "text/encoder_output"]
        if guided and system != "vq-diffusion":  # VQ-Diffusion's "no text" is learned
            names += ["text/uncond_input_ids", "text/uncond_encoder_output"]
        names.append("text/context")
    names.append("latents/initial")
    predictions = ["pred_uncond", "pred_cond"] if guided else ["pred"]
    gumbel = ["gumbel"] if system == "vq-diffusion" else []
    for i in range(steps):
        stages = ["model_input", "timestep", *predictions, "scheduler_input", *gumbel, "latents"]
        names += [f"step/{i:03d}/{stage}" for stage in stages]
    return names + ["image/decoded", "image"]


def diffusers_blocks(system: str, denoiser) -> set:
    """The blocks a layers trace should hold, from diffusers' own module classes."""
    if system == "vq-diffusion":
        kinds = ("BasicTransformerBlock",)
        named = {"norm_out", "out"}
    else:
        kinds = ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D")
        kinds += ("Attention",) if system == "ldm-uncond" else ()  # its self-attention blocks
        named = {"time_embedding", "conv_in", "conv_out"}
    found = {name for name, module in denoiser.named_modules() if type(module).__name__ in kinds}
    return found | named


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """Each system traced by both implementations, with the blocks of step LAYERS_STEP."""
    oracle("diffusers")
    folder = tmp_path_factory.mktemp("traces")
    paths = {}
    for system, settings in SETTINGS.items():
        for implementation in trace.IMPLEMENTATIONS:
            tensors, metadata = trace.record(
                system, minildm.TINY_MODELS[system], settings, implementation, LAYERS_STEP
            )
            path = folder / f"{system}-{implementation}.safetensors"
            trace.write(path, tensors, metadata)
            paths[system, implementation] = path
    return paths


@pytest.mark.parametrize("system", list(SETTINGS))
def test_minildm_and_diffusers_traces_agree(traces, system):
    ours, theirs = traces[system, "minildm"], traces[system, "diffusers"]
    comparison = trace.compare(ours, theirs, rtol=1e-4)
    worst_stage = max(comparison.stages, key=lambda r: r.max_rel)
    worst_block = max(comparison.layers, key=lambda r: r.max_rel)
    print(
        f"\n{system}: {len(comparison.stages)} stages, worst {worst_stage.name} "
        f"max rel {worst_stage.max_rel:.1e}; {len(comparison.layers)} blocks, worst "
        f"{worst_block.name} {worst_block.max_rel:.1e} (rtol 1e-4)"
    )
    if system == "vq-diffusion":
        comparison.stages = cut_off_flips_allowed(comparison, SETTINGS[system].truncation)
    assert comparison.agree, trace.report(comparison)
    # the stages are the documented ones, in run order, in both files
    guided = system != "ldm-uncond"
    expected = documented_stages(system, STEPS[system], guided)
    for path in (ours, theirs):
        order = trace.read(path).order
        assert [name for name in order if not name.startswith("layers/")] == expected
    # integer stages compared exactly, the images to the parity tests' 1e-4
    by_name = {result.name: result for result in comparison.stages}
    assert by_name["image"].max_abs < 1e-4
    if system == "vq-diffusion":
        assert all(by_name[f"step/{i:03d}/latents"].max_abs == 0 for i in range(STEPS[system]))
    # the blocks: every one diffusers' denoiser has of the recorded kinds, under its own name
    diffusers = oracle("diffusers")
    pipe = trace.load(system, minildm.TINY_MODELS[system], "diffusers", None, None)
    assert isinstance(pipe, getattr(diffusers, trace.DIFFUSERS_PIPELINES[system]))
    denoiser = getattr(pipe, trace.DENOISER[system])
    recorded = {result.name.removeprefix("layers/") for result in comparison.layers}
    assert recorded == diffusers_blocks(system, denoiser)
    metadata = trace.read(ours).metadata
    assert metadata["layers_step"] == str(LAYERS_STEP) and metadata["system"] == system
    assert json.loads(metadata["versions"])["torch"] == torch.__version__


def cut_off_flips_allowed(comparison, rate: float) -> list:
    """VQ-Diffusion's truncation keeps, at every position, the likeliest codes until their summed
    probability reaches `rate` (pipelines/vq_diffusion.py, truncate): a step function of the
    log-probabilities. A code whose preceding sum lies within rounding of `rate` is kept by one
    implementation and cut (log-probability -70 after the clamp) by the other when the two
    transformers differ in the last bits, which they do by host (summation order); the codes drawn
    are the same (the latents are asserted equal below) and the cut code's probability is what
    differs. Such a stage passes here only if every difference is one of these flips and the rest
    agrees within the tolerance (docs/parity/pipelines.md, truncation is a step function)."""
    results = []
    for result in comparison.stages:
        if result.ok or not result.name.endswith("/scheduler_input"):
            results.append(result)
            continue
        ours = comparison.a.tensors[result.name].double()  # (B, K, N)
        theirs = comparison.b.tensors[result.name].double()
        flipped = (ours == -70) != (theirs == -70)
        flips = []
        for kept, cut in ((ours, theirs), (theirs, ours)):
            for b, k, n in (flipped & (cut == -70)).nonzero().tolist():
                column = kept[b, :, n].exp()
                before = float(column[column > column[k]].sum())  # the likelier codes' total
                flips.append(before)
        rest = ~flipped
        scale = float(ours.abs().max())
        error = float((ours - theirs)[rest].abs().max()) / scale
        near = all(abs(before - rate) < 1e-5 for before in flips)
        print(
            f"{result.name}: {len(flips)} code(s) kept by one side only, the likelier codes "
            f"summing to {[round(f, 7) for f in flips]} (cut-off {rate}); elsewhere max rel "
            f"{error:.1e}"
        )
        if near and error <= comparison.rtol:
            result = trace.StageResult(result.name, "ok", result.shape, float("nan"), error)
        results.append(result)
    return results


def test_recording_leaves_the_pipeline_as_it_was():
    pipe = minildm.StableDiffusionPipeline.from_pretrained(minildm.TINY_SD)
    settings = SETTINGS["sd"]
    tensors, _ = trace.record_pipeline(pipe, "sd", settings, "minildm", layers_step=1)
    assert "step" not in vars(pipe.scheduler) and "decode" not in vars(pipe.vae)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in pipe.unet.modules())
    assert not any(m._forward_hooks for m in pipe.text_encoder.modules())
    plain = pipe(**trace.pipeline_call("sd", settings)).images
    error = float(np.abs(tensors["image"].numpy() - plain).max())
    print(f"traced vs untraced image: {error:.1e}")
    assert error == 0.0


def edited(source: Path, target: Path, edit) -> Path:
    tensors = load_file(source)
    from safetensors import safe_open

    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    edit(tensors, metadata)
    save_file(tensors, target, metadata=metadata)
    return target


def run_compare(a, b, *options):
    return subprocess.run(
        [sys.executable, "-m", "minildm", "compare", str(a), str(b), *options],
        capture_output=True,
        text=True,
    )


def test_an_edited_stage_or_block_is_found_where_it_was_edited(traces, tmp_path):
    ours, theirs = traces["sd", "minildm"], traces["sd", "diffusers"]

    def nudge(name):
        def edit(tensors, metadata):
            tensors[name] = tensors[name].clone()
            tensors[name].view(-1)[5] += 1e-2 * tensors[name].abs().max()

        return edit

    stage = "step/004/scheduler_input"  # one step's guided prediction
    changed = edited(ours, tmp_path / "stage.safetensors", nudge(stage))
    comparison = trace.compare(changed, theirs)
    failed = [r.name for r in comparison.stages + comparison.layers if not r.ok]
    print(f"edited {stage}: failing {failed}")
    assert failed == [stage] and comparison.first(comparison.stages).name == stage
    result = run_compare(changed, theirs)
    assert result.returncode == 1
    assert f"first stage beyond tolerance: {stage}" in result.stdout

    block = "layers/down_blocks.1.attentions.0"
    changed = edited(ours, tmp_path / "block.safetensors", nudge(block))
    comparison = trace.compare(changed, theirs)
    assert comparison.first(comparison.stages) is None
    assert comparison.first(comparison.layers).name == block
    result = run_compare(changed, theirs)
    assert result.returncode == 1
    assert f"first block beyond tolerance in step {LAYERS_STEP}: {block}" in result.stdout
    # a change below the tolerance is not one
    assert run_compare(ours, theirs).returncode == 0
    small = edited(ours, tmp_path / "small.safetensors", lambda t, m: t[stage].mul_(1 + 1e-6))
    assert run_compare(small, theirs).returncode == 0


def test_a_missing_or_reshaped_stage_is_named(traces, tmp_path):
    ours, theirs = traces["sd", "minildm"], traces["sd", "diffusers"]

    def drop(tensors, metadata):
        del tensors["step/002/pred_cond"]
        order = json.loads(metadata["order"])
        order.remove("step/002/pred_cond")
        metadata["order"] = json.dumps(order)

    dropped = edited(ours, tmp_path / "dropped.safetensors", drop)
    result = run_compare(dropped, theirs)
    print(result.stdout[-400:])
    assert result.returncode == 1
    assert (
        f"first stage beyond tolerance: step/002/pred_cond (missing in {dropped})" in result.stdout
    )

    def reshape(tensors, metadata):
        tensors["text/context"] = tensors["text/context"][:1].clone()

    reshaped = edited(ours, tmp_path / "reshaped.safetensors", reshape)
    comparison = trace.compare(reshaped, theirs)
    first = comparison.first(comparison.stages)
    assert first.name == "text/context" and first.verdict.startswith("shape (1, 16, 64) vs (2, 16")

    def recode(tensors, metadata):
        tensors["text/input_ids"] = tensors["text/input_ids"].clone()
        tensors["text/input_ids"][0, 2] += 1

    recoded = edited(ours, tmp_path / "recoded.safetensors", recode)
    first = trace.compare(recoded, theirs).first(trace.compare(recoded, theirs).stages)
    assert first.name == "text/input_ids" and first.verdict == "1 of 16 differ"


def test_what_is_not_a_trace_or_not_the_same_run_is_refused(traces, tmp_path):
    ours = traces["sd", "minildm"]
    text = tmp_path / "notes.txt"
    text.write_text("not a tensor file")
    plain = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2)}, plain)
    cases = [
        (text, "is not a safetensors file"),
        (plain, "is not a minildm trace: its metadata's format is None"),
        (tmp_path / "absent.safetensors", "no such file"),
        (traces["ldm", "minildm"], "different runs: system sd in .*, ldm in"),
    ]
    fewer = edited(ours, tmp_path / "steps.safetensors", lambda t, m: m.update(steps="7"))
    cases.append((fewer, "different runs: steps 8 in .*, 7 in"))
    reseeded = tmp_path / "seed.safetensors"
    edited(ours, reseeded, lambda t, m: m.update(arguments=json.dumps({"seed": 1})))
    cases.append((reseeded, "different runs: seed 0 in .*, 1 in"))
    for other, message in cases:
        with pytest.raises(ValueError, match=message):
            trace.compare(ours, other)
        result = run_compare(ours, other)
        assert result.returncode == 2 and re.search(message, result.stderr), result.stderr
    with pytest.raises(ValueError, match="--rtol must be a positive number"):
        trace.compare(ours, ours, rtol=0)


def run_trace(*arguments, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "minildm", "trace", *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_trace_command_line(tmp_path):
    result = run_trace("ldm-uncond", "--steps", "3", "--layers", "--layers-step", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "ldm-uncond-minildm.safetensors"
    recorded = trace.read(path)
    assert recorded.metadata["steps"] == "3" and recorded.metadata["layers_step"] == "2"
    assert "step/002/latents" in recorded.tensors and "layers/conv_in" in recorded.tensors
    print(result.stdout.strip())
    for arguments, message in [
        (["ldm-uncond", "a face"], "trace ldm-uncond takes no prompt"),
        (["sd"], "trace sd needs a prompt"),
        (["ldm-uncond", "--guidance", "3"], "trace ldm-uncond has no --guidance"),
        (["vq-diffusion", "x", "--height", "64"], "trace vq-diffusion has no --height"),
        (["sd", "x", "--steps", "4", "--layers", "--layers-step", "4"], "the layers step must"),
        (["sd", "x", "--steps", "0"], r"steps must lie in \[1, 999\]"),
        (["sd", "x", "--layers-step", "2"], "--layers-step chooses the step --layers records"),
        (["sd", "x", "--out", str(tmp_path / "nowhere" / "t.safetensors")], "does not exist"),
    ]:
        result = run_trace(*arguments, cwd=tmp_path)
        assert result.returncode == 2 and re.search(message, result.stderr), (arguments, result)


def test_the_documented_recipe_writes_a_trace_compare_reads(traces, tmp_path):
    """A porter's code writes its intermediates with numpy and safetensors alone (docs/trace.md's
    example, run as written): here the arrays come from minildm's own trace, so they agree."""
    page = (REPO / "docs" / "trace.md").read_text()
    example = re.search(r"<!-- trace-example -->\s*```python\n(.*?)```", page, re.S).group(1)
    namespace = {}
    exec(compile(example, "docs/trace.md", "exec"), namespace)
    from safetensors.numpy import load_file as load_numpy

    arrays = load_numpy(str(traces["sd", "minildm"]))
    stages = {name: array for name, array in arrays.items() if not name.startswith("layers/")}
    mine = tmp_path / "mine.safetensors"
    namespace["save_trace"](str(mine), stages, system="sd", steps=STEPS["sd"])
    comparison = trace.compare(mine, traces["sd", "diffusers"])
    assert comparison.notes and comparison.agree, trace.report(comparison)
    # without an `order`, the stages are put in run order by name
    assert trace.read(mine).order == [
        n for n in trace.read(traces["sd", "minildm"]).order if not n.startswith("layers/")
    ]
