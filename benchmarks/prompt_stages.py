"""Measurements of the prompt stages on held-out synthetic scenes (exact truth).

    python benchmarks/prompt_stages.py refine [--scenes 24] [--sweep]
    python benchmarks/prompt_stages.py miou [--scenes 24]

``refine``: boxes jittered the way a detector errs (pipeline.truth.synthetic.detector_boxes:
shift, scale, loose, tight) prompt the model; each box is refined by its mask
(sam_core.box_prompts.refine_boxes, the thresholds of conf/stage/box_prompts.yaml) and
the box IoU with the true box is printed before and after, with the shares of boxes
improved, worsened and trusted, per kind of error. ``--sweep`` also prints the grid of
thresholds the defaults were chosen from.

``miou``: the box_prompts stage (real Ray) on the scenes with their exact boxes, its
mask mIoU against the scenes' masks next to the eval stage's box mIoU on the same
scenes with the same model.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.truth.synthetic import DETECTOR_ERRORS, coco_instances, detector_boxes, make_scene, scene_seeds  # noqa: E402

MODEL = REPO / "models" / "sam_vit_tiny_512_synthetic.pth"
ARCH = "vit_tiny_512"


def refine(scenes: int, size: tuple[int, int], sweep: bool) -> None:
    import torch
    from omegaconf import OmegaConf

    from sam_core import SamPredictor, sam_model_registry
    from sam_core.box_prompts import box_iou, predict_boxes, refine_boxes

    torch.set_num_threads(1)
    conf = OmegaConf.load(REPO / "conf" / "stage" / "box_prompts.yaml").refine
    predictor = SamPredictor(sam_model_registry[ARCH](checkpoint=str(MODEL)).eval())
    rng = np.random.default_rng(0)
    answers = {e: [] for e in DETECTOR_ERRORS}  # per error: (truth, prompt, mask box, iou, stability)
    start = time.perf_counter()
    for seed in scene_seeds("test", 0, scenes):
        scene = make_scene(seed, size)
        truth = scene.boxes_xyxy() + np.array([0, 0, 1, 1], np.float32)
        predictor.set_image(scene.image)
        for error in DETECTOR_ERRORS:
            prompt = detector_boxes(truth, error, rng, size)
            keep = (prompt[:, 2] > prompt[:, 0]) & (prompt[:, 3] > prompt[:, 1])
            a = predict_boxes(predictor, prompt[keep])
            answers[error].append((truth[keep], prompt[keep], a.mask_boxes, a.predicted_iou, a.stability_score))
    seconds = time.perf_counter() - start
    joined = {e: [np.concatenate(parts) for parts in zip(*answers[e])] for e in DETECTOR_ERRORS}

    def measure(error: str, min_iou: float, stability_score_thresh: float, margin: float) -> dict[str, float]:
        truth, prompt, mask_box, iou, stability = joined[error]
        boxes, trusted = refine_boxes(prompt, mask_box, iou, stability, min_iou, stability_score_thresh, margin)
        before, after = box_iou(prompt, truth), box_iou(boxes, truth)
        return {"boxes": len(truth), "iou_before": before.mean(), "iou_after": after.mean(),
                "improved": (after > before + 1e-9).mean(), "worsened": (after < before - 1e-9).mean(),
                "trusted": trusted.mean(), "mask_extent_iou": box_iou(mask_box, truth).mean()}

    print(f"refine: {scenes} held-out scenes {size[1]}x{size[0]}, model {MODEL.name}, thresholds "
          f"pred_iou_thresh={conf.pred_iou_thresh} stability_score_thresh={conf.stability_score_thresh} "
          f"margin={conf.margin}; "
          f"{seconds:.0f} s of prompting")
    print("| error | boxes | box IoU before | after | improved | worsened | trusted | mask extent alone |")
    print("|---|---|---|---|---|---|---|---|")
    for error in DETECTOR_ERRORS:
        m = measure(error, conf.pred_iou_thresh, conf.stability_score_thresh, conf.margin)
        print(f"| {error} | {m['boxes']} | {m['iou_before']:.3f} | {m['iou_after']:.3f} | {m['improved']:.1%} | "
              f"{m['worsened']:.1%} | {m['trusted']:.1%} | {m['mask_extent_iou']:.3f} |")
    if sweep:
        print("\nsweep: mean box IoU gain over the four errors, and the share worsened")
        print("| pred_iou_thresh | stability_score_thresh | margin | gain | worsened |")
        print("|---|---|---|---|---|")
        for min_iou, min_stab, margin in itertools.product((0.0, 0.5, 0.6, 0.7), (0.0, 0.85, 0.9),
                                                           (0.1, 0.2, 0.3, 0.5)):
            ms = [measure(e, min_iou, min_stab, margin) for e in DETECTOR_ERRORS]
            gain = np.mean([m["iou_after"] - m["iou_before"] for m in ms])
            worse = np.mean([m["worsened"] for m in ms])
            print(f"| {min_iou} | {min_stab} | {margin} | {gain:+.4f} | {worse:.1%} |")


def miou(scenes: int, size: tuple[int, int]) -> None:
    from hydra import compose, initialize_config_dir
    from PIL import Image

    import pipeline.config  # noqa: F401  (the ${project_root:} resolver)
    from pipeline.stages import run_stage

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        seeds = scene_seeds("test", 0, scenes)
        generated = [make_scene(s, size) for s in seeds]
        names = [f"scene{i:03d}.png" for i in range(scenes)]
        for scene, name in zip(generated, names):
            Image.fromarray(scene.image).save(root / "images" / name)
        (root / "boxes.json").write_text(json.dumps(coco_instances(generated, names)))
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            prompted = compose(config_name="config", overrides=[
                "+stage=box_prompts", f"input={root / 'images'}", f"stage.boxes={root / 'boxes.json'}",
                f"output={root / 'out'}", "cluster.num_cpus=2"])
            # The eval stage itself (shipped model, held-out seeds from 0: the same scenes).
            evaluation = compose(config_name="config", overrides=[
                "+stage=eval", f"output={root / 'eval'}", f"stage.num_images={scenes}",
                f"stage.size=[{size[0]},{size[1]}]", "stage.max_masks_per_image=10000", "stage.clicks=[1]",
                "stage.amg.points_per_side=2"])
        start = time.perf_counter()
        report = run_stage(prompted)["boxes"]["gt"]
        stage_s = time.perf_counter() - start
        evaluated = run_stage(evaluation)
    print(f"\nmiou: {scenes} held-out scenes {size[1]}x{size[0]}, model {MODEL.name}, exact boxes")
    print("| | masks | mIoU | small | medium | large |")
    print("|---|---|---|---|---|---|")
    print(f"| box_prompts stage ({stage_s:.0f} s) | {report['masks']} | {report['miou']:.4f} | "
          + " | ".join(f"{report[s]['miou']} ({report[s]['masks']})" for s in ("small", "medium", "large")) + " |")
    print(f"| eval stage, box_miou | {evaluated['masks']} | {evaluated['box_miou']:.4f} | | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("refine", "miou"))
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--size", default="512x512", help="HxW of the scenes")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.what == "refine":
        refine(args.scenes, size, args.sweep)
    else:
        miou(args.scenes, size)


if __name__ == "__main__":
    main()
