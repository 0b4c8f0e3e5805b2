"""notebooks/explore_dataset.ipynb runs top to bottom on a generated dataset."""
from __future__ import annotations

import re

import nbclient
import nbformat

from pipeline.stages import run_stage

from .dataset_factory import REPO, compose, make_dataset

NOTEBOOK = REPO / "notebooks" / "explore_dataset.ipynb"


def execute(dataset_dir, monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("DATASET_DIR", str(dataset_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return notebook


def outputs_of(notebook, mime: str) -> list[str]:
    return [o["data"][mime] for c in notebook.cells if c.cell_type == "code"
            for o in c.outputs if mime in o.get("data", {})]


def test_notebook_on_stats_output(tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "dataset", num_shards=2, images_per_shard=3)
    summary = run_stage(compose("stats", dataset.root, overrides=["stage.parallel=local"]))
    notebook = execute(dataset.root, monkeypatch)
    # one overlay figure and the six report figures
    assert len(outputs_of(notebook, "image/png")) == 7
    tables = "\n".join(outputs_of(notebook, "text/plain"))
    assert re.search(rf"^Masks\s+{summary['masks']}\s+1.1B$", tables, re.M), tables
    assert re.search(rf"^Images\s+{summary['images']}\s+11M$", tables, re.M), tables
    assert "synthetic_000001" in tables  # the manifest and the per-mask table are shown


def test_notebook_on_bare_sa1b_tars(tmp_path, monkeypatch):
    """No stats/ and no manifest: the notebook computes statistics itself."""
    dataset = make_dataset(tmp_path / "sa1b", num_shards=1, images_per_shard=4, layout="sa1b")
    notebook = execute(dataset.root, monkeypatch)
    assert len(outputs_of(notebook, "image/png")) == 7
    streams = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                      for o in c.outputs)
    assert "stats computed for 1 of 1 shards" in streams


def test_notebook_on_sample_output(tmp_path, monkeypatch, tiny_checkpoint, ray_local):
    """The project's own output: fully_auto on sample/images (random-weights model, so
    few masks), which must validate clean, then stats, then the notebook."""
    out = tmp_path / "sample"
    run_stage(compose("fully_auto", REPO / "sample" / "images", out, overrides=[
        "model=vit_tiny", f"model.checkpoint={tiny_checkpoint}", "amg.points_per_side=4", "amg.pred_iou_thresh=0",
        "amg.stability_score_thresh=0", "stage.images_per_unit=2"]))
    assert run_stage(compose("validate", out, overrides=["stage.parallel=local"]))["problems"] == 0
    summary = run_stage(compose("stats", out, overrides=["stage.parallel=local"]))
    assert summary["images"] == len(list((REPO / "sample" / "images").iterdir()))
    notebook = execute(out, monkeypatch)
    assert len(outputs_of(notebook, "image/png")) == 7
