"""Where the prompts go: the grid against adaptive and object prompting, on the same
images and weights, in one run.

    python benchmarks/prompting.py                       # the shipped model, everything below
    python benchmarks/prompting.py --checkpoint sam_vit_h_4b8939.pth --arch vit_h --device cuda \
        --detector <output>/models/detector_v001 --photos <folder>

For each image set and each mode it prints seconds per image, decoder prompts per image,
masks per image, the share of the grid's masks that the mode recovers (matched one to
one at IoU >= 0.9 and >= 0.75), recall against the truth where the images have it (at
IoU 0.5 and 0.75), and the growth of the process's peak memory during the mode.

Image sets: the sample photos (or --photos); synthetic scenes with exact truth (the
default model's domain, 512x512); one dense SA-1B-sized image (1500x2250, several hundred
touching cells: the microscopy domain). ``objects`` takes its boxes from --detector (a
registered detector) where given, else, on the sets with truth, from the true boxes (an
oracle detector: an upper bound, labelled so); without either it is skipped.

The generator settings are the model's: the shipped model's masks pass 0.4 / 0.85
(README); pass --pred-iou-thresh / --stability-score-thresh for an official checkpoint.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.paths import PROJECT_ROOT
from pipeline.truth.domains import make_domain_scene
from pipeline.truth.synthetic import iter_scenes, scene_seeds
from sam_core import SamAutomaticMaskGenerator, sam_model_registry
from sam_core.tools.bench import mask_parity

MODES = ("grid", "adaptive", "objects")


class PeakMemory:
    """The process's resident memory sampled every 5 ms: the peak above the start."""

    def __init__(self) -> None:
        self.process = psutil.Process()

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def grown_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def image_sets(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """{set name: [{"image", "truth" (list of bool masks) or None, "boxes" or None}]}."""
    photos = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    sets = {"sample photos": [{"image": np.asarray(Image.open(p).convert("RGB")), "truth": None} for p in photos]}
    scenes = list(iter_scenes(scene_seeds("test", 0, args.scenes), (512, 512)))
    dense = make_domain_scene("microscopy", 910_000, (1500, 2250))
    for name, group in (("synthetic scenes", scenes), ("dense 1500x2250", [dense])):
        sets[name] = [{"image": s.image, "truth": [m.astype(bool) for m in s.masks if m.any()],
                       "true_boxes": np.asarray(s.boxes_xyxy(), np.float64) + [0, 0, 1, 1]} for s in group]
    return sets


def truth_recall(truth: list[list[np.ndarray]], outputs: list[list[dict]], threshold: float) -> float:
    reference = [[{"segmentation": mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))} for m in masks]
                 for masks in truth]
    return mask_parity(reference, outputs, threshold)["matched_fraction"]


def run_mode(generator: SamAutomaticMaskGenerator, items: list[dict], boxes: Callable[[dict], Any]) -> dict[str, Any]:
    outputs, prompts = [], 0
    with PeakMemory() as memory:
        start = time.perf_counter()
        for item in items:
            outputs.append(generator.generate(item["image"], boxes=boxes(item)))
            prompts += generator.counts["prompts"]
        seconds = time.perf_counter() - start
    return {"seconds_per_image": seconds / len(items), "prompts_per_image": prompts / len(items),
            "masks_per_image": float(np.mean([len(o) for o in outputs])), "peak_memory_growth_mb": memory.grown_mb,
            "outputs": outputs}


def _cell(row: dict[str, Any], key: str, width: int) -> str:
    return f"{row[key]:>{width}.3f}" if key in row else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_tiny_512")
    parser.add_argument("--checkpoint", default=str(PROJECT_ROOT / "models" / "sam_vit_tiny_512_synthetic.pth"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--photos", default=str(PROJECT_ROOT / "sample" / "images"))
    parser.add_argument("--scenes", type=int, default=4, help="synthetic scenes with truth")
    parser.add_argument("--sets", default="sample photos,synthetic scenes,dense 1500x2250")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--detector", help="a registered detector folder: objects' boxes")
    parser.add_argument("--min-box-score", type=float, default=0.3)
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--adaptive-levels", type=int, default=2)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.4)
    parser.add_argument("--stability-score-thresh", type=float, default=0.85)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    sam = sam_model_registry[args.arch](checkpoint=args.checkpoint).to(device).eval()
    detect = None
    if args.detector:
        from pipeline.models.detector import load_detector, predict

        detector, _ = load_detector(args.detector, device)
        detect = lambda item: predict(detector, [item["image"]], device, args.min_box_score)[0][0]  # noqa: E731

    sets = image_sets(args)
    wanted = [s.strip() for s in args.sets.split(",")]
    results: dict[str, Any] = {"arch": args.arch, "checkpoint": args.checkpoint, "device": str(device),
                               "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
                               "settings": vars(args), "sets": {}}
    print(f"{args.arch} ({Path(args.checkpoint).name}) on {device}, {torch.get_num_threads()} thread(s), "
          f"{args.points_per_side}x{args.points_per_side} grid, thresholds {args.pred_iou_thresh} / "
          f"{args.stability_score_thresh}")
    header = (f"{'set':<18}{'mode':<22}{'s/img':>8}{'prompts':>9}{'masks':>8}{'grid@0.9':>10}{'grid@0.75':>10}"
              f"{'truth@0.5':>10}{'truth@0.75':>11}{'peak+MB':>9}")
    print(header)
    for set_name in wanted:
        items = sets[set_name]
        rows: dict[str, dict[str, Any]] = {}
        for mode in [m.strip() for m in args.modes.split(",")]:
            boxes: Callable[[dict], Any] = lambda item: None  # noqa: E731
            label = mode
            if mode == "objects":
                if detect is not None:
                    boxes = detect
                elif items[0].get("true_boxes") is not None:
                    boxes, label = (lambda item: item["true_boxes"]), "objects (true boxes)"
                else:
                    continue
            generator = SamAutomaticMaskGenerator(
                sam, points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                stability_score_thresh=args.stability_score_thresh, output_mode="coco_rle", prompting=mode,
                adaptive_levels=args.adaptive_levels)
            rows[label] = run_mode(generator, items, boxes)
        grid = rows.get("grid")
        for label, row in rows.items():
            if grid is not None:
                row["grid_recovered_09"] = mask_parity(grid["outputs"], row["outputs"], 0.9)["matched_fraction"]
                row["grid_recovered_075"] = mask_parity(grid["outputs"], row["outputs"], 0.75)["matched_fraction"]
            if items[0]["truth"] is not None:
                truth = [item["truth"] for item in items]
                row["truth_recall_05"] = truth_recall(truth, row["outputs"], 0.5)
                row["truth_recall_075"] = truth_recall(truth, row["outputs"], 0.75)

            print(f"{set_name:<18}{label:<22}{row['seconds_per_image']:>8.2f}{row['prompts_per_image']:>9.1f}"
                  f"{row['masks_per_image']:>8.1f}{_cell(row, 'grid_recovered_09', 10)}"
                  f"{_cell(row, 'grid_recovered_075', 10)}{_cell(row, 'truth_recall_05', 10)}"
                  f"{_cell(row, 'truth_recall_075', 11)}{row['peak_memory_growth_mb']:>9.0f}", flush=True)
        for row in rows.values():
            del row["outputs"]
        results["sets"][set_name] = {"images": len(items), "size": list(items[0]["image"].shape[:2]), "modes": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
