"""Re-execute the notebooks in place, storing their outputs (text, images, plots) in the .ipynb.

    python notebooks/execute.py                  # all of them, in order
    python notebooks/execute.py 04_samplers      # some of them (names with or without .ipynb)

Each runs top to bottom in a fresh python3 Jupyter kernel started in notebooks/, as Jupyter would,
so `import minildm` finds the installed package (`pip install -e .` for a checkout). Needs
`pip install ".[test]"` (nbclient, ipykernel, matplotlib). Cell timings are not recorded, so a
re-run changes the files only where an output changed.
"""

import sys
import time
from pathlib import Path

import nbclient
import nbformat

FOLDER = Path(__file__).resolve().parent


def notebook_paths(names: list) -> list:
    if not names:
        return sorted(FOLDER.glob("[0-9][0-9]_*.ipynb"))
    paths = [FOLDER / (name if name.endswith(".ipynb") else name + ".ipynb") for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        known = ", ".join(p.stem for p in sorted(FOLDER.glob("*.ipynb")))
        raise SystemExit(
            f"no notebook {', '.join(missing)} in {FOLDER}; the notebooks are: {known}"
        )
    return paths


def execute(path: Path, timeout: int = 600) -> float:
    """Run one notebook in place; returns the seconds it took (kernel start-up included)."""
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    notebook.metadata.pop("widgets", None)
    nbformat.write(notebook, path)
    return seconds


def main(names: list):
    total = 0.0
    for path in notebook_paths(names):
        seconds = execute(path)
        total += seconds
        print(f"{path.name}: {seconds:.1f} s, {path.stat().st_size / 1e3:.0f} kB", flush=True)
    print(f"total {total:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
