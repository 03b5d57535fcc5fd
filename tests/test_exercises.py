"""The lessons' exercises: each lesson listed has at least two, every solution between nbgrader's
markers with a check cell after it; notebooks/student.py strips the solutions; the student
versions, run in a real kernel, fail at every check with a message that names the function to
write (not a traceback into minildm) and nowhere else, while the stored teacher versions passed
every check (tests/test_notebooks.py re-runs them)."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
from conftest import oracle

FOLDER = Path(__file__).parent.parent / "notebooks"
EXERCISE_LESSONS = [
    "01_tokenizers_and_text_encoders",
    "02_autoencoders",
    "03_unet_and_cross_attention",
    "04_samplers",
    "05_stable_diffusion",
    "06_ldm",
    "07_vq_diffusion",
    "08_training",
]
CHECK = re.compile(r"# check: exercise (\d+)")


def load_student_module():
    spec = importlib.util.spec_from_file_location("student", FOLDER / "student.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


student = load_student_module()


def code_cells(notebook: dict) -> list:
    return [c for c in notebook["cells"] if c["cell_type"] == "code"]


def exercises(notebook: dict) -> tuple:
    """(number of solutions, the check cells' exercise numbers in order)."""
    cells = code_cells(notebook)
    solutions = sum("".join(c["source"]).count(student.BEGIN) for c in cells)
    checks = [int(m.group(1)) for c in cells if (m := CHECK.match("".join(c["source"])))]
    return solutions, checks


def test_strip_source_replaces_solutions_and_removes_hidden_tests():
    source = (
        "def f(x):\n"
        "    ### BEGIN SOLUTION\n"
        "    return 2 * x\n"
        "    ### END SOLUTION\n"
        "assert f(1) == 2\n"
        "### BEGIN HIDDEN TESTS\n"
        "assert f(2) == 4\n"
        "### END HIDDEN TESTS\n"
    )
    stripped = student.strip_source(source)
    print(stripped)
    assert stripped == (
        "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\nassert f(1) == 2\n"
    )
    for broken in ("### BEGIN SOLUTION\nx = 1\n", "x = 1\n### END SOLUTION\n"):
        with pytest.raises(ValueError, match="SOLUTION"):
            student.strip_source(broken)


@pytest.mark.parametrize("name", EXERCISE_LESSONS)
def test_lesson_has_checked_exercises_that_the_teacher_version_passes(name):
    notebook = json.loads((FOLDER / f"{name}.ipynb").read_text())
    solutions, checks = exercises(notebook)
    print(f"{name}: {solutions} exercises, checks {checks}")
    assert solutions >= 2 and checks == list(range(1, solutions + 1))
    for cell in code_cells(notebook):
        match = CHECK.match("".join(cell["source"]))
        if match:
            text = "".join("".join(o.get("text", "")) for o in cell["outputs"])
            assert f"exercise {match.group(1)}: right" in text, f"{name}: stored check {text!r}"
    stripped = student.student_version(notebook)
    left = "\n".join("".join(c["source"]) for c in code_cells(stripped))
    assert student.BEGIN not in left and left.count("raise NotImplementedError()") == solutions


def test_student_versions_fail_every_check_and_nothing_else(tmp_path):
    """Written by the documented command, then run top to bottom with errors allowed."""
    nbclient = oracle("nbclient")
    import nbformat

    assert student.main([str(tmp_path), *EXERCISE_LESSONS]) == 0
    for name in EXERCISE_LESSONS:
        notebook = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
        resources = {"metadata": {"path": str(FOLDER)}}  # run where the lessons run
        nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources=resources, allow_errors=True
        ).execute()
        failed = {}
        for index, cell in enumerate(notebook.cells):
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            if errors:
                failed[index] = (
                    cell.source.splitlines()[0],
                    errors[0]["ename"],
                    errors[0]["evalue"],
                )
        for line, ename, evalue in failed.values():
            print(f"{name}: {line} -> {ename}: {evalue}")
        checks = [f for f in failed.values() if CHECK.match(f[0])]
        teacher = json.loads((FOLDER / f"{name}.ipynb").read_text())
        assert len(checks) == len(failed) == exercises(teacher)[0]
        for line, ename, evalue in checks:
            number = CHECK.match(line).group(1)
            assert ename == "AssertionError" and evalue.startswith(f"exercise {number}: write")
