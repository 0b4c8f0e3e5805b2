"""The statistics report: matplotlib figures mirroring the SA-1B paper's dataset
figures and one self-contained HTML page (figures inlined as base64 PNG)."""
from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.stats.tables import CONCAVITY_EDGES, MASKS_PER_IMAGE_LABELS, REL_SIZE_EDGES, SCORE_EDGES, SIZE_BIN_EDGES

# Figures are built with matplotlib.figure.Figure, not pyplot: no global backend or
# figure registry, so the same code renders on headless workers and inline in Jupyter.

# Published figures of SA-1B (paper, arXiv 2304.02643); "-" where the paper gives none.
SA1B = {
    "images": "11M",
    "masks": "1.1B",
    "masks_per_image_mean": "~100",
    "masks_per_image_median": "-",
    "shards": "1,000",
    "bytes": "-",
    "covered_fraction_mean": "-",
}


def _bar_percent(ax: Axes, labels: list[str], values: np.ndarray, xlabel: str) -> None:
    ax.bar(labels, values, color="#4c72b0")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("percent")


# A reference dataset (``reference``: its name and summary, e.g. SA-1B's own tars run
# through +stage=stats) is drawn on the distributions as a line: the paper gives figures,
# not numbers, so the reference is measured with this same code.
Reference = tuple[str, dict[str, Any]] | None
REFERENCE_STYLE = dict(color="#dd8452", marker="o", ms=3, lw=1.5)


def _legend(ax: Axes, reference: Reference) -> None:
    if reference is not None:
        ax.legend(fontsize=7)


def fig_masks_per_image(summary: dict[str, Any], reference: Reference = None) -> Figure:
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    _bar_percent(ax, MASKS_PER_IMAGE_LABELS, summary["masks_per_image_hist"], "masks per image")
    if reference is not None:
        ax.containers[0].set_label("this dataset")
        ax.plot(MASKS_PER_IMAGE_LABELS, reference[1]["masks_per_image_hist"], label=reference[0], **REFERENCE_STYLE)
    ax.set_ylabel("percent of images")
    ax.set_title("Masks per image")
    _legend(ax, reference)
    return fig


def fig_rel_size(summary: dict[str, Any], reference: Reference = None) -> Figure:
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    # The first bin starts at 0; draw it at the next edge's scale so log x works.
    left = REL_SIZE_EDGES[:-1].copy()
    left[0] = REL_SIZE_EDGES[1] / 10 ** 0.1
    ax.bar(left, summary["rel_size_hist"], width=np.diff(np.r_[left, 1.0]), align="edge",
           color="#4c72b0", label="this dataset")
    if reference is not None:
        centres = np.sqrt(left * np.r_[left[1:], 1.0])  # geometric: the bins are log-spaced
        ax.plot(centres, reference[1]["rel_size_hist"], label=reference[0], **REFERENCE_STYLE)
    ax.set_xscale("log")
    ax.set_xlabel("relative mask size  sqrt(mask area / image area)")
    ax.set_ylabel("percent of masks")
    ax.set_title("Relative mask size")
    _legend(ax, reference)
    return fig


def fig_concavity(summary: dict[str, Any], reference: Reference = None) -> Figure:
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    centres = (CONCAVITY_EDGES[:-1] + CONCAVITY_EDGES[1:]) / 2
    ax.plot(centres, summary["concavity_hist"], "k-", lw=2, label="all (weighted)")
    for b, row in enumerate(summary["concavity_by_size"]):
        if summary["concavity_sample_counts"][b]:
            ax.plot(centres, row, lw=1, alpha=0.7,
                    label=f"size {SIZE_BIN_EDGES[b]:.3g}-{min(SIZE_BIN_EDGES[b + 1], 1):.3g}")
    if reference is not None:
        ax.plot(centres, reference[1]["concavity_hist"], label=f"{reference[0]} (all)", **REFERENCE_STYLE)
    ax.set_xlabel("concavity  1 - area / convex hull area")
    ax.set_ylabel("percent of masks")
    ax.set_title(f"Concavity (sample of {summary['concavity_sampled']:,} masks)")
    ax.legend(fontsize=6)
    return fig


def fig_centres(summary: dict[str, Any], reference: Reference = None) -> Figure:
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    hist = summary["centre_hist"].astype(float)
    ax.imshow(hist / max(hist.max(), 1), extent=(0, 1, 1, 0), cmap="magma")
    ax.set_xlabel("x / width")
    ax.set_ylabel("y / height")
    ax.set_title("Mask centres (bbox centre)")
    return fig


def fig_resolution(summary: dict[str, Any], reference: Reference = None) -> Figure:
    fig = Figure(figsize=(4.5, 3.6))
    ax = fig.subplots()
    res = np.asarray(summary["resolutions"], dtype=float).reshape(-1, 3)
    if len(res):
        ax.scatter(res[:, 0], res[:, 1], s=20 + 200 * res[:, 2] / res[:, 2].max(), alpha=0.5)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("Image resolution (marker size: images)")
    return fig


def fig_scores(summary: dict[str, Any], reference: Reference = None) -> Figure:
    fig = Figure(figsize=(8, 3.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (name, label) in zip(axes, (("predicted_iou", "Predicted IoU"),
                                        ("stability_score", "Stability score"))):
        ax.bar(SCORE_EDGES[:-1], summary[f"{name}_hist"], width=np.diff(SCORE_EDGES),
               align="edge", color="#4c72b0")
        used = np.nonzero(summary[f"{name}_hist"])[0]
        if len(used):  # zoom on the occupied range: automatic masks sit above the thresholds
            ax.set_xlim(SCORE_EDGES[max(used[0] - 2, 0)], SCORE_EDGES[min(used[-1] + 3, len(SCORE_EDGES) - 1)])
        ax.set_xlabel(label)
        ax.set_title(label)
    axes[0].set_ylabel("percent of masks")
    return fig


FIGURES = {
    "Masks per image": fig_masks_per_image,
    "Relative mask size": fig_rel_size,
    "Concavity": fig_concavity,
    "Mask centres": fig_centres,
    "Image resolution": fig_resolution,
    "Predicted IoU and stability": fig_scores,
}
# Each figure's file, stats/figures/<stem>.png (the dataset card links them).
FIGURE_STEMS = {
    "Masks per image": "masks_per_image",
    "Relative mask size": "relative_mask_size",
    "Concavity": "concavity",
    "Mask centres": "mask_centres",
    "Image resolution": "image_resolution",
    "Predicted IoU and stability": "scores",
}


def figure_pngs(summary: dict[str, Any], reference: Reference = None) -> dict[str, bytes]:
    """PNG bytes of every figure, keyed by its caption (as ``FIGURES``); ``reference``
    (name, summary) drawn on the distributions."""
    pngs = {}
    for caption, make in FIGURES.items():
        buf = io.BytesIO()
        fig = make(summary, reference=reference)
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        pngs[caption] = buf.getvalue()
    return pngs


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if value < 1000 else f"{value:,.0f}"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    return str(value)


SUMMARY_ROWS = [
    ("images", "Images"),
    ("masks", "Masks"),
    ("masks_per_image_mean", "Masks per image (mean)"),
    ("masks_per_image_median", "Masks per image (median)"),
    ("shards", "Shards"),
    ("bytes", "Bytes (tar files)"),
    ("covered_fraction_mean", "Image area covered by masks (mean)"),
]


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, this dataset, SA-1B) rows of the summary table."""
    rows = [(label, _fmt(summary[key]), SA1B[key]) for key, label in SUMMARY_ROWS]
    gb = summary["bytes"] / 1e9
    return [(label, f"{ours} ({gb:.3g} GB)" if label.startswith("Bytes") else ours, theirs)
            for label, ours, theirs in rows]


# The generator settings of the released SA-1B masks (paper; conf/amg/sa1b.yaml).
SA1B_SETTINGS = {"points_per_side": 32, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95,
                 "crop_n_layers": 2, "min_mask_region_area": 100, "max_mask_area_fraction": 0.95}
FAMILY_PRED_IOU = {"sam": 0.88, "sam2": 0.8}  # what amg.pred_iou_thresh: null means


def settings_notes(config: dict[str, Any] | None) -> list[str]:
    """What differs between the generator settings a dataset recorded (its config.yaml)
    and SA-1B's, as lines for the report; [] when they agree or nothing was recorded."""
    amg = (config or {}).get("amg")
    if not isinstance(amg, dict):
        return []
    values = dict(amg)
    if values.get("pred_iou_thresh") is None:
        values["pred_iou_thresh"] = FAMILY_PRED_IOU.get(str((config or {}).get("model_family", "sam")), 0.88)
    differences = [f"{key} {values.get(key)} (SA-1B: {sa1b})" for key, sa1b in SA1B_SETTINGS.items()
                   if key in values and values.get(key) != sa1b]
    if not differences:
        return []
    return [f"This dataset was made with other generator settings than SA-1B's: {'; '.join(differences)}. "
            "Its distributions are not comparable with SA-1B's one to one (lower thresholds keep more, "
            "rougher masks; without crops, fewer small ones)."]


def render(summary: dict[str, Any], title: str, pngs: dict[str, bytes] | None = None,
           notes: list[str] | None = None) -> str:
    """One self-contained HTML page: notes (``settings_notes``), summary table, figures
    (``pngs`` from ``figure_pngs``, rendered here when not given), definitions."""
    pngs = figure_pngs(summary) if pngs is None else pngs
    note_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes or [])
    rows = "\n".join(
        f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
        for a, b, c in summary_rows(summary))
    figures = "\n".join(
        f'<figure><img alt="{html.escape(caption)}" '
        f'src="data:image/png;base64,{base64.b64encode(pngs[caption]).decode()}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption in FIGURES)
    per_bin = summary.get("concavity_per_bin", "?")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Statistics: {html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; }}
td:nth-child(n+2) {{ text-align: right; }}
figure {{ display: inline-block; margin: 8px; vertical-align: top; }}
figcaption {{ text-align: center; font-size: 90%; }}
.note {{ background: #fff4e0; border-left: 4px solid #e69500; padding: 6px 10px; }}
</style></head><body>
<h1>Dataset statistics: {html.escape(title)}</h1>
{note_html}
<h2>Summary</h2>
<table><tr><th></th><th>This dataset</th><th>SA-1B (published)</th></tr>
{rows}
</table>
<h2>Figures</h2>
{figures}
<h2>How these were computed</h2>
<ul>
<li>Area, bounding box, relative size sqrt(area / image area), centre and covered
fraction are computed from the compressed RLE with pycocotools, without decoding masks,
for all {summary['masks']:,} masks; {summary['masks_per_s_per_core']:,.0f} masks/s per CPU core
for the per-mask table, from the JSON bytes (parse, RLE columns, Arrow; {summary['table_cpu_s']:.2f}
CPU s in all, excluding tar reading and the concavity sample).</li>
<li>Mask centre is the centre of the mask's bounding box (the exact centroid needs a decode).</li>
<li>Concavity = 1 - mask area / convex hull area (mask as a union of pixel squares) is
computed on a stratified sample: up to {per_bin} masks per relative-size bin per shard
(bins {", ".join(f"{e:.3g}" for e in SIZE_BIN_EDGES[1:-1])}), {summary['concavity_sampled']:,}
masks in all; the "all" curve weights each sampled mask by its size bin's population.</li>
<li>Masks-per-image bins follow the SA-1B paper: the first bin holds images with at most 10 masks.</li>
<li>Records that could not be read: {summary['skipped']:,} (run +stage=validate for details).</li>
</ul>
</body></html>
"""
