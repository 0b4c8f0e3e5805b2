"""Chaos benchmark: fully_auto under random SIGKILLs, growing inputs and poison images.

    python benchmarks/chaos.py --kills 20 --images 48 --poison 2 --seed 0

Each round starts the real stage (``python -m pipeline.run +stage=fully_auto``, its own
in-process Ray cluster) on the same output, waits a random time, and SIGKILLs either the
driver with its whole process tree (Ray included) or one annotating worker; between
rounds it sometimes adds new images to the input. Inputs include images that kill the
worker that touches them (fault injection). After ``--kills`` kills, a last run goes
to completion, and the output is audited:

  expected    every input image (the final listing)
  committed   manifest rows (each ok row's sample is looked up in its shard)
  lost        inputs with no manifest row, or an ok row whose sample is missing
  duplicated  inputs with two rows, samples in two shards, or ids/keys used twice
  left        temporary files and careful-try notes left in the output

and a JSON line with these figures (plus kills, rounds, seconds) is printed. The goal
is 0 lost, 0 duplicated, 0 left. Uses the project's small default architecture with
random weights and a 4x4 grid, so the model's speed does not dominate.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.dataset import manifest  # noqa: E402
from pipeline.dataset.shards import iter_shard  # noqa: E402
from pipeline.inputs.entries import enumerate_input  # noqa: E402


def write_images(folder: Path, start: int, count: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(start, start + count):
        pixels = rng.integers(0, 255, (48 + 8 * (n % 5), 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{n:04d}.jpg", quality=85)


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def audit(inp: Path, out: Path) -> dict[str, int]:
    sources = [e.source for e in enumerate_input(str(inp), exclude=str(out))]
    rows = manifest.read_table(str(out)).to_pylist()
    by_source = Counter(r["source"] for r in rows)
    lost = sum(1 for s in sources if by_source[s] == 0)
    duplicated = sum(c - 1 for c in by_source.values() if c > 1)
    duplicated += len(rows) - len({r["key"] for r in rows}) + len(rows) - len({r["image_id"] for r in rows})
    in_shards: Counter = Counter()
    for shard in sorted((out / "shards").glob("sa_*.tar")):
        for sample in iter_shard(str(shard), images=False):
            in_shards[(shard.name, sample.key)] += 1
    keys_in_shards = Counter(key for _, key in in_shards)
    duplicated += sum(c - 1 for c in keys_in_shards.values() if c > 1)
    lost += sum(1 for r in rows if r["status"] == manifest.STATUS_OK and in_shards[(r["shard"], r["key"])] == 0)
    left = sum(1 for p in out.rglob("*") if ".tmp-" in p.name) + sum(1 for _ in out.glob(".inflight/**/*"))
    return {"expected": len(sources), "committed": len(rows), "lost": lost, "duplicated": duplicated, "left": left}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--images", type=int, default=48, help="images at the start")
    parser.add_argument("--add", type=int, default=4, help="images added before some restarts")
    parser.add_argument("--poison", type=int, default=2, help="images that kill their worker")
    parser.add_argument("--images-per-unit", type=int, default=4)
    parser.add_argument("--max-wait", type=float, default=12.0, help="longest wait before a kill, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    chance = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
    inp, out = work / "images", work / "out"
    write_images(inp, 0, args.images, rng)
    for n in range(args.poison):
        (inp / f"poison_{n}.jpg").write_bytes((inp / "img_0000.jpg").read_bytes())
    import torch

    from sam_core import sam_model_registry

    checkpoint = work / "random_vit_tiny_512.pth"
    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_tiny_512"]().state_dict(), checkpoint)
    command = [
        sys.executable, "-m", "pipeline.run", "+stage=fully_auto", f"input={inp}", f"output={out}",
        "model.arch=vit_tiny_512", f"model.checkpoint={checkpoint}", "amg.points_per_side=4",
        "amg.pred_iou_thresh=0", "amg.stability_score_thresh=0", "cluster.num_cpus=2",
        f"stage.images_per_unit={args.images_per_unit}", "stage.fault_injection.kill_worker_on=[*/poison_*]",
        f"hydra.run.dir={work / 'hydra'}",
    ]
    start = time.perf_counter()
    kills = rounds = added = 0
    next_image = args.images
    log = (work / "driver.log").open("ab")
    while kills < args.kills:
        if rounds and chance.random() < 0.4:
            write_images(inp, next_image, args.add, rng)
            next_image += args.add
            added += args.add
        rounds += 1
        driver = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + chance.uniform(0.5, args.max_wait)
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.1)
        family = tree(driver.pid)
        if driver.poll() is not None:
            kill_all(family[1:])
            print(f"round {rounds}: finished before its kill (exit {driver.returncode})", flush=True)
            continue
        workers = [p for p in family if "UnitWorker" in " ".join(_cmdline(p))]
        if workers and chance.random() < 0.5:
            victim = chance.choice(workers)
            victim.send_signal(signal.SIGKILL)
            time.sleep(chance.uniform(0.5, 3.0))  # the driver replaces it, then dies too
            what = "a worker, then the driver"
            family = tree(driver.pid)
        else:
            what = "the driver"
        kill_all(family)
        driver.wait()
        kills += 1
        print(f"round {rounds}: killed {what} (kill {kills}/{args.kills})", flush=True)
    final = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    figures = audit(inp, out)
    figures.update(kills=kills, rounds=rounds + 1, images_added=added, poison=args.poison,
                   final_exit=final.returncode, seconds=round(time.perf_counter() - start, 1), workdir=str(work))
    print(json.dumps(figures))


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


if __name__ == "__main__":
    main()
