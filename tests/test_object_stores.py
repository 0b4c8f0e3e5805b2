"""retrain, eval and loop with every input and output in an object store: the moto S3
server on loopback (``s3_env``), the commands run as a user runs them (each starts its
own Ray, which inherits the endpoint), and nothing may land on the local disk instead."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.stages import run_stage
from pipeline.truth.synthetic import make_scene
from tests.test_loop import TINY as LOOP_TINY
from tests.test_retrain import TINY as RETRAIN_TINY
from tests.test_retrain import _write_shard

pytestmark = pytest.mark.slow


def run_command(cwd: Path, *overrides: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pipeline.run", *overrides, "cluster.num_cpus=1",
                           f"hydra.run.dir={cwd / 'hydra'}"],
                          cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def local_leftovers(cwd: Path) -> list[str]:
    """What a command wrote into its working directory besides Hydra's run folder: an
    output URL mistaken for a path would appear here (``s3:/...``)."""
    return sorted(p.name for p in cwd.iterdir() if p.name != "hydra")


@pytest.fixture
def bucket(s3_env):
    import s3fs

    fs = s3fs.S3FileSystem()
    name = "stages"
    if not fs.exists(name):
        fs.mkdir(name)
    return fs, name


def test_retrain_and_eval_on_s3_resume_from_s3(bucket, tmp_path):
    fs, b = bucket
    _write_shard(tmp_path / "sa_000000.tar", [3, 4])
    fs.put(str(tmp_path / "sa_000000.tar"), f"{b}/data/sa_000000.tar")
    (tmp_path / "sa_000000.tar").unlink()
    out = f"s3://{b}/run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    train = ["+stage=retrain", f"output={out}", *RETRAIN_TINY, "stage.version=a", "stage.steps=3",
             f"stage.data.shards=s3://{b}/data", "stage.data.synthetic.enabled=false",
             "stage.eval.enabled=false", "model.checkpoint=null"]

    # Cut after 2 of 3 steps: a registered but incomplete version, checkpoints in S3.
    run_command(cwd, *train, "stage.stop_at_step=2")
    fs.invalidate_cache()
    summary = json.loads(fs.cat_file(f"{b}/run/models/a/train_summary.json"))
    assert summary["steps"] == 2 and not summary["complete"]
    assert summary["model"] == f"{out}/models/a/model.pth"
    runs = fs.ls(f"{b}/run/train_runs/a")
    marked = sorted(p.rsplit("/", 1)[1] for p in runs if fs.exists(f"{p}/complete.json"))
    assert marked[-1] == "checkpoint_00000002"
    assert json.loads(fs.cat_file(f"{b}/run/train_runs/a/checkpoint_00000002/complete.json")) == {"step": 2}
    data = json.loads(fs.cat_file(f"{b}/run/models/a/data.json"))
    assert data["shards"] == [f"s3://{b}/data/sa_000000.tar"]

    # The same command continues from the checkpoint in S3.
    log = run_command(cwd, *train)
    fs.invalidate_cache()
    summary = json.loads(fs.cat_file(f"{b}/run/models/a/train_summary.json"))
    assert summary["steps"] == 3 and summary["complete"]
    steps = [json.loads(line)["step"] for line in fs.cat_file(f"{b}/run/models/a/history.jsonl").decode().splitlines()]
    assert steps == [1, 2, 3]
    assert re.findall(r"\[retrain\] step (\d+)/3 ", log) == ["3"], "the resumed run must not redo steps 1-2"
    with fs.open(f"{b}/run/models/a/model.pth", "rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    assert "mask_decoder.iou_token.weight" in state
    assert fs.cat_file(f"{b}/run/models/a/figures/training.png")[:4] == b"\x89PNG"

    # Eval of the registered version, by name, as the architecture it was registered
    # with (its config.yaml read from S3), the report written to S3.
    run_command(cwd, "+stage=eval", f"output={out}", "stage.checkpoint=a", "stage.num_images=1",
                "stage.size=[128,128]", "stage.max_masks_per_image=2", "stage.clicks=[1,2]",
                "stage.amg.points_per_side=4")
    fs.invalidate_cache()
    report = json.loads(fs.cat_file(f"{b}/run/eval/eval.json"))
    assert report["model"] == f"{out}/models/a/model.pth" and report["arch"] == "vit_tiny"
    assert report["images"] == 1 and 0.0 <= report["point_miou_1"] <= 1.0
    assert local_leftovers(cwd) == []
    assert not [p for p in fs.find(f"{b}/run") if ".tmp-" in p], "temporary objects left behind"


def test_loop_on_s3(bucket, tmp_path, tiny_checkpoint):
    """A round with the pool, the start model and the output in S3: the annotator
    actors, the training workers and the evaluation read the model from there."""
    fs, b = bucket
    for seed in (11, 12, 13):
        Image.fromarray(make_scene(seed, size=(96, 128)).image).save(tmp_path / f"scene_{seed}.jpg", quality=92)
        fs.put(str(tmp_path / f"scene_{seed}.jpg"), f"{b}/pool/scene_{seed}.jpg")
    fs.put(str(tiny_checkpoint), f"{b}/start/model.pth")
    start, out = f"s3://{b}/start/model.pth", f"s3://{b}/loop"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run_command(cwd, "+stage=loop", f"input=s3://{b}/pool", f"output={out}", "model=vit_tiny",
                f"stage.init_checkpoint={start}", *LOOP_TINY, "stage.rounds=1")
    fs.invalidate_cache()
    report = json.loads(fs.cat_file(f"{b}/loop/loop_report.json"))
    assert report["rounds_done"] == 1 and [r["round"] for r in report["rounds"]] == [0, 1]
    r0, r1 = report["rounds"]
    assert r0["model"] == r1["from_model"] == start
    assert r1["model"] == f"{out}/models/round_001/model.pth"
    assert r1["images_annotated"] == 3 and r1["training_steps"] == 2
    assert json.loads(fs.cat_file(f"{b}/loop/models/round_001/eval.json")) == r1["eval"]
    assert fs.exists(f"{b}/loop/rounds/round_001/done.json")
    assert "| 1 | round_001 |" in fs.cat_file(f"{b}/loop/loop_report.md").decode()
    import pyarrow.parquet as pq
    import s3fs

    from pipeline.models.loader import model_identity

    manifest = pq.read_table(f"{b}/loop/rounds/round_001/dataset/manifest", filesystem=s3fs.S3FileSystem())
    assert set(manifest.column("model_sha256").to_pylist()) == {model_identity(str(tiny_checkpoint))}
    assert local_leftovers(cwd) == []


@pytest.mark.parametrize("stage", ["retrain", "eval", "loop"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(stage, compose_config, tmp_path):
    for url, reason in (("http://127.0.0.1:9/out", "read-only"), ("nosuchscheme://bucket/out", "cannot write")):
        # retrain reads no input= and eval's would be ground truth: only loop reads tmp_path
        inputs = [f"input={tmp_path}"] if stage == "loop" else []
        cfg = compose_config(f"+stage={stage}", f"output={url}", *inputs)
        with pytest.raises(ValueError, match=reason):
            run_stage(cfg)
    assert list(tmp_path.iterdir()) == []
