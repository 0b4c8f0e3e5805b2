"""The engine's figures and report, computed from committed data only: each stage's
annotation cost and quality (``annotation_figures``, ``automatic_figures``), the
annotators' decisions the verifier learns from (``write_decisions``), and
``engine_report.{md,json,png}`` with a row per engine stage (``write_report``).

Every figure comes from a dataset's records (each mask's provenance, clicks, seconds),
never from the simulated annotator's memory, so a resumed run reports what a straight
run would.
"""
from __future__ import annotations

import io
from typing import Any, Callable, Mapping

import numpy as np

from pipeline import storage
from pipeline.dataset.listing import iter_samples
from pipeline.truth.pools import Truth

REPORT = "engine_report"
HUMAN = ("manual", "model_assisted", "automatic_edited")  # provenances an annotator drew


def _records(dataset: str) -> list[tuple[str, dict[str, Any]]]:
    return [(s.key, s.record) for s in iter_samples(dataset, images=False) if s.record is not None]


def _source(key: str, record: dict[str, Any], sources: dict[str, str] | None) -> str:
    """The input an image came from: ``sources[key]`` when given (the images of a dataset
    annotated from a queue dataset came from the queue's inputs), else its record's."""
    return (sources or {}).get(key) or record["image"].get("source") or record["image"]["file_name"]


def modelled_seconds(clicks: int, strokes: int, cost: Mapping[str, float]) -> float:
    """The annotation time a drawn mask is modelled to cost: ``mask_s`` to start and accept
    it, ``click_s`` per click, ``stroke_s`` per brush or eraser stroke."""
    return cost["mask_s"] + cost["click_s"] * clicks + cost["stroke_s"] * strokes


def annotation_figures(dataset: str, truth: Truth, sources: dict[str, str] | None = None,
                       cost: Mapping[str, float] | None = None) -> dict[str, Any]:
    """An annotated dataset's cost and quality, from its committed records: images,
    masks, masks_per_image, drawn (masks an annotator drew), accepted_unchanged
    (pre-filled masks accepted as they were), noc90 (mean clicks per drawn mask: the
    simulated annotator stops clicking at IoU 0.9, so this is NoC@90 capped at its click
    limit), clicks_per_mask and strokes_per_mask (over all masks), cost_s_per_mask (the
    modelled annotation seconds of ``cost``, over all masks: drawn masks by
    ``modelled_seconds``, accepted pre-filled ones ``accept_s``), annotation_s_per_mask
    (the seconds recorded with the masks), label_miou (mean IoU of each mask with its
    best-matching true mask)."""
    from sam_core.metrics import amg_matches

    cost = cost or {"mask_s": 0.0, "click_s": 0.0, "stroke_s": 0.0, "accept_s": 0.0}
    images = masks = accepted = 0
    clicks, strokes, seconds, modelled, label_ious = [], [], 0.0, 0.0, []
    for key, record in _records(dataset):
        anns = record["annotations"]
        images, masks = images + 1, masks + len(anns)
        accepted += sum(a.get("provenance") == "automatic_accepted" for a in anns)
        for a in anns:
            if a.get("provenance") in HUMAN:
                clicks.append(int(a.get("clicks", 0)))
                strokes.append(int(a.get("strokes", 0)))
                modelled += modelled_seconds(clicks[-1], strokes[-1], cost)
            elif a.get("provenance") == "automatic_accepted":
                modelled += cost["accept_s"]
        seconds += sum(float(a.get("seconds", 0.0)) for a in anns)
        gt = truth(_source(key, record, sources))
        if anns and gt is not None and len(gt):
            label_ious += list(amg_matches(anns, gt)[1])
    return {
        "images": images, "masks": masks, "masks_per_image": masks / images if images else 0.0,
        "drawn": len(clicks), "accepted_unchanged": accepted,
        "noc90": float(np.mean(clicks)) if clicks else 0.0,
        "clicks_per_mask": sum(clicks) / masks if masks else 0.0,
        "strokes_per_mask": sum(strokes) / masks if masks else 0.0,
        "cost_s_per_mask": modelled / masks if masks else 0.0,
        "annotation_s_per_mask": seconds / masks if masks else 0.0,
        "label_miou": float(np.mean(label_ious)) if label_ious else 0.0,
    }


def automatic_figures(dataset: str, truth: Truth, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Automatic masks against the pool's truth: images, masks, masks_per_image,
    recall_0.5 (share of true objects matched at IoU >= 0.5), precision_0.5 (share of
    masks matching an object at IoU >= 0.5), miou (mean best IoU of the masks)."""
    from sam_core.metrics import amg_matches

    images = masks = 0
    gt_best, pred_best = [], []
    for key, record in _records(dataset):
        anns = record["annotations"]
        images, masks = images + 1, masks + len(anns)
        gt = truth(_source(key, record, sources))
        if gt is None:
            raise ValueError(f"{dataset}: no truth for {key}")
        g, p = amg_matches(anns, gt)
        gt_best += list(g)
        pred_best += list(p)
    return {"images": images, "masks": masks, "masks_per_image": masks / images if images else 0.0,
            "recall_0.5": float(np.mean(np.array(gt_best) >= 0.5)) if gt_best else 0.0,
            "precision_0.5": float(np.mean(np.array(pred_best) >= 0.5)) if pred_best else 0.0,
            "miou": float(np.mean(pred_best)) if pred_best else 0.0}


def write_decisions(queue: str, annotated: str, path: str) -> dict[str, int]:
    """The annotators' decisions on the pre-filled masks of ``queue`` as a table the
    verifier learns from (``pipeline.models.verifier.read_decisions``): ``accepted`` when the
    annotated dataset holds the mask unchanged (``automatic_accepted``, same RLE), else
    ``deleted`` (an edited mask is not told apart from a deleted one: both were not good
    as they were, which is what the verifier learns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.models.verifier import FEATURES, mask_features

    kept = {key: {a["segmentation"]["counts"] for a in record["annotations"]
                  if a.get("provenance") == "automatic_accepted"} for key, record in _records(annotated)}
    rows: dict[str, list] = {name: [] for name in (*FEATURES, "decision", "image")}
    for sample in iter_samples(queue, images=True):
        anns = (sample.record or {}).get("annotations") or []
        if not anns or sample.key not in kept:
            continue
        rgb = np.asarray(Image.open(io.BytesIO(sample.jpg)).convert("RGB"))
        for features, a in zip(mask_features(anns, rgb), anns):
            for name, value in zip(FEATURES, features):
                rows[name].append(float(value))
            rows["decision"].append("accepted" if a["segmentation"]["counts"] in kept[sample.key] else "deleted")
            rows["image"].append(sample.key)
    buffer = io.BytesIO()
    pq.write_table(pa.table(rows), buffer)
    storage.write_bytes(path, buffer.getvalue())
    return {d: rows["decision"].count(d) for d in ("accepted", "deleted")}


# ------------------------------------------------------------------------------ report
COLUMNS: list[tuple[str, str, Callable[[dict[str, Any]], Any]]] = [
    ("stage", "stage", lambda r: r["stage"]),
    ("round", "round", lambda r: r.get("round")),
    ("images", "images", lambda r: r.get("images")),
    ("masks/image", "masks_per_image", lambda r: r.get("masks_per_image")),
    ("pre-filled/image", "prefilled_per_image", lambda r: r.get("prefilled_per_image")),
    ("pre-filled accepted unchanged", "accepted_share",
     lambda r: r["accepted_unchanged"] / r["prefilled"] if r.get("prefilled") else None),
    ("clicks/mask", "clicks_per_mask", lambda r: r.get("clicks_per_mask")),
    ("strokes/mask", "strokes_per_mask", lambda r: r.get("strokes_per_mask")),
    ("NoC@90 (drawn masks)", "noc90", lambda r: r.get("noc90") if r.get("drawn") else None),
    ("annotation s/mask (modelled)", "cost_s_per_mask", lambda r: r.get("cost_s_per_mask")),
    ("model s/mask", "model_s_per_mask", lambda r: _model_seconds_per_mask(r)),
    ("label mIoU", "label_miou", lambda r: r.get("label_miou")),
    ("auto recall@0.5", "automatic_recall_0.5", lambda r: r.get("automatic_recall_0.5")),
    ("auto precision@0.5", "automatic_precision_0.5", lambda r: r.get("automatic_precision_0.5")),
    ("candidate 1-click (gate)", "candidate_point_miou_1", lambda r: _gate_figure(r)),
    ("promoted", "promoted", lambda r: None if r.get("promoted") is None else ("yes" if r["promoted"] else "no")),
    ("held-out 1-click mIoU", "point_miou_1", lambda r: r["eval"].get("point_miou_1")),
    ("held-out box mIoU", "box_miou", lambda r: r["eval"].get("box_miou")),
    ("control 1-click", "control_point_miou_1", lambda r: (r.get("control_eval") or {}).get("point_miou_1")),
    ("control box", "control_box_miou", lambda r: (r.get("control_eval") or {}).get("box_miou")),
]


def _gate_figure(row: dict[str, Any]) -> float | None:
    """The retrained candidate's gate figure on the held-out set (promoted or not)."""
    sets = (row.get("gate") or {}).get("sets") or {}
    return next((s["after"] for s in sets.values()), None)


def _model_seconds_per_mask(row: dict[str, Any]) -> float | None:
    """Seconds the model spent per mask of the round's dataset: the automatic pass
    (semi_auto's box-prompted pre-filling, fully_auto; training not counted) plus the
    annotator's decoder time (the per-mask seconds the annotation records carry)."""
    if not row.get("masks"):
        return None
    automatic = sum(row["seconds"].get(k, 0.0) for k in ("semi_auto", "fully_auto"))
    return automatic / row["masks"] + row.get("annotation_s_per_mask", 0.0)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def format_report(rows: list[dict[str, Any]]) -> str:
    head = [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(f(r)) for _, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_report(output: str, rows: list[dict[str, Any]], planned: int, cost: Mapping[str, float]) -> str:
    table = format_report(rows)
    first = rows[0]["eval"] if rows else {}
    kept = [r for r in rows if r.get("promoted") is False]
    md = ["# Data engine report", "",
          f"{max(len(rows) - 1, 0)} of {planned - 1} round(s) finished. Start model: "
          f"{rows[0]['model'] if rows else '-'}. After each round the model in use is retrained on every dataset so "
          "far and gated on the held-out set: a candidate worse than the model it started from is registered but "
          f"not promoted ({len(kept)} so far), and the engine goes on with the model it had. The control spends the "
          "same training steps on the same images' true masks.", "",
          f"Held-out: {first.get('images')} images, {first.get('masks')} prompted masks. Clicks and NoC@90: the "
          "simulated annotator (clicks at the centre of the largest error region until IoU 0.9, its click limit, or "
          "clicks stop helping); strokes: brush and eraser strokes on the largest error regions after the clicks. "
          f"Modelled annotation time per drawn mask: {cost['mask_s']:g} s + {cost['click_s']:g} s per click + "
          f"{cost['stroke_s']:g} s per stroke; {cost['accept_s']:g} s per accepted pre-filled mask. Auto "
          "recall/precision: the automatic masks of the round's pool (semi_auto: pre-filled; fully_auto: final) "
          "against its truth.", "",
          table, "", f"![engine]({REPORT}.png)", ""]
    storage.write_bytes(storage.join(output, REPORT + ".md"), "\n".join(md).encode())
    summary = report_rows(rows)
    storage.write_json(storage.join(output, REPORT + ".json"),
                       {"rounds_planned": planned - 1, "rounds_done": max(len(rows) - 1, 0), "cost": dict(cost),
                        "summary": summary, "rows": rows})
    storage.write_bytes(storage.join(output, REPORT + ".png"), plot(summary))
    return table


def report_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's figures, one dict per row (keys: the second item of ``COLUMNS``)."""
    return [{key: f(r) for _, key, f in COLUMNS} for r in rows]


def _label(row: dict[str, Any]) -> str:
    short = {"start": "start", "assisted_manual": "AM", "semi_auto": "SA", "fully_auto": "FA"}[row["stage"]]
    return short if not row.get("round") else f"{short}{row['round']}"


def plot(summary: list[dict[str, Any]]) -> bytes:
    """Held-out mIoU after each round (engine vs control) and annotation cost per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [_label(r) for r in summary]
    x = np.arange(len(names))
    fig, (quality, cost) = plt.subplots(1, 2, figsize=(12, 4))
    lines = (("point_miou_1", "1-click mIoU", "o-", "C0"), ("box_miou", "box mIoU", "s-", "C1"))
    for key, label, style, colour in lines:
        quality.plot(x, [r[key] if r[key] is not None else np.nan for r in summary], style, color=colour, label=label)
        control = [r[f"control_{key}"] if r[f"control_{key}"] is not None else np.nan for r in summary]
        if not np.all(np.isnan(control)):
            quality.plot(x, control, style.replace("-", "--"), color=colour, alpha=0.5,
                         label=f"{label}, control (true masks)")
    rejected = [i for i, r in enumerate(summary) if r["promoted"] == "no"]
    if rejected:
        quality.plot(x[rejected], [summary[i]["candidate_point_miou_1"] for i in rejected], "x", color="C3",
                     label="candidate not promoted (1-click)")
    quality.set(xticks=x, xticklabels=names, ylabel="held-out mIoU", title="model in use after each round")
    quality.legend(fontsize=8)
    quality.grid(alpha=0.3)
    width = 0.38
    cost.bar(x - width / 2, [(r["clicks_per_mask"] or 0) + (r["strokes_per_mask"] or 0) for r in summary], width,
             label="clicks + strokes per mask")
    cost.bar(x + width / 2, [r["cost_s_per_mask"] or 0 for r in summary], width, label="modelled s per mask")
    cost.set(xticks=x, xticklabels=names, title="annotation cost per round")
    cost.legend(fontsize=8)
    cost.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
