"""Stage ``engine``: SAM's data engine end to end, its three stages with a retrained
model between them, annotated by the simulated annotator on synthetic scenes.

    python -m pipeline.run +stage=engine output=DIR [stage.init_checkpoint=<model>]

0. start: the start model (``stage.init_checkpoint``, else ``model.checkpoint``) is
   evaluated on held-out scenes.
1. assisted_manual: the annotation tool (``+stage=annotate``: the real server, the
   exported decoder) serves pool 1; the simulated annotator clicks every object until
   IoU 0.9 (or the click limit). Model 1 = retrain(start model, dataset 1).
2. semi_auto: ``+stage=semi_auto`` trains a box detector on dataset 1 and pre-fills
   pool 2 with model 1's confident box-prompted masks; the annotator accepts the
   pre-filled masks that match an object, deletes the others and clicks the missing
   objects. Its decisions train the mask verifier (``+stage=verifier``). Model 2 =
   retrain(model 1, datasets 1-2).
3. fully_auto: ``+stage=fully_auto`` with model 2 and the verifier over pool 3, no
   person. Model 3 = retrain(model 2, datasets 1-3).
control: the same retrains from the same start model on the same images' true masks.

The annotator sees the truth only through its clicks' answers (``pipeline.annotate.
simulated``). Every figure is computed from committed data (a dataset's records carry
each mask's provenance, clicks and seconds), so a resumed run reports what a straight
run would. Layout of DIR:

    scenes/<stage>/scene_<seed>.png, scenes/<stage>.json    the pools and their truth (COCO)
    stages/<n>_<stage>/{dataset/, queue/, decisions.parquet, eval.json, timing.json, done.json}
    models/engine_<n>/, models/control_<n>/, models/verifier_engine/   registered models
    engine.json                    the start model and settings (a rerun must match)
    engine_report.{md,json,png}    a row per stage; rewritten after every stage

Rerunning the same command skips finished stages (``done.json`` is written last) and
resumes a cut one where it stopped: saved masks, committed units, training checkpoints.
"""
from __future__ import annotations

import io
import logging
import secrets
import time
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.compose import settings as compose
from pipeline.dataset import manifest
from pipeline.dataset.listing import iter_samples
from pipeline.execution.cluster import connect
from pipeline.models import registry
from pipeline.models.evaluation import EVAL_FILE, evaluate_model
from pipeline.models.loader import model_identity
from pipeline.paths import is_url, user_path
from pipeline.stages import fully_auto, retrain, semi_auto, verifier
from pipeline.truth.synthetic import coco_instances, make_scene, scene_seeds

log = logging.getLogger(__name__)

STAGES = ("assisted_manual", "semi_auto", "fully_auto")
SCENES_DIR = "scenes"
STAGES_DIR = "stages"
START_FILE = "engine.json"
DONE_FILE = "done.json"
REPORT = "engine_report"
VERIFIER_VERSION = "engine"
HUMAN = ("manual", "model_assisted", "automatic_edited")  # provenances an annotator drew


class Stopped(Exception):
    """This invocation's budget (``stage.stop_after_images``, ``stop_at_step``) ran out."""


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs the stages not finished yet; returns summary (the report's figures, a dict
    per finished stage), complete, model (the last model) and report (the markdown
    report's path; engine_report.json beside it has every stage's full record)."""
    import ray

    stage = cfg.stage
    output = user_path(cfg.output)
    if is_url(output):
        raise ValueError(f"output={output}: the engine's simulated annotator needs a local output folder")
    storage.writable(output)
    start_model = compose.start_model(cfg, output, "engine")
    _check_resume(cfg, output, start_model)
    pools = write_pools(output, stage.scenes)

    started = connect(cfg.cluster)  # one Ray session for every sub-stage
    engine = _Engine(cfg, output, pools, start_model)
    try:
        engine.run()
    except Stopped as stop:
        log.info("%s; rerun the same command to go on", stop)
    finally:
        if started:
            ray.shutdown()
    table = write_report(output, engine.rows, engine.planned)
    print(table, flush=True)
    return {"summary": report_rows(engine.rows), "complete": len(engine.rows) == engine.planned, "model": engine.model,
            "report": storage.join(output, REPORT + ".md")}


# ------------------------------------------------------------------------------ resume
def engine_settings(cfg: DictConfig) -> dict[str, Any]:
    """What the engine's results depend on besides the start model, as dotted keys."""
    return compose.settings({"model.arch": cfg.model.arch, "amg": OmegaConf.to_container(cfg.amg, resolve=True),
                             "stage": OmegaConf.to_container(cfg.stage, resolve=True)},
                            per_run=("stage.init_checkpoint",))


def _check_resume(cfg: DictConfig, output: str, start_model: str) -> None:
    """Records the start model and settings at the first start; refuses a rerun with
    others (it would mix two engines in one output), naming what differs."""
    url = storage.join(output, START_FILE)
    now = {"start_model": start_model, "start_model_sha256": model_identity(start_model), **engine_settings(cfg)}
    before = storage.read_json(url)
    if before is None:
        storage.write_json(url, now)
        return
    differ = compose.differences(before, now)
    if differ:
        raise RuntimeError(f"{output} holds an engine run started with other settings: {compose.shown(differ)}. "
                           "Rerun with the settings it started with to finish it, or use another output")


# ------------------------------------------------------------------------------- pools
def write_pools(output: str, scenes: DictConfig) -> dict[str, dict[str, str]]:
    """Writes each stage's pool of synthetic scenes once (``scenes/<stage>/``) with its
    truth (``scenes/<stage>.json``) and the truth of the pools so far
    (``scenes/upto_<stage>.json``, for the control); ``scenes/done.json`` last."""
    root = storage.join(output, SCENES_DIR)
    size = tuple(int(v) for v in scenes.size)
    pools = {name: {"images": storage.join(root, name), "truth": storage.join(root, f"{name}.json"),
                    "upto": storage.join(root, f"upto_{name}.json"), "image_dir": root} for name in STAGES}
    marker = storage.join(root, DONE_FILE)
    if storage.read_json(marker) is not None:
        return pools
    seed, upto = int(scenes.seed_start), {"images": [], "annotations": [], "categories": []}
    for name in STAGES:
        count = int(scenes[name])
        made, names = [], []
        for s in scene_seeds("train", seed, count):
            scene = make_scene(s, size)
            buffer = io.BytesIO()
            from PIL import Image

            Image.fromarray(scene.image).save(buffer, format="PNG")
            storage.write_bytes(storage.join(pools[name]["images"], f"scene_{s}.png"), buffer.getvalue())
            made.append(scene)
            names.append(f"{name}/scene_{s}.png")
        seed += count
        truth = coco_instances(made, names)
        storage.write_json(pools[name]["truth"], truth)
        offset = len(upto["images"])
        upto["images"] += [{**i, "id": i["id"] + offset} for i in truth["images"]]
        upto["annotations"] += [{**a, "id": a["id"] + offset * 1000, "image_id": a["image_id"] + offset}
                                for a in truth["annotations"]]
        upto["categories"] = truth["categories"]
        storage.write_json(pools[name]["upto"], upto)
    storage.write_json(marker, {"seed_start": int(scenes.seed_start), "size": list(size),
                                **{n: int(scenes[n]) for n in STAGES}})
    return pools


class Truth:
    """A pool's true masks by image file name (what the simulated annotator compares its
    masks with, and what pool recall and precision are measured against)."""

    def __init__(self, coco_json: str):
        from pipeline.annotate.simulated import coco_truth

        self._lookup = coco_truth(coco_json)

    def __call__(self, source: str) -> np.ndarray | None:
        return self._lookup({"source": source})


# ------------------------------------------------------------------------------ stages
class _Engine:
    def __init__(self, cfg: DictConfig, output: str, pools: dict[str, dict[str, str]], start_model: str):
        self.cfg, self.output, self.pools = cfg, output, pools
        self.model = start_model
        self.rows: list[dict[str, Any]] = []
        self.control_model = start_model
        self.planned = 1 + len(STAGES)
        self.budget = cfg.stage.stop_after_images  # images the annotator may still save in this invocation
        self.datasets: list[str] = []

    def stage_dir(self, n: int, name: str) -> str:
        return storage.join(self.output, STAGES_DIR, f"{n}_{name}")

    def run(self) -> None:
        self.rows.append(self._start())
        for n, name in enumerate(STAGES, 1):
            sdir = self.stage_dir(n, name)
            self.datasets.append(storage.join(sdir, "dataset"))
            done = storage.read_json(storage.join(sdir, DONE_FILE))
            if done is None:
                log.info("engine stage %d (%s) with %s", n, name, self.model)
                timing = compose.Timing(storage.join(sdir, "timing.json"))
                row = getattr(self, f"_{name}")(n, sdir, timing)
                row.update(self._train_and_evaluate(n, sdir, timing))
                row["seconds"] = dict(timing.seconds)
                storage.write_json(storage.join(sdir, DONE_FILE), row)  # last: the stage is finished
                done = row
            else:
                log.info("engine stage %d (%s) already finished: %s", n, name, done["model"])
            self.rows.append(done)
            self.model, self.control_model = done["model"], done.get("control_model") or self.control_model
            write_report(self.output, self.rows, self.planned)

    # -- 0: the start model -------------------------------------------------------------
    def _start(self) -> dict[str, Any]:
        sdir = self.stage_dir(0, "start")
        done = storage.read_json(storage.join(sdir, DONE_FILE))
        if done is not None:
            return done
        t0 = time.perf_counter()
        metrics = self._evaluate(self.model, sdir)
        row = {"stage": "start", "model": self.model, "eval": metrics,
               "seconds": {"eval": round(time.perf_counter() - t0, 3)}}
        if self.cfg.stage.control:
            row["control_eval"] = metrics  # the control starts from the same model
        storage.write_json(storage.join(sdir, DONE_FILE), row)
        return row

    # -- 1: assisted-manual ---------------------------------------------------------------
    def _assisted_manual(self, n: int, sdir: str, timing: compose.Timing) -> dict[str, Any]:
        pool = self.pools["assisted_manual"]
        dataset = self.datasets[-1]
        self._annotate(pool["images"], dataset, Truth(pool["truth"]), timing)
        return {"stage": "assisted_manual", **annotation_figures(dataset, Truth(pool["truth"]))}

    # -- 2: semi-automatic ----------------------------------------------------------------
    def _semi_auto(self, n: int, sdir: str, timing: compose.Timing) -> dict[str, Any]:
        pool = self.pools["semi_auto"]
        queue, dataset = storage.join(sdir, "queue"), self.datasets[-1]
        truth = Truth(pool["truth"])
        t0 = time.perf_counter()
        filled = semi_auto.run(compose.derive(self.cfg, "semi_auto", input=pool["images"], output=queue,
                                              **{"model.checkpoint": self.model, "stage.masks": self.datasets[:-1]}))
        if filled["units_committed"]:  # the detector's training apart from the pre-filling pass
            timing.add("detector", time.perf_counter() - t0 - filled["wall_s"])
            timing.add("semi_auto", filled["wall_s"])
        sources = {r["key"]: r["source"] for r in manifest.read_table(queue).to_pylist()}  # the pool's files
        self._annotate(queue, dataset, truth, timing, sources)
        decisions = storage.join(sdir, "decisions.parquet")
        counts = write_decisions(queue, dataset, decisions)
        trained = self._train_verifier(decisions, timing)
        prefill = automatic_figures(queue, truth, sources)
        detector = filled["detector"]
        return {"stage": "semi_auto", **annotation_figures(dataset, truth, sources),
                "prefilled": prefill["masks"], "prefilled_per_image": prefill["masks_per_image"],
                "automatic_recall_0.5": prefill["recall_0.5"], "automatic_precision_0.5": prefill["precision_0.5"],
                "decisions": counts, "verifier": trained,
                "detector": {"version": detector["version"], "steps": detector["steps"],
                             "box_ap": detector["eval"]["box_ap"], "box_ap50": detector["eval"]["box_ap50"]}}

    def _train_verifier(self, decisions: str, timing: compose.Timing) -> dict[str, Any]:
        """The verifier learnt from ``decisions`` (plus synthetic masks if
        ``stage.verifier.synthetic.enabled``): its validation figures, or why there is
        none (e.g. no mask was accepted), in which case stage 3 runs without one."""
        from pipeline import versions

        summary = versions.read_summary(self.verifier_dir)
        if summary is not None:
            return {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
        t0 = time.perf_counter()
        try:
            summary = verifier.run(compose.derive(self.cfg, "verifier", output=self.output, **{
                "model.checkpoint": self.model, "stage.version": VERIFIER_VERSION, "stage.decisions": [decisions]}))
        except ValueError as error:  # too few decisions, or all of one kind
            log.warning("no verifier for stage 3: %s", error)
            return {"skipped": str(error)}
        finally:
            timing.add("verifier", time.perf_counter() - t0)
        return {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}

    @property
    def verifier_dir(self) -> str:
        from pipeline import versions

        return versions.version_dir(self.output, "verifier", VERIFIER_VERSION)

    # -- 3: fully automatic ---------------------------------------------------------------
    def _fully_auto(self, n: int, sdir: str, timing: compose.Timing) -> dict[str, Any]:
        pool = self.pools["fully_auto"]
        dataset = self.datasets[-1]
        from pipeline import versions

        values = {"model.checkpoint": self.model}
        filtered = bool(self.cfg.stage.use_verifier) and versions.read_summary(self.verifier_dir) is not None
        if filtered:
            values["amg.verifier"] = self.verifier_dir
        t0 = time.perf_counter()
        annotated = fully_auto.run(compose.derive(self.cfg, "fully_auto", input=pool["images"], output=dataset,
                                                  **values))
        if annotated["units_committed"]:
            timing.add("fully_auto", time.perf_counter() - t0)
        truth = Truth(pool["truth"])
        auto = automatic_figures(dataset, truth)
        return {"stage": "fully_auto", "images": auto["images"], "masks": auto["masks"],
                "masks_per_image": auto["masks_per_image"], "label_miou": auto["miou"],
                "automatic_recall_0.5": auto["recall_0.5"], "automatic_precision_0.5": auto["precision_0.5"],
                "verifier": self.verifier_dir if filtered else None}

    # -- shared -----------------------------------------------------------------------------
    def _annotate(self, images: str, dataset: str, truth: Truth, timing: compose.Timing,
                  sources: dict[str, str] | None = None) -> None:
        """The annotation tool on ``images`` (a folder or a pre-filled dataset), annotated
        by the simulated annotator until every unit is committed or the budget is spent."""
        from pipeline.annotate.app import build
        from pipeline.annotate.simulated import SimulatedAnnotator

        token = secrets.token_urlsafe(16)
        tool = build(compose.derive(self.cfg, "annotate", input=images, output=dataset, **{
            "model.checkpoint": self.model, "stage.token": token, "stage.port": 0, "stage.exit_when_done": True}))
        t0 = time.perf_counter()
        try:
            tool.start()
            if tool.session.finished():
                return
            opts = self.cfg.stage.annotator

            def lookup(view: dict[str, Any]) -> np.ndarray | None:
                return truth((sources or {}).get(view["key"], view["source"]))

            person = SimulatedAnnotator(tool.server.url, token, lookup, name="simulated",
                                        target_iou=float(opts.target_iou), max_clicks=int(opts.max_clicks))
            saved = person.run(self.budget)["images"]
            timing.add("annotate", time.perf_counter() - t0)
            finished = tool.session.finished()
        finally:
            tool.stop()
        if self.budget is not None:
            self.budget -= saved
        if not finished:
            raise Stopped(f"annotation of {dataset} stopped after {saved} image(s) (stage.stop_after_images)")

    def _train_and_evaluate(self, n: int, sdir: str, timing: compose.Timing) -> dict[str, Any]:
        """Model n from model n-1 on the datasets so far; the control model n from control
        n-1 on the same images' true masks; both evaluated on held-out scenes."""
        name = STAGES[n - 1]
        model, steps = self._retrain(f"engine_{n}", self.model, timing, shards=list(self.datasets))
        row = {"model": model, "from_model": self.model, "training_steps": steps,
               "eval": self._evaluate(model, sdir, timing)}
        if self.cfg.stage.control:
            upto = self.pools[name]
            control, _ = self._retrain(f"control_{n}", self.control_model, timing,
                                       coco={"annotations": upto["upto"], "image_dir": upto["image_dir"]})
            row.update(control_model=control,
                       control_eval=self._evaluate(control, storage.join(sdir, "control"), timing))
        return row

    def _retrain(self, version: str, init: str, timing: compose.Timing, shards: list[str] | None = None,
                 coco: dict[str, str] | None = None) -> tuple[str, int]:
        steps = int(self.cfg.stage.retrain.steps)
        trained = registry.read_summary(self.output, version)
        if trained is None or not trained["complete"] or trained["steps"] != steps:
            t0 = time.perf_counter()
            values: dict[str, Any] = {"stage.version": version, "stage.init_checkpoint": init,
                                      "stage.data.shards": shards}
            if coco is not None:
                values.update({"stage.data.coco.annotations": coco["annotations"],
                               "stage.data.coco.image_dir": coco["image_dir"]})
            trained = retrain.run(compose.derive(self.cfg, "retrain", output=self.output, **values))
            timing.add("retrain", time.perf_counter() - t0)
            if not trained["complete"]:
                raise Stopped(f"retrain {version} stopped at step {trained['steps']} of {steps} (stop_at_step)")
        return storage.join(registry.version_url(self.output, version), registry.MODEL_FILE), int(trained["steps"])

    def _evaluate(self, model: str, out_dir: str, timing: compose.Timing | None = None) -> dict[str, Any]:
        saved = storage.read_json(storage.join(out_dir, EVAL_FILE))
        if saved is not None and saved.get("model") == model:
            return saved
        t0 = time.perf_counter()
        stage = compose.derive(self.cfg, "eval").stage
        metrics = evaluate_model(self.cfg.stage.retrain.arch, model, stage, self.cfg.amg, out_dir,
                                 device=self.cfg.model.device)
        if timing is not None:
            timing.add("eval", time.perf_counter() - t0)
        return metrics


# ----------------------------------------------------------------------------- figures
def _records(dataset: str) -> list[tuple[str, dict[str, Any]]]:
    return [(s.key, s.record) for s in iter_samples(dataset, images=False) if s.record is not None]


def _source(key: str, record: dict[str, Any], sources: dict[str, str] | None) -> str:
    """The input an image came from: ``sources[key]`` when given (the images of a dataset
    annotated from a queue dataset came from the queue's inputs), else its record's."""
    return (sources or {}).get(key) or record["image"].get("source") or record["image"]["file_name"]


def annotation_figures(dataset: str, truth: Truth, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """An annotated dataset's cost and quality, from its committed records: images,
    masks, masks_per_image, drawn (masks an annotator drew), accepted_unchanged
    (pre-filled masks accepted as they were), noc90 (mean clicks per drawn mask: the
    simulated annotator stops at IoU 0.9, so this is NoC@90 capped at its click limit),
    clicks_per_mask (over all masks), annotation_s_per_mask, label_miou (mean IoU of
    each mask with its best-matching true mask)."""
    from sam_core.metrics import amg_matches

    images = masks = accepted = 0
    clicks, seconds, label_ious = [], 0.0, []
    for key, record in _records(dataset):
        anns = record["annotations"]
        images, masks = images + 1, masks + len(anns)
        accepted += sum(a.get("provenance") == "automatic_accepted" for a in anns)
        clicks += [int(a.get("clicks", 0)) for a in anns if a.get("provenance") in HUMAN]
        seconds += sum(float(a.get("seconds", 0.0)) for a in anns)
        gt = truth(_source(key, record, sources))
        if anns and gt is not None and len(gt):
            label_ious += list(amg_matches(anns, gt)[1])
    return {
        "images": images, "masks": masks, "masks_per_image": masks / images if images else 0.0,
        "drawn": len(clicks), "accepted_unchanged": accepted,
        "noc90": float(np.mean(clicks)) if clicks else 0.0,
        "clicks_per_mask": sum(clicks) / masks if masks else 0.0,
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
    ("images", "images", lambda r: r.get("images")),
    ("masks/image", "masks_per_image", lambda r: r.get("masks_per_image")),
    ("pre-filled/image", "prefilled_per_image", lambda r: r.get("prefilled_per_image")),
    ("pre-filled accepted unchanged", "accepted_share",
     lambda r: r["accepted_unchanged"] / r["prefilled"] if r.get("prefilled") else None),
    ("clicks/mask", "clicks_per_mask", lambda r: r.get("clicks_per_mask")),
    ("NoC@90 (drawn masks)", "noc90", lambda r: r.get("noc90") if r.get("drawn") else None),
    ("model s/mask", "model_s_per_mask", lambda r: _model_seconds_per_mask(r)),
    ("label mIoU", "label_miou", lambda r: r.get("label_miou")),
    ("auto recall@0.5", "automatic_recall_0.5", lambda r: r.get("automatic_recall_0.5")),
    ("auto precision@0.5", "automatic_precision_0.5", lambda r: r.get("automatic_precision_0.5")),
    ("held-out 1-click mIoU", "point_miou_1", lambda r: r["eval"].get("point_miou_1")),
    ("held-out box mIoU", "box_miou", lambda r: r["eval"].get("box_miou")),
    ("control 1-click", "control_point_miou_1", lambda r: (r.get("control_eval") or {}).get("point_miou_1")),
    ("control box", "control_box_miou", lambda r: (r.get("control_eval") or {}).get("box_miou")),
]


def _model_seconds_per_mask(row: dict[str, Any]) -> float | None:
    """Seconds the model spent per mask of the stage's dataset: the automatic pass
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


def write_report(output: str, rows: list[dict[str, Any]], planned: int) -> str:
    table = format_report(rows)
    first = rows[0]["eval"] if rows else {}
    md = ["# Data engine report", "",
          f"{max(len(rows) - 1, 0)} of {planned - 1} stage(s) finished. Start model: "
          f"{rows[0]['model'] if rows else '-'}. Each stage's model is retrained from the previous one on every "
          "dataset so far; the control spends the same training steps on the same images' true masks.", "",
          f"Held-out: {first.get('images')} {first.get('source')} images, {first.get('masks')} prompted masks. "
          "Clicks and NoC@90: the simulated annotator (positive/negative clicks at the centre of the largest error "
          "region until IoU 0.9 or its click limit). Auto recall/precision: the automatic masks of the stage's pool "
          "(semi_auto: pre-filled; fully_auto: final) against its truth.", "",
          table, "", f"![engine]({REPORT}.png)", ""]
    storage.write_bytes(storage.join(output, REPORT + ".md"), "\n".join(md).encode())
    summary = report_rows(rows)
    storage.write_json(storage.join(output, REPORT + ".json"),
                       {"stages_planned": planned - 1, "stages_done": max(len(rows) - 1, 0),
                        "summary": summary, "rows": rows})
    storage.write_bytes(storage.join(output, REPORT + ".png"), plot(summary))
    return table


def report_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: f(r) for _, key, f in COLUMNS} for r in rows]


def plot(summary: list[dict[str, Any]]) -> bytes:
    """Held-out mIoU per stage (engine vs control) and annotation cost per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["stage"] for r in summary]
    x = np.arange(len(names))
    fig, (quality, cost) = plt.subplots(1, 2, figsize=(11, 4))
    lines = (("point_miou_1", "1-click mIoU", "o-", "C0"), ("box_miou", "box mIoU", "s-", "C1"))
    for key, label, style, colour in lines:
        quality.plot(x, [r[key] if r[key] is not None else np.nan for r in summary], style, color=colour, label=label)
        control = [r[f"control_{key}"] if r[f"control_{key}"] is not None else np.nan for r in summary]
        if not np.all(np.isnan(control)):
            quality.plot(x, control, style.replace("-", "--"), color=colour, alpha=0.5,
                         label=f"{label}, control (true masks)")
    quality.set(xticks=x, xticklabels=names, ylabel="held-out mIoU", title="model after each stage")
    quality.legend(fontsize=8)
    quality.grid(alpha=0.3)
    width = 0.38
    cost.bar(x - width / 2, [r["clicks_per_mask"] or 0 for r in summary], width, label="clicks per mask")
    cost.bar(x + width / 2, [r["masks_per_image"] or 0 for r in summary], width, label="masks per image")
    cost.set(xticks=x, xticklabels=names, title="annotation per stage")
    cost.legend(fontsize=8)
    cost.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()

