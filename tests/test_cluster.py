"""Cluster behaviour for real on one machine: an S3-compatible object store on loopback
(moto's server, as s3fs's own tests use) and a two-node Ray cluster (a head and a second
node joined with `ray start --address`), with jobs submitted through the Ray Jobs API."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.local_cluster import LocalRayCluster, kill_tree
from tests.conftest import REPO, scene
from tests.test_fully_auto import FAST, check_dataset

pytestmark = pytest.mark.slow


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def write_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(scene(96 + 8 * (i % 8), 64, seed=i)).save(folder / f"img_{i:02d}.jpg", quality=90)


# --- object store ----------------------------------------------------------------------

def stage_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.run", *overrides]


def test_fully_auto_on_s3_killed_and_resumed_then_stats_from_s3(s3_env, tmp_path, tiny_checkpoint):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("engine")
    local_images = tmp_path / "images"
    write_images(local_images, 6)
    fs.put(str(local_images) + "/", "engine/images/", recursive=True)
    inp, out = "s3://engine/images", "s3://engine/dataset"
    command = stage_command(
        "+stage=fully_auto", f"input={inp}", f"output={out}", "model=vit_tiny", f"model.checkpoint={tiny_checkpoint}",
        *FAST, "stage.images_per_unit=1", "cluster.num_cpus=1", f"hydra.run.dir={tmp_path / 'run'}",
    )

    # First run: SIGKILL the driver and every process it started (its Ray workers too, as
    # when its machine is lost) once a unit is committed.
    first = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: fs.exists("engine/dataset/manifest/part_000000.parquet") or first.poll() is not None,
                 timeout=300, what="the first committed unit", interval=0.2)
    finally:
        kill_tree(first)
    assert first.returncode == -signal.SIGKILL, "the first run must be killed mid-run, not finish"
    fs.invalidate_cache()
    committed_before = len(fs.glob("engine/dataset/manifest/part_*.parquet"))
    assert committed_before >= 1

    second = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:]
    assert f"{committed_before} units already committed, {6 - committed_before} to do" in second.stdout

    fs.invalidate_cache()
    summary = json.loads(fs.cat_file("engine/dataset/summary.json"))
    assert summary["units_skipped"] == committed_before
    assert summary["units_committed"] == 6 - committed_before
    assert summary["dataset"]["images"] == 6, "the resumed run must see every committed unit"
    local = tmp_path / "dataset"
    fs.get("engine/dataset/", str(local) + "/", recursive=True)
    records = check_dataset(local, inp)
    assert len(records) == 6
    assert not [p for p in fs.find("engine/dataset") if ".tmp-" in p], "temporary objects left behind"

    stats_out = tmp_path / "stats_out"
    stats = subprocess.run(
        stage_command("+stage=stats", f"input={out}", f"output={stats_out}", "cluster.num_cpus=1",
                      f"hydra.run.dir={tmp_path / 'run_stats'}"),
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert stats.returncode == 0, stats.stderr[-3000:]
    images = pq.read_table(stats_out / "stats" / "images.parquet")
    assert images.num_rows == 6


# --- two-node Ray cluster --------------------------------------------------------------

@pytest.fixture
def two_node_cluster():
    """A Ray head and a second node, 1 CPU each (so one annotator actor fits per node),
    each `ray start --block` in its own process group so a node can be lost at once."""
    with LocalRayCluster(nodes=2, num_cpus=1) as cluster:
        yield cluster


def submit_fully_auto(cluster: LocalRayCluster, job_id: str, inp: Path, out: Path, checkpoint: Path, *extra: str):
    submit = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "submit.py"), "--address", cluster.dashboard, "submit",
         "--job-id", job_id, "+stage=fully_auto", f"input={inp}", f"output={out}",
         "model=vit_tiny", f"model.checkpoint={checkpoint}", *FAST, "stage.images_per_unit=1", "stage.num_actors=2",
         f"hydra.run.dir={out.parent / 'run'}", *extra],
        env=cluster.env, capture_output=True, text=True, timeout=300,
    )
    assert submit.returncode == 0, submit.stderr
    assert "cluster=existing" in submit.stdout


def wait_for_job(client, job_id: str, timeout: float = 300):
    from ray.job_submission import JobStatus

    return wait_for(lambda: (s := client.get_job_status(job_id)) in
                    (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and s,
                    timeout=timeout, what=f"job {job_id} to end", interval=1)


def actor_nodes(cluster: LocalRayCluster) -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "UnitWorker")], limit=100,
                         raise_on_missing_output=False)
    return {a.node_id for a in actors if a.node_id}


def test_job_on_two_nodes_writes_every_image_once(two_node_cluster, tmp_path, tiny_checkpoint):
    from ray.job_submission import JobStatus, JobSubmissionClient

    inp, out = tmp_path / "images", tmp_path / "dataset"
    write_images(inp, 6)
    submit_fully_auto(two_node_cluster, "two-nodes", inp, out, tiny_checkpoint)
    client = JobSubmissionClient(two_node_cluster.dashboard)
    status = wait_for_job(client, "two-nodes")
    logs = client.get_job_logs("two-nodes")
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert len(check_dataset(out, str(inp))) == 6
    # The actors were spread over both nodes, and both did work.
    assert len(actor_nodes(two_node_cluster)) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert [a["restarts"] for a in summary["actors"]] == [0, 0]
    assert all(a["units"] >= 1 for a in summary["actors"]), summary["actors"]


def test_job_on_two_nodes_survives_losing_a_node(two_node_cluster, tmp_path, tiny_checkpoint):
    """Each node has room for one actor, so the lost node's replacement cannot be
    placed anywhere: the run must finish on the surviving actor instead of waiting."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    inp, out = tmp_path / "images", tmp_path / "dataset"
    write_images(inp, 16)  # enough that units are still queued when the loss is noticed
    submit_fully_auto(two_node_cluster, "lose-a-node", inp, out, tiny_checkpoint)
    client = JobSubmissionClient(two_node_cluster.dashboard)

    # Lose the second node once work is under way on both.
    wait_for(lambda: list((out / "manifest").glob("part_*.parquet")) if (out / "manifest").exists() else
             client.get_job_status("lose-a-node") in (JobStatus.FAILED, JobStatus.STOPPED),
             timeout=300, what="the first committed unit", interval=0.2)
    assert len(actor_nodes(two_node_cluster)) == 2
    two_node_cluster.kill_node(1)

    status = wait_for_job(client, "lose-a-node")
    logs = client.get_job_logs("lose-a-node")
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert two_node_cluster.alive_nodes() == 1
    assert len(check_dataset(out, str(inp))) == 16
    summary = json.loads((out / "summary.json").read_text())
    assert sum(a["restarts"] for a in summary["actors"]) >= 1, "the lost node's actor must have been replaced"
    assert summary["units_failed"] == 0 and summary["dataset"]["images"] == 16


def test_readme_cluster_walkthrough_as_written(tmp_path):
    """README, "Clusters": `python jobs/local_cluster.py --nodes 2 --num-cpus 1`, then
    `python jobs/submit.py --address <printed> submit --wait +stage=fully_auto input=...
    output=...` with nothing else (the default model): every image once. A job whose
    actors ask for more CPUs than one node has would wait 10 minutes instead."""
    import re
    import threading

    inp, out = tmp_path / "images", tmp_path / "dataset"
    write_images(inp, 4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a user's plain shell
    cluster = subprocess.Popen([sys.executable, "jobs/local_cluster.py", "--nodes", "2", "--num-cpus", "1"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(cluster.stdout), daemon=True).start()
    try:
        hint = wait_for(lambda: next((ln for ln in lines if "python jobs/submit.py --address" in ln), None)
                        or (cluster.poll() is not None and "exited"), timeout=300, what="the cluster's address")
        assert hint != "exited", "".join(lines)[-3000:]
        address = re.search(r"--address (\S+)", hint).group(1)
        submit = subprocess.run(
            [sys.executable, "jobs/submit.py", "--address", address, "submit", "--wait", "+stage=fully_auto",
             f"input={inp}", f"output={out}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=420,
        )
        assert submit.returncode == 0, submit.stdout[-4000:]
        assert "SUCCEEDED" in submit.stdout
        assert len(check_dataset(out, str(inp))) == 4
        summary = json.loads((out / "summary.json").read_text())
        assert all(a["restarts"] == 0 for a in summary["actors"])
        # A job of one unit gets one actor: it must ask for what one node holds (1 CPU),
        # not for the cluster's 2 CPUs, which no node has.
        gcs = re.search(r"address='([^']+)'", hint).group(1)
        probe = subprocess.run(
            [sys.executable, "-c", "import sys, ray; from omegaconf import OmegaConf; "
             "from pipeline.execution.cluster import pool_size; "
             "ray.init(address=sys.argv[1], log_to_driver=False); size = pool_size(OmegaConf.create("
             "{'num_actors': None, 'cpus_per_actor': 1}), 1); print('pool', size.actors, size.num_cpus)", gcs],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
        assert re.findall(r"^pool (\S+) (\S+)$", probe.stdout, re.M) == [("1", "1")], probe.stdout + probe.stderr
    finally:
        cluster.send_signal(signal.SIGINT)  # Ctrl-C, as the README says
        try:
            cluster.wait(timeout=180)  # stopping two nodes' process trees took over 60 s on a loaded box
        except subprocess.TimeoutExpired:
            kill_tree(cluster)
    assert cluster.returncode == 0, "".join(lines)[-3000:]


# --- scheduler: actors that cannot be placed -------------------------------------------

class _Idle:
    def ready(self) -> int:
        return os.getpid()


def test_no_placeable_actor_fails_with_a_clear_error_instead_of_hanging(ray_local):
    from pipeline.execution.scheduler import PlacementError, UnitScheduler
    from pipeline.inputs.entries import Item, Unit

    # Asks for a resource no node has, as a replacement does whose node is gone.
    remote = ray_local.remote(_Idle).options(num_cpus=0, resources={"lost_node": 1})
    scheduler = UnitScheduler(remote.remote, actors=2, placement_timeout_s=3)
    start = time.monotonic()
    try:
        with pytest.raises(PlacementError, match="no annotator actor could be started for 3 s"):
            scheduler.wait_ready()
        with pytest.raises(PlacementError):
            scheduler.run([Unit(0, (Item("k", 1, "x.jpg"),))])
    finally:
        scheduler.close()
    assert time.monotonic() - start < 30


def test_job_uploads_leave_out_what_git_ignores():
    """The working dir a job uploads excludes outputs, runs and virtual environments
    (everything in .gitignore): a checkout with runs/ would exceed Ray's upload limit."""
    from jobs.submit import DEFAULT_RUNTIME_ENV, runtime_env

    excludes = set(runtime_env(DEFAULT_RUNTIME_ENV)["excludes"])
    assert {"runs/", "outputs/", ".venv/", "venv/", ".ci-venv/", ".git"} <= excludes
