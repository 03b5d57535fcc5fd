"""Write the student versions of the lessons: every exercise's solution removed, outputs cleared.

    python notebooks/student.py OUT_DIR                 # all the lessons with exercises
    python notebooks/student.py OUT_DIR 04_samplers     # some of them

The solutions sit between nbgrader's markers, `### BEGIN SOLUTION` and `### END SOLUTION`, and
become `raise NotImplementedError()` under a `# YOUR CODE HERE` line, as nbgrader's own
`generate_assignment` writes them (a teacher with nbgrader can use the lessons directly; this
script needs nothing but the standard library). Cells between `### BEGIN HIDDEN TESTS` and
`### END HIDDEN TESTS` lose those lines. Each exercise's check cell (`# check: exercise N`) stays:
in the student version it fails, saying which function to write, until the student has.
"""

import json
import sys
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"


def strip_source(source: str) -> str:
    """A code cell's source with every solution replaced and every hidden test removed."""
    kept, inside = [], None
    for line in source.splitlines(keepends=True):
        marker = line.strip()
        if marker in (BEGIN, BEGIN_HIDDEN):
            if inside is not None:
                raise ValueError(f"{marker!r} inside an unclosed {inside!r}")
            inside = marker
            if marker == BEGIN:
                indent = line[: len(line) - len(line.lstrip())]
                kept += [f"{indent}# YOUR CODE HERE\n", f"{indent}raise NotImplementedError()\n"]
        elif marker in (END, END_HIDDEN):
            if inside != {END: BEGIN, END_HIDDEN: BEGIN_HIDDEN}[marker]:
                raise ValueError(f"{marker!r} without its BEGIN marker")
            inside = None
        elif inside is None:
            kept.append(line)
    if inside is not None:
        raise ValueError(f"{inside!r} is never closed")
    return "".join(kept)


def student_version(notebook: dict) -> dict:
    """The notebook (as read from .ipynb JSON) without solutions, hidden tests or outputs."""
    notebook = json.loads(json.dumps(notebook))  # a copy
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        cell["source"] = strip_source("".join(cell["source"])).splitlines(keepends=True)
        cell["outputs"] = []
        cell["execution_count"] = None
    return notebook


def has_exercises(path: Path) -> bool:
    return BEGIN in path.read_text()


def main(argv: list) -> int:
    if not argv:
        print(__doc__)
        return 2
    out = Path(argv[0])
    names = argv[1:]
    paths = [FOLDER / (n if n.endswith(".ipynb") else n + ".ipynb") for n in names]
    if not names:
        paths = [p for p in sorted(FOLDER.glob("[0-9][0-9]_*.ipynb")) if has_exercises(p)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        print(f"no notebook {', '.join(missing)} in {FOLDER}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        notebook = student_version(json.loads(path.read_text()))
        (out / path.name).write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
        count = sum(
            line.strip() == BEGIN
            for cell in json.loads(path.read_text())["cells"]
            if cell["cell_type"] == "code"
            for line in cell["source"]
        )
        print(f"{out / path.name}: {count} exercise(s) to solve")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
