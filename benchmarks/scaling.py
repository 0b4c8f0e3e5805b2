"""Scaling over nodes: fully_auto with CPU actors on a one-node and on a two-node Ray cluster.

    python benchmarks/scaling.py --images 32 --cpus-per-node 1
    python benchmarks/scaling.py --images 200 --cpus-per-node 4 --checkpoint models/x.pth --points-per-side 16

Both clusters are real multi-process Ray clusters started on this machine with
jobs/local_cluster.py (one raylet and object store per node, nodes joined with
``ray start --address``); each node has the same CPUs, and there is one actor per
``cpus-per-node`` CPUs, so the two-node run has twice the actors. The driver joins the
cluster with ``cluster=existing``, as a submitted job does. Same inputs, same model,
same settings, a fresh output each time. Reported: images/s over the annotation time
(models loaded to last unit committed, from summary.json), the wall time of the whole
command, and the two-node / one-node ratio (2.0 is perfect scaling).

On one machine the "nodes" share its cores: the ratio is only meaningful when the
machine has at least 2 x cpus-per-node idle cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs.local_cluster import LocalRayCluster  # noqa: E402


def write_images(folder: Path, count: int, width: int, height: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    for i in range(count):
        image = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], -1).astype(np.uint8)
        for _ in range(4):
            x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
            image[y0:y0 + rng.integers(8, height // 2), x0:x0 + rng.integers(8, width // 2)] = rng.integers(0, 255, 3)
        Image.fromarray(image).save(folder / f"img_{i:05d}.jpg", quality=90)


def random_checkpoint(path: Path) -> Path:
    import torch

    from sam_core import sam_model_registry

    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_tiny"]().state_dict(), path)
    return path


def run_on(nodes: int, args: argparse.Namespace, images: Path, checkpoint: Path, work: Path) -> dict:
    out = work / f"out_{nodes}n"
    with LocalRayCluster(nodes=nodes, num_cpus=args.cpus_per_node) as cluster:
        command = [
            sys.executable, "-m", "pipeline.run", "+stage=fully_auto", "cluster=existing",
            f"input={images}", f"output={out}", "model=vit_tiny", f"model.checkpoint={checkpoint}",
            f"amg.points_per_side={args.points_per_side}", "amg.pred_iou_thresh=0", "amg.stability_score_thresh=0",
            f"stage.images_per_unit={args.images_per_unit}", f"stage.cpus_per_actor={args.cpus_per_node}",
            f"hydra.run.dir={work / f'run_{nodes}n'}",
        ]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=dict(cluster.env, RAY_ADDRESS=cluster.address),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"fully_auto on {nodes} node(s) failed:\n{done.stdout[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["images"] == args.images, summary["dataset"]
    return {"nodes": nodes, "actors": len(summary["actors"]), "images": summary["images"],
            "annotate_s": summary["annotate_s"], "images_per_s": summary["images_per_s"], "wall_s": round(wall, 1),
            "per_actor_images_per_s": [a["images_per_s"] for a in summary["actors"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", default="256x192", help="WIDTHxHEIGHT of the synthetic images")
    parser.add_argument("--images-per-unit", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--points-per-side", type=int, default=8)
    parser.add_argument("--checkpoint", type=Path, default=None, help="vit_tiny state dict (default: random weights)")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        work = Path(tmp)
        write_images(work / "images", args.images, width, height)
        checkpoint = args.checkpoint or random_checkpoint(work / "vit_tiny_random.pth")
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; {args.images} images "
              f"{args.size}, {args.cpus_per_node} CPU(s) per node, points_per_side={args.points_per_side}", flush=True)
        results = []
        for nodes in (1, 2):
            result = run_on(nodes, args, work / "images", checkpoint, work)
            print(json.dumps(result), flush=True)
            results.append(result)
    one, two = results
    print(f"1 node: {one['images_per_s']:.2f} images/s ({one['actors']} actor(s)); "
          f"2 nodes: {two['images_per_s']:.2f} images/s ({two['actors']} actor(s)); "
          f"ratio {two['images_per_s'] / one['images_per_s']:.2f} (perfect: 2.00); "
          f"wall {one['wall_s']} s vs {two['wall_s']} s")


if __name__ == "__main__":
    main()
