"""The dataset contract under change and crash: a recorded plan, one model and one
configuration per dataset, isolation that converges and persists, one writer per output,
durable commits. Real Ray, real tars, real Parquet."""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline import storage
from pipeline.dataset import isolated, lease, manifest, plan
from pipeline.dataset.lease import Lease, LeaseHeld, LeaseLost
from pipeline.dataset.plan import PlanError
from pipeline.dataset.provenance import ConfigMismatch
from pipeline.inputs.entries import enumerate_input
from pipeline.stages import run_stage
from tests.conftest import encode, scene
from tests.test_fully_auto import check_dataset, overrides


def photos(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        (folder / name).write_bytes(encode(Image.fromarray(scene(64, 48, n)), "JPEG"))
    return folder


def ids_by_name(out: Path) -> dict[str, int]:
    return {r["source"].rsplit("/", 1)[-1]: r["image_id"] for r in manifest.read_table(str(out)).to_pylist()}


# --- the plan -------------------------------------------------------------------------

def test_inputs_added_and_removed_between_runs_keep_every_id_and_lose_nothing(
        compose_config, tmp_path, tiny_checkpoint, ray_local):
    inp = photos(tmp_path / "images", ["b.jpg", "d.jpg", "f.jpg", "h.jpg", "j.jpg"])
    out = tmp_path / "out"
    args = overrides(inp, out, tiny_checkpoint, "stage.images_per_unit=2")
    first = run_stage(compose_config(*args))
    assert first["inputs_added"] == 5 and first["units"] == 3
    before = ids_by_name(out)
    assert sorted(before.values()) == [1, 2, 3, 4, 5]

    # New names sort before and between the old ones; one committed input disappears.
    photos(inp, ["a.jpg", "c.jpg", "e.jpg"])
    (inp / "d.jpg").unlink()
    second = run_stage(compose_config(*args))
    assert second["inputs_added"] == 3 and second["inputs_gone"] == 1
    assert second["units_skipped"] == 3 and second["units_committed"] == 2
    after = ids_by_name(out)
    assert {name: after[name] for name in before} == before, "ids of planned inputs never change"
    assert sorted(after[n] for n in ("a.jpg", "c.jpg", "e.jpg")) == [6, 7, 8], "new inputs get new ids"
    assert len(after) == 8  # d.jpg's committed record is kept
    table = manifest.read_table(str(out)).to_pylist()
    assert sorted(r["key"] for r in table) == sorted(f"sa_{i}" for i in range(1, 9))

    # A changed unit size on an existing output would move images between units.
    with pytest.raises(PlanError, match="images_per_unit=2"):
        run_stage(compose_config(*overrides(inp, out, tiny_checkpoint, "stage.images_per_unit=3")))
    # Leaving it unset resumes with the recorded size.
    assert run_stage(compose_config(*overrides(inp, out, tiny_checkpoint)))["units_committed"] == 0


def test_a_planned_input_that_vanished_before_annotation_is_an_error_row(
        compose_config, tmp_path, tiny_checkpoint, ray_local):
    inp = photos(tmp_path / "images", [f"p{n}.jpg" for n in range(4)])
    out = tmp_path / "out"
    # A first start that died right after recording its plan.
    plan.load_or_extend(str(out), enumerate_input(str(inp)), images_per_unit=2)
    (inp / "p1.jpg").unlink()
    (inp / "p3.jpg").rename(inp / "p9.jpg")  # renamed: the old name is gone, the new one is new
    summary = run_stage(compose_config(*overrides(inp, out, tiny_checkpoint, "stage.images_per_unit=2")))
    assert summary["inputs_gone"] == 2 and summary["inputs_added"] == 1
    errors = {r["source"].rsplit("/", 1)[-1]: r for r in manifest.read_table(str(out), manifest.ERRORS_DIR).to_pylist()}
    assert set(errors) == {"p1.jpg", "p3.jpg"} and all("not found" in e["reason"] for e in errors.values())
    assert ids_by_name(out)["p9.jpg"] == 5


def test_uncommitted_shard_is_replaced_by_the_next_run(compose_config, tmp_path, tiny_checkpoint, ray_local):
    inp = photos(tmp_path / "images", [f"p{n}.jpg" for n in range(4)])
    out = tmp_path / "out"
    args = overrides(inp, out, tiny_checkpoint, "stage.images_per_unit=2")
    run_stage(compose_config(*args))
    # A crash between the shard's rename and its manifest part: a stale shard, no commit.
    (out / "manifest" / "part_000001.parquet").unlink()
    (out / "shards" / "sa_000001.tar").write_bytes(b"stale")
    summary = run_stage(compose_config(*args))
    assert summary["units_committed"] == 1
    assert len(check_dataset(out, str(inp))) == 4


# --- one model, one configuration ---------------------------------------------------

def test_a_resumed_run_with_other_settings_or_another_model_is_refused(
        compose_config, tmp_path, tiny_checkpoint, ray_local):
    inp = photos(tmp_path / "images", ["a.jpg", "b.jpg"])
    out = tmp_path / "out"
    checkpoint = tmp_path / "model.pth"
    shutil.copy(tiny_checkpoint, checkpoint)
    run_stage(compose_config(*overrides(inp, out, checkpoint)))
    recorded = (out / "config.yaml").read_bytes()

    with pytest.raises(ConfigMismatch, match=r"amg.points_per_side: 4 \(recorded\) vs 5 \(this run\)"
                                             r"\nWrite to a new output=.*allow_config_change"):
        run_stage(compose_config(*overrides(inp, out, checkpoint, "amg.points_per_side=5")))
    # The same path, other weights: the sha256 tells.
    torch.manual_seed(1)
    from sam_core import sam_model_registry

    torch.save(sam_model_registry["vit_tiny"]().state_dict(), checkpoint)
    with pytest.raises(ConfigMismatch, match="model_sha256"):
        run_stage(compose_config(*overrides(inp, out, checkpoint)))
    assert (out / "config.yaml").read_bytes() == recorded, "config.yaml is never overwritten"

    # An explicit override goes on and records both.
    photos(inp, ["c.jpg"])
    summary = run_stage(compose_config(*overrides(inp, out, checkpoint, "stage.allow_config_change=true")))
    assert summary["units_committed"] == 1
    assert (out / "config.yaml").read_bytes() == recorded
    assert len(list((out / "config_history").glob("*.yaml"))) == 1
    shas = {r["model_sha256"] for r in manifest.read_table(str(out)).to_pylist()}
    assert len(shas) == 2, "the manifest tells the two models apart"


def test_each_worker_verifies_the_checkpoint_it_loads(tmp_path, tiny_checkpoint):
    from pipeline.execution.worker import UnitWorker
    from sam_core import ChecksumError, checkpoint_sha256

    spec = {"kind": "grid", "model": {"arch": "vit_tiny", "checkpoint": str(tiny_checkpoint), "device": "cpu"},
            "amg": {"points_per_side": 4}, "model_sha256": "0" * 64}
    with pytest.raises(ChecksumError, match="replaced after the run recorded it"):
        UnitWorker(spec, {}, str(tmp_path), "0" * 64)
    UnitWorker({**spec, "model_sha256": checkpoint_sha256(tiny_checkpoint)}, {}, str(tmp_path), "x")


# --- poison isolation converges and persists -------------------------------------------

@pytest.mark.parametrize("crashing", [1, 2, 5])
def test_a_unit_with_crashing_images_finishes_with_default_retries(
        compose_config, tmp_path, tiny_checkpoint, ray_local, crashing):
    # Poison sorts first so that each careful try meets it early (the test's time, not
    # the behaviour, depends on that).
    poison = [f"a_poison{n}.jpg" for n in range(crashing)]
    inp = photos(tmp_path / "images", poison + [f"good{n:02d}.jpg" for n in range(20 - crashing)])
    out = tmp_path / "out"
    args = overrides(inp, out, tiny_checkpoint, "stage.num_actors=1", "stage.images_per_unit=20",
                     "stage.fault_injection.kill_worker_on=[*/a_poison*]")
    summary = run_stage(compose_config(*args))
    assert summary["units_committed"] == 1 and summary["images_ok"] == 20 - crashing
    assert len(summary["isolated"]) == crashing
    assert len(isolated.load(str(out))) == crashing, "isolation is persisted in the output"
    check_dataset(out, str(inp))

    # A rerun that has to redo the unit starts with the isolated images excluded: no crash.
    (out / "manifest" / "part_000000.parquet").unlink()
    again = run_stage(compose_config(*args))
    assert again["units_committed"] == 1 and again["actors"][0]["restarts"] == 0
    errors = manifest.read_table(str(out), manifest.ERRORS_DIR).to_pylist()
    assert sorted(e["source"].rsplit("/", 1)[-1] for e in errors if e["phase"] == "isolated") == poison


# --- one writer per output ----------------------------------------------------------------

def test_lease_is_exclusive_expires_and_fences(tmp_path, caplog):
    out = str(tmp_path / "out")
    first = Lease(out, ttl_s=60)
    first.acquire()
    with pytest.raises(LeaseHeld, match=rf"run {first.owner} \(host {socket.gethostname()}, pid {os.getpid()}"):
        Lease(out).acquire()
    lease.check(out, first.owner)
    # A holder that stopped beating is taken over, and that is logged.
    record = json.loads((tmp_path / "out" / "lease.json").read_text())
    first.release()
    record["heartbeat"] = time.time() - 120
    (tmp_path / "out" / "lease.json").write_text(json.dumps(record))
    second = Lease(out, ttl_s=60)
    second.acquire()
    assert "taking over the expired lease" in caplog.text
    with pytest.raises(LeaseLost):
        lease.check(out, record["owner"])
    second.release()
    assert not (tmp_path / "out" / "lease.json").exists()


def test_a_second_run_on_a_live_output_stops_and_touches_nothing(compose_config, tmp_path, tiny_checkpoint):
    inp = photos(tmp_path / "images", ["a.jpg"])
    out = tmp_path / "out"
    held = Lease(str(out), ttl_s=60)
    held.acquire()
    try:
        live_temp = out / "shards" / ".sa_000000.tar.tmp-livewriter"
        live_temp.parent.mkdir(parents=True)
        live_temp.write_bytes(b"being written")
        with pytest.raises(LeaseHeld, match="is being written by"):
            run_stage(compose_config(*overrides(inp, out, tiny_checkpoint)))
        assert live_temp.exists(), "start-up clean-up must never delete a live writer's files"
        assert not (out / "config.yaml").exists() and not (out / "plan").exists()
    finally:
        held.release()


def test_a_worker_that_lost_the_lease_commits_nothing(tmp_path, tiny_checkpoint):
    from pipeline.execution.worker import UnitWorker

    inp = photos(tmp_path / "images", ["a.jpg"])
    out = str(tmp_path / "out")
    unit = plan.load_or_extend(out, enumerate_input(str(inp)), 1).units[0]
    holder = Lease(out)
    holder.acquire()
    try:
        spec = {"kind": "grid", "model": {"arch": "vit_tiny", "checkpoint": str(tiny_checkpoint), "device": "cpu"},
                "amg": {"points_per_side": 4}}
        worker = UnitWorker(spec, {}, out, "x", lease_owner="someone-else")
        with pytest.raises(LeaseLost):
            list(worker.process_unit(unit))
        assert manifest.committed_units(out) == set()
    finally:
        holder.release()


# --- durability --------------------------------------------------------------------------

def test_a_local_commit_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    fs, root = storage.filesystem(str(tmp_path))
    with storage.atomic_open(fs, storage.join(root, "d", "x.bin")) as f:
        f.write(b"data")
    assert (tmp_path / "d" / "x.bin").read_bytes() == b"data"
    assert any(".x.bin.tmp-" in p for p in synced), "the file's data reaches the disk before the rename"
    assert str(tmp_path / "d") in synced, "the rename itself is made durable"


def test_audit_against_the_plan_finds_lost_duplicated_and_pending(tmp_path):
    inp = photos(tmp_path / "images", [f"p{n}.jpg" for n in range(5)])
    out = str(tmp_path / "out")
    units = plan.load_or_extend(out, enumerate_input(str(inp)), images_per_unit=2).units

    def row(item):
        return {"key": item.key, "image_id": item.image_id, "shard": "", "source": item.source, "source_sha256": "",
                "width": 0, "height": 0, "num_masks": 0, "model_sha256": "x", "status": "ok"}

    first, second = units[0].items, units[1].items
    manifest.write_part(out, manifest.MANIFEST_DIR, 0, [row(first[0])])  # first[1] lost
    manifest.write_part(out, manifest.MANIFEST_DIR, 1, [row(i) for i in second] + [row(second[0])])
    found = plan.audit(out)
    assert found.lost == [first[1].key]
    assert found.duplicated == [second[0].key]
    assert found.pending == [2] and found.unplanned == []
    assert plan.audit(str(tmp_path / "nothing")) is None


def test_validate_reports_images_lost_against_the_plan(compose_config, tmp_path, tiny_checkpoint, ray_local, capsys):
    import pyarrow.parquet as pq

    inp = photos(tmp_path / "images", [f"p{n}.jpg" for n in range(4)])
    out = tmp_path / "out"
    run_stage(compose_config(*overrides(inp, out, tiny_checkpoint, "stage.images_per_unit=2")))
    run_stage(compose_config("+stage=validate", f"input={out}", "output=null"))  # clean: no exit
    part = out / "manifest" / "part_000001.parquet"
    table = pq.read_table(part)
    lost = table.column("key")[1].as_py()
    pq.write_table(table.slice(0, 1), part)  # a committed unit that forgot an image
    with pytest.raises(SystemExit):
        run_stage(compose_config("+stage=validate", f"input={out}", "output=null"))
    printed = capsys.readouterr().out
    assert any(lost in line and "(lost)" in line for line in printed.splitlines()), printed
