"""Pipeline overhead and memory: fully_auto on Ray against the generator in a plain loop.

    python benchmarks/pipeline_overhead.py --images 48 --points-per-side 8
    python benchmarks/pipeline_overhead.py --images 10000 --checkpoint models/x.pth --cpus 16

Both sides use the same model, settings, images and CPU threads (or the same GPU):
  loop:     decoded images in memory -> generator.generate(), nothing else, timed;
  pipeline: python -m pipeline.run +stage=fully_auto with one actor: reading, decoding,
            annotating, RLE to JSON, tar writing, manifest, Ray scheduling and progress.
Reported: images/s of both and their ratio (the target is >= 0.9), and the resident
memory of the driver and of the worker sampled during the run (flat = bounded).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.inputs.images import prepare_image  # noqa: E402
from pipeline.models.loader import build_generator  # noqa: E402
from pipeline.stages import run_stage  # noqa: E402


def synthetic_images(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """JPEG scenes of flat shapes on a gradient, each different."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], -1).astype(np.uint8)
    for n in range(count):
        rng = np.random.default_rng(n)
        image = base.copy()
        for _ in range(4):
            x0, y0 = rng.integers(0, width * 3 // 4), rng.integers(0, height * 3 // 4)
            image[y0 : y0 + rng.integers(20, height // 2), x0 : x0 + rng.integers(20, width // 2)] = (
                rng.integers(0, 255, 3)
            )
        path = folder / f"img{n:06d}.jpg"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


class MemorySampler(threading.Thread):
    """Samples the RSS of this process (the driver) and of the annotator workers."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.samples: list[tuple[float, int, int]] = []  # (seconds, driver rss, workers rss)
        self.stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        start = time.perf_counter()
        while not self.stop.is_set():
            workers = 0
            for child in me.children(recursive=True):
                try:
                    if "UnitWorker" in " ".join(child.cmdline()):
                        workers += child.memory_info().rss
                except psutil.Error:
                    pass
            self.samples.append((time.perf_counter() - start, me.memory_info().rss, workers))
            self.stop.wait(self.period)

    def summary(self) -> dict:
        busy = [s for s in self.samples if s[2] > 0]  # while the worker is alive
        if len(busy) < 4:
            return {"samples": len(busy)}
        quarter = len(busy) // 4
        mib = lambda b: round(b / 2**20, 1)  # noqa: E731
        return {
            "samples": len(busy),
            "driver_rss_mib": {"after_first_quarter": mib(busy[quarter][1]), "end": mib(busy[-1][1]),
                               "max": mib(max(s[1] for s in busy))},
            "worker_rss_mib": {"after_first_quarter": mib(busy[quarter][2]), "end": mib(busy[-1][2]),
                               "max": mib(max(s[2] for s in busy))},
            # at 0%, 10%, ..., 100% of the run: growth shows as a trend, a cache as a step
            "worker_rss_mib_by_tenth": [mib(busy[min(len(busy) - 1, i * len(busy) // 10)][2]) for i in range(11)],
        }


def plain_loop(paths: list[Path], model_cfg: dict, amg_cfg: dict, min_seconds: float = 15.0) -> float:
    """images/s of generator.generate() alone on images decoded beforehand.

    Cycles over the images for at least ``min_seconds`` (and every image once): a
    one-second window on a shared machine gave +-20% between two measurements.
    """
    generator = build_generator(model_cfg, amg_cfg)
    images = [prepare_image(p.read_bytes()).rgb for p in paths]
    generator.generate(images[0])  # warm-up, as the pipeline's model is warm too
    start = time.perf_counter()
    done = 0
    while done < len(images) or time.perf_counter() - start < min_seconds:
        generator.generate(images[done % len(images)])
        done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the synthetic images")
    parser.add_argument("--points-per-side", type=int, default=8)
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--checkpoint", default=None, help="default: random weights")
    parser.add_argument("--cpus", type=int, default=psutil.cpu_count(), help="torch threads on both sides")
    parser.add_argument("--images-per-unit", type=int, default=1000)
    parser.add_argument("--report", default=None, help="also write the report as JSON here")
    args = parser.parse_args()

    width, height = map(int, args.size.split("x"))
    torch.set_num_threads(args.cpus)
    # Random weights keep no mask at the default thresholds; keep all of them instead,
    # so that RLE encoding and JSON writing are part of the measured work.
    amg = {"points_per_side": args.points_per_side, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            from sam_core import sam_model_registry

            torch.manual_seed(0)
            checkpoint = str(tmp / "random.pth")
            torch.save(sam_model_registry[args.arch]().state_dict(), checkpoint)
        paths = synthetic_images(tmp / "images", args.images, width, height)
        model = {"arch": args.arch, "checkpoint": checkpoint, "device": "auto"}

        loop_before = plain_loop(paths[: min(len(paths), 32)], model, amg)

        from hydra import compose, initialize_config_dir

        overrides = [
            "+stage=fully_auto", f"input={tmp / 'images'}", f"output={tmp / 'out'}",
            f"model.arch={args.arch}", f"model.checkpoint={checkpoint}",
            *(f"amg.{k}={v}" for k, v in amg.items()),
            "stage.num_actors=1", f"stage.cpus_per_actor={args.cpus}", f"cluster.num_cpus={args.cpus}",
            f"stage.images_per_unit={args.images_per_unit}",
        ]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        sampler = MemorySampler()
        sampler.start()
        summary = run_stage(cfg)
        sampler.stop.set()
        sampler.join()

        loop_after = plain_loop(paths[: min(len(paths), 32)], model, amg)

    loop = (loop_before + loop_after) / 2
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{args.cpus}",
        "images": args.images,
        "size": args.size,
        "points_per_side": args.points_per_side,
        "loop_images_per_s": {"before": round(loop_before, 3), "after": round(loop_after, 3)},
        "pipeline_images_per_s": summary["images_per_s"],
        "pipeline_worker_busy_images_per_s": summary["actors"][0]["images_per_s"],
        "ratio_pipeline_to_loop": round(summary["images_per_s"] / loop, 3),
        "pipeline_wall_s": summary["wall_s"],
        "masks": summary["masks"],
        "memory": sampler.summary(),
    }
    print(json.dumps(report, indent=2))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
