"""Stage ``retrain``: trains or fine-tunes a sam_core model with Ray Train.

    python -m pipeline.run +stage=retrain [output=DIR] [stage.steps=N] [stage.data.shards=DIR]

One ``TorchTrainer`` worker per GPU (DDP, bf16 autocast) or one CPU worker locally.
Data: synthetic scenes, SA-1B shards (filtered by predicted IoU and stability) and
COCO instance files, alone or mixed. Checkpoints are plain ``Sam`` state dicts (the
official format) plus a side file with the optimiser state, so an interrupted run
resumes from its last checkpoint. The finished model is registered under
``<output>/models/<version>/`` with its config, data, history, figures and eval.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.dataset import committed_shards
from pipeline.shards import Sample, iter_shard
from pipeline.synthetic import make_scene, scene_seeds

log = logging.getLogger(__name__)

MODEL_FILE = "model.pth"  # plain Sam state dict: loadable by sam_core and segment_anything
TRAIN_STATE_FILE = "train_state.pt"
MODELS_DIR = "models"


# ------------------------------------------------------------------ ground-truth sources
@dataclass
class GroundTruth:
    """One image with instance masks, from any source.

    key: a unique name; image: HxWx3 uint8 RGB; masks: NxHxW bool; generated: the masks
    were made by a model (SA-1B-format shards), not by people or the scene generator.
    """

    key: str
    image: np.ndarray
    masks: np.ndarray
    generated: bool = False


def iter_synthetic(seeds: range, size: tuple[int, int]) -> Iterator[GroundTruth]:
    for seed in seeds:
        scene = make_scene(seed, size)
        yield GroundTruth(f"synthetic_{seed}", scene.image, scene.masks)


def _decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _decode_shard_sample(
    sample: Sample, min_predicted_iou: float, min_stability: float
) -> GroundTruth:
    from pycocotools import mask as mask_utils

    anns = [
        a for a in sample.record["annotations"]
        if a.get("predicted_iou", 1.0) >= min_predicted_iou and a.get("stability_score", 1.0) >= min_stability
    ]
    image = _decode_jpeg(sample.jpg)
    if anns:
        masks = mask_utils.decode([dict(a["segmentation"]) for a in anns]).transpose(2, 0, 1).astype(bool)
    else:
        masks = np.zeros((0, *image.shape[:2]), bool)
    return GroundTruth(sample.key, image, masks, generated=True)


def iter_shards(
    paths: list[str], min_predicted_iou: float = 0.0, min_stability: float = 0.0
) -> Iterator[GroundTruth]:
    """Images of SA-1B shards with their masks that pass the quality filters."""
    for path in paths:
        for sample in iter_shard(path):
            yield _decode_shard_sample(sample, min_predicted_iou, min_stability)


def iter_coco(annotations: str, image_dir: str) -> Iterator[GroundTruth]:
    """Images and instance masks of a COCO instances JSON (crowd regions skipped)."""
    from pycocotools.coco import COCO
    from PIL import Image

    coco = COCO(annotations)
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        with Image.open(os.path.join(image_dir, info["file_name"])) as im:
            image = np.asarray(im.convert("RGB"))
        masks = np.stack([coco.annToMask(a).astype(bool) for a in anns]) if anns else np.zeros(
            (0, *image.shape[:2]), bool
        )
        yield GroundTruth(str(info["file_name"]).rsplit(".", 1)[0], image, masks)


# --------------------------------------------------------------------- training stream
def _source_weights(data: dict[str, Any], files: list[str]) -> tuple[list[str], np.ndarray]:
    syn, coco = data["synthetic"], data.get("coco") or {}
    weights = {
        "synthetic": float(syn["weight"]) if syn.get("enabled", True) else 0.0,
        "shards": float(data.get("shards_weight", 1.0)) if files else 0.0,
        "coco": float(coco.get("weight", 1.0)) if coco.get("annotations") else 0.0,
    }
    names = [k for k, v in weights.items() if v > 0]
    if not names:
        raise ValueError("retrain has no data: enable synthetic scenes or set data.shards / data.coco")
    return names, np.array([weights[k] for k in names]) / sum(weights[k] for k in names)


def training_stream(data: dict[str, Any], rank: int, world: int, start_step: int, batch_size: int,
                    img_size: int) -> Iterator[list[GroundTruth]]:
    """Endless batches for one worker, mixing the configured sources.

    Every random choice is a pure function of (seed, rank, step, slot), and the real
    sources are replayed up to ``start_step`` without decoding, so a resumed run sees
    exactly the data an uninterrupted one would.
    """
    syn, coco = data["synthetic"], data.get("coco") or {}
    files = committed_shards(data["shards"]) if data.get("shards") else []
    names, p = _source_weights(data, files)
    seed = int(data.get("seed", 0))

    def choose(step: int, slot: int) -> str:
        if len(names) == 1:
            return names[0]
        return names[int(np.random.default_rng([seed, rank, step, slot]).choice(len(names), p=p))]

    def real(kind: str, skip: int) -> Iterator[GroundTruth]:
        epoch = 0
        while True:
            if kind == "shards":
                order = np.random.default_rng([seed, epoch]).permutation(len(files))
                mine = [files[i] for i in order[rank::world]] or [files[order[rank % len(files)]]]
                raw: Iterator[Any] = (s for path in mine for s in iter_shard(path))
            else:
                raw = (g for i, g in enumerate(iter_coco(coco["annotations"], coco["image_dir"]))
                       if i % world == rank)
            yielded = False
            for item in raw:
                yielded = True
                if skip > 0:  # consumed before the resume: skip without decoding
                    skip -= 1
                    continue
                yield _decode_shard_sample(item, data["min_predicted_iou"], data["min_stability"]) \
                    if kind == "shards" else item
            if not yielded:
                raise ValueError(f"data source {kind} gave this worker no images")
            epoch += 1

    consumed = {k: 0 for k in names}
    if len(names) > 1 or names != ["synthetic"]:
        for step in range(start_step):
            for slot in range(batch_size):
                consumed[choose(step, slot)] += 1
    streams = {k: real(k, consumed[k]) for k in names if k != "synthetic"}
    size = tuple(syn.get("size") or (img_size, img_size))
    step = start_step
    while True:
        batch = []
        for slot in range(batch_size):
            kind = choose(step, slot)
            if kind == "synthetic":
                index = (step * world + rank) * batch_size + slot
                scene_seed = scene_seeds("train", int(syn["seed_start"]) + index % int(syn["seed_count"]), 1)[0]
                batch.append(next(iter_synthetic(range(scene_seed, scene_seed + 1), size)))
            else:
                batch.append(next(streams[kind]))
        yield batch
        step += 1


def to_batch(items: list[GroundTruth], img_size: int, data: dict[str, Any], rng: np.random.Generator):
    """A ``sam_core.training.Batch`` of the items' trainable masks (empty images skipped)."""
    from sam_core.training import collate, prepare_sample, select_masks

    samples, supervise_iou = [], []
    for gt in items:
        if len(gt.masks) == 0:  # e.g. an image none of whose automatic masks passed the filters
            continue
        image, size, masks = prepare_sample(gt.image, gt.masks, img_size)
        idx = select_masks(masks.numpy(), int(data["max_masks_per_image"]),
                           float(data["max_area_fraction"]), int(data["min_mask_area"]), rng)
        if len(idx):
            samples.append((image, size, masks[torch.from_numpy(idx)]))
            supervise_iou.append(not gt.generated or bool(data.get("shards_supervise_iou", True)))
    return collate(samples, supervise_iou) if samples else None


# ------------------------------------------------------------------------- optimisation
def lr_factor(step: int, warmup: int, total: int, decay_at: list[float], factor: float) -> float:
    """Linear warmup, then a step decay by ``factor`` at each fraction of ``total`` in ``decay_at``."""
    if step < warmup:
        return (step + 1) / warmup
    return factor ** sum(step >= int(f * total) for f in decay_at)


def make_optimizer(model: torch.nn.Module, optim: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings tables of size 1 (ndim < 2)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(optim["weight_decay"])}, {"params": rest, "weight_decay": 0.0}],
        lr=float(optim["lr"]), betas=tuple(optim["betas"]),
    )


def build_model(arch: str, checkpoint: str | None, resize: bool = False) -> torch.nn.Module:
    """``arch`` with the weights of ``checkpoint``; ``resize``: the file may come from the
    same architecture at another input size (position tables are resampled)."""
    import sam_core

    if arch not in sam_core.sam_model_registry:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(sorted(sam_core.sam_model_registry))}")
    if not resize or checkpoint is None:
        return sam_core.sam_model_registry[arch](checkpoint=checkpoint)
    from sam_core.checkpoint import load_checkpoint

    return load_checkpoint(sam_core.sam_model_registry[arch](), checkpoint, arch=arch, resize=True)


# -------------------------------------------------------------------------- checkpoints
def save_checkpoint(directory: Path, sam: torch.nn.Module, state: dict[str, Any]) -> None:
    """``model.pth`` (official state dict) + ``train_state.pt`` (optimiser, step, history)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in sam.state_dict().items()}, directory / MODEL_FILE)
    torch.save(state, directory / TRAIN_STATE_FILE)
    (directory / "step.json").write_text(json.dumps({"step": state["step"]}))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint directory with the highest step under ``run_dir`` (any depth 1)."""
    best, best_step = None, -1
    for step_file in run_dir.glob("*/step.json"):
        step = json.loads(step_file.read_text())["step"]
        if step > best_step and (step_file.parent / MODEL_FILE).is_file():
            best, best_step = step_file.parent, step
    return best


def _say(line: str) -> None:
    """A progress line to the driver's console. Ray forwards worker stdout, not worker
    loggers; and not ``print``, which Ray Train patches to go to stdout and to a logger
    that also ends on stdout, so every line would show twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: the plain loop of ``sam_core.training.train_step`` plus
    checkpoints. Runs unchanged with one CPU worker or N GPU workers (DDP)."""
    import ray.train
    import ray.train.torch

    from sam_core.training import InteractiveConfig, InteractiveSam, train_step

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(int(config["seed"]))
    # A start model trained at another input size (e.g. vit_tiny -> vit_tiny_512) fits.
    sam = build_model(config["arch"], config.get("init_checkpoint"), resize=True)
    interactive = InteractiveConfig(**config["interactive"])
    model = InteractiveSam(sam, interactive)
    optimizer = make_optimizer(model, config["optim"])
    steps = int(config["steps"])
    optim = config["optim"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, int(optim["warmup_steps"]), steps, list(optim["decay_at"]),
                                       float(optim["decay_factor"]))
    )
    generator = torch.Generator(device=device).manual_seed(int(config["seed"]) * 1000 + rank)
    start, history = 0, []

    # Ray's own checkpoint (a restarted worker, or a run Ray restores from its snapshot)
    # wins over the one found on disk. as_directory reads a local checkpoint in place and
    # cleans up a downloaded one; to_directory would leave a copy in /tmp on every resume.
    resume = ray.train.get_checkpoint()
    with resume.as_directory() if resume is not None else nullcontext(config.get("resume_from")) as resume_dir:
        if resume_dir is not None:
            sam.load_state_dict(torch.load(Path(resume_dir) / MODEL_FILE, map_location="cpu", weights_only=True))
            state = torch.load(Path(resume_dir) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start, history = int(state["step"]), list(state["history"])
            if rank < len(state["generators"]):
                generator.set_state(state["generators"][rank])

    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    bare = model.module if hasattr(model, "module") else model
    autocast = torch.bfloat16 if (config["bf16"] and device.type == "cuda") else None
    data = config["data"]
    img_size = bare.sam.image_encoder.img_size
    stream = training_stream(data, rank, world, start, int(config["batch_size"]), img_size)
    every = int(config["checkpoint_every"])
    _say(f"[retrain] worker {rank}/{world} on {device}, {torch.get_num_threads()} threads, "
         f"steps {start}..{steps}")

    # stop_at_step ends this invocation early without changing the schedule, e.g. to
    # train in time slices on a shared machine; rerunning the version continues it.
    end = min(steps, int(config.get("stop_at_step") or steps))
    for step in range(start, end):
        t0 = time.perf_counter()
        batch = None
        attempt = 0
        while batch is None:  # a batch whose masks are all filtered out is skipped
            rng = np.random.default_rng([int(config["seed"]), rank, step, attempt])
            batch = to_batch(next(stream), img_size, data, rng)
            attempt += 1
        out = train_step(model, optimizer, batch.to(device), generator, autocast, config["optim"].get("grad_clip"))
        scheduler.step()
        out.update(step=step + 1, lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - t0)
        history.append(out)
        if (step + 1) % int(config["log_every"]) == 0 and rank == 0:
            _say(f"[retrain] step {step + 1}/{steps} loss {out['loss']:.4f} iou_first "
                 f"{out['iou_first']:.3f} iou_last {out['iou_last']:.3f} {out['seconds']:.2f}s")
        if (step + 1) % every == 0 or step + 1 == end:
            metrics = {k: v for k, v in out.items() if isinstance(v, (int, float))}
            gens = _gather_generator_states(generator, world)
            if rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    save_checkpoint(Path(tmp), bare.sam, {
                        "step": step + 1, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "history": history, "generators": gens,
                    })
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                     checkpoint_dir_name=f"checkpoint_{step + 1:08d}")
            else:
                ray.train.report(metrics, checkpoint=None)


def _gather_generator_states(generator: torch.Generator, world: int) -> list[torch.Tensor]:
    """Every worker's prompt-sampling RNG state, so a resume continues each one exactly."""
    state = generator.get_state()
    if world == 1 or not torch.distributed.is_initialized():
        return [state]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, state)
    return gathered


# ------------------------------------------------------------------------------ stage
def next_version(models_dir: Path) -> str:
    taken = {p.name for p in models_dir.glob("v[0-9][0-9][0-9]")} if models_dir.is_dir() else set()
    n = 1
    while f"v{n:03d}" in taken:
        n += 1
    return f"v{n:03d}"


def resolve_model_path(spec: str | None, output: Path) -> str | None:
    """A checkpoint path, or the name of a model registered under ``<output>/models/``."""
    if spec is None:
        return None
    registered = output / MODELS_DIR / str(spec) / MODEL_FILE
    if registered.is_file():
        return str(registered)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"init checkpoint {spec!r} is neither a file nor a version in {output / MODELS_DIR}")
    return str(spec)


def registered_arch(checkpoint: str | None) -> str | None:
    """The architecture a registered version was trained as (its config.yaml), else None:
    a version trained at another input size than ``model.arch`` evaluates as itself."""
    if checkpoint is None or Path(checkpoint).name != MODEL_FILE:
        return None
    config = Path(checkpoint).with_name("config.yaml")
    if not config.is_file():
        return None
    return OmegaConf.select(OmegaConf.load(config), "stage.arch")


def worker_config(cfg: DictConfig) -> dict[str, Any]:
    """The plain-dict settings a worker needs, resolved on the driver."""
    stage = OmegaConf.to_container(cfg.stage, resolve=True)
    from sam_core.training import InteractiveConfig

    known = {f.name for f in fields(InteractiveConfig)}
    unknown = set(stage["interactive"]) - known
    if unknown:
        raise ValueError(f"unknown stage.interactive keys: {sorted(unknown)}; known: {sorted(known)}")
    return stage


def _plot_history(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, keys, title in zip(
        axes, (("loss",), ("focal", "dice", "iou_mse"), ("iou_first", "iou_last")),
        ("total loss", "loss parts", "training IoU (round 1 / last)"),
    ):
        for k in keys:
            values = np.array([h[k] for h in history])
            window = max(1, len(values) // 50)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def register(
    version_dir: Path, checkpoint_dir: Path, cfg: DictConfig, data_files: list[str]
) -> dict[str, Any]:
    """Copies the final checkpoint to ``<version>/model.pth`` with its config, data
    list, history and figures; returns the training summary."""
    version_dir.mkdir(parents=True, exist_ok=True)
    # Figures of an earlier registration of this version describe another model.
    (version_dir / "eval.json").unlink(missing_ok=True)
    shutil.copyfile(checkpoint_dir / MODEL_FILE, version_dir / MODEL_FILE)
    state = torch.load(checkpoint_dir / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    history = state["history"]
    (version_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (version_dir / "data.json").write_text(json.dumps({
        "shards": data_files,
        "synthetic": OmegaConf.to_container(cfg.stage.data.synthetic, resolve=True),
        "coco": OmegaConf.to_container(cfg.stage.data.coco, resolve=True),
    }, indent=2))
    with open(version_dir / "history.jsonl", "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    (version_dir / "figures").mkdir(exist_ok=True)
    if history:
        _plot_history(history, version_dir / "figures" / "training.png")
    tail = history[-min(len(history), 20):]
    summary = {
        "version": version_dir.name,
        "model": str(version_dir / MODEL_FILE),
        "steps": state["step"],
        "complete": state["step"] >= int(cfg.stage.steps),
        "final_loss": float(np.mean([h["loss"] for h in tail])) if tail else math.nan,
        "seconds_per_step": float(np.median([h["seconds"] for h in history])) if history else math.nan,
    }
    (version_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(cfg: DictConfig) -> dict:
    """Trains, registers and (optionally) evaluates a model.

    Returns: version, model (path of the registered state dict), steps, complete
    (False when ``stop_at_step`` ended it early),
    final_loss (mean of the last 20 steps), seconds_per_step (median), and eval
    (the eval stage's summary) when ``stage.eval.enabled``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import connect

    stage = cfg.stage
    output = Path(cfg.output).resolve()
    version = stage.version or next_version(output / MODELS_DIR)
    config = worker_config(cfg)
    config["arch"] = stage.arch
    config["init_checkpoint"] = resolve_model_path(stage.init_checkpoint, output)
    storage = output / "train_runs"
    previous = latest_checkpoint(storage / version)
    config["resume_from"] = str(previous) if previous is not None else None
    if previous is not None:
        log.info("resuming %s from %s", version, previous)
    data_files = (committed_shards(config["data"]["shards"]) if config["data"].get("shards") else [])

    started = connect(cfg.cluster)
    try:
        use_gpu = bool(stage.use_gpu) if stage.use_gpu != "auto" else ray.cluster_resources().get("GPU", 0) > 0
        workers = stage.num_workers or (int(ray.cluster_resources().get("GPU", 0)) if use_gpu else 1)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": stage.cpus_per_worker}
            ),
            run_config=ray.train.RunConfig(
                name=version, storage_path=str(storage),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=int(stage.keep_checkpoints)),
                failure_config=ray.train.FailureConfig(max_failures=int(stage.max_failures)),
            ),
        )
        result = trainer.fit()
    finally:
        if started:
            ray.shutdown()
    final = latest_checkpoint(storage / version)
    if final is None:
        raise RuntimeError(f"training of {version} produced no checkpoint: {result.error!r}")
    summary = register(output / MODELS_DIR / version, final, cfg, data_files)
    if stage.eval.enabled:
        from pipeline.stages import eval as eval_stage

        summary["eval"] = eval_stage.evaluate_model(
            arch=stage.arch, checkpoint=summary["model"], eval_cfg=stage.eval, amg_cfg=cfg.amg,
            out_dir=output / MODELS_DIR / version,
        )
    log.info("registered %s: %s", version, summary)
    return summary
