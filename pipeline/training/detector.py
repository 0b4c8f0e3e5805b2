"""Training the box detector (``pipeline.models.detector``) with the training stack of
``pipeline.training`` (the same Ray Train wiring, checkpoints and registration as SAM's).

One ``TorchTrainer`` worker per GPU (DDP) or CPU workers. Checkpoints go to
``<output>/train_runs/detector_<version>/checkpoint_%08d/`` (``pipeline.training.
checkpoints``: ``complete.json`` last), so a killed run resumes from its last complete
one: rerunning the same command finds the unfinished run whose settings match
(``settings.json`` in the run folder) and continues it. The finished detector is
registered as ``<output>/models/detector_<version>/`` (``pipeline.models.registry``) with
``detector.json`` (what rebuilds it) and its box AP on held-out ground truth (eval.json).
Output may be a local path or an object store URL.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.dataset.filters import is_held_out
from pipeline.dataset.listing import committed_shards
from pipeline.dataset.shards import iter_shard
from pipeline.models import detector, registry
from pipeline.models.detector import BoxSample
from pipeline.training import checkpoints
from pipeline.training.optim import cosine_factor
from pipeline.training.registration import register
from pipeline.training.trainer import TRAIN_RUNS_DIR, StepProgress, run_url, say, train_to_checkpoint
from pipeline.truth.synthetic import make_scene, scene_seeds

log = logging.getLogger(__name__)

KIND = "detector"
SETTINGS_FILE = "settings.json"   # in the run folder: a rerun resumes only with equal settings


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
                if is_held_out(sample.key, holdout):
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
            if is_held_out(sample.key, float(data["holdout_fraction"])):
                count += 1
                yield detector.from_sample(sample, min_area)
                if count == n:
                    return
    if count == 0:
        raise ValueError("no held-out images in data.datasets: "
                         "raise data.holdout_fraction or use eval.source=synthetic")


# ------------------------------------------------------------------------------ worker
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
        optimizer, lambda s: cosine_factor(s, int(optim["warmup_steps"]), steps, float(optim["final_lr_fraction"])))
    start, history = 0, []
    with checkpoints.resumed(config.get("resume_from")) as folder:
        if folder is not None:
            model.load_state_dict(checkpoints.load(folder, registry.MODEL_FILE, device))
            state = checkpoints.load(folder, checkpoints.TRAIN_STATE_FILE, device)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start, history = int(state["step"]), list(state["history"])
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    bare = model.module if hasattr(model, "module") else model
    stream = training_stream(config["data"], rank, world, start, int(config["batch_size"]))
    end = min(steps, int(config.get("stop_at_step") or steps))
    say(f"[detector] worker {rank}/{world} on {device}, steps {start}..{end} of {steps}")
    progress = StepProgress("detector", start, end, int(config["log_every"]))
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
        if rank == 0 and progress.due(step + 1):
            say(progress.line(step + 1, f"loss {record['loss']:.4f}"))
        if (step + 1) % int(config["checkpoint_every"]) == 0 or step + 1 == end:
            metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            state = {"step": step + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "history": history}
            checkpoints.report(step + 1, checkpoints.state_dict(bare) if rank == 0 else None,
                               state if rank == 0 else None, metrics)


# ------------------------------------------------------------------------------ driver
def worker_config(stage: DictConfig) -> dict[str, Any]:
    """The detector's settings (conf/stage/detector.yaml, user paths already absolute) as
    a plain dict, with the datasets listed (committed shards only)."""
    config = OmegaConf.to_container(stage, resolve=True)
    data = config["data"]
    specs = data["datasets"]
    data["datasets"] = [specs] if isinstance(specs, str) else list(specs or [])
    data["shards"] = committed_shards(data["datasets"]) if data["datasets"] else []
    for key in ("version", "stop_at_step"):  # do not change what is trained
        config.pop(key, None)
    return config


def _run_name(version: str) -> str:
    return f"{KIND}_{version}"


def choose_version(output: str, requested: str | None, config: dict[str, Any]) -> str:
    """``requested``, else the run with these very settings (rerunning a killed command
    resumes its run; rerunning a finished one finds its version), else the next free one."""
    runs = storage.join(output, TRAIN_RUNS_DIR)
    same = json.loads(json.dumps(config))

    def settings_of(version: str) -> Any:
        return storage.read_json(storage.join(runs, _run_name(version), SETTINGS_FILE))

    if requested:
        recorded = settings_of(str(requested))
        if recorded is not None and recorded != same:
            raise ValueError(f"detector {requested} in {output} was trained with other settings "
                             f"({storage.join(runs, _run_name(str(requested)), SETTINGS_FILE)}): choose another "
                             "stage.version, or none for the next free one")
        return str(requested)
    fs, root = storage.filesystem(runs)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) if fs.isdir(root) else []
    versions = [n.removeprefix(f"{KIND}_") for n in names if n.startswith(f"{KIND}_v")]
    for version in versions:
        if settings_of(version) == same:
            return version
    version = registry.next_version(output, KIND)
    while version in versions:
        version = f"v{int(version[1:]) + 1:03d}"
    return version


def train(cfg: DictConfig, stage: DictConfig | None = None) -> dict[str, Any]:
    """Trains (or resumes), registers and evaluates a detector with the settings
    ``stage`` (conf/stage/detector.yaml; None: ``cfg.stage``) under ``cfg.output``;
    returns the registration's summary (``pipeline.training.registration.register``)
    with eval (``detector.box_ap``). A finished version with these settings is returned
    as it is."""
    stage = cfg.stage if stage is None else stage
    output = str(cfg.output)
    storage.writable(output)
    config = worker_config(stage)
    version = choose_version(output, stage.get("version"), config)
    done = registry.read_summary(registry.version_dir(output, version, KIND))
    if done is not None and done["complete"]:
        log.info("detector %s is already trained with these settings: %s", version, done["path"])
        return done
    storage.write_json(storage.join(run_url(output, _run_name(version)), SETTINGS_FILE), config)
    worker = {**config, "stop_at_step": stage.get("stop_at_step")}
    final = train_to_checkpoint(train_loop_per_worker, worker, output, _run_name(version), cfg.cluster)

    def measure(folder: str) -> dict[str, Any]:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, _ = detector.load_detector(folder, device)
        figures = detector.box_ap(model, held_out(config["data"], config["eval"]), device)
        registry.write(folder, registry.EVAL_FILE, json.dumps(figures, indent=2))
        return {"eval": figures}

    meta = json.dumps({"model": config["model"], "version": version}, indent=1)
    summary = register(output, version, final, cfg, config, kind=KIND, files={detector.META_FILE: meta},
                       measure=measure)
    log.info("registered detector %s: %s", version, summary)
    return summary
