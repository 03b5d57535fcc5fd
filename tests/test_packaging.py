"""The package as a user installs it: `pip install .` carries every data file, the `minildm` command
and `python -m minildm` work from any directory, the requirement files agree with pyproject.toml,
and the source reads at the width and with the citations the project promises."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import minildm

REPOSITORY = Path(__file__).resolve().parent.parent
SOURCE = REPOSITORY / "minildm"
INSTALLED = Path(minildm.__file__).resolve().parent


def requirement_lines(path: Path) -> list[str]:
    """The requirements a pip requirements file names, without comments and `-r` includes."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-r")]


def test_requirement_files_agree_with_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    runtime = requirement_lines(REPOSITORY / "requirements.txt")
    print(f"runtime dependencies: {runtime}")
    assert runtime == project["dependencies"]
    names = [re.split(r"[<>=!~\[]", line)[0].lower() for line in runtime]
    assert names == ["torch", "numpy", "pillow", "safetensors", "tokenizers"]
    assert (
        requirement_lines(REPOSITORY / "requirements-dev.txt")
        == project["optional-dependencies"]["test"]
    )


def test_tests_run_against_the_installed_package_under_ci():
    """CI installs a clean clone with `pip install .` (not editable) and runs the tests against that
    copy, so a data file missing from the package fails there rather than for a user."""
    print(f"minildm imported from {INSTALLED}")
    if not os.environ.get("CI"):
        pytest.skip("only CI promises a non-editable install; here the source tree may be imported")
    assert INSTALLED != SOURCE, (
        "under CI the tests must import the installed minildm, not the checkout"
    )


def test_every_data_file_is_in_the_package():
    """Every file of the source package (vocabularies, embedded models, their READMEs, the weights
    manifest) is present, with the same size, in the package that was imported."""
    wanted = [p for p in SOURCE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    missing = []
    for path in wanted:
        installed = INSTALLED / path.relative_to(SOURCE)
        if not installed.is_file() or installed.stat().st_size != path.stat().st_size:
            missing.append(str(path.relative_to(SOURCE)))
    print(f"{len(wanted)} files in minildm/, {len(missing)} missing or different in {INSTALLED}")
    assert not missing, f"not in the installed package (pyproject.toml package-data): {missing}"
    manifest = (INSTALLED / "weights_manifest.txt").read_text()
    assert manifest == (REPOSITORY / "weights_manifest.txt").read_text()


def test_the_distribution_declares_its_command_and_dependencies():
    try:
        distribution = importlib.metadata.distribution("minildm")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("minildm is not installed here (pip install -e .)")
    scripts = [e for e in distribution.entry_points if e.group == "console_scripts"]
    assert [(e.name, e.value) for e in scripts] == [("minildm", "minildm.__main__:main")]
    assert any(r.startswith("tokenizers") for r in distribution.requires)


@pytest.mark.parametrize(
    "command", [["minildm"], [sys.executable, "-m", "minildm"]], ids=["script", "-m"]
)
def test_command_runs_from_another_directory(command, tmp_path):
    """From a directory that is not the checkout, with nothing on PYTHONPATH: only an installed
    package can answer."""
    if command[0] == "minildm":
        if shutil.which("minildm") is None:
            if os.environ.get("CI"):
                pytest.fail("the minildm console script is not on PATH after pip install .")
            pytest.skip("the minildm command is not installed here (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for arguments in (["--help"], ["download", "--list"]):
        result = subprocess.run(
            command + arguments, cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-2000:]
        print(f"{' '.join(command[-1:] + arguments)}: {len(result.stdout.splitlines())} lines")
    assert "CompVis/stable-diffusion-v1-4" in result.stdout


def test_source_reads_at_100_columns():
    """The share of lines over 100 and over 120 characters in minildm/ (nanoGPT: 4.3% and 0.7%)."""
    lines = [
        line for path in sorted(SOURCE.rglob("*.py")) for line in path.read_text().splitlines()
    ]
    over_100 = sum(len(line) > 100 for line in lines) / len(lines)
    over_120 = sum(len(line) > 120 for line in lines) / len(lines)
    print(
        f"minildm/: {len(lines)} lines, {over_100:.1%} over 100 characters, {over_120:.1%} over 120"
    )
    assert over_100 <= 0.02
    assert over_120 == 0


def test_citations_point_at_sources_a_reader_can_open():
    """Comments cite papers, the original repositories' files or docs/ of this repository, never an
    internal notes document that is not in the repository."""
    pattern = re.compile("facts" + r" [0-9]")
    files = [
        p for folder in ("minildm", "tests", "notebooks") for p in (REPOSITORY / folder).rglob("*")
    ]
    hits = [
        f"{path.relative_to(REPOSITORY)}:{number}"
        for path in files
        if path.suffix in (".py", ".ipynb", ".md")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits
