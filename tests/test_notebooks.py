"""Every notebook runs top to bottom (its cells assert what they show), and the CLI answers."""

from pathlib import Path

import pytest
from conftest import oracle

from minildm.__main__ import main

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    """In a real Jupyter kernel, started in notebooks/ as Jupyter would: `import minildm` works
    only from an installed package (pip install . or -e .), not from the test's path."""
    nbclient = oracle("nbclient")
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    cells = [c for c in notebook.cells if c.cell_type == "code"]
    print(f"{path.name}: {len(cells)} code cells ran in a python3 kernel")


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
