"""The training curve registered with every model (``figures/training.png``)."""
from __future__ import annotations

import io

import numpy as np

# (keys, title): a panel is drawn when the history has any of its keys.
PANELS = (
    (("loss",), "total loss"),
    (("focal", "dice", "iou_mse"), "loss parts"),
    (("iou_first", "iou_last"), "training IoU (round 1 / last)"),
    (("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"), "detector losses"),
)


def plot_history(history: list[dict[str, float]]) -> bytes:
    """A PNG of the loss, its parts and the training IoU per step (moving average over
    a fiftieth of the run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    panels = [(tuple(k for k in keys if k in history[0]), title) for keys, title in PANELS]
    panels = [(keys, title) for keys, title in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.5), squeeze=False)
    for ax, (keys, title) in zip(axes[0], panels):
        for k in keys:
            values = np.array([h[k] for h in history])
            window = max(1, len(values) // 50)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
