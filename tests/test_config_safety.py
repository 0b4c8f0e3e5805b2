"""Configuration cannot execute code nor come from outside conf/: the real entry point
in a subprocess with hostile overrides (a local module that would write a file when
imported), the composed-config check for every vector, and the submit paths."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pipeline.config.guard import ConfigRefused, check_command_line, check_config
from pipeline.stages import STAGES, run_stage

from .dataset_factory import REPO, compose, make_dataset

# Imported by Hydra (callbacks, logging handlers) from the working directory, which
# `python -m` puts on sys.path: importing it is running it.
EVIL_MODULE = """\
import pathlib
pathlib.Path(__file__).with_name("pwned").write_text("code from the command line ran")


class Callback:
    def __init__(self, *args, **kwargs):
        pass


Handler = Callback
"""


@pytest.fixture(scope="module")
def evil_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("evil")
    (directory / "evil_mod.py").write_text(EVIL_MODULE)
    return directory


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("safety") / "dataset", num_shards=1)


def run_entry_point(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_rayjob_entrypoint_refuses_a_hostile_callback(evil_dir, dataset):
    """The RayJob manifest's own entrypoint, rendered with a hostile hydra.callbacks
    override, exits non-zero and the module is never imported."""
    manifest = yaml.safe_load((REPO / "jobs" / "rayjob.yaml").read_text())
    overrides = (f"+stage=validate input={dataset.root} "
                 "+hydra.callbacks.evil={_target_:evil_mod.Callback}")
    entrypoint = manifest["spec"]["entrypoint"].replace("${OVERRIDES}", overrides)
    command = shlex.split(entrypoint)
    assert command[:3] == ["python", "-m", "pipeline.run"]
    result = run_entry_point([sys.executable, *command[1:]], evil_dir)
    assert result.returncode != 0
    assert not (evil_dir / "pwned").exists(), "the hostile callback ran"
    assert "hydra.callbacks.evil._target_" in result.stderr and "not allowed" in result.stderr


def test_entry_point_refuses_a_hostile_logging_handler(evil_dir, dataset, tmp_path):
    command = [sys.executable, "-m", "pipeline.run", "+stage=validate", f"input={dataset.root}",
               f"hydra.run.dir={tmp_path}", "hydra.job_logging.handlers.console.class=evil_mod.Handler"]
    result = run_entry_point(command, evil_dir)
    assert result.returncode != 0
    assert not (evil_dir / "pwned").exists(), "the hostile logging handler ran"
    assert "logging class 'evil_mod.Handler' is not allowed" in result.stderr


@pytest.mark.parametrize("override, message", [
    ("+hydra.callbacks.x={_target_:os.system}", "hydra.callbacks.x._target_"),
    ("+stage.anything={_target_:os.system,_args_:[id]}", "stage.anything._target_"),
    ("hydra.launcher._target_=evil_mod.Launcher", "hydra.launcher._target_"),
    ("hydra.job_logging.handlers.console.stream=ext://evil_mod.stream", "imports a module"),
    ("+hydra.job.env_set.LD_PRELOAD=/tmp/x.so", "hydra.job.env_set"),
    ("+cluster.runtime_env.worker_process_setup_hook=evil_mod.setup", "setup hook"),
    ("+stage.x='${oc.create:\"{_target_: os.system}\"}'", "builds a config from a string"),
    ("hydra.searchpath=[file:///tmp]", "configs come from conf/ only"),
    ("hydra.mode=MULTIRUN", "run one configuration per command"),
    ("hydra.job_logging.handlers.file.filename=/etc/cron.d/x", "outside the run folder"),
    ("hydra.job_logging.handlers.file.filename=${hydra.runtime.output_dir}/../../x.log", "outside the run folder"),
])
def test_hostile_overrides_are_refused(override, message):
    with pytest.raises(ConfigRefused, match="refused") as refused:
        check_command_line(["+stage=stats", override])
    assert message in str(refused.value)


@pytest.mark.parametrize("argv, message", [
    (["+stage=../../jobs/runtime_env"], "'../../jobs/runtime_env' points outside conf/"),
    (["+stage=/etc/passwd"], "points outside conf/"),
    (["+stage=stats", "model=../stage/stats"], "points outside conf/"),
    (["--config-dir", "/tmp", "+stage=stats"], "--config-dir"),
    (["--experimental-rerun", "config.pickle"], "loads a pickle"),
    (["-m", "+stage=stats"], "--multirun"),
])
def test_configs_from_outside_conf_and_unsafe_flags_are_refused(argv, message):
    with pytest.raises(ConfigRefused) as refused:
        check_command_line(argv)
    assert message in str(refused.value)


def test_a_logging_factory_in_a_config_is_refused():
    """'()' cannot be written as an override key; a config file could carry it."""
    cfg = OmegaConf.create({"hydra": {"job_logging": {"handlers": {"x": {"()": "evil_mod.Handler"}}}}})
    with pytest.raises(ConfigRefused, match=r"hydra.job_logging.handlers.x.\(\): a logging factory"):
        check_config(cfg)


def test_sweeper_params_in_a_config_are_refused():
    cfg = OmegaConf.create({"hydra": {"sweeper": {"params": {"stage": "../../x"}}}})
    with pytest.raises(ConfigRefused, match="hydra.sweeper.params"):
        check_config(cfg)


def test_a_traversing_group_is_refused_before_hydra_reads_it(tmp_path):
    """The YAML exists and would compose: the refusal does not depend on it missing."""
    outside = tmp_path / "x.yaml"
    outside.write_text("# @package _global_\nhydra:\n  job:\n    name: hijacked\nname: stats\n")
    relative = os.path.relpath(outside.with_suffix(""), REPO / "conf" / "stage")
    with pytest.raises(ConfigRefused, match="points outside conf/"):
        check_command_line([f"+stage={relative}"])


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_shipped_stage_passes(stage):
    check_command_line([f"+stage={stage}", "input=/data/in", "output=/data/out"])


def test_shipped_groups_pass():
    check_command_line(["+stage=fully_auto", "model=vit_h", "amg=sa1b", "cluster=existing",
                        "hydra/job_logging=disabled", "hydra.run.dir=/tmp/x", "input=../data"])
    check_command_line(["+stage=retrain_default_gpu"])


def test_run_stage_checks_configs_composed_in_python(dataset):
    cfg = compose("stats", dataset.root, overrides=["+stage.hook={_target_:os.system,_args_:[id]}"])
    with pytest.raises(ConfigRefused, match="stage.hook._target_"):
        run_stage(cfg)


def test_submit_refuses_before_submitting():
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        from submit import entrypoint
    finally:
        sys.path.remove(str(REPO / "jobs"))
    assert entrypoint(["+stage=stats", "input=s3://b/d"]).endswith("cluster=existing")
    with pytest.raises(SystemExit, match="(?s)not submitted.*_target_"):
        entrypoint(["+stage=stats", "+hydra.callbacks.x={_target_:os.system}"])
    with pytest.raises(SystemExit, match="(?s)not submitted.*outside conf/"):
        entrypoint(["+stage=../../jobs/runtime_env"])


def test_a_token_never_lands_in_the_run_folder(dataset, tmp_path):
    """With the default output, Hydra's run folder is the dataset: its record of the
    command line must not carry a secret given on it."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline.run", "+stage=validate", f"input={dataset.root}",
               f"hydra.run.dir={run_dir}", "+stage.token=s3cr3t-token-1234"]
    result = run_entry_point(command, tmp_path)
    assert (run_dir / ".hydra" / "overrides.yaml").is_file(), result.stderr
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and b"s3cr3t-token-1234" in p.read_bytes()]
    assert not leaked
    assert "<redacted>" in (run_dir / ".hydra" / "overrides.yaml").read_text()
