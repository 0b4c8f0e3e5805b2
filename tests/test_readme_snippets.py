"""The README's reading snippets, extracted from README.md and run as they are (only
the dataset folder ``D`` is replaced), on a dataset of one shard: the PyTorch one with
two DataLoader workers (more workers than shards), the Hugging Face one on the card."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

from pipeline.stages import run_stage

from .dataset_factory import REPO, compose, make_dataset

SECTION = "### Reading a dataset"


def snippets() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def run_snippet(code: str, dataset_root, tmp_path) -> subprocess.CompletedProcess:
    code, n = re.subn(r'^D = ".*?"', f"D = {str(dataset_root)!r}", code, flags=re.M)
    assert n == 1, "the snippet must name its dataset in one line: D = \"...\""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf")}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    dataset = make_dataset(tmp_path_factory.mktemp("readme") / "dataset", num_shards=1,
                           images_per_shard=3)
    run_stage(compose("stats", dataset.root, overrides=["stage.parallel=local"]))
    return dataset


def test_readme_has_both_snippets():
    torch_snippet, hf_snippet = snippets()
    assert "num_workers=2" in torch_snippet and "DataLoader" in torch_snippet
    assert "load_dataset(D" in hf_snippet


def test_pytorch_snippet_with_two_workers_on_one_shard(one_shard, tmp_path):
    result = run_snippet(snippets()[0], one_shard.root, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split(" ", 1) for line in result.stdout.splitlines()]
    seen = {key: tuple(ast.literal_eval(shapes.replace(") (", "), ("))) for key, shapes in lines}
    assert sorted(key for key, _ in lines) == sorted(s.key for s in one_shard.samples), \
        "every image exactly once"
    for s in one_shard.samples:
        h, w = s.image.shape[:2]
        assert seen[s.key] == ((h, w, 3), (len(s.masks), h, w))


def test_hugging_face_snippet(one_shard, tmp_path):
    result = run_snippet(snippets()[1], one_shard.root, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    n, key, size, masks = re.fullmatch(r"(\d+) (\S+) (\(.*\)) (\d+)\n", result.stdout).groups()
    first = one_shard.samples[0]
    assert (int(n), key) == (len(one_shard.samples), first.key)
    assert ast.literal_eval(size) == (first.image.shape[1], first.image.shape[0])
    assert int(masks) == len(first.masks)
