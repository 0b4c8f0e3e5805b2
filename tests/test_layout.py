"""The import rules the layout promises (docs/ARCHITECTURE.md), read from the source:
stage modules never import each other (only ``loop`` and ``engine`` compose stages), shared modules
import no stage, nothing imports ``pipeline.run``, and ``sam_core`` knows nothing of Ray,
Hydra or the pipeline (the official package only as the benchmark's optional oracle)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.stages import STAGES
from tests.conftest import REPO

COMPOSING_STAGES = {"loop", "engine"}


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


def stage_imports(path: Path) -> set[str]:
    return {name.rsplit(".", 1)[1] for name in imports(path)
            if name.startswith("pipeline.stages.") and name.rsplit(".", 1)[1] in STAGES}


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
