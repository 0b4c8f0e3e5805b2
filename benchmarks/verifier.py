"""The mask verifier against the generator's plain thresholds, at equal recall.

    PYTHONPATH=. python benchmarks/verifier.py [--train-scenes 30] [--test-scenes 20] [--points-per-side 16]

With the shipped default model (conf/model/default.yaml) and its generator thresholds,
the verifier is fitted (``pipeline.models.verifier.fit``: validation images inside the training
scenes choose its threshold) on the masks of synthetic training scenes, labelled by the
simulated annotator's rule (good: IoU with the truth >= 0.9). On held-out test scenes
(the eval stage's), the generator's masks are then filtered two ways:

- thresholds: predicted IoU >= a and stability >= b, for every (a, b) of a grid at or
  above the shipped ones; at each recall level the best such pair (highest precision at
  IoU 0.5 among those reaching the recall), chosen on the test scenes themselves, so
  this is the plain thresholds' best case;
- verifier: probability >= t, with the highest t that reaches the same recall.

Recall and precision are the eval stage's automatic-generation metrics (``amg_matches``:
ground-truth masks matched / generated masks matching, at IoU 0.5 and 0.75). Prints a
Markdown table and writes it with the raw figures as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.models import verifier  # noqa: E402
from pipeline.models.loader import build_generator  # noqa: E402
from pipeline.truth.synthetic import make_scene, scene_seeds  # noqa: E402
from sam_core.metrics import amg_matches  # noqa: E402

IOUS = (0.5, 0.75)


def shipped_model() -> tuple[dict, dict]:
    """(model config, generator thresholds) of conf/model/default.yaml."""
    cfg = OmegaConf.load(REPO / "conf" / "model" / "default.yaml")
    model = {"arch": cfg.model.arch, "checkpoint": str(REPO / "models" / cfg.model.checkpoint.rsplit("/models/", 1)[1]),
             "device": "cpu"}
    return model, OmegaConf.to_container(cfg.amg)


def pool(generator, seeds, size, cache: Path | None, tag: str):
    """(scene, generator records) per seed; records cached as JSON under ``cache``."""
    for seed in seeds:
        scene = make_scene(seed, size)
        path = cache / f"{tag}_{seed}.json" if cache else None
        if path is not None and path.is_file():
            records = json.loads(path.read_text())
        else:
            records = generator.generate(scene.image)
            if path is not None:
                path.write_text(json.dumps(records))
        yield scene, records


def metrics(images: list[tuple[np.ndarray, list[dict]]], keep: list[np.ndarray]) -> dict[str, float]:
    """Recall and precision at IOUS of the kept records of every image."""
    gt, pred = [], []
    for (truth, records), k in zip(images, keep):
        g, p = amg_matches([r for r, kk in zip(records, k) if kk], truth)
        gt.append(g)
        pred.append(p)
    g, p = np.concatenate(gt), np.concatenate(pred)
    out = {"masks_per_image": len(p) / len(images)}
    for t in IOUS:
        out[f"recall@{t}"] = float((g >= t).mean())
        out[f"precision@{t}"] = float((p >= t).mean()) if len(p) else 0.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-scenes", type=int, default=30)
    ap.add_argument("--test-scenes", type=int, default=20)
    ap.add_argument("--train-seed-start", type=int, default=500_000, help="training split (beyond the model's seeds)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--hidden", type=int, nargs="*", default=[], help="MLP widths; none (default): logistic regression")
    ap.add_argument("--weight-decay", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--target-precision", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None, help="keep the generator's masks here (JSON) for reruns")
    ap.add_argument("--out", type=Path, default=Path("verifier_benchmark.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_cfg, thresholds = shipped_model()
    amg = {**thresholds, "points_per_side": args.points_per_side}
    generator = build_generator(model_cfg, amg)
    tag = hashlib.sha256(json.dumps([model_cfg["arch"], amg, args.size]).encode()).hexdigest()[:10]
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    size = (args.size, args.size)
    t0 = time.perf_counter()

    parts = []
    for index, (scene, records) in enumerate(pool(generator,
                                                  scene_seeds("train", args.train_seed_start, args.train_scenes),
                                                  size, args.cache, tag)):
        iou = verifier.best_ious(records, scene.masks)
        parts.append(verifier.Examples(verifier.mask_features(records, scene.image), iou >= verifier.GOOD_IOU,
                                       np.full(len(records), index), iou))
    fitted = verifier.fit(verifier.Examples.concat(parts), hidden=args.hidden, weight_decay=args.weight_decay,
                          steps=args.steps, target_precision=args.target_precision)
    train_s = time.perf_counter() - t0

    images, scores, good = [], [], []
    for scene, records in pool(generator, scene_seeds("test", 0, args.test_scenes), size, args.cache, tag):
        images.append((scene.masks, records))
        scores.append(fitted.score(records, scene.image))
        good.append(verifier.best_ious(records, scene.masks) >= verifier.GOOD_IOU)
    all_scores, all_good = np.concatenate(scores), np.concatenate(good)
    iou_pred = [np.array([r["predicted_iou"] for r in rec]) for _, rec in images]
    stab = [np.array([r["stability_score"] for r in rec]) for _, rec in images]

    everything = metrics(images, [np.ones(len(r), bool) for _, r in images])
    grid = []
    for a in np.arange(thresholds["pred_iou_thresh"], 0.96, 0.025):
        for b in np.arange(thresholds["stability_score_thresh"], 0.995, 0.01):
            grid.append(({"pred_iou": round(float(a), 3), "stability": round(float(b), 3)},
                         metrics(images, [(i > a) & (s >= b) for i, s in zip(iou_pred, stab)])))

    def verifier_at(recall: float) -> tuple[float, dict]:
        """The highest verifier threshold whose recall@0.5 reaches ``recall``."""
        candidates = np.unique(all_scores)[::-1]
        lo, hi = 0, len(candidates) - 1  # recall grows as the threshold falls (index rises)
        while lo < hi:
            mid = (lo + hi) // 2
            if metrics(images, [s >= candidates[mid] for s in scores])["recall@0.5"] >= recall:
                hi = mid
            else:
                lo = mid + 1
        t = float(candidates[lo])
        return t, metrics(images, [s >= t for s in scores])

    rows = []
    registered = metrics(images, [s >= fitted.threshold for s in scores])
    levels = sorted({round(everything["recall@0.5"] * f, 4) for f in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)}
                    | {round(registered["recall@0.5"], 4)}, reverse=True)
    for level in levels:
        reaching = [(p, m) for p, m in grid if m["recall@0.5"] >= level - 1e-9]
        if not reaching:
            continue
        params, base = max(reaching, key=lambda pm: pm[1]["precision@0.5"])
        if rows and rows[-1]["thresholds"] == params:
            continue  # the same best pair as the level above
        t, ver = verifier_at(base["recall@0.5"])
        rows.append({"recall_level": level, "thresholds": params, "baseline": base, "verifier_threshold": t,
                     "verifier": ver})
    result = {
        "command": " ".join(sys.argv), "model": model_cfg, "amg": amg, "size": args.size,
        "train_scenes": args.train_scenes, "test_scenes": args.test_scenes, "hidden": args.hidden,
        "verifier_validation": fitted.info, "registered_threshold": fitted.threshold,
        "at_registered_threshold": registered,
        "good_precision_at_registered_threshold": float(all_good[all_scores >= fitted.threshold].mean()),
        "good_recall_at_registered_threshold": float((all_scores >= fitted.threshold)[all_good].mean()),
        "test_masks": int(len(all_scores)), "test_good": float(all_good.mean()),
        "test_auc_good": verifier.auc(all_scores, all_good),
        "test_auc_predicted_iou": verifier.auc(np.concatenate(iou_pred), all_good),
        "test_auc_stability": verifier.auc(np.concatenate(stab), all_good),
        "unfiltered": everything, "rows": rows, "seconds": time.perf_counter() - t0, "train_seconds": train_s,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))


def table(result: dict) -> str:
    head = ("| recall@0.5 level | thresholds (pred IoU / stability) | P@0.5 | R@0.5 | P@0.75 | R@0.75 | masks/img "
            "| verifier threshold | P@0.5 | R@0.5 | P@0.75 | R@0.75 | masks/img |")
    lines = [head, "|" + "---|" * 13]
    u = result["unfiltered"]
    lines.append(f"| all masks | - | {u['precision@0.5']:.3f} | {u['recall@0.5']:.3f} | {u['precision@0.75']:.3f} | "
                 f"{u['recall@0.75']:.3f} | {u['masks_per_image']:.1f} | | | | | | |")
    for r in result["rows"]:
        b, v, p = r["baseline"], r["verifier"], r["thresholds"]
        lines.append(
            f"| {r['recall_level']:.3f} | {p['pred_iou']:.3f} / {p['stability']:.2f} | {b['precision@0.5']:.3f} | "
            f"{b['recall@0.5']:.3f} | {b['precision@0.75']:.3f} | {b['recall@0.75']:.3f} | "
            f"{b['masks_per_image']:.1f} | "
            f"{r['verifier_threshold']:.4g} | {v['precision@0.5']:.3f} | {v['recall@0.5']:.3f} | "
            f"{v['precision@0.75']:.3f} | {v['recall@0.75']:.3f} | {v['masks_per_image']:.1f} |")
    info = result["verifier_validation"]
    lines.append("")
    lines.append(
        f"test masks {result['test_masks']} ({result['test_good']:.1%} good at IoU >= 0.9); AUC of good vs not: "
        f"verifier {result['test_auc_good']:.3f}, predicted IoU {result['test_auc_predicted_iou']:.3f}, "
        f"stability {result['test_auc_stability']:.3f}; validation: log loss {info['validation_log_loss']:.3f} "
        f"(constant {info['constant_log_loss']:.3f}), threshold {result['registered_threshold']:.4g} for precision "
        f"{info['target_precision']} (met: {info['target_met']}); on the test masks at that threshold, good ones: "
        f"precision {result['good_precision_at_registered_threshold']:.3f}, recall "
        f"{result['good_recall_at_registered_threshold']:.3f}; {result['seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
