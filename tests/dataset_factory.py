"""Small, real SA-1B-format datasets for tests: synthetic images and masks, masks
encoded with pycocotools into the exact SA-1B JSON schema, written into real tars with
webdataset.TarWriter, plus the manifest and config.yaml of this project's layout.

The decoded masks are kept next to the records so that tests can compute every
statistic independently with numpy.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import webdataset as wds
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
MODEL_SHA256 = "ab" * 32


@dataclass
class Sample:
    """One image of a factory dataset: its key, shard file name, pixels, the binary
    masks (H x W, uint8) and the SA-1B record written for it."""

    key: str
    shard: str
    image: np.ndarray
    masks: list[np.ndarray]
    record: dict


@dataclass
class FactoryDataset:
    root: Path
    samples: list[Sample] = field(default_factory=list)

    def sample(self, key: str) -> Sample:
        return next(s for s in self.samples if s.key == key)

    def shard_path(self, index: int) -> Path:
        found = sorted(self.root.rglob(f"sa_{index:06d}.tar"))
        return found[0]


def synthetic_masks(rng: np.random.Generator, height: int, width: int, n: int) -> list[np.ndarray]:
    """n masks of varied shapes: rectangles, ellipses, L shapes (concave), rings,
    two disjoint blobs, single pixels, and one almost-full mask."""
    masks = []
    for i in range(n):
        m = np.zeros((height, width), np.uint8)
        kind = i % 7
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1 = int(rng.integers(x0 + 2, width))
        y1 = int(rng.integers(y0 + 2, height))
        if kind == 0:
            m[y0:y1, x0:x1] = 1
        elif kind == 1:
            centre = ((x0 + x1) // 2, (y0 + y1) // 2)
            axes = (max(1, (x1 - x0) // 2), max(1, (y1 - y0) // 2))
            cv2.ellipse(m, centre, axes, float(rng.integers(0, 180)), 0, 360, 1, -1)
        elif kind == 2:
            m[y0:y1, x0:x1] = 1
            m[y0 : (y0 + y1) // 2, (x0 + x1) // 2 : x1] = 0
        elif kind == 3:
            centre = (width // 2, height // 2)
            r = int(rng.integers(6, min(height, width) // 2))
            cv2.circle(m, centre, r, 1, -1)
            cv2.circle(m, centre, r // 2, 0, -1)
        elif kind == 4:
            m[y0 : y0 + 3, x0 : x0 + 4] = 1
            m[y1 - 2 : y1, max(0, x1 - 5) : x1] = 1
        elif kind == 5:
            m[y0, x0] = 1
        else:
            m[1:-1, 1:-1] = 1
        masks.append(m)
    return masks


def sa1b_record(key: str, image_id: int, first_ann_id: int, masks: Sequence[np.ndarray],
                height: int, width: int, rng: np.random.Generator) -> dict:
    """The SA-1B JSON record of one image; bbox in SAM's convention (x, y, x1 - x0,
    y1 - y0 with inclusive x1, y1), as the released annotations and SamAutomaticMaskGenerator."""
    annotations = []
    for i, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m))
        ys, xs = np.nonzero(m)
        j = int(rng.integers(len(xs)))
        annotations.append({
            "id": first_ann_id + i,
            "segmentation": {"size": [int(height), int(width)], "counts": rle["counts"].decode()},
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())],
            "area": int(m.sum()),
            "predicted_iou": float(rng.uniform(0.88, 1.02)),
            "stability_score": float(rng.uniform(0.95, 1.0)),
            "crop_box": [0, 0, int(width), int(height)],
            "point_coords": [[float(xs[j]), float(ys[j])]],
        })
    return {"image": {"image_id": image_id, "width": int(width), "height": int(height),
                      "file_name": f"{key}.jpg"},
            "annotations": annotations}


def write_shard(path: Path, samples: Sequence[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            ok, jpg = cv2.imencode(".jpg", s.image)
            assert ok
            sink.write({"__key__": s.key, "jpg": jpg.tobytes(),
                        "json": json.dumps(s.record).encode()})


def write_manifest(path: Path, samples: Sequence[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"key": s.key, "image_id": s.record["image"]["image_id"], "shard": s.shard,
             "source": f"synthetic/{s.key}.png", "width": s.record["image"]["width"],
             "height": s.record["image"]["height"], "num_masks": len(s.record["annotations"]),
             "model_sha256": MODEL_SHA256, "status": "ok"} for s in samples]
    pq.write_table(pa.Table.from_pylist(rows), path)


CONFIG_YAML = """\
model:
  name: vit_b
  checkpoint: models/sam_vit_b_01ec64.pth
amg:
  points_per_side: 32
  pred_iou_thresh: 0.88
  stability_score_thresh: 0.95
  box_nms_thresh: 0.7
code_version: 0123456789abcdef
"""


def make_dataset(
    root: Path,
    num_shards: int = 2,
    images_per_shard: int = 3,
    masks_per_image: Sequence[int] = (4, 12, 0, 7, 3, 9),
    sizes: Sequence[tuple[int, int]] = ((48, 64), (40, 56), (64, 48)),
    layout: str = "project",
    seed: int = 0,
    mutate: Callable[[Sample], None] | None = None,
) -> FactoryDataset:
    """Writes a dataset and returns it with the true masks.

    layout "project": ``shards/``, ``manifest/`` and ``config.yaml``; layout "sa1b":
    ``sa_%06d.tar`` in the root with ``sa_<image_id>`` keys and nothing else, like the
    SA-1B download. ``mutate`` may corrupt a sample's record or masks before writing;
    the manifest is written from the unmutated samples, as the writer would have.
    """
    rng = np.random.default_rng(seed)
    dataset = FactoryDataset(root)
    image_id, ann_id = 1, 1
    for shard_index in range(num_shards):
        shard = f"sa_{shard_index:06d}.tar"
        samples = []
        for _ in range(images_per_shard):
            n = masks_per_image[(image_id - 1) % len(masks_per_image)]
            height, width = sizes[(image_id - 1) % len(sizes)]
            key = f"sa_{image_id}" if layout == "sa1b" else f"synthetic_{image_id:06d}"
            image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            masks = synthetic_masks(rng, height, width, n)
            record = sa1b_record(key, image_id, ann_id, masks, height, width, rng)
            samples.append(Sample(key, shard, image, masks, record))
            image_id += 1
            ann_id += n
        dataset.samples.extend(samples)
        written = samples
        if mutate is not None:
            written = [copy.deepcopy(s) for s in samples]
            for s in written:
                mutate(s)
        if layout == "sa1b":
            write_shard(root / shard, written)
        else:
            write_shard(root / "shards" / shard, written)
            write_manifest(root / "manifest" / f"part_{shard_index:06d}.parquet", samples)
    if layout == "project":
        (root / "config.yaml").write_text(CONFIG_YAML)
    return dataset


def compose(stage: str, input: Path | str, output: Path | str | None = None,
            overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python -m pipeline.run +stage=<stage> input=... output=...`` sees;
    ``output`` None composes ``output=null`` (the stage's default output)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import pipeline.config  # noqa: F401  registers the ${project_root:} resolver

    args = [f"+stage={stage}", f"input={input}",
            f"output={output}" if output is not None else "output=null", *overrides]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=args)
