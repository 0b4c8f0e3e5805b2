"""A scripted annotator: drives the annotation server's HTTP API as the browser does,
against ground truth, and measures annotation cost in clicks.

It sees the truth only through the decoder's answers, as a person sees the mask on
screen: for each object it clicks the centre of the largest error region (positive in
a missed region, negative in a false one; ``sam_core.metrics.next_click``) until the
mask reaches the target IoU, the click limit, or clicks stop helping (``stall_clicks``
in a row gain less than 0.01 IoU); then, as a person finishes a mask, it corrects what
remains wrong with brush and eraser strokes, each stroke tracing one connected error
region (the largest first: the brush on a missed one, the eraser on a spill), until the
target IoU or the stroke limit, and accepts. Clicks and strokes are counted per mask
and saved with it. It runs the same ONNX decoder on the same float16 embeddings the
server sends the browser, so it measures what the browser would answer. Pre-filled
automatic masks that already match an object are accepted (0 clicks); the others are
deleted.

    python -m pipeline.annotate.simulated scenes --count 10 --out /tmp/scenes
    python -m pipeline.run +stage=annotate input=/tmp/scenes/images output=/tmp/ds stage.token=T
    python -m pipeline.annotate.simulated run --url http://127.0.0.1:8765 --token T --truth /tmp/scenes/instances.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import onnxruntime
import torch

from pipeline.annotate.rle import counts_from_mask, mask_from_counts
from pipeline.truth.pools import Truth, write_scenes
from sam_core.metrics import mask_iou, next_click
from sam_core.utils.onnx import upscale_low_res
from sam_core.utils.transforms import ResizeLongestSide, ResizeSquare

# One line per request would bury the run's own log (the annotator makes thousands).
logging.getLogger("httpx").setLevel(logging.WARNING)


@dataclass
class MaskResult:
    """One object: clicks spent, IoU after each click, the click counts at which IoU
    first reached 0.85 and 0.9 (the cap when never), model seconds per click."""

    key: str
    clicks: int
    ious: list[float]
    noc85: int
    noc90: int
    model_s: list[float] = field(default_factory=list)
    prefilled: bool = False
    strokes: int = 0
    final_iou: float | None = None  # after the strokes (the clicks' last IoU without any)


class Decoder:
    """The page's decoder in Python: the server's low-res ONNX graph under onnxruntime,
    and the upsampling of the chosen mask to the image size (as the page does)."""

    def __init__(self, onnx_bytes: bytes, img_size: int, mask_input_size: int, family: str = "sam") -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # as the browser's single-threaded WebAssembly
        self.session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.img_size = img_size
        self.family = family
        self.transform = ResizeSquare(img_size) if family == "sam2" else ResizeLongestSide(img_size)
        self.mask_input_size = mask_input_size

    def __call__(self, features: list[np.ndarray], points: list[tuple[float, float]], labels: list[int],
                 size: tuple[int, int], previous: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(predicted IoUs 4, low-res logits 4 x S x S) for the clicks, (x, y) in pixels;
        ``features``: the embedding, then (SAM 2) its high-resolution maps."""
        coords = self.transform.apply_coords(np.array(list(points) + [(0, 0)], float), size)
        side = self.mask_input_size
        maps = {"high_res_feats_0": features[1], "high_res_feats_1": features[2]} if self.family == "sam2" else {}
        feeds = {
            "image_embeddings": features[0],
            **maps,
            "point_coords": coords[None].astype(np.float32),
            "point_labels": np.array([list(labels) + [-1]], np.float32),
            "mask_input": (previous if previous is not None else np.zeros((side, side)))[None, None].astype(np.float32),
            "has_mask_input": np.array([0.0 if previous is None else 1.0], np.float32),
        }
        scores, low_res = self.session.run(None, feeds)
        return scores[0], low_res[0]

    def mask(self, low_res: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """One low-res mask -> H x W bool, as the model's ``postprocess_masks`` then > 0."""
        logits = upscale_low_res(torch.from_numpy(low_res)[None], self.img_size, size, self.family)
        return logits[0].numpy() > 0


def read_features(response: httpx.Response) -> list[np.ndarray]:
    """The embedding endpoint's answer -> float32 arrays (the embedding, then SAM 2's
    high-resolution maps), as the page reads it."""
    shapes = [tuple(int(v) for v in shape.split(",")) for shape in response.headers["X-Feature-Shapes"].split(";")]
    values = np.frombuffer(response.content, "<f2")
    features, at = [], 0
    for shape in shapes:
        count = int(np.prod(shape))
        features.append(values[at : at + count].reshape(shape).astype(np.float32))
        at += count
    if at != len(values):
        raise ValueError(f"features of {len(values)} values, the shapes say {at}")
    return features


class SimulatedAnnotator:
    """Annotates every image the server leases to it; ``run`` returns the report."""

    def __init__(self, url: str, token: str, truth: Callable[[dict[str, Any]], np.ndarray | None],
                 name: str = "simulated", target_iou: float = 0.9, max_clicks: int = 20,
                 max_strokes: int = 0, stall_clicks: int = 0, timeout_s: float = 300.0) -> None:
        self.http = httpx.Client(base_url=url, headers={"X-Token": token}, timeout=timeout_s)
        self.truth = truth
        self.name = name
        self.client = f"simulated-{uuid.uuid4().hex[:8]}"
        self.target_iou = target_iou
        self.max_clicks = max_clicks
        self.max_strokes = max_strokes    # 0: clicks only
        self.stall_clicks = stall_clicks  # 0: click on to max_clicks
        config = self._get("/api/config").json()
        model = config["model"]
        self.decoder = Decoder(self._get(model["decoder_url"]).content, model["img_size"], model["mask_input_size"],
                               model["family"])

    def _get(self, path: str) -> httpx.Response:
        response = self.http.get(path)
        response.raise_for_status()
        return response

    def run(self, max_images: int | None = None) -> dict[str, Any]:
        """Annotates leased images until the queue is empty (or ``max_images``).

        Returns: images, masks, noc85 and noc90 (mean clicks to IoU 0.85 / 0.9, capped at
        max_clicks), clicks_per_mask, miou (final IoU), model_ms_per_click (median and
        p95), prefilled_accepted, per_mask (MaskResult dicts).
        """
        results: list[MaskResult] = []
        images, after = 0, None
        while max_images is None or images < max_images:
            response = self.http.post("/api/lease", json={"client": self.client, "after": after, "step": 1})
            response.raise_for_status()
            view = response.json()
            if view is None:
                break
            truth = self.truth(view)
            if truth is None:
                raise ValueError(f"no ground truth for {view['key']} ({view['source']})")
            results += self.annotate(view, truth)
            images, after = images + 1, view["key"]
        return report(results, images, self.max_clicks)

    def annotate(self, view: dict[str, Any], truth: np.ndarray) -> list[MaskResult]:
        key, size = view["key"], (view["height"], view["width"])
        if truth.shape[1:] != size:
            raise ValueError(f"{key}: ground truth is {truth.shape[1:]}, the image {size}")
        features = read_features(self._get(f"/api/images/{key}/embedding"))
        objects = [m for m in truth if m.any()]
        saved, results = [], []
        automatic = [(m, mask_from_counts(m["counts"], *size)) for m in view["masks"] if m["provenance"] == "automatic"]
        kept = [m for m in view["masks"] if m["provenance"] != "automatic"]
        remaining = []
        for gt in objects:
            best = max(range(len(automatic)), key=lambda i: mask_iou(automatic[i][1], gt), default=None)
            if best is not None and mask_iou(automatic[best][1], gt) >= self.target_iou:
                offered, decoded = automatic.pop(best)
                saved.append({**offered, "provenance": "automatic_accepted", "annotator": self.name})
                results.append(MaskResult(key, 0, [mask_iou(decoded, gt)], 0, 0, prefilled=True))
            else:
                remaining.append(gt)
        for gt in remaining:
            start = time.perf_counter()
            result, mask, points = self._click_until_done(key, features, gt, size)
            mask, result.strokes = strokes_until_done(mask, gt, self.target_iou, self.max_strokes)
            result.final_iou = mask_iou(mask, gt)
            results.append(result)
            saved.append({"uid": uuid.uuid4().hex, "counts": counts_from_mask(mask), "provenance": "model_assisted",
                          "clicks": result.clicks, "strokes": result.strokes,
                          "seconds": round(time.perf_counter() - start, 3),
                          "annotator": self.name, "point_coords": points})
        body = {"client": self.client, "masks": kept + saved, "done": True, "version": view["version"]}
        response = self.http.put(f"/api/images/{key}", json=body)
        response.raise_for_status()
        return results

    def _click_until_done(self, key: str, features: list[np.ndarray], gt: np.ndarray, size: tuple[int, int]):
        points: list[tuple[int, int]] = []
        labels: list[int] = []
        pred, logits, ious, seconds = None, None, [], []
        for k in range(1, self.max_clicks + 1):
            xy, label = next_click(gt, pred)
            points.append(xy)
            labels.append(label)
            start = time.perf_counter()
            scores, low_res = self.decoder(features, points, labels, size, logits)
            # One click: the best of the three ambiguity-aware masks, as the browser shows
            # first; more: the single-mask output, refined from the previous logits.
            index = 1 + int(np.argmax(scores[1:])) if k == 1 else 0
            pred, logits = self.decoder.mask(low_res[index], size), low_res[index]
            seconds.append(time.perf_counter() - start)
            ious.append(mask_iou(pred, gt))
            if ious[-1] >= self.target_iou or self._stalled(ious):
                break

        def noc(threshold: float) -> int:
            return next((i + 1 for i, v in enumerate(ious) if v >= threshold), self.max_clicks)

        positive = [[float(x), float(y)] for (x, y), lbl in zip(points, labels) if lbl == 1]
        return MaskResult(key, len(points), ious, noc(0.85), noc(0.9), seconds), pred, positive


    def _stalled(self, ious: list[float]) -> bool:
        """Whether the last ``stall_clicks`` clicks together gained less than 0.01 IoU each."""
        n = self.stall_clicks
        return n > 0 and len(ious) > n and ious[-1] - ious[-1 - n] < 0.01 * n


def strokes_until_done(mask: np.ndarray, gt: np.ndarray, target_iou: float, max_strokes: int) -> tuple[np.ndarray, int]:
    """(the mask after brush and eraser strokes, the strokes spent): each stroke fixes the
    largest connected error region (missed pixels brushed in, spilled ones erased) until
    the IoU with ``gt`` reaches ``target_iou`` or ``max_strokes`` were made."""
    import cv2

    mask = mask.copy()
    strokes = 0
    while strokes < max_strokes and mask_iou(mask, gt) < target_iou:
        best, best_area, add = None, 0, True
        for error, missing in ((gt & ~mask, True), (mask & ~gt, False)):
            count, labels, stats, _ = cv2.connectedComponentsWithStats(error.astype(np.uint8), connectivity=8)
            if count > 1:
                label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
                if stats[label, cv2.CC_STAT_AREA] > best_area:
                    best, best_area, add = labels == label, int(stats[label, cv2.CC_STAT_AREA]), missing
        if best is None:
            break
        mask = mask | best if add else mask & ~best
        strokes += 1
    return mask, strokes


def report(results: list[MaskResult], images: int, max_clicks: int) -> dict[str, Any]:
    clicked = [r for r in results if not r.prefilled]
    per_click = np.array([s for r in clicked for s in r.model_s]) * 1000
    return {
        "images": images,
        "masks": len(results),
        "prefilled_accepted": len(results) - len(clicked),
        "noc85": float(np.mean([r.noc85 for r in clicked])) if clicked else 0.0,
        "noc90": float(np.mean([r.noc90 for r in clicked])) if clicked else 0.0,
        "clicks_per_mask": float(np.mean([r.clicks for r in results])) if results else 0.0,
        "strokes_per_mask": float(np.mean([r.strokes for r in results])) if results else 0.0,
        "miou": float(np.mean([r.final_iou if r.final_iou is not None else r.ious[-1] for r in results]))
        if results else 0.0,
        "max_clicks": max_clicks,
        "model_ms_per_click": {
            "median": float(np.median(per_click)) if len(per_click) else 0.0,
            "p95": float(np.percentile(per_click, 95)) if len(per_click) else 0.0,
        },
        "per_mask": [r.__dict__ for r in results],
    }


def _by_source(truth: Truth) -> Callable[[dict[str, Any]], np.ndarray | None]:
    """An image view's true masks, by the source it was read from."""
    return lambda view: truth(view["source"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.annotate.simulated", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    scenes = commands.add_parser("scenes", help="write held-out synthetic scenes and their COCO ground truth")
    scenes.add_argument("--count", type=int, default=10)
    scenes.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    scenes.add_argument("--out", required=True)
    run = commands.add_parser("run", help="annotate a running server's queue against COCO ground truth")
    run.add_argument("--url", required=True)
    run.add_argument("--token", required=True)
    run.add_argument("--truth", required=True, help="COCO instances JSON whose file names match the input images")
    run.add_argument("--max-images", type=int)
    run.add_argument("--target-iou", type=float, default=0.9)
    run.add_argument("--max-clicks", type=int, default=20)
    run.add_argument("--max-strokes", type=int, default=0, help="brush/eraser strokes after the clicks (0: none)")
    run.add_argument("--stall-clicks", type=int, default=0, help="stop clicking after this many clicks without gain")
    run.add_argument("--report", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if args.command == "scenes":
        path = write_scenes(args.out, args.count, tuple(args.size))
        print(f"wrote {args.count} scenes to {Path(args.out) / 'images'} and their masks to {path}")
        return 0
    annotator = SimulatedAnnotator(args.url, args.token, _by_source(Truth(args.truth)),
                                   target_iou=args.target_iou, max_clicks=args.max_clicks,
                                   max_strokes=args.max_strokes, stall_clicks=args.stall_clicks)
    result = annotator.run(args.max_images)
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k != "per_mask"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
