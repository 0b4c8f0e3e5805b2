"""Comparing a recorded configuration with a rerun's, leaf by leaf: what both a dataset's
``config.yaml`` (``pipeline.dataset.provenance``) and a composing stage's phases
(``pipeline.compose.phases``) refuse to resume with.

A setting added to the project after a run was recorded is absent from its record. The
rerun is the same run when the new setting has the value that reproduces what the code
did before it existed (``ADDED_SETTINGS``); any other value is a difference, as usual."""
from __future__ import annotations

from typing import Any, Mapping

# Settings added since runs were first recorded, matched by their end (whole dotted parts),
# with the value that means "as before". SAM 2 support (2026-12): every model before it was
# SAM 1, whose generator always took multimask outputs, no mask-to-mask refinement, and the
# model's own mask threshold. Prompting (2026-12): every point of the grid.
ADDED_SETTINGS: dict[str, Any] = {
    "model_family": "sam", "amg.use_m2m": False, "amg.multimask_output": True, "amg.mask_threshold": None,
    "amg.prompting": "grid", "amg.adaptive_levels": 2, "amg.max_mask_memory_mb": 512,
    "amg.objects.detector": None, "amg.objects.min_box_score": 0.3, "amg.objects.max_boxes": 100,
    "amg.objects.boxes": None, "amg.objects.box_frame": "auto", "detector_sha256": None, "boxes_sha256": None,
}

_MISSING = object()


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """``{"amg": {"a": 1}}`` -> ``{"amg.a": 1}``; an empty mapping is a leaf."""
    if isinstance(values, Mapping) and values:
        flat: dict[str, Any] = {}
        for key, value in values.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: values}


def differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, then, now)`` for each flat key whose values differ, in key order; a side
    without the key has ``None`` (see ``ADDED_SETTINGS`` for keys new since ``before``)."""
    out = []
    for key in sorted(set(before) | set(now)):
        then, current = before.get(key, _MISSING), now.get(key, _MISSING)
        # (a dataset's identity reads a field its record lacks as None: no added setting
        # has None as a recorded value other than its "as before" one)
        if (then is _MISSING or then is None) and _as_before(key, current):
            continue
        if then != current:
            out.append((key, None if then is _MISSING else then, None if current is _MISSING else current))
    return out


def _as_before(key: str, value: Any) -> bool:
    """Whether ``key`` is an added setting (``ADDED_SETTINGS``) and ``value`` its as-before value."""
    return any((key == name or key.endswith("." + name)) and value == before
               for name, before in ADDED_SETTINGS.items())
