"""The lessons in notebooks/: each runs top to bottom in a real Jupyter kernel within its time (its
cells assert what they show), and each stores its outputs, pictures included, so that it reads
where the repository is browsed. Also the command-line's status and tokenize commands."""

import json
import time
from pathlib import Path

import pytest
from conftest import oracle

from minildm import schedulers
from minildm.__main__ import main

FOLDER = Path(__file__).parent.parent / "notebooks"
# One lesson per concept, read in this order (README, "Learning path").
LESSONS = [
    "00_diffusion_in_one_page",
    "01_tokenizers_and_text_encoders",
    "02_autoencoders",
    "03_unet_and_cross_attention",
    "04_samplers",
    "05_stable_diffusion",
    "06_ldm",
    "07_vq_diffusion",
    "08_training",
    "09_how_minildm_is_checked",
    "10_fine_tuning",
]
# on the 2-core CI machine of record, kernel start-up included; a slower host multiplies them by its
# pace, measured in the same run (tests/pace.py)
SECONDS_EACH = 60
# lesson 10 trains two fine-tunings live, each for under a minute
SECONDS = {name: SECONDS_EACH for name in LESSONS} | {"10_fine_tuning": 240}
SECONDS_ALL = 480
MEGABYTES_EACH = 2.0  # stored outputs are pictures at modest resolution, not large binaries


def read(name: str) -> dict:
    return json.loads((FOLDER / f"{name}.ipynb").read_text())


def code_cells(notebook: dict) -> list:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def source(notebook: dict) -> str:
    return "\n".join("".join(cell["source"]) for cell in code_cells(notebook))


def test_the_notebooks_are_the_lessons():
    assert sorted(p.stem for p in FOLDER.glob("*.ipynb")) == LESSONS


def test_lessons_find_their_weights_with_the_shared_helper():
    """official_or_tiny (checkpoints/download.py) decides official weights or tiny model; no
    lesson spells out a weights path of its own."""
    for name in LESSONS:
        code = source(read(name))
        assert "../weights" not in code, f"{name} looks for ../weights itself"
        if "TINY_" in code or "official_or_tiny" in code:
            print(f"{name}: {code.count('official_or_tiny(')} official_or_tiny calls")


def test_lessons_that_may_load_official_weights_keep_freed_memory_first():
    """At official size a notebook is as fast as the command line only after
    retain_freed_memory() (docs/speed.md, "The API path"): each lesson that may load official
    weights calls it in the cell that chooses them, before any model runs."""
    for name in LESSONS:
        for cell in code_cells(read(name)):
            code = "".join(cell["source"])
            if "official_or_tiny(" in code:
                chooses = code.rindex("official_or_tiny(")
                assert "retain_freed_memory()" in code[chooses:], name
                assert ".from_pretrained(" not in code[: code.index("retain_freed_memory()")]
                print(f"{name}: retain_freed_memory() after official_or_tiny, before any model")


@pytest.fixture(scope="module")
def executed():
    """Runs every lesson once, in a python3 kernel started in notebooks/ as Jupyter would, so that
    `import minildm` works only from an installed package (pip install . or -e .). Returns
    {name: (seconds, error or None)}; the outputs are not written back (notebooks/execute.py
    does that)."""
    nbclient = oracle("nbclient")
    oracle("matplotlib")
    import nbformat

    results = {}
    for name in LESSONS:
        start = time.perf_counter()
        try:
            notebook = nbformat.read(FOLDER / f"{name}.ipynb", as_version=4)
            resources = {"metadata": {"path": str(FOLDER)}}
            nbclient.NotebookClient(
                notebook, timeout=600, kernel_name="python3", resources=resources
            ).execute()
            error = None
        except Exception as exception:  # a failing cell: reported by its lesson's test below
            error = f"{type(exception).__name__}: {exception}"
        results[name] = (time.perf_counter() - start, error)
        print(f"{name}: {results[name][0]:.1f} s{' FAILED' if error else ''}", flush=True)
    return results


@pytest.mark.parametrize("name", LESSONS)
def test_notebook_runs_within_its_time(executed, host_pace, name):
    seconds, error = executed[name]
    limit = SECONDS[name] * host_pace
    print(f"{name}: ran in {seconds:.1f} s (limit {SECONDS[name]} s x pace {host_pace:.2f})")
    assert error is None, f"{name} failed in a fresh kernel:\n{error[-3000:]}"
    assert seconds < limit, (
        f"{name} took {seconds:.1f} s; this lesson must run in {SECONDS[name]} s on the CI "
        f"machine of record, {limit:.0f} s on this host (pace {host_pace:.2f}, tests/pace.py)"
    )


def test_all_notebooks_run_within_eight_minutes(executed, host_pace):
    total = sum(seconds for seconds, _ in executed.values())
    print(f"all {len(executed)} lessons: {total:.1f} s (limit {SECONDS_ALL} s x {host_pace:.2f})")
    assert total < SECONDS_ALL * host_pace


@pytest.mark.parametrize("name", LESSONS)
def test_notebook_stores_its_outputs(name):
    """Executed in order, top to bottom (counts 1..N), with no error, at least one picture, and a
    first markdown cell that titles the lesson."""
    notebook = read(name)
    cells = code_cells(notebook)
    counts = [cell["execution_count"] for cell in cells]
    outputs = [output for cell in cells for output in cell["outputs"]]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    errors = [output for output in outputs if output["output_type"] == "error"]
    size = (FOLDER / f"{name}.ipynb").stat().st_size / 1e6
    print(
        f"{name}: {len(cells)} code cells, {len(outputs)} outputs, {len(images)} images, {size:.2f} MB"
    )
    assert notebook["cells"][0]["cell_type"] == "markdown"
    assert "".join(notebook["cells"][0]["source"]).startswith("# ")
    assert counts == list(range(1, len(cells) + 1)), f"not executed top to bottom: {counts}"
    assert not errors, f"stored error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert images, "no stored picture"
    assert size < MEGABYTES_EACH


def test_samplers_notebook_covers_every_scheduler():
    code = source(read("04_samplers"))
    discrete = {"VQDiffusionScheduler"}  # samples code indices, not vectors: its own lesson, 07
    missing = [name for name in schedulers.__all__ if name not in discrete and name not in code]
    assert not missing, f"04_samplers does not use {missing}"
    assert "VQDiffusionScheduler" in source(read("07_vq_diffusion"))


def test_each_system_has_its_notebook():
    uses = {
        "05_stable_diffusion": [
            "StableDiffusionPipeline",
            "StableDiffusionImg2ImgPipeline",
            "StableDiffusionInpaintPipeline",
        ],
        "06_ldm": ["LDMTextToImagePipeline", "LDMPipeline"],
        "07_vq_diffusion": ["VQDiffusionPipeline"],
    }
    for name, classes in uses.items():
        code = source(read(name))
        assert all(c in code for c in classes), f"{name} should use {classes}"


def test_command_line(capsys):
    main([])
    status = capsys.readouterr().out
    assert (
        "StableDiffusionPipeline" in status
        and "DDIMScheduler" in status
        and "VQDiffusionPipeline" in status
    )
    main(["tokenize", "a photograph of an astronaut riding a horse"])
    assert "[49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]" in capsys.readouterr().out
    main(["tokenize", "--bert", "A painting of a squirrel eating a burger"])
    assert "[101, 1037, 4169, 1997, 1037, 18197, 5983, 1037, 15890, 102]" in capsys.readouterr().out
