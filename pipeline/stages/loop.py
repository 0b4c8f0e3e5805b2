"""Stage ``loop``: the model-in-the-loop cycle of SAM's data engine.

    python -m pipeline.run +stage=loop input=<unlabeled images> output=DIR|URL \
        stage.init_checkpoint=<path or registered version> [stage.rounds=N]

Round N (1, 2, ...): ``fully_auto`` annotates the unlabeled pool ``input`` with model
N-1 into ``DIR/rounds/round_NNN/dataset/``; ``retrain`` fine-tunes model N-1 on that
dataset's masks that pass its predicted-IoU and stability filters (optionally mixed
with labeled data) and registers model N as ``DIR/models/round_NNN/``; model N is then
evaluated on held-out ground truth. Round 0 is the evaluation of the start model.

The sub-stages run through their own ``run()`` functions with configs derived from
``stage.fully_auto`` / ``stage.retrain`` / ``stage.eval`` (their stage configs,
composed by ``conf/stage/loop.yaml``). A round records the model and settings it starts
with (``round.json``) and is finished when its ``done.json`` is written, atomically and
last. Rerunning the same command skips finished rounds and resumes a cut one
(fully_auto skips committed units, retrain continues from its last checkpoint); a rerun
with another model or other settings for a cut round refuses to start and says what
differs. ``DIR/loop_report.md`` and ``loop_report.json`` are rewritten after every round.
"""
from __future__ import annotations

import logging
import posixpath
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.compose import settings as compose
from pipeline.compose.phases import Phase, is_trained, started_with
from pipeline.dataset.filters import MaskFilter
from pipeline.dataset.listing import iter_samples
from pipeline.models import registry
from pipeline.models.evaluation import evaluate_model
from pipeline.models.loader import model_identity
from pipeline.stages import fully_auto, retrain

log = logging.getLogger(__name__)

ROUNDS_DIR = "rounds"
START_FILE = "round.json"      # the model and settings a round started with
REPORT_MD = "loop_report.md"
REPORT_JSON = "loop_report.json"
METRICS = ("point_miou_1", "point_miou_5", "point_miou_1_oracle", "box_miou", "amg_recall_0.5",
           "amg_recall_0.75", "amg_precision_0.5", "amg_precision_0.75", "amg_masks_per_image")


def round_name(n: int) -> str:
    return f"round_{n:03d}"


def kept_masks(dataset: str, masks: MaskFilter) -> tuple[int, int]:
    """(masks in the dataset's shards, masks passing retrain's filter ``masks``)."""
    for sample in iter_samples(str(dataset), images=False):
        masks(sample.record["annotations"])
    return masks.kept + masks.dropped, masks.kept


def round_settings(cfg: DictConfig) -> dict[str, Any]:
    """What a round's result depends on besides its start model, as dotted keys: the
    pool, the model architecture, the generator and every sub-stage setting except
    ``compose.RUN_CONTROL`` and those the loop sets per round."""
    stage = OmegaConf.to_container(cfg.stage, resolve=True)
    return compose.settings({"input": str(cfg.input), "model.arch": cfg.model.arch,
                             "amg": OmegaConf.to_container(cfg.amg, resolve=True),
                             "stage": {k: stage[k] for k in ("version_prefix", "fully_auto", "retrain", "eval")}},
                            per_run=("stage.retrain.version", "stage.retrain.init_checkpoint"))


def _start(cfg: DictConfig, model: str) -> dict[str, Any]:
    """What round.json records: the model a round starts from and the round's settings."""
    return {"from_model": model, "from_model_sha256": model_identity(model), "settings": round_settings(cfg)}


def _check_resume(cfg: DictConfig, output: str, start_model: str) -> None:
    """Refuses a rerun whose rounds would not continue the ones in ``output``: a finished
    round made from another model, or a cut round started with another model or other
    settings. Checked before any work."""
    model = start_model
    for n in range(1, int(cfg.stage.rounds) + 1):
        rdir = storage.join(output, ROUNDS_DIR, round_name(n))
        done = Phase(rdir).done
        if done is None:
            started_with(storage.join(rdir, START_FILE), _start(cfg, model),
                         f"round {n} in {output} was cut short and", record=False)
            return
        if done["from_model"] != model:
            raise RuntimeError(
                f"round {n} in {output} was made from {done['from_model']}, not {model}: "
                "use another output for another start model"
            )
        model = done["model"]


def _evaluate(cfg: DictConfig, model: str, out_dir: str) -> dict[str, Any]:
    stage = compose.derive(cfg, "eval").stage
    arch = stage.arch or cfg.stage.retrain.arch
    return evaluate_model(arch, model, stage, cfg.amg, out_dir, device=cfg.model.device)


def _round_zero(cfg: DictConfig, output: str, start_model: str) -> dict[str, Any]:
    phase = Phase(storage.join(output, ROUNDS_DIR, round_name(0)))
    done = phase.done
    if done is not None and done["model"] == start_model:
        log.info("round 0 (start model) already evaluated")
        return done
    metrics = phase.evaluated(start_model, phase.folder, lambda m, d: _evaluate(cfg, m, d))
    return phase.finish({"round": 0, "model": start_model, "eval": metrics, "seconds": dict(phase.timing.seconds)})


def _run_round(cfg: DictConfig, output: str, n: int, model: str) -> dict[str, Any] | None:
    """Runs (or resumes) round ``n`` from ``model``; None when stopped before its end."""
    stage = cfg.stage
    phase = Phase(storage.join(output, ROUNDS_DIR, round_name(n)))
    dataset = storage.join(phase.folder, "dataset")
    version = f"{stage.version_prefix}{n:03d}"
    started_with(storage.join(phase.folder, START_FILE), _start(cfg, model), f"round {n} in {output}")
    pool = str(cfg.input)
    log.info("round %d: fully_auto with %s over %s", n, model, pool)

    t0 = time.perf_counter()
    annotated = fully_auto.run(compose.derive(cfg, "fully_auto", input=pool, output=dataset,
                                              **{"model.checkpoint": model}))
    if annotated["units_committed"]:  # a rerun that found every unit committed did no work
        phase.timing.add("fully_auto", time.perf_counter() - t0)

    data = stage.retrain.data
    masks, kept = kept_masks(dataset, MaskFilter.of(data))
    labeled = bool(data.synthetic.enabled) or bool(data.coco.annotations)
    if kept == 0 and not labeled:
        raise RuntimeError(
            f"round {n}: none of the {masks} masks in {dataset} passes retrain's filters "
            f"(predicted IoU >= {data.pred_iou_thresh}, stability >= {data.stability_score_thresh}); lower "
            "stage.retrain.data.pred_iou_thresh / stability_score_thresh or mix in labeled data "
            "(stage.retrain.data.synthetic.enabled=true)"
        )
    if kept == 0:
        log.warning("round %d: no mask of model %s passes retrain's filters; this round trains on "
                    "the labeled data only", n, model)

    steps = int(stage.retrain.steps)
    if is_trained(output, version, steps):
        log.info("round %d: %s already trained (%d steps)", n, version, steps)
        trained = registry.read_summary(registry.version_dir(output, version))
    else:
        log.info("round %d: retrain %s from %s on %d masks (%d generated)", n, version, model, kept, masks)
        extra = OmegaConf.to_container(stage.retrain.data, resolve=True)["shards"] or []
        shards = [dataset, *([extra] if isinstance(extra, str) else extra)]
        train = compose.derive(cfg, "retrain", output=output, **{
            "stage.version": version, "stage.init_checkpoint": model, "stage.data.shards": shards})
        trained = phase.timed("retrain", lambda: retrain.run(train))
        if not trained["complete"]:
            log.info("round %d: retrain stopped at step %d of %d (stop_at_step); rerun to continue",
                     n, trained["steps"], steps)
            return None
    registered = registry.version_dir(output, version)
    candidate = registry.model_file(output, version)
    promoted = bool(trained.get("promoted", True))
    if not promoted:
        log.warning("round %d: %s is worse than %s on the held-out images (promotion gate): the next round goes "
                    "on with %s", n, version, model, model)
    in_use = candidate if promoted else model
    metrics = phase.evaluated(in_use, registered if promoted else phase.folder, lambda m, d: _evaluate(cfg, m, d))
    storage.write_json(storage.join(phase.folder, registry.EVAL_FILE), metrics)

    summary = annotated["dataset"]
    return phase.finish({
        "round": n, "model": in_use, "candidate": candidate, "promoted": promoted, "gate": trained.get("gate"),
        "version": version, "from_model": model,
        "images_annotated": summary["images_ok"], "images_failed": summary["images"] - summary["images_ok"],
        "masks_generated": masks, "masks_kept": kept,
        "training_steps": trained["steps"], "final_loss": trained.get("final_loss"),
        "eval": metrics, "seconds": dict(phase.timing.seconds),
    })


def format_report(rounds: list[dict[str, Any]]) -> str:
    """A markdown table: held-out metrics and the work of each round (0 = start model)."""
    head = ["round", "model", "images", "masks kept / generated", "steps", "promoted", "time (s)", *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds:
        ev = r["eval"]
        work = (["-", "-", "-", "-"] if r["round"] == 0 else
                [str(r["images_annotated"]), f"{r['masks_kept']} / {r['masks_generated']}", str(r["training_steps"]),
                 "yes" if r.get("promoted", True) else f"no ({posixpath.basename(posixpath.dirname(r['candidate']))})"])
        name = posixpath.basename(posixpath.dirname(r["model"])) or r["model"]
        cells = [str(r["round"]), name, *work,
                 f"{sum(r['seconds'].values()):.0f}", *(f"{ev[m]:.3f}" if m in ev else "-" for m in METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(output: str, rounds: list[dict[str, Any]], planned: int) -> str:
    table = format_report(rounds)
    first = rounds[0]["eval"]
    done = len(rounds) - 1
    md = [
        "# Model-in-the-loop report", "",
        f"{done} of {planned} round(s) finished. Round 0 is the start model "
        f"({rounds[0]['model']}); round N is the model retrained on round N's automatic "
        "annotations of the unlabeled pool by model N-1, kept when the promotion gate finds it no worse "
        "than model N-1 on held-out images (else model N-1 goes on).", "",
        f"Held-out set: {first.get('images')} {first.get('source')} images, {first.get('masks')} prompted "
        "masks. Time: seconds spent in the round's fully_auto, retrain and eval (summed over invocations).",
        "", table, "",
    ]
    storage.write_bytes(storage.join(output, REPORT_MD), "\n".join(md).encode())
    storage.write_json(storage.join(output, REPORT_JSON), {"rounds_planned": planned, "rounds_done": done,
                                                           "rounds": rounds})
    return table


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs the rounds not finished yet; returns rounds (the records of rounds 0..N
    done), rounds_run and rounds_skipped (by this invocation), complete, model (the
    last model), and report (URL of the markdown report)."""
    stage = cfg.stage
    output = str(cfg.output)
    storage.writable(output)
    start_model = compose.start_model(cfg, output, "loop")
    _check_resume(cfg, output, start_model)
    storage.write_bytes(storage.join(output, "loop_config.yaml"), OmegaConf.to_yaml(cfg.stage, resolve=False).encode())

    records = [_round_zero(cfg, output, start_model)]
    write_report(output, records, int(stage.rounds))
    model, ran, skipped, complete = start_model, 0, 0, True
    for n in range(1, int(stage.rounds) + 1):
        done = Phase(storage.join(output, ROUNDS_DIR, round_name(n))).done
        if done is not None:
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
            "model": model, "report": storage.join(output, REPORT_MD)}
