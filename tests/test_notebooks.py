"""Every notebook runs top to bottom (its cells assert what they show), and the CLI answers."""

import json
from pathlib import Path

import pytest

from minildm.__main__ import main

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    namespace = {"__name__": "__main__"}
    for number, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            exec(compile(source, f"{path.name} cell {number}", "exec"), namespace)


def test_command_line(capsys):
    main([])
    status = capsys.readouterr().out
    assert "StableDiffusionPipeline" in status and "DDIMScheduler" in status and "VQDiffusionPipeline" in status
    main(["tokenize", "a photograph of an astronaut riding a horse"])
    assert "[49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]" in capsys.readouterr().out
    main(["tokenize", "--bert", "A painting of a squirrel eating a burger"])
    assert "[101, 1037, 4169, 1997, 1037, 18197, 5983, 1037, 15890, 102]" in capsys.readouterr().out
