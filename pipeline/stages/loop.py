"""Stage ``loop``: the model-in-the-loop cycle of SAM's data engine.

    python -m pipeline.run +stage=loop input=<unlabeled images> output=DIR \
        stage.init_checkpoint=<path or registered version> [stage.rounds=N]

Round N (1, 2, ...): ``fully_auto`` annotates the unlabeled pool ``input`` with model
N-1 into ``DIR/rounds/round_NNN/dataset/``; ``retrain`` fine-tunes model N-1 on that
dataset's masks that pass its predicted-IoU and stability filters (optionally mixed
with labeled data) and registers model N as ``DIR/models/round_NNN/``; ``eval``
measures it on held-out ground truth. Round 0 is the evaluation of the start model.

The sub-stages run through their own ``run()`` functions with configs derived from
``stage.fully_auto`` / ``stage.retrain`` / ``stage.eval`` (their stage configs,
composed by ``conf/stage/loop.yaml``). A round is finished when its ``done.json`` is
written, atomically and last; rerunning the same command skips finished rounds and
resumes a cut one (fully_auto skips committed units, retrain continues from its last
checkpoint). ``DIR/loop_report.md`` and ``loop_report.json`` are rewritten after every
round.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.dataset import iter_samples
from pipeline.stages import eval as eval_stage
from pipeline.stages import fully_auto, retrain

log = logging.getLogger(__name__)

ROUNDS_DIR = "rounds"
DONE_FILE = "done.json"        # written last: its presence marks the round finished
TIMING_FILE = "timing.json"    # seconds spent per phase, summed over invocations
EVAL_FILE = "eval.json"
REPORT_MD = "loop_report.md"
REPORT_JSON = "loop_report.json"
METRICS = ("point_miou_1", "point_miou_5", "point_miou_1_oracle", "box_miou", "amg_recall_0.5",
           "amg_recall_0.75", "amg_precision_0.5", "amg_precision_0.75", "amg_masks_per_image")


def round_name(n: int) -> str:
    return f"round_{n:03d}"


def _write_json(path: Path, value: Any) -> None:
    """Atomic: a reader (or a resumed run) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _derive(cfg: DictConfig, sub: str, **values: Any) -> DictConfig:
    """The root config with ``stage`` replaced by ``cfg.stage[sub]`` and ``values`` set
    (dotted keys allowed), as if that stage had been run from the command line."""
    derived = cfg.copy()
    with open_dict(derived):
        derived.stage = OmegaConf.to_container(cfg.stage[sub], resolve=False)
        for key, value in values.items():
            OmegaConf.update(derived, key, value, merge=False, force_add=True)
    return derived


class _Timing:
    """Seconds per phase of one round, accumulated in ``timing.json`` across invocations
    (a phase cut by a kill loses only the time of that attempt)."""

    def __init__(self, round_dir: Path):
        self.path = round_dir / TIMING_FILE
        self.seconds: dict[str, float] = _read_json(self.path) or {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + seconds, 3)
        _write_json(self.path, self.seconds)


def kept_masks(dataset: Path, min_predicted_iou: float, min_stability: float) -> tuple[int, int]:
    """(masks in the dataset's shards, masks passing retrain's quality filters)."""
    total = kept = 0
    for sample in iter_samples(str(dataset), images=False):
        for a in sample.record["annotations"]:
            total += 1
            kept += (a.get("predicted_iou", 1.0) >= min_predicted_iou
                     and a.get("stability_score", 1.0) >= min_stability)
    return total, kept


def _evaluate(cfg: DictConfig, model: str, out_dir: Path) -> dict[str, Any]:
    stage = _derive(cfg, "eval").stage
    arch = stage.arch or cfg.stage.retrain.arch
    return eval_stage.evaluate_model(arch, model, stage, cfg.amg, out_dir, device=cfg.model.get("device", "auto"))


def _round_zero(cfg: DictConfig, output: Path, start_model: str) -> dict[str, Any]:
    rdir = output / ROUNDS_DIR / round_name(0)
    done = _read_json(rdir / DONE_FILE)
    if done is not None and done["model"] == start_model:
        log.info("round 0 (start model) already evaluated")
        return done
    t0 = time.perf_counter()
    metrics = _evaluate(cfg, start_model, rdir)
    record = {"round": 0, "model": start_model, "eval": metrics,
              "seconds": {"eval": round(time.perf_counter() - t0, 3)}}
    _write_json(rdir / DONE_FILE, record)
    return record


def _run_round(cfg: DictConfig, output: Path, n: int, model: str) -> dict[str, Any] | None:
    """Runs (or resumes) round ``n`` from ``model``; None when stopped before its end."""
    stage = cfg.stage
    rdir = output / ROUNDS_DIR / round_name(n)
    dataset = rdir / "dataset"
    version = f"{stage.version_prefix}{n:03d}"
    timing = _Timing(rdir)
    log.info("round %d: fully_auto with %s over %s", n, model, cfg.input)

    t0 = time.perf_counter()
    annotated = fully_auto.run(_derive(cfg, "fully_auto", output=str(dataset), **{"model.checkpoint": model}))
    if annotated["units_committed"]:
        timing.add("fully_auto", time.perf_counter() - t0)

    data = stage.retrain.data
    masks, kept = kept_masks(dataset, float(data.min_predicted_iou), float(data.min_stability))
    labeled = bool(data.synthetic.enabled) or bool(data.coco.annotations)
    if kept == 0 and not labeled:
        raise RuntimeError(
            f"round {n}: none of the {masks} masks in {dataset} passes retrain's filters "
            f"(predicted IoU >= {data.min_predicted_iou}, stability >= {data.min_stability}); lower "
            "stage.retrain.data.min_predicted_iou / min_stability or mix in labeled data "
            "(stage.retrain.data.synthetic.enabled=true)"
        )
    if kept == 0:
        log.warning("round %d: no mask of model %s passes retrain's filters; this round trains on "
                    "the labeled data only", n, model)

    steps = int(stage.retrain.steps)
    registered = output / retrain.MODELS_DIR / version
    trained = _read_json(registered / "train_summary.json")
    if trained is not None and trained["complete"] and trained["steps"] == steps:
        log.info("round %d: %s already trained (%d steps)", n, version, steps)
    else:
        log.info("round %d: retrain %s from %s on %d masks (%d generated)", n, version, model, kept, masks)
        t0 = time.perf_counter()
        extra = OmegaConf.to_container(stage.retrain.data, resolve=True)["shards"] or []
        shards = [str(dataset), *([extra] if isinstance(extra, str) else extra)]
        trained = retrain.run(_derive(
            cfg, "retrain", output=str(output),
            **{"stage.version": version, "stage.init_checkpoint": model, "stage.data.shards": shards},
        ))
        timing.add("retrain", time.perf_counter() - t0)
        if not trained["complete"]:
            log.info("round %d: retrain stopped at step %d of %d (stop_at_step); rerun to continue",
                     n, trained["steps"], steps)
            return None
    new_model = str(registered / retrain.MODEL_FILE)

    metrics = _read_json(registered / EVAL_FILE)
    if metrics is None or metrics.get("model") != new_model:
        t0 = time.perf_counter()
        metrics = _evaluate(cfg, new_model, registered)
        timing.add("eval", time.perf_counter() - t0)
    _write_json(rdir / EVAL_FILE, metrics)

    summary = _read_json(dataset / fully_auto.SUMMARY_FILE)["dataset"]
    record = {
        "round": n, "model": new_model, "version": version, "from_model": model,
        "images_annotated": summary["images_ok"], "images_failed": summary["images"] - summary["images_ok"],
        "masks_generated": masks, "masks_kept": kept,
        "training_steps": trained["steps"], "final_loss": trained.get("final_loss"),
        "eval": metrics, "seconds": dict(timing.seconds),
    }
    _write_json(rdir / DONE_FILE, record)  # last: the round is finished
    return record


def format_report(rounds: list[dict[str, Any]]) -> str:
    """A markdown table: held-out metrics and the work of each round (0 = start model)."""
    head = ["round", "model", "images", "masks kept / generated", "steps", "time (s)", *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds:
        ev = r["eval"]
        work = (["-", "-", "-"] if r["round"] == 0 else
                [str(r["images_annotated"]), f"{r['masks_kept']} / {r['masks_generated']}", str(r["training_steps"])])
        cells = [str(r["round"]), Path(r["model"]).parent.name or r["model"], *work,
                 f"{sum(r['seconds'].values()):.0f}", *(f"{ev[m]:.3f}" if m in ev else "-" for m in METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(output: Path, rounds: list[dict[str, Any]], planned: int) -> str:
    table = format_report(rounds)
    first = rounds[0]["eval"]
    done = len(rounds) - 1
    md = [
        "# Model-in-the-loop report", "",
        f"{done} of {planned} round(s) finished. Round 0 is the start model "
        f"({rounds[0]['model']}); round N is the model retrained on round N's automatic "
        "annotations of the unlabeled pool by model N-1.", "",
        f"Held-out set: {first.get('images')} {first.get('source')} images, {first.get('masks')} prompted "
        "masks. Time: seconds spent in the round's fully_auto, retrain and eval (summed over invocations).",
        "", table, "",
    ]
    (output / REPORT_MD).write_text("\n".join(md))
    _write_json(output / REPORT_JSON, {"rounds_planned": planned, "rounds_done": done, "rounds": rounds})
    return table


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs the rounds not finished yet; returns rounds (the records of rounds 0..N
    done), rounds_run and rounds_skipped (by this invocation), complete, and report
    (path of the markdown report)."""
    stage = cfg.stage
    output = Path(cfg.output).resolve()
    spec = stage.init_checkpoint if stage.init_checkpoint is not None else cfg.model.get("checkpoint")
    start_model = retrain.resolve_model_path(spec, output)
    if start_model is None:
        raise ValueError("the loop needs a start model: stage.init_checkpoint=<path or registered version>")
    output.mkdir(parents=True, exist_ok=True)
    (output / "loop_config.yaml").write_text(OmegaConf.to_yaml(cfg.stage, resolve=False))

    records = [_round_zero(cfg, output, start_model)]
    write_report(output, records, int(stage.rounds))
    model, ran, skipped, complete = start_model, 0, 0, True
    for n in range(1, int(stage.rounds) + 1):
        done = _read_json(output / ROUNDS_DIR / round_name(n) / DONE_FILE)
        if done is not None:
            if done["from_model"] != model:
                raise RuntimeError(
                    f"round {n} in {output} was made from {done['from_model']}, not {model}: "
                    "use another output for another start model"
                )
            log.info("round %d already finished: %s", n, done["model"])
            skipped += 1
        else:
            if stage.stop_after_round is not None and n > int(stage.stop_after_round):
                complete = False
                break
            done = _run_round(cfg, output, n, model)
            if done is None:
                complete = False
                break
            ran += 1
        records.append(done)
        model = done["model"]
        write_report(output, records, int(stage.rounds))
    print(write_report(output, records, int(stage.rounds)), flush=True)
    return {"rounds": records, "rounds_run": ran, "rounds_skipped": skipped, "complete": complete,
            "model": model, "report": str(output / REPORT_MD)}
