"""The mask verifier: the probability that an automatic mask is good, so that people
see only the masks it is unsure of (SAM 3's data engine: AI verifiers before people).

"Good" means what an annotator does with the mask: accepted unchanged, not edited or
deleted. The simulated annotator accepts a mask when its IoU with the truth is at least
``GOOD_IOU``; on synthetic scenes that rule is computed from the truth directly, and a
table of real decisions trains it just the same.

The verifier only sees what the generator knows about a mask (``FEATURES``): its
predicted IoU and stability, its size and shape, and how well its boundary agrees with
the image's edges. It is a logistic regression (or a tiny MLP: ``hidden`` widths)
fitted on the driver; its acceptance threshold is chosen on validation images for a
target precision. A registered verifier is a folder::

    model.pth       the network's state dict (tensors only; loaded with weights_only=True)
    verifier.json   features, layer sizes, threshold, the validation precision/recall curve
    eval.json       validation figures;  config.yaml  how it was trained

Its identity (``verifier_identity``) is the sha256 of model.pth and verifier.json.
"""
from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import nn

from pipeline import storage
from pipeline.models import registry
from sam_core.metrics import amg_matches

log = logging.getLogger(__name__)

GOOD_IOU = 0.9  # the simulated annotator accepts a mask unchanged at this IoU with the truth
DECISIONS = {"accepted": True, "edited": False, "deleted": False}
FEATURES = (
    "predicted_iou",      # the decoder's own quality estimate
    "stability_score",    # IoU of the mask thresholded at +/- the stability offset
    "log_area_fraction",  # log10 of the share of the image it covers
    "bbox_aspect",        # short side / long side of its tight box
    "bbox_fill",          # mask area / tight box area
    "log_compactness",    # log of perimeter^2 / (4 pi area): 0 for a disc, large for ragged masks
    "log_components",     # log(1 + number of 8-connected pieces - 1)
    "border_sides",       # share of the image's four sides its box touches
    "edge_boundary",      # mean Sobel gradient along its contour / the image's mean
    "edge_inside",        # mean Sobel gradient in its interior / the image's mean
    "log_edge_ratio",     # log of (contour + eps) / (inside + eps): a good mask's contour is an edge
    "contrast",           # colour distance between the rings just inside and just outside it
)
MODEL_FILE = registry.MODEL_FILE
META_FILE = "verifier.json"
EVAL_FILE = registry.EVAL_FILE
# What a verifier.json may declare before anything is allocated: a small MLP on 12 features.
MAX_LAYERS, MAX_WIDTH = 8, 1024


# ------------------------------------------------------------------------------ features
def mask_features(records: Sequence[Mapping[str, Any]], rgb: np.ndarray) -> np.ndarray:
    """``len(records) x len(FEATURES)`` float32 features of the generator's mask records
    (coco_rle segmentation, predicted_iou, stability_score) on their HxWx3 image."""
    out = np.zeros((len(records), len(FEATURES)), np.float32)
    if not len(records):
        return out
    gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY).astype(np.float32)
    grad = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3))
    grad /= float(grad.mean()) + 1e-6  # edge strength relative to this image: scale-free
    colour = rgb.astype(np.float32)
    for i, record in enumerate(records):
        out[i, :2] = record["predicted_iou"], record["stability_score"]
        out[i, 2:] = _shape_and_edges(_decode(record["segmentation"]), grad, colour)
    return out


def _decode(segmentation: Mapping[str, Any]) -> np.ndarray:
    counts = segmentation["counts"]
    rle = {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(np.uint8)


def _shape_and_edges(mask: np.ndarray, grad: np.ndarray, colour: np.ndarray) -> list[float]:
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return [math.log10(1 / (h * w)), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    # Everything below is local to the mask's box (plus the rings' width): cheap for small masks.
    pad = 4
    cy0, cy1, cx0, cx1 = max(y0 - pad, 0), min(y1 + pad, h), max(x0 - pad, 0), min(x1 + pad, w)
    m = mask[cy0:cy1, cx0:cx1]
    g, c = grad[cy0:cy1, cx0:cx1], colour[cy0:cy1, cx0:cx1]
    area = float(m.sum())
    kernel = np.ones((3, 3), np.uint8)
    eroded, dilated = cv2.erode(m, kernel), cv2.dilate(m, kernel)
    contour = (dilated > eroded)                          # ~3 px band centred on the boundary
    interior = cv2.erode(m, kernel, iterations=3) > 0
    ring_in = (m > 0) & (cv2.erode(m, kernel, iterations=2) == 0)
    ring_out = (cv2.dilate(m, kernel, iterations=2) > 0) & (m == 0)
    contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    perimeter = sum(cv2.arcLength(k, True) for k in contours) or 1.0
    pieces = cv2.connectedComponents(m, connectivity=8)[0] - 1
    edge_boundary = float(g[contour].mean()) if contour.any() else 0.0
    edge_inside = float(g[interior].mean()) if interior.any() else 0.0
    contrast = (float(np.linalg.norm(c[ring_in].mean(0) - c[ring_out].mean(0))) / (255 * math.sqrt(3))
                if ring_in.any() and ring_out.any() else 0.0)
    bh, bw = y1 - y0, x1 - x0
    touches = (x0 == 0) + (y0 == 0) + (x1 == w) + (y1 == h)
    return [
        math.log10(area / (h * w)),
        min(bh, bw) / max(bh, bw),
        area / (bh * bw),
        math.log(max(perimeter ** 2 / (4 * math.pi * area), 1e-3)),
        math.log(max(pieces, 1)),
        touches / 4,
        edge_boundary,
        edge_inside,
        math.log((edge_boundary + 0.05) / (edge_inside + 0.05)),
        contrast,
    ]


# ------------------------------------------------------------------------------ examples
@dataclass
class Examples:
    """Masks to learn from: ``features`` (N x F), ``labels`` (N bool: good), ``groups``
    (N int: the image of each mask, so validation holds out whole images) and
    ``best_iou`` (N: IoU with the best-matching truth; NaN for recorded decisions)."""

    features: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    best_iou: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(parts: Iterable["Examples"]) -> "Examples":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Examples(np.zeros((0, len(FEATURES)), np.float32), np.zeros(0, bool), np.zeros(0, np.int64),
                            np.zeros(0))
        offsets = np.cumsum([0] + [int(p.groups.max()) + 1 for p in parts[:-1]])
        return Examples(
            np.concatenate([p.features for p in parts]), np.concatenate([p.labels for p in parts]),
            np.concatenate([p.groups + o for p, o in zip(parts, offsets)]),
            np.concatenate([p.best_iou for p in parts]),
        )


def best_ious(records: Sequence[Mapping[str, Any]], truth: np.ndarray) -> np.ndarray:
    """IoU of each generated mask with its best-matching true mask (NxHxW bool): the
    matching of the eval stage's automatic-generation metrics."""
    return amg_matches(list(records), truth)[1]


def synthetic_examples(
    generate: Callable[[np.ndarray], list[dict[str, Any]]], scenes: Iterable[Any], good_iou: float = GOOD_IOU,
    progress: bool = False,
) -> Examples:
    """The generator's masks on synthetic scenes (``pipeline.truth.synthetic.Scene``), each
    labelled by the simulated annotator's rule: good when IoU with the truth >= ``good_iou``."""
    from tqdm import tqdm

    parts = []
    for index, scene in enumerate(tqdm(scenes, desc="verifier data", unit="scene", disable=not progress)):
        records = generate(scene.image)
        iou = best_ious(records, scene.masks)
        parts.append(Examples(mask_features(records, scene.image), iou >= good_iou,
                              np.full(len(records), index, np.int64), iou))
    return Examples.concat(parts)


def read_decisions(path: str) -> Examples:
    """A table of annotators' decisions (.parquet or .csv): the ``FEATURES`` columns and
    ``decision`` (accepted / edited / deleted); an optional ``image`` column groups the
    masks of one image for validation (else every row is its own group)."""
    import pyarrow.csv
    import pyarrow.parquet

    fs, inner = storage.filesystem(path)
    with fs.open(inner, "rb") as f:
        table = pyarrow.csv.read_csv(f) if inner.endswith(".csv") else pyarrow.parquet.read_table(f)
    missing = [c for c in (*FEATURES, "decision") if c not in table.column_names]
    if missing:
        raise ValueError(f"decisions table {path}: missing column(s) {missing}; it needs {list(FEATURES)} "
                         "and decision (accepted / edited / deleted)")
    decisions = [str(d) for d in table.column("decision").to_pylist()]
    unknown = sorted(set(decisions) - set(DECISIONS))
    if unknown:
        raise ValueError(f"decisions table {path}: unknown decision value(s) {unknown}; known: {sorted(DECISIONS)}")
    features = np.stack([np.asarray(table.column(c).to_pylist(), np.float32) for c in FEATURES], 1)
    if not np.isfinite(features).all():
        raise ValueError(f"decisions table {path}: feature values must be finite numbers (found NaN/inf/empty)")
    images = table.column("image").to_pylist() if "image" in table.column_names else range(len(decisions))
    _, groups = np.unique(np.asarray([str(i) for i in images]), return_inverse=True)
    return Examples(features, np.array([DECISIONS[d] for d in decisions]), groups.astype(np.int64),
                    np.full(len(decisions), np.nan))


# --------------------------------------------------------------------------------- model
class VerifierNet(nn.Module):
    """Standardised features -> an MLP (no hidden layer: logistic regression) -> a logit."""

    def __init__(self, n_features: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp((x - self.mean) / self.std).squeeze(-1)


@dataclass
class Verifier:
    """A fitted verifier. ``threshold``: accept masks whose probability is at least this
    (chosen for ``info["target_precision"]`` on validation images); ``curve``: the
    validation precision and recall at each threshold (lists under those names)."""

    net: VerifierNet
    hidden: list[int]
    threshold: float
    curve: dict[str, list[float]]
    info: dict[str, Any]

    @torch.no_grad()
    def probabilities(self, features: np.ndarray) -> np.ndarray:
        return torch.sigmoid(self.net(torch.as_tensor(features, dtype=torch.float32))).numpy().astype(np.float64)

    def score(self, records: Sequence[Mapping[str, Any]], rgb: np.ndarray) -> np.ndarray:
        """The probability that each mask record is good."""
        return self.probabilities(mask_features(records, rgb))

    def threshold_for(self, precision: float | None) -> float:
        """The registered threshold (None), or the lowest one whose validation precision
        reaches ``precision`` (the highest-precision one when none does)."""
        if precision is None:
            return self.threshold
        return choose_threshold(self.curve, float(precision))[0]

    def keep(self, records: Sequence[dict[str, Any]], rgb: np.ndarray, threshold: float) -> list[dict[str, Any]]:
        """The records the verifier accepts, each with its ``verifier_score``."""
        scores = self.score(records, rgb)
        return [{**r, "verifier_score": float(s)} for r, s in zip(records, scores) if s >= threshold]


def precision_curve(scores: np.ndarray, labels: np.ndarray, max_points: int = 400) -> dict[str, list[float]]:
    """Precision and recall of accepting ``scores >= t`` for each distinct score t
    (at most ``max_points`` of them, evenly spaced in rank), highest t first."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(float)
    tp = np.cumsum(y)
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # the last row of each tie
    if len(last) > max_points:
        last = last[np.unique(np.linspace(0, len(last) - 1, max_points).round().astype(int))]
    positives = max(float(y.sum()), 1.0)
    return {"threshold": s[last].tolist(), "precision": (tp[last] / (last + 1)).tolist(),
            "recall": (tp[last] / positives).tolist(), "accepted": (last + 1).tolist()}


def choose_threshold(curve: Mapping[str, list], target: float, min_accepted: int = 5) -> tuple[float, bool]:
    """(threshold, met): the lowest threshold of the curve whose precision is at least
    ``target`` (most recall), or, when none is, the one with the highest precision among
    those accepting at least ``min_accepted`` masks (met False)."""
    precision, accepted = np.asarray(curve["precision"]), np.asarray(curve["accepted"])
    if not len(precision):
        return 1.0, False
    ok = np.flatnonzero((precision >= target) & (accepted >= min(min_accepted, accepted.max())))
    if len(ok):
        return float(curve["threshold"][ok[-1]]), True
    eligible = np.flatnonzero(accepted >= min(min_accepted, accepted.max()))
    return float(curve["threshold"][eligible[np.argmax(precision[eligible])]]), False


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (the chance a good mask outscores a bad one); NaN
    when one class is absent."""
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # ties share their mean rank
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def log_loss(p: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(np.where(labels, np.log(p), np.log(1 - p))))


def fit(
    examples: Examples,
    hidden: Sequence[int] = (),
    weight_decay: float = 1e-3,
    steps: int = 1500,
    lr: float = 0.01,
    validation_fraction: float = 0.25,
    target_precision: float = 0.9,
    seed: int = 0,
) -> Verifier:
    """Fits a verifier on the images not held out for validation, then chooses its
    threshold for ``target_precision`` on the held-out ones.

    ``info`` of the result: train/validation masks, images and share of good masks,
    validation log loss of the verifier and of the constant (training share) classifier,
    validation AUC, target_precision, target_met, and the validation precision, recall
    and accepted share at the threshold.
    """
    if len(examples) == 0:
        raise ValueError("the verifier has no masks to learn from")
    groups = np.unique(examples.groups)
    if len(groups) < 2:
        raise ValueError("the verifier needs masks from at least two images (one is held out for validation)")
    rng = np.random.default_rng(seed)
    held = rng.permutation(groups)[: max(1, int(round(validation_fraction * len(groups))))]
    val = np.isin(examples.groups, held)
    x, y = examples.features[~val], examples.labels[~val]
    if y.all() or not y.any():
        raise ValueError(f"the verifier's training masks are all {'good' if y.all() else 'bad'}: "
                         "it needs both accepted and rejected masks")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few thousand rows: more threads only add synchronisation (10x slower)
    try:
        net = _train(x, y, hidden, weight_decay, steps, lr, seed)
    finally:
        torch.set_num_threads(threads)
    verifier = Verifier(net, [int(h) for h in hidden], 0.5, {}, {})
    pv, yv = verifier.probabilities(examples.features[val]), examples.labels[val]
    verifier.curve = precision_curve(pv, yv)
    verifier.threshold, met = choose_threshold(verifier.curve, target_precision)
    accepted = pv >= verifier.threshold
    verifier.info = {
        "train_masks": int(len(y)), "train_images": int(len(groups) - len(held)), "train_good": float(y.mean()),
        "validation_masks": int(val.sum()), "validation_images": int(len(held)),
        "validation_good": float(yv.mean()) if len(yv) else math.nan,
        "validation_log_loss": log_loss(pv, yv),
        "constant_log_loss": log_loss(np.full(len(yv), y.mean()), yv),
        "validation_auc": auc(pv, yv),
        "target_precision": float(target_precision), "target_met": met, "threshold": verifier.threshold,
        "precision_at_threshold": float(yv[accepted].mean()) if accepted.any() else math.nan,
        "recall_at_threshold": float(accepted[yv].mean()) if yv.any() else math.nan,
        "accepted_at_threshold": float(accepted.mean()) if len(accepted) else math.nan,
    }
    if not met:
        log.warning("verifier: no threshold reaches precision %.2f on validation; using the most precise one "
                    "(%.3f, precision %.3f)", target_precision, verifier.threshold,
                    verifier.info["precision_at_threshold"])
    return verifier


def _train(x: np.ndarray, y: np.ndarray, hidden: Sequence[int], weight_decay: float, steps: int, lr: float,
           seed: int) -> VerifierNet:
    torch.manual_seed(seed)
    net = VerifierNet(x.shape[1], hidden)
    net.mean.copy_(torch.as_tensor(x.mean(0)))
    net.std.copy_(torch.as_tensor(x.std(0) + 1e-6))
    xt, yt = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.float32)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(int(steps)):  # full batch: a few thousand masks at most
        optimizer.zero_grad()
        loss_fn(net(xt), yt).backward()
        optimizer.step()
    return net.eval()


# ------------------------------------------------------------------------- registration
def save(verifier: Verifier, directory: str, extra: Mapping[str, Any] | None = None) -> None:
    """Writes ``model.pth`` and ``verifier.json`` (atomically) into ``directory``;
    ``extra``: more keys for verifier.json (e.g. what it was trained with)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in verifier.net.state_dict().items()}, buffer)
    meta = {"features": list(FEATURES), "hidden": verifier.hidden, "threshold": verifier.threshold,
            "validation": verifier.info, "curve": verifier.curve, **(extra or {})}
    registry.write(directory, MODEL_FILE, buffer.getvalue())
    registry.write(directory, META_FILE, json.dumps(meta, indent=1))


def verifier_identity(path: str | None) -> str | None:
    """The sha256 identifying the verifier at ``path`` (its two files), or None."""
    if path is None:
        return None
    return registry.identity(registry.read_files(str(path), (MODEL_FILE, META_FILE), "verifier"))


def load_verifier(path: str, expected_sha256: str | None = None) -> Verifier:
    """The verifier registered at ``path``; ``expected_sha256``: refuse files that are
    not the ones the run recorded. The weights load with ``weights_only=True``."""
    files = registry.read_files(str(path), (MODEL_FILE, META_FILE), "verifier")
    registry.check_identity(files, expected_sha256, str(path))
    model, meta_bytes = files[MODEL_FILE], files[META_FILE]
    meta = json.loads(meta_bytes)
    if list(meta.get("features", [])) != list(FEATURES):
        raise ValueError(f"verifier {path}: trained on features {meta.get('features')}, this version computes "
                         f"{list(FEATURES)}: retrain it (+stage=verifier)")
    hidden = meta.get("hidden")
    if (not isinstance(hidden, list) or len(hidden) > MAX_LAYERS
            or not all(type(h) is int and 0 < h <= MAX_WIDTH for h in hidden)):
        raise ValueError(f"verifier {path}: hidden layer sizes {str(hidden)[:100]} are not a list of at most "
                         f"{MAX_LAYERS} widths of 1 to {MAX_WIDTH} (a damaged or foreign {META_FILE})")
    net = VerifierNet(len(FEATURES), hidden)
    net.load_state_dict(torch.load(io.BytesIO(model), map_location="cpu", weights_only=True))
    net.eval()
    return Verifier(net, list(meta["hidden"]), float(meta["threshold"]), meta["curve"], meta["validation"])
