"""The layout of DESIGN.md, held by an `ast` scan of every file under minildm/ (function-local
imports included): files stand on floors and import only from their own floor or below, the model
files import nothing from minildm but `layers` (the safety checker also `clip`) and no library but
torch, and no chain of imports comes back to where it started.

Floors, from the ground: (1) layers, tokenizer, shapes; (2) the model files and schedulers/, and
lora and textual_inversion, the concepts that adapt the models; (3) cpu_speed; (4) checkpoints/;
(5) pipelines/ and the package's public names (__init__); (6) train/; (7) tools/; (8) __main__."""

import ast
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "minildm"

MODEL_FILES = ("clip", "ldm_bert", "autoencoder", "unet", "vq_transformer", "safety_checker")
# what each model file may import from minildm: the shared layers (and the safety checker, the
# CLIP vision tower it is built on)
MODEL_FILE_IMPORTS = {name: {"minildm.layers"} for name in MODEL_FILES}
MODEL_FILE_IMPORTS["safety_checker"] = {"minildm.layers", "minildm.clip"}
# and the libraries beyond the standard one: torch; the safety checker also resizes its input with
# PIL (through numpy), bicubic as CLIPImageProcessor does, which is part of what it computes
MODEL_FILE_LIBRARIES = {name: {"torch"} for name in MODEL_FILES}
MODEL_FILE_LIBRARIES["safety_checker"] = {"torch", "numpy", "PIL"}


def floor(module: str) -> int:
    """The floor of a minildm module, by its dotted name."""
    parts = module.split(".")[1:]  # without the leading "minildm"
    top = parts[0] if parts else "__init__"
    if top in ("layers", "tokenizer", "shapes"):
        return 1
    if top in MODEL_FILES or top == "schedulers":
        return 2
    if top in ("lora", "textual_inversion"):  # concepts that adapt the models: floor 2 beside them
        return 2
    if top == "cpu_speed":
        return 3
    if top == "checkpoints":
        return 4
    if top in ("pipelines", "__init__"):
        return 5
    if top == "train":
        return 6
    if top == "tools":
        return 7
    if top == "__main__":
        return 8
    raise AssertionError(f"{module} stands on no floor of DESIGN.md: give it one")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def is_package(module: str, root: Path) -> bool:
    return (root.parent / Path(*module.split(".")) / "__init__.py").exists()


def exists(module: str, root: Path) -> bool:
    path = root.parent / Path(*module.split("."))
    return path.with_suffix(".py").exists() or path.is_dir()


def imports_of(source: str, module: str, root: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement of a file, at any depth. `from a import
    b` names a.b when that is a module of minildm, else a; relative imports are resolved."""
    found = []
    package = module if is_package(module, root) else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = base.split(".")[0] == "minildm" and exists(candidate, root)
                found.append((candidate if is_module else base, node.lineno))
    return found


def scan(root: Path = SOURCE, replaced: dict | None = None) -> tuple[dict, list[str]]:
    """The import graph of the package under `root` ({module: {imported minildm module}}) and every
    breach of the floors. `replaced` maps a module name to source text read instead of its file,
    for the test that shows a breach is caught."""
    graph, breaches = {}, []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        source = (replaced or {}).get(module) or path.read_text()
        edges = set()
        for imported, line in imports_of(source, module, root):
            where = f"{path.relative_to(root.parent)}:{line}"
            if imported.split(".")[0] != "minildm":
                top = imported.split(".")[0]
                short = module.split(".")[-1]
                third_party = top not in sys.stdlib_module_names and top != "__future__"
                is_model_file = short in MODEL_FILES and module.count(".") == 1
                if is_model_file and third_party and top not in MODEL_FILE_LIBRARIES[short]:
                    breaches.append(
                        f"{where}: model file {module} imports {imported} "
                        f"(libraries: only {sorted(MODEL_FILE_LIBRARIES[short])})"
                    )
                continue
            if imported == module:
                continue
            edges.add(imported)
            if imported != "minildm" and floor(imported) > floor(module):
                breaches.append(
                    f"{where}: {module} (floor {floor(module)}) imports {imported} "
                    f"(floor {floor(imported)}): an import may not run upward"
                )
            short = module.split(".")[-1]
            if short in MODEL_FILES and module.count(".") == 1:
                allowed = MODEL_FILE_IMPORTS[short]
                if imported not in allowed:
                    breaches.append(
                        f"{where}: model file {module} imports {imported}; a model file imports "
                        f"only {sorted(allowed)} from minildm (conversion and loading live in "
                        "checkpoints/, speed in cpu_speed)"
                    )
        graph[module] = edges
    return graph, breaches


def cycles(graph: dict) -> list[list[str]]:
    """Every import cycle (one per strongly connected group of two or more modules), ignoring the
    edges to the bare package `minildm`, whose __init__ only re-exports public names."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target == "minildm" or target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_file_stands_on_its_floor():
    graph, breaches = scan()
    print(f"{len(graph)} modules scanned, {sum(map(len, graph.values()))} imports inside minildm")
    assert not breaches, "\n".join(breaches)


def test_no_import_cycle():
    graph, _ = scan()
    found = cycles(graph)
    assert not found, f"import cycles: {found}"


@pytest.mark.parametrize("model", MODEL_FILES)
def test_model_files_import_only_layers(model):
    graph, _ = scan()
    imported = graph[f"minildm.{model}"]
    print(f"minildm.{model} imports {sorted(imported)}")
    assert imported <= MODEL_FILE_IMPORTS[model]


@pytest.mark.parametrize(
    "model, line",
    [
        ("unet", "from minildm.cpu_speed import speed_up"),
        ("clip", "from minildm.checkpoints.clip import load_clip_text_model"),
        ("autoencoder", "    from minildm.checkpoints import load  # a function-local import"),
    ],
)
def test_a_breach_is_caught(model, line):
    """The scan is not vacuous: a model file that imports cpu_speed or checkpoints, even from
    inside a function, is reported, and an import back up closes a cycle the scan names."""
    source = (SOURCE / f"{model}.py").read_text()
    if line.startswith(" "):
        source += f"\n\ndef _deliberate():\n{line}\n"
    else:
        source += f"\n{line}\n"
    graph, breaches = scan(replaced={f"minildm.{model}": source})
    print("\n".join(breaches))
    assert any(f"model file minildm.{model} imports" in breach for breach in breaches)
    assert any("may not run upward" in breach for breach in breaches)
    assert cycles(graph), "an import from a model file up to its own loader closes a cycle"
