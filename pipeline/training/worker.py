"""The Ray Train worker: the plain loop of ``sam_core.training.train_step`` with a
resumable data stream, checkpoints and progress lines. Runs unchanged with one CPU
worker or N GPU workers (DDP)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pipeline.models.loader import load_sam
from pipeline.training import checkpoints
from pipeline.training.optim import make_optimizer, make_scheduler
from pipeline.training.stream import to_batch, training_stream
from pipeline.training.trainer import say


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``; ``config`` is ``trainer.worker_config``'s."""
    import ray.train
    import ray.train.torch

    from sam_core.training import InteractiveConfig, InteractiveSam, train_step

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed = int(config["seed"])
    torch.manual_seed(seed)
    # A start model trained at another input size (e.g. vit_tiny -> vit_tiny_512) fits.
    sam = load_sam({"arch": config["arch"], "checkpoint": config["init_checkpoint"], "device": "cpu"}, resize=True)
    model = InteractiveSam(sam, InteractiveConfig(**config["interactive"]))
    optim = config["optim"]
    steps = int(config["steps"])
    optimizer = make_optimizer(model, optim)
    scheduler = make_scheduler(optimizer, optim, steps)
    generator = torch.Generator(device=device).manual_seed(seed * 1000 + rank)
    start, history = 0, []

    with checkpoints.resumed(config["resume_from"]) as folder:
        if folder is not None:
            sam.load_state_dict(checkpoints.load(folder, checkpoints.MODEL_FILE))
            state = checkpoints.load(folder, checkpoints.TRAIN_STATE_FILE)
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
    say(f"[retrain] worker {rank}/{world} on {device}, {torch.get_num_threads()} threads, steps {start}..{steps}")

    # stop_at_step ends this invocation early without changing the schedule, e.g. to
    # train in time slices on a shared machine; rerunning the version continues it.
    end = min(steps, int(config["stop_at_step"] or steps))
    for step in range(start, end):
        t0 = time.perf_counter()
        batch = None
        attempt = 0
        while batch is None:  # a batch whose masks are all filtered out is skipped
            rng = np.random.default_rng([seed, rank, step, attempt])
            batch = to_batch(next(stream), img_size, data, rng)
            attempt += 1
        out = train_step(model, optimizer, batch.to(device), generator, autocast, optim["grad_clip"])
        scheduler.step()
        out.update(step=step + 1, lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - t0)
        history.append(out)
        if (step + 1) % int(config["log_every"]) == 0 and rank == 0:
            say(f"[retrain] step {step + 1}/{steps} loss {out['loss']:.4f} iou_first "
                f"{out['iou_first']:.3f} iou_last {out['iou_last']:.3f} {out['seconds']:.2f}s")
        if (step + 1) % every == 0 or step + 1 == end:
            metrics = {k: v for k, v in out.items() if isinstance(v, (int, float))}
            gens = _gather_generator_states(generator, world)
            if rank != 0:
                checkpoints.report(step + 1, None, None, metrics)
                continue
            checkpoints.report(step + 1, bare.sam, {
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
