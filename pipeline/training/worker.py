"""The Ray Train worker for SAM: the plain loop of ``sam_core.training.train_step`` with a
resumable data stream, checkpoints and progress lines. Runs unchanged with one CPU
worker or N GPU workers (DDP).

What trains is ``stage.tune`` (``sam_core.training.tune``). With a frozen image encoder
(decoder, decoder_prompt) every image's embedding is computed once, without gradients,
and kept in a cache (``EmbeddingCache``): a CPU fine-tune then costs the decoder's
work, not the encoder's. Adapter and LoRA runs checkpoint only their tuned tensors and
the base they were tuned from (the adapter file the loader reads).
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from pipeline.models.loader import is_tuned, load_sam, read_tuned
from pipeline.training import checkpoints
from pipeline.training.optim import make_optimizer, make_scheduler
from pipeline.training.stream import to_batch, training_stream
from pipeline.training.trainer import StepProgress, say
from sam_core.checkpoint import load_official_state
from sam_core.training import (
    ENCODER_MODES,
    InteractiveConfig,
    InteractiveSam,
    TunedSpec,
    encoder_frozen,
    encoder_input,
    load_tuned,
    prepare,
    train_step,
    tuned_state,
)


def tune_spec(config: dict[str, Any]):
    """The ``TunedSpec`` of a retrain config (``stage.tune`` and ``stage.tune_sizes``)."""
    return TunedSpec(config["tune"], **config["tune_sizes"])


def tuned_base(init: str | None, spec) -> tuple[str | None, dict[str, torch.Tensor] | None]:
    """(the model to tune, the tuned tensors to start from): an adapter file tuned the
    same way is continued on its own base (its adapters train on); anything else is the
    base itself, its new adapters starting afresh. An adapter model cannot be the base
    of a run that writes a whole state dict (its keys are not SAM's): refused."""
    if not is_tuned(init):
        return init, None
    meta, tensors = read_tuned(init)
    if TunedSpec(**meta["tune"]) == spec:
        return meta["base"], tensors
    if meta["tune"]["mode"] == "adapter" and spec.mode not in ENCODER_MODES:
        raise ValueError(f"{init} is an adapter model: tune it with stage.tune=adapter, or tune its base "
                         f"({meta['base']}) with stage.tune={spec.mode}")
    return init, None


def adapter_file(sam: torch.nn.Module, spec, arch: str, base: str, base_sha256: str) -> dict[str, Any]:
    """What an adapter file holds (``pipeline.models.loader.read_tuned`` reads it): the
    tuned tensors of ``sam`` and how to rebuild the model from its base."""
    return {"meta": {"arch": arch, "base": base, "base_sha256": base_sha256, "tune": spec.to_dict()},
            "tuned": tuned_state(sam, spec)}


class EmbeddingCache:
    """What a frozen encoder computes for an image (SAM 1: its embedding; SAM 2: the
    embedding and the two high-resolution maps) by image content, least recently used
    out first, at most ``max_mb`` megabytes."""

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[bytes, list[torch.Tensor]] = OrderedDict()

    def embeddings(self, sam: torch.nn.Module, batch) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The batch's embeddings (B x C x h x w) and SAM 2's high-resolution maps (None
        for SAM 1), computed for the images not cached."""

        keys = [hashlib.blake2b(img.numpy().tobytes(), digest_size=16).digest() for img in batch.images]
        missing = [i for i, key in enumerate(keys) if key not in self._items]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            device = next(sam.parameters()).device
            sub = type(batch)(batch.images[missing].to(device), [batch.input_sizes[i] for i in missing], [])
            with torch.no_grad():
                embedding, maps = sam.encode(encoder_input(sam, sub))
            for j, i in enumerate(missing):
                self._put(keys[i], [embedding[j].cpu(), *(level[j].cpu() for level in maps)])
        for key in keys:
            self._items.move_to_end(key)
        per_image = [self._items[key] for key in keys]
        levels = [torch.stack(level) for level in zip(*per_image)]
        return levels[0], (levels[1:] or None)

    def _put(self, key: bytes, tensors: list[torch.Tensor]) -> None:
        self._items[key] = tensors
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        while self.bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``; ``config`` is ``trainer.worker_config``'s
    plus init_checkpoint, base_sha256 (the identity of the model tuned) and resume_from."""
    import ray.train
    import ray.train.torch


    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed = int(config["seed"])
    torch.manual_seed(seed)
    spec = tune_spec(config)
    base, start_tensors = tuned_base(config["init_checkpoint"], spec)
    # A start model trained at another input size (e.g. vit_tiny -> vit_tiny_512) fits.
    sam = load_sam({"arch": config["arch"], "checkpoint": base, "device": "cpu"}, resize=not is_tuned(base))
    trainable = prepare(sam, spec, start_tensors)
    model = InteractiveSam(sam, InteractiveConfig(**config["interactive"]))
    optim = config["optim"]
    steps = int(config["steps"])
    optimizer = make_optimizer(model, optim)
    scheduler = make_scheduler(optimizer, optim, steps)
    generator = torch.Generator(device=device).manual_seed(seed * 1000 + rank)
    start, history = 0, []

    with checkpoints.resumed(config["resume_from"]) as folder:
        if folder is not None:
            weights = checkpoints.load(folder, checkpoints.MODEL_FILE)
            if "tuned" in weights:
                load_tuned(sam, spec, weights["tuned"])
            else:
                load_official_state(sam, weights)
            state = checkpoints.load(folder, checkpoints.TRAIN_STATE_FILE)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start, history = int(state["step"]), list(state["history"])
            if rank < len(state["generators"]):
                generator.set_state(state["generators"][rank])

    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    bare = model.module if hasattr(model, "module") else model
    cache = EmbeddingCache(float(config["embedding_cache_mb"])) if encoder_frozen(spec) else None
    autocast = torch.bfloat16 if (config["bf16"] and device.type == "cuda") else None
    data = config["data"]
    img_size = bare.sam.image_encoder.img_size
    stream = training_stream(data, rank, world, start, int(config["batch_size"]), img_size)
    every = int(config["checkpoint_every"])
    count = sum(p.numel() for n, p in bare.sam.named_parameters() if n in set(trainable))
    say(f"[retrain] worker {rank}/{world} on {device}, {torch.get_num_threads()} threads, steps {start}..{steps}, "
        f"tune {spec.mode}: {count:,} trainable parameters" + (", image embeddings cached" if cache else ""))

    # stop_at_step ends this invocation early without changing the schedule, e.g. to
    # train in time slices on a shared machine; rerunning the version continues it.
    end = min(steps, int(config["stop_at_step"] or steps))
    progress = StepProgress("retrain", start, end, int(config["log_every"]))
    for step in range(start, end):
        t0 = time.perf_counter()
        batch = None
        attempt = 0
        while batch is None:  # a batch whose masks are all filtered out is skipped
            rng = np.random.default_rng([seed, rank, step, attempt])
            batch = to_batch(next(stream), img_size, data, rng, square=bare.sam.family == "sam2")
            attempt += 1
        if cache is not None:
            batch.embeddings, batch.high_res = cache.embeddings(bare.sam, batch)
        out = train_step(model, optimizer, batch.to(device), generator, autocast, optim["grad_clip"])
        scheduler.step()
        out.update(step=step + 1, lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - t0)
        history.append(out)
        if rank == 0 and progress.due(step + 1):
            cached = f" cache {cache.hits}/{cache.hits + cache.misses}" if cache else ""
            say(progress.line(step + 1, f"loss {out['loss']:.4f} iou_first {out['iou_first']:.3f} "
                                        f"iou_last {out['iou_last']:.3f}{cached}"))
        if (step + 1) % every == 0 or step + 1 == end:
            metrics = {k: v for k, v in out.items() if isinstance(v, (int, float))}
            gens = _gather_generator_states(generator, world)
            if rank != 0:
                checkpoints.report(step + 1, None, None, metrics)
                continue
            if spec.mode in ENCODER_MODES:
                weights = adapter_file(bare.sam, spec, config["arch"], base, config["base_sha256"])
            else:
                weights = checkpoints.state_dict(bare.sam)
            checkpoints.report(step + 1, weights, {
                "step": step + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "history": history, "generators": gens,
            }, metrics)


def _gather_generator_states(generator: torch.Generator, world: int) -> list[torch.Tensor]:
    """Every worker's prompt-sampling RNG state, so a resume continues each one exactly."""
    state = generator.get_state()
    if world == 1 or not torch.distributed.is_initialized():
        return [state]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, state)
    return gathered
