"""The driver side of a training run: the settings workers get, and the Ray Train
``TorchTrainer`` that runs them with checkpoints in the output's storage."""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.paths import is_url, user_path
from pipeline.training.worker import train_loop_per_worker

TRAIN_RUNS_DIR = "train_runs"   # <output>/train_runs/<version>/checkpoint_%08d/


def _user_paths(value: Any) -> Any:
    return [user_path(v) for v in value] if isinstance(value, list) else user_path(value)


def worker_config(stage: DictConfig) -> dict[str, Any]:
    """``stage`` (conf/stage/retrain.yaml) as a plain dict with every user path made
    absolute here, on the driver: workers run in another directory."""
    from sam_core.training import InteractiveConfig

    config = OmegaConf.to_container(stage, resolve=True)
    known = {f.name for f in fields(InteractiveConfig)}
    unknown = set(config["interactive"]) - known
    if unknown:
        raise ValueError(f"unknown stage.interactive keys: {sorted(unknown)}; known: {sorted(known)}")
    data = config["data"]
    data["shards"] = _user_paths(data["shards"])
    data["coco"]["annotations"] = user_path(data["coco"]["annotations"])
    data["coco"]["image_dir"] = user_path(data["coco"]["image_dir"])
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


def fit(config: dict[str, Any], runs_url: str, version: str):
    """Trains ``config`` (``worker_config`` plus arch, init_checkpoint, resume_from) as
    run ``version`` under ``runs_url``; returns Ray Train's ``Result``.

    Workers: ``num_workers`` (null: one per GPU when ``use_gpu``, else one), each with
    ``cpus_per_worker`` CPUs; ``use_gpu`` auto means: when the cluster has GPUs.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = bool(config["use_gpu"]) if config["use_gpu"] != "auto" else gpus > 0
    workers = config["num_workers"] or (gpus if use_gpu else 1)
    path, filesystem = ray_storage(runs_url)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": config["cpus_per_worker"]}
        ),
        run_config=ray.train.RunConfig(
            name=version, storage_path=path, storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=int(config["keep_checkpoints"])),
            failure_config=ray.train.FailureConfig(max_failures=int(config["max_failures"])),
        ),
    )
    return trainer.fit()
