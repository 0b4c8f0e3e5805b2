"""Side-by-side benchmark of sam_core's automatic mask generator and the official one
(segment-anything's for SAM 1, sam2's for SAM 2 / 2.1).

    python -m sam_core.tools.bench --arch vit_tiny --images 4 --size 512x768 --points-per-side 32
    python -m sam_core.tools.bench --arch vit_h --checkpoint sam_vit_h_4b8939.pth --device cuda --images 20
    python -m sam_core.tools.bench --arch sam2.1_hiera_t --images sample/images --shape-scores
    python -m sam_core.tools.bench --arch sam2.1_hiera_l --checkpoint sam2.1_hiera_large.pt --device cuda --images 20

Both generators run in this process on the same weights and the same images. Prints a
table (seconds per image, images/s, peak memory, masks per image, speed-up) and the
parity of the masks (share of official masks matched at IoU >= 0.9 by ours, mean IoU of
the matches), and writes the same as JSON with --json.

The comparison needs the official package (``pip install segment-anything``; for SAM 2,
``SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2``) and the oracle that wires
it, ``tests/sam_reference.py`` (run from the checkout); with ``--skip-official`` neither
is imported. Without --checkpoint the weights are random; random weights keep no mask at
SAM 2's thresholds, so ``--shape-scores`` shifts their scores to straddle them (the
parity tests' weights), which makes both generators do a trained model's work.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ..automatic_mask_generator import AMG_PRESETS, FAMILY_PRED_IOU_THRESH, SamAutomaticMaskGenerator
from ..build import ENCODER_SIZES, _build_sam, sam_model_registry
from ..checkpoint import read_state_dict, split_sam2_state
from ..sizes import SAM2_ARCHS, family


def _oracle(arch: str) -> Dict[str, Any]:
    """What wires the official package for ``arch`` (``tests/sam_reference.py``), imported
    only when asked to compare."""
    sam2 = family(arch) == "sam2"
    try:
        if sam2:
            from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as OfficialGenerator
        else:
            from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator
        from tests import sam_reference
    except ImportError as err:
        package = "SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2" if sam2 else "pip install segment-anything"
        raise SystemExit(
            f"comparing with the official generator needs the checkout's tests/sam_reference.py "
            f"(run from the repository root) and `{package}` ({err}); or pass --skip-official"
        ) from err
    return {"generator": OfficialGenerator, "reference": sam_reference}


def _models(args: argparse.Namespace, device: torch.device):
    """(sam_core's model, the official model with the same weights or None)."""
    oracle = None if args.skip_official else _oracle(args.arch)
    if family(args.arch) != "sam2":
        state = read_state_dict(args.checkpoint) if args.checkpoint else None
        ours = _build_sam(**ENCODER_SIZES[args.arch])
        if state is None:
            torch.manual_seed(0)
            state = ours.state_dict()
        ours.load_state_dict(state)
        official = None if oracle is None else oracle["reference"].official_sam(args.arch, state).to(device)
        return ours.to(device), official
    official = None
    if oracle is not None:
        official = oracle["reference"].official_sam2(args.arch, 1024, seed=0)
    if args.checkpoint:
        ours = sam_model_registry[args.arch](checkpoint=args.checkpoint)
        if official is not None:
            official.load_state_dict(read_state_dict(args.checkpoint), strict=True)
    elif official is not None:  # random weights made by the official package, shared
        if args.shape_scores:
            oracle["reference"].shape_for_thresholds_(official)
        ours = sam_model_registry[args.arch]()
        ours.load_state_dict(split_sam2_state(official.state_dict(), args.arch)[0])
    else:
        torch.manual_seed(0)
        ours = sam_model_registry[args.arch]()
    return ours.to(device).eval(), None if official is None else official.to(device).eval()


def load_images(spec: str, size: str, seed: int = 0) -> List[np.ndarray]:
    """A folder of images, or a count of synthetic scenes of the given HxW size."""
    if Path(spec).is_dir():
        from PIL import Image

        paths = sorted(p for p in Path(spec).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    h, w = (int(v) for v in size.lower().split("x"))
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(int(spec)):
        img = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
        yy, xx = np.mgrid[0:h, 0:w]
        for _ in range(30):
            cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(min(h, w) // 40 + 2, min(h, w) // 5 + 3)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
        images.append(img)
    return images


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def time_generator(generate: Callable[[np.ndarray], list], images: List[np.ndarray], device: torch.device,
                   warmup: int = 1) -> Dict[str, Any]:
    """Runs ``generate`` over the images (after warm-up runs) and returns timings."""
    for img in images[:warmup]:
        generate(img)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    outputs, start = [], time.perf_counter()
    for img in images:
        outputs.append(generate(img))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "seconds_per_image": seconds / len(images),
        "images_per_second": len(images) / seconds,
        "peak_memory_mb": _peak_memory_mb(device),
        "masks_per_image": float(np.mean([len(o) for o in outputs])),
        "outputs": outputs,
    }


def mask_parity(reference: List[list], candidate: List[list], iou_threshold: float = 0.9) -> Dict[str, float]:
    """Share of reference masks matched one-to-one (greedy by IoU) at >= iou_threshold,
    and the mean IoU of those matches, over all images."""
    matched, total, ious_kept = 0, 0, []
    for ref_records, our_records in zip(reference, candidate):
        total += len(ref_records)
        if not ref_records or not our_records:
            continue
        ious = np.asarray(mask_utils.iou([r["segmentation"] for r in ref_records],
                                         [r["segmentation"] for r in our_records], [0] * len(our_records)))
        ious = ious.reshape(len(ref_records), len(our_records))
        for i in np.argsort(-ious.max(axis=1)):
            j = int(np.argmax(ious[i]))
            if ious[i, j] >= iou_threshold:
                matched += 1
                ious_kept.append(float(ious[i, j]))
                ious[:, j] = -1.0
    return {"matched_fraction": matched / total if total else 1.0,
            "mean_matched_iou": float(np.mean(ious_kept)) if ious_kept else float("nan"),
            "reference_masks": total}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_tiny", choices=sorted([*ENCODER_SIZES, *SAM2_ARCHS]))
    parser.add_argument("--checkpoint", help="state dict to load (random weights if omitted)")
    parser.add_argument("--images", default="3", help="a folder of images, or a number of synthetic images")
    parser.add_argument("--size", default="512x768", help="HxW of synthetic images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="default", choices=sorted(AMG_PRESETS))
    parser.add_argument("--points-per-side", type=int, default=None)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--permissive", action="store_true",
                        help="IoU and stability filters off (as many masks as possible)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16 also times the bf16 fast path and its parity with sam_core's fp32 path")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--shape-scores", action="store_true",
                        help="SAM 2, random weights: scores shaped to straddle the default thresholds")
    parser.add_argument("--use-m2m", action="store_true", help="SAM 2's mask-to-mask refinement (both sides)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)

    ours, official = _models(args, device)
    settings: Dict[str, Any] = dict(AMG_PRESETS[args.preset], points_per_batch=args.points_per_batch,
                                    output_mode="coco_rle")
    settings.setdefault("pred_iou_thresh", FAMILY_PRED_IOU_THRESH[family(args.arch)])  # each family's default
    if args.points_per_side:
        settings["points_per_side"] = args.points_per_side
    if args.permissive:
        settings.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    if args.use_m2m:
        settings["use_m2m"] = True
    images = load_images(args.images, args.size)

    results: Dict[str, Any] = {
        "arch": args.arch, "checkpoint": args.checkpoint, "device": str(device), "images": len(images),
        "image_size": [list(images[0].shape[:2])], "settings": settings, "torch": torch.__version__,
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda"
                    else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }
    ours_gen = SamAutomaticMaskGenerator(ours, **settings)
    rows = {"sam_core": time_generator(ours_gen.generate, images, device)}
    if args.precision != "fp32":
        fast = SamAutomaticMaskGenerator(ours, **settings, precision=args.precision)
        rows[f"sam_core {args.precision}"] = time_generator(fast.generate, images, device)
        results["fast_path_parity"] = mask_parity(rows["sam_core"]["outputs"],
                                                  rows[f"sam_core {args.precision}"]["outputs"])
    if official is not None:
        generator = _oracle(args.arch)["generator"]
        official_settings = {k: v for k, v in settings.items() if k != "max_mask_area_fraction"}
        rows["official"] = time_generator(generator(official, **official_settings).generate, images, device)
        results["parity"] = mask_parity(rows["official"]["outputs"], rows["sam_core"]["outputs"])
        results["parity_099"] = mask_parity(rows["official"]["outputs"], rows["sam_core"]["outputs"], 0.99)
        results["speedup"] = {name: rows["official"]["seconds_per_image"] / row["seconds_per_image"]
                              for name, row in rows.items() if name != "official"}
    for row in rows.values():
        del row["outputs"]
    results["results"] = rows

    print(f"{args.arch} on {results['machine']} ({device}, {results['threads']} threads), "
          f"{len(images)} images {results['image_size'][0]}, preset {args.preset}")
    print(f"{'implementation':<16}{'s/image':>10}{'images/s':>10}{'peak MB':>10}{'masks/img':>11}")
    for name, row in rows.items():
        print(f"{name:<16}{row['seconds_per_image']:>10.3f}{row['images_per_second']:>10.2f}"
              f"{row['peak_memory_mb']:>10.0f}{row['masks_per_image']:>11.1f}")
    if "speedup" in results:
        p = results["parity"]
        print("speed-up over official: " + ", ".join(f"{n} {x:.2f}x" for n, x in results["speedup"].items()))
        print(f"parity (sam_core fp32 vs official): {100 * p['matched_fraction']:.1f}% of "
              f"{p['reference_masks']} official masks matched at IoU>=0.9, mean IoU {p['mean_matched_iou']:.4f}; "
              f"{100 * results['parity_099']['matched_fraction']:.1f}% at IoU>=0.99")
    if "parity" in results and results["parity"]["reference_masks"] < 50:
        print(f"note: parity rests on {results['parity']['reference_masks']} official masks; with a model "
              "calibrated lower than SAM pass its thresholds, or --permissive, to compare more")
    if "fast_path_parity" in results:
        p = results["fast_path_parity"]
        print(f"parity ({args.precision} vs fp32 path): {100 * p['matched_fraction']:.1f}% of "
              f"{p['reference_masks']} fp32 masks matched at IoU>=0.9, mean IoU {p['mean_matched_iou']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
