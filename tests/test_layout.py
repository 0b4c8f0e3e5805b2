"""The import rules the layout promises (docs/ARCHITECTURE.md), read from the source:
``pipeline``'s subpackages form layers that import only downwards, no module imports
itself through others (no cycles), stage modules never import each other (only
``loop`` and ``engine`` compose stages), nothing imports ``pipeline.run``, and
``sam_core`` knows nothing of Ray, Hydra or the pipeline (the official package only as
the benchmark's optional oracle)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.stages import STAGES
from tests.conftest import REPO

COMPOSING_STAGES = {"loop", "engine"}
# pipeline's parts from the top down: a part may import the parts below it, never one
# above it or beside it (parts on one line are independent of each other).
LAYERS = [
    ("run",),
    ("stages",),
    ("compose",),
    ("annotate",),
    ("training",),
    ("execution",),
    ("masks", "stats"),
    ("models",),
    ("truth",),
    ("dataset",),
    ("inputs",),
    ("config",),
    ("paths", "storage"),
]
LEVEL = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Dotted names of the modules ``path`` imports (``from a import b`` gives a and a.b)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    nodes = tree.body if top_level_only else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*parent, base] if p)
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(*folders: str) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's ``__init__`` counts as the package)."""
    modules = {module_name(p): p for p in python_files(*folders)}
    return {name: {n for n in imports(path) if n in modules and n != name} for name, path in modules.items()}


def part(module: str) -> str | None:
    """The part of ``pipeline`` a module belongs to: its subpackage or top-level module."""
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


def stage_imports(path: Path) -> set[str]:
    return {name.rsplit(".", 1)[1] for name in imports(path)
            if name.startswith("pipeline.stages.") and name.rsplit(".", 1)[1] in STAGES}


def test_every_part_of_the_pipeline_has_a_layer():
    parts = {part(m) for m in import_graph("pipeline")} - {None}
    assert parts == set(LEVEL), f"without a layer: {sorted(parts - set(LEVEL))}; gone: {sorted(set(LEVEL) - parts)}"


def test_parts_import_only_the_layers_below_them():
    wrong = []
    for module, imported in import_graph("pipeline").items():
        here = part(module)
        for other in imported:
            there = part(other)
            if here and there and here != there and LEVEL[there] <= LEVEL[here]:
                way = "beside" if LEVEL[there] == LEVEL[here] else "up"
                wrong.append(f"{module} imports {other} ({way}: {here} -> {there})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_through_others():
    graph = import_graph("pipeline", "sam_core")
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                cycles.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, [*path, other])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # A package imports its own modules (its __init__ re-exports them): not a cycle of concepts.
    cycles = [c for c in cycles if not any(b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_imports_no_other_stage_unless_it_composes_them(stage):
    path = REPO / "pipeline" / "stages" / f"{stage}.py"
    others = stage_imports(path) - {stage}
    if stage in COMPOSING_STAGES:
        assert others <= set(STAGES)
    else:
        assert not others, f"{path.name} imports the stage module(s) {sorted(others)}: move shared code out"


def test_shared_modules_import_no_stage():
    offenders = {str(p.relative_to(REPO)): sorted(stage_imports(p))
                 for p in python_files("pipeline", "sam_core", "jobs", "benchmarks")
                 if "stages" not in p.parts and stage_imports(p)}
    assert not offenders


def test_nothing_imports_the_command_line_entry_point():
    offenders = [str(p.relative_to(REPO)) for p in python_files("pipeline", "sam_core", "jobs", "benchmarks", "tests")
                 if imports(p) & {"pipeline.run", "pipeline.run.main"}]
    assert not offenders


def test_user_paths_are_resolved_in_one_place():
    users = [str(p.relative_to(REPO)) for p in python_files("pipeline")
             if {"pipeline.paths.user_path"} & imports(p)]
    assert users == ["pipeline/config/paths.py"]


def test_sam_core_knows_nothing_of_ray_hydra_or_the_pipeline():
    forbidden = ("pipeline", "ray", "hydra", "omegaconf")
    for path in python_files("sam_core"):
        used = {n for n in imports(path) if n.split(".")[0] in forbidden}
        assert not used, f"{path.relative_to(REPO)} imports {sorted(used)}"
        # The official package and its test oracle: only the benchmark, only on demand.
        oracle = {n for n in imports(path) if n.split(".")[0] in ("segment_anything", "tests")}
        if path.name == "bench.py":
            assert oracle and not {n for n in imports(path, top_level_only=True)
                                   if n.split(".")[0] in ("segment_anything", "tests")}
        else:
            assert not oracle, f"{path.relative_to(REPO)} imports {sorted(oracle)}"


def test_sam_core_command_line_tools_are_apart_from_the_library():
    """Library modules never import the command-line tools (``sam_core/tools/``)."""
    offenders = [str(p.relative_to(REPO)) for p in python_files("sam_core")
                 if "tools" not in p.parts and {n for n in imports(p) if n.startswith("sam_core.tools")}]
    assert not offenders
