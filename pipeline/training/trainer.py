"""The driver side of a training run, for every model the engine trains: the Ray Train
``TorchTrainer`` over a worker loop, with its checkpoints in the output's storage."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import fields
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.execution.cluster import connect
from pipeline.paths import is_url
from pipeline.training import checkpoints

log = logging.getLogger(__name__)

TRAIN_RUNS_DIR = "train_runs"   # <output>/train_runs/<run>/checkpoint_%08d/


def say(line: str) -> None:
    """A progress line from a worker to the driver's console. Ray forwards worker stdout,
    not worker loggers; and not ``print``, which Ray Train patches to go to stdout and to
    a logger that also ends on stdout, so every line would show twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class StepProgress:
    """Progress lines of a training loop, with the time per step and the time left: the
    first step's line is the run's estimate, then every ``every`` steps (at most a tenth
    of the run apart, so a short run still shows some) and the last."""

    def __init__(self, label: str, start: int, end: int, every: int) -> None:
        self.label, self.start, self.end = label, start, end
        self.every = max(1, min(int(every), max(1, (end - start) // 10)))
        self.t0 = time.perf_counter()

    def due(self, done: int) -> bool:
        """Whether step ``done`` (1-based) gets a line."""
        return done - self.start == 1 or done % self.every == 0 or done == self.end

    def line(self, done: int, text: str) -> str:
        per_step = (time.perf_counter() - self.t0) / max(1, done - self.start)
        left = (self.end - done) * per_step
        return (f"[{self.label}] step {done}/{self.end} {text} | {per_step:.2f} s/step, "
                f"{_duration(left)} left")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_url(output: str, name: str) -> str:
    """Where run ``name``'s checkpoints go: ``<output>/train_runs/<name>``."""
    return storage.join(output, TRAIN_RUNS_DIR, name)


def worker_config(stage: DictConfig) -> dict[str, Any]:
    """``stage`` (conf/stage/retrain.yaml, user paths already absolute) as the plain dict
    SAM's workers get, the tune mode's defaults resolved; an unknown ``stage.tune`` or
    ``stage.interactive`` key is refused here."""
    from sam_core.training import TUNE_MODES, InteractiveConfig

    if stage.tune not in TUNE_MODES:
        raise ValueError(f"stage.tune={stage.tune}: one of {', '.join(TUNE_MODES)}")
    config = OmegaConf.to_container(stage, resolve=True)
    known = {f.name for f in fields(InteractiveConfig)}
    unknown = set(config["interactive"]) - known
    if unknown:
        raise ValueError(f"unknown stage.interactive keys: {sorted(unknown)}; known: {sorted(known)}")
    return config


def ray_storage(url: str):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig: a local folder as
    it is; a URL through the same fsspec file system as every other output (pyarrow's
    wrapper of it), so credentials and endpoints are configured once."""
    if not is_url(url):
        return url, None
    import pyarrow.fs

    fs, path = storage.filesystem(url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def fit(loop: Callable[[dict[str, Any]], None], config: dict[str, Any], runs_url: str, name: str):
    """Runs ``loop`` (a ``train_loop_per_worker``) on ``config`` as run ``name`` under
    ``runs_url`` (``<output>/train_runs``); returns Ray Train's ``Result``.

    Workers: ``num_workers`` (null: one per GPU when ``use_gpu``, else one), each with
    ``cpus_per_worker`` CPUs; ``use_gpu`` auto means: when the cluster has GPUs.
    ``keep_checkpoints`` and ``max_failures`` as in the stage configs.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = bool(config["use_gpu"]) if config["use_gpu"] != "auto" else gpus > 0
    workers = config["num_workers"] or (gpus if use_gpu else 1)
    path, filesystem = ray_storage(runs_url)
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": config["cpus_per_worker"]}
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=path, storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=int(config["keep_checkpoints"])),
            failure_config=ray.train.FailureConfig(max_failures=int(config["max_failures"])),
        ),
    )
    return trainer.fit()


def train_to_checkpoint(loop: Callable[[dict[str, Any]], None], config: dict[str, Any], output: str, name: str,
                        cluster: Any) -> str:
    """Trains run ``name`` under ``output`` with ``loop`` on ``config`` (``fit``), from its
    last complete checkpoint when a killed or stopped run left one, on the Ray cluster
    ``cluster`` (``cfg.cluster``; joined or started here, and stopped if started here);
    returns the run's last complete checkpoint folder."""
    import ray

    run = run_url(output, name)
    previous = checkpoints.latest(run)
    if previous is not None:
        log.info("resuming %s from %s", name, previous)
    started = connect(cluster)
    try:
        result = fit(loop, {**config, "resume_from": previous}, storage.join(output, TRAIN_RUNS_DIR), name)
    finally:
        if started:
            ray.shutdown()
    final = checkpoints.latest(run)
    if final is None:
        raise RuntimeError(f"training run {name} produced no complete checkpoint: {result.error!r}")
    return final
