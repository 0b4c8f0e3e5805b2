"""Training the box detector (``pipeline.models.detector``) with Ray Train, and registering it.

One ``TorchTrainer`` worker per GPU (DDP) or CPU workers. Checkpoints go to
``<output>/train_runs/detector_<version>/checkpoint_%08d/`` (``model.pth`` + the
optimiser state), so a killed run resumes from its last one: rerunning the same command
finds the unfinished run whose settings match and continues it. The finished detector
is registered as ``<output>/models/detector_<version>/``::

    model.pth            the detector's state dict
    detector.json        its model settings (what rebuilds it)
    config.yaml          the resolved configuration it was trained with (+ code_version)
    history.jsonl        one line of training losses per step
    eval.json            box AP on held-out ground truth
    train_summary.json   written last: the version is registered once it exists

The Ray Train wiring mirrors ``pipeline/stages/retrain.py`` (being split into shared
``pipeline/training/`` modules on another branch); the pieces both need are the
checkpoint folder layout, ``latest_checkpoint`` and the resume-from-Ray-or-disk logic.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import versions
from pipeline.dataset.listing import committed_shards
from pipeline.dataset.provenance import code_version
from pipeline.dataset.shards import iter_shard
from pipeline.models import detector
from pipeline.models.detector import BoxSample
from pipeline.paths import user_path
from pipeline.truth.synthetic import make_scene, scene_seeds

log = logging.getLogger(__name__)

KIND = "detector"
TRAIN_STATE_FILE = "train_state.pt"
SETTINGS_FILE = "settings.json"   # in the run folder: a rerun resumes only with equal settings
RUNS_DIR = "train_runs"


# --------------------------------------------------------------------------------- data
def _dataset_stream(shards: list[str], rank: int, world: int, data: dict[str, Any], skip: int) -> Iterator[BoxSample]:
    """This worker's share of the datasets' training images (held-out keys left out),
    epoch after epoch, the shard order reshuffled each epoch; the first ``skip`` are
    passed over without decoding (a resumed run sees the data an uninterrupted one would)."""
    seed, holdout, min_area = int(data["seed"]), float(data["holdout_fraction"]), float(data["min_box_area"])
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(shards))
        position, yielded = 0, False
        for i in order:
            for sample in iter_shard(shards[i]):
                if detector.is_held_out(sample.key, holdout):
                    continue
                position += 1
                if (position - 1) % world != rank:
                    continue
                yielded = True
                if skip > 0:
                    skip -= 1
                    continue
                yield detector.from_sample(sample, min_area)
        if not yielded:
            raise ValueError(f"data.datasets give worker {rank} of {world} no training images "
                             "(all held out, or fewer images than workers)")
        epoch += 1


def training_stream(data: dict[str, Any], rank: int, world: int, start_step: int,
                    batch_size: int) -> Iterator[list[BoxSample]]:
    """Endless batches for one worker mixing synthetic scenes and the datasets' boxes.

    Every random choice is a pure function of (seed, rank, step, slot), so a run resumed
    at ``start_step`` continues exactly where an uninterrupted one would be.
    """
    syn, shards = data["synthetic"], data["shards"]
    weights = {"synthetic": float(syn["weight"]) if syn["enabled"] else 0.0,
               "datasets": float(data["datasets_weight"]) if shards else 0.0}
    names = [k for k, w in weights.items() if w > 0]
    if not names:
        raise ValueError("the detector has no training data: set data.datasets or enable data.synthetic")
    p = np.array([weights[k] for k in names]) / sum(weights[k] for k in names)
    seed, min_area = int(data["seed"]), float(data["min_box_area"])

    def rng(step: int, slot: int, use: int) -> np.random.Generator:
        return np.random.default_rng([seed, rank, step, slot, use])

    def choose(step: int, slot: int) -> str:
        return names[0] if len(names) == 1 else names[int(rng(step, slot, 0).choice(len(names), p=p))]

    drawn = sum(choose(s, k) == "datasets" for s in range(start_step) for k in range(batch_size))
    stream = _dataset_stream(shards, rank, world, data, drawn) if "datasets" in names else None
    size = tuple(syn["size"])
    step = start_step
    while True:
        batch = []
        for slot in range(batch_size):
            if choose(step, slot) == "synthetic":
                index = (step * world + rank) * batch_size + slot
                scene_seed = scene_seeds("train", int(syn["seed_start"]) + index, 1)[0]
                sample = detector.from_scene(make_scene(scene_seed, size), min_area)
            else:
                sample = next(stream)
            if data["flip"] and rng(step, slot, 1).random() < 0.5:
                sample = detector.flip(sample)
            batch.append(sample)
        yield batch
        step += 1


def held_out(data: dict[str, Any], eval_cfg: dict[str, Any]) -> Iterator[BoxSample]:
    """The held-out images of the box AP: the held-out share of the datasets when they
    are given (``eval.source`` auto or datasets), else synthetic test scenes."""
    n, min_area = int(eval_cfg["num_images"]), float(data["min_box_area"])
    source = eval_cfg["source"]
    if source == "auto":
        source = "datasets" if data["shards"] and float(data["holdout_fraction"]) > 0 else "synthetic"
    if source == "synthetic":
        for seed in scene_seeds("test", int(eval_cfg["seed_start"]), n):
            yield detector.from_scene(make_scene(seed, tuple(eval_cfg["size"])), min_area)
        return
    if source != "datasets":
        raise ValueError(f"unknown detector eval source {source!r}: auto, datasets or synthetic")
    count = 0
    for url in data["shards"]:
        for sample in iter_shard(url):
            if detector.is_held_out(sample.key, float(data["holdout_fraction"])):
                count += 1
                yield detector.from_sample(sample, min_area)
                if count == n:
                    return
    if count == 0:
        raise ValueError("no held-out images in data.datasets: "
                         "raise data.holdout_fraction or use eval.source=synthetic")


# ------------------------------------------------------------------------------ worker
def lr_factor(step: int, warmup: int, total: int, final: float) -> float:
    """Linear warmup to 1, then a cosine to ``final`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))


def _say(line: str) -> None:
    """A progress line for the driver's console (Ray forwards worker stdout)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: Faster R-CNN's own losses (RPN and box head), AdamW, and a
    checkpoint every ``checkpoint_every`` steps. One CPU worker or N GPU workers (DDP)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(int(config["seed"]))
    model = detector.build_detector(config["model"]).to(device)  # before the optimiser: its state follows
    params = [p for p in model.parameters() if p.requires_grad]
    optim, steps = config["optim"], int(config["steps"])
    optimizer = torch.optim.AdamW(params, lr=float(optim["lr"]), weight_decay=float(optim["weight_decay"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, int(optim["warmup_steps"]), steps, float(optim["final_lr_fraction"])))
    start, history = 0, []
    resume = ray.train.get_checkpoint()  # Ray's (a restarted worker) wins over the one on disk
    with resume.as_directory() if resume is not None else nullcontext(config.get("resume_from")) as folder:
        if folder is not None:
            model.load_state_dict(torch.load(Path(folder) / detector.MODEL_FILE, map_location=device,
                                             weights_only=True))
            state = torch.load(Path(folder) / TRAIN_STATE_FILE, map_location=device, weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start, history = int(state["step"]), list(state["history"])
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    bare = model.module if hasattr(model, "module") else model
    stream = training_stream(config["data"], rank, world, start, int(config["batch_size"]))
    end = min(steps, int(config.get("stop_at_step") or steps))
    _say(f"[detector] worker {rank}/{world} on {device}, steps {start}..{end} of {steps}")
    for step in range(start, end):
        t0 = time.perf_counter()
        batch = next(stream)
        model.train()
        losses = model([detector.to_tensor(s.image).to(device) for s in batch],
                       [detector.target(s, device) for s in batch])
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(optim["grad_clip"]))
        optimizer.step()
        scheduler.step()
        record = {"step": step + 1, "loss": loss.item(), **{k: v.item() for k, v in losses.items()},
                  "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0}
        history.append(record)
        if rank == 0 and (step + 1) % int(config["log_every"]) == 0:
            _say(f"[detector] step {step + 1}/{steps} loss {record['loss']:.4f} {record['seconds']:.2f}s")
        if (step + 1) % int(config["checkpoint_every"]) == 0 or step + 1 == end:
            metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            if rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    torch.save({k: v.detach().cpu() for k, v in bare.state_dict().items()},
                               Path(tmp) / detector.MODEL_FILE)
                    torch.save({"step": step + 1, "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "history": history}, Path(tmp) / TRAIN_STATE_FILE)
                    (Path(tmp) / "step.json").write_text(json.dumps({"step": step + 1}))  # written last
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                     checkpoint_dir_name=f"checkpoint_{step + 1:08d}")
            else:
                ray.train.report(metrics, checkpoint=None)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint folder with the highest step under ``run_dir``."""
    best, best_step = None, -1
    for step_file in run_dir.glob("checkpoint_*/step.json"):
        step = json.loads(step_file.read_text())["step"]
        folder = step_file.parent
        if step > best_step and all((folder / f).is_file() for f in (detector.MODEL_FILE, TRAIN_STATE_FILE)):
            best, best_step = folder, step
    return best


# ------------------------------------------------------------------------------ driver
def worker_config(stage: DictConfig) -> dict[str, Any]:
    """The detector's settings (conf/stage/detector.yaml) as a plain dict, user paths
    resolved here on the driver and the datasets listed (committed shards only)."""
    config = OmegaConf.to_container(stage, resolve=True)
    data, model = config["data"], config["model"]
    specs = data["datasets"]
    specs = [specs] if isinstance(specs, str) else list(specs or [])
    data["datasets"] = [user_path(s) for s in specs]
    data["shards"] = committed_shards(data["datasets"]) if data["datasets"] else []
    model["backbone_weights"] = user_path(model.get("backbone_weights"))
    for key in ("version", "stop_at_step"):  # do not change what is trained
        config.pop(key, None)
    return config


def choose_version(output: str, requested: str | None, config: dict[str, Any]) -> str:
    """``requested``, else the run with these very settings (rerunning a killed command
    resumes its run; rerunning a finished one finds its version), else the next free one."""
    runs = Path(output) / RUNS_DIR
    if requested:
        settings = runs / f"{KIND}_{requested}" / SETTINGS_FILE
        if settings.is_file() and json.loads(settings.read_text()) != json.loads(json.dumps(config)):
            raise ValueError(f"detector {requested} in {output} was trained with other settings "
                             f"({settings}): choose another stage.version, or none for the next free one")
        return str(requested)
    for settings in sorted(runs.glob(f"{KIND}_v*/{SETTINGS_FILE}")):
        if json.loads(settings.read_text()) == json.loads(json.dumps(config)):
            return settings.parent.name.removeprefix(f"{KIND}_")
    taken = {p.name for p in runs.glob(f"{KIND}_v*")}
    version = versions.next_version(output, KIND)
    while f"{KIND}_{version}" in taken:
        version = f"v{int(version[1:]) + 1:03d}"
    return version


def train(cfg: DictConfig, stage: DictConfig | None = None) -> dict[str, Any]:
    """Trains (or resumes), registers and evaluates a detector with the settings
    ``stage`` (conf/stage/detector.yaml; None: ``cfg.stage``) under ``cfg.output``;
    returns the summary: version, path (the registered folder), steps, complete,
    final_loss (mean of the last 20 steps), seconds_per_step (median) and eval
    (``detector.box_ap``). A finished version with these settings is returned as it is."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.execution.cluster import connect

    stage = cfg.stage if stage is None else stage
    output = user_path(cfg.output)
    config = worker_config(stage)
    version = choose_version(output, stage.get("version"), config)
    done = versions.read_summary(versions.version_dir(output, KIND, version))
    if done is not None and done["complete"]:
        log.info("detector %s is already trained with these settings: %s", version, done["path"])
        return done
    run_dir = Path(output) / RUNS_DIR / f"{KIND}_{version}"
    run_dir.mkdir(parents=True, exist_ok=True)
    versions.write(str(run_dir), SETTINGS_FILE, json.dumps(config, indent=1))
    previous = latest_checkpoint(run_dir)
    worker = {**config, "resume_from": str(previous) if previous else None,
              "stop_at_step": stage.get("stop_at_step")}
    if previous is not None:
        log.info("resuming detector %s from %s", version, previous)
    started = connect(cfg.cluster)
    try:
        use_gpu = (bool(config["use_gpu"]) if config["use_gpu"] != "auto"
                   else ray.cluster_resources().get("GPU", 0) > 0)
        workers = config["num_workers"] or (int(ray.cluster_resources().get("GPU", 0)) if use_gpu else 1)
        result = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=worker,
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                   resources_per_worker={"CPU": config["cpus_per_worker"]}),
            run_config=ray.train.RunConfig(
                name=run_dir.name, storage_path=str(run_dir.parent),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=int(config["keep_checkpoints"])),
                failure_config=ray.train.FailureConfig(max_failures=int(config["max_failures"])),
            ),
        ).fit()
    finally:
        if started:
            ray.shutdown()
    final = latest_checkpoint(run_dir)
    if final is None:
        raise RuntimeError(f"training of detector {version} produced no checkpoint: {result.error!r}")
    return register(cfg, config, version, final)


def register(cfg: DictConfig, config: dict[str, Any], version: str, checkpoint: Path) -> dict[str, Any]:
    """Registers ``checkpoint`` as ``<output>/models/detector_<version>/`` and measures
    its box AP on held-out ground truth (see ``train`` for the summary's keys)."""
    output = user_path(cfg.output)
    target = versions.version_dir(output, KIND, version)
    state = torch.load(checkpoint / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    history = state["history"]
    model_bytes = (checkpoint / detector.MODEL_FILE).read_bytes()
    versions.write(target, detector.MODEL_FILE, model_bytes)
    versions.write(target, detector.META_FILE, json.dumps({"model": config["model"], "version": version}, indent=1))
    saved = {**OmegaConf.to_container(cfg, resolve=True), "stage": config, "code_version": code_version()}
    versions.write(target, "config.yaml", OmegaConf.to_yaml(saved))
    versions.write(target, "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = detector.load_detector(target, device)
    figures = detector.box_ap(model, held_out(config["data"], config["eval"]), device)
    versions.write(target, "eval.json", json.dumps(figures, indent=2))
    tail = history[-min(len(history), 20):]
    summary = {
        "version": version, "path": target, "steps": int(state["step"]),
        "complete": int(state["step"]) >= int(config["steps"]),
        "final_loss": float(np.mean([h["loss"] for h in tail])) if tail else math.nan,
        "seconds_per_step": float(np.median([h["seconds"] for h in history])) if history else math.nan,
        "eval": figures,
    }
    versions.mark_registered(target, summary)
    log.info("registered detector %s: %s", version, summary)
    return summary
