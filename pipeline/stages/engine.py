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
each mask's provenance, clicks and seconds; ``pipeline.compose.engine_report``), so a
resumed run reports what a straight run would. Layout of DIR:

    scenes/<stage>/scene_<seed>.png, scenes/<stage>.json    the pools and their truth (COCO)
    stages/<n>_<stage>/{dataset/, queue/, decisions.parquet, eval.json, timing.json, done.json}
    models/engine_<n>/, models/control_<n>/, models/verifier_engine/   registered models
    engine.json                    the start model and settings (a rerun must match)
    engine_report.{md,json,png}    a row per stage; rewritten after every stage

Rerunning the same command skips finished stages (``done.json`` is written last) and
resumes a cut one where it stopped: saved masks, committed units, training checkpoints.
"""
from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.compose import settings as compose
from pipeline.compose.engine_report import (
    REPORT,
    annotation_figures,
    automatic_figures,
    report_rows,
    write_decisions,
    write_report,
)
from pipeline.compose.phases import Phase, is_trained, started_with
from pipeline.dataset import manifest
from pipeline.execution.cluster import connect
from pipeline.models import registry
from pipeline.models.evaluation import evaluate_model
from pipeline.models.loader import model_identity
from pipeline.paths import is_url
from pipeline.stages import fully_auto, retrain, semi_auto, verifier
from pipeline.truth.pools import Truth, write_pools

log = logging.getLogger(__name__)

ENGINE_STAGES = ("assisted_manual", "semi_auto", "fully_auto")  # SAM's data engine; not pipeline stages
SCENES_DIR = "scenes"
STAGES_DIR = "stages"
START_FILE = "engine.json"
VERIFIER_VERSION = "engine"


class Stopped(Exception):
    """This invocation's budget (``stage.stop_after_images``, ``stop_at_step``) ran out."""


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs the engine stages not finished yet; returns summary (the report's figures, a
    dict per finished stage), complete, model (the last model) and report (the markdown
    report's path; engine_report.json beside it has every stage's full record)."""
    import ray

    stage = cfg.stage
    output = str(cfg.output)
    if is_url(output):
        raise ValueError(f"output={output}: the engine's simulated annotator needs a local output folder")
    storage.writable(output)
    start_model = compose.start_model(cfg, output, "engine")
    started_with(storage.join(output, START_FILE),
                 {"start_model": start_model, "start_model_sha256": model_identity(start_model),
                  **engine_settings(cfg)}, f"the engine run in {output}")
    scenes = stage.scenes
    pools = write_pools(storage.join(output, SCENES_DIR), ENGINE_STAGES, {n: int(scenes[n]) for n in ENGINE_STAGES},
                        int(scenes.seed_start), tuple(int(v) for v in scenes.size))

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


def engine_settings(cfg: DictConfig) -> dict[str, Any]:
    """What the engine's results depend on besides the start model, as dotted keys."""
    return compose.settings({"model.arch": cfg.model.arch, "amg": OmegaConf.to_container(cfg.amg, resolve=True),
                             "stage": OmegaConf.to_container(cfg.stage, resolve=True)},
                            per_run=("stage.init_checkpoint",))


class _Engine:
    def __init__(self, cfg: DictConfig, output: str, pools: dict[str, dict[str, str]], start_model: str):
        self.cfg, self.output, self.pools = cfg, output, pools
        self.model = start_model
        self.rows: list[dict[str, Any]] = []
        self.control_model = start_model
        self.planned = 1 + len(ENGINE_STAGES)
        self.budget = cfg.stage.stop_after_images  # images the annotator may still save in this invocation
        self.datasets: list[str] = []

    def phase(self, n: int, name: str) -> Phase:
        return Phase(storage.join(self.output, STAGES_DIR, f"{n}_{name}"))

    def run(self) -> None:
        self.rows.append(self._start())
        for n, name in enumerate(ENGINE_STAGES, 1):
            phase = self.phase(n, name)
            self.datasets.append(storage.join(phase.folder, "dataset"))
            done = phase.done
            if done is None:
                log.info("engine stage %d (%s) with %s", n, name, self.model)
                row = getattr(self, f"_{name}")(phase)
                row.update(self._train_and_evaluate(n, phase))
                row["seconds"] = dict(phase.timing.seconds)
                done = phase.finish(row)
            else:
                log.info("engine stage %d (%s) already finished: %s", n, name, done["model"])
            self.rows.append(done)
            self.model, self.control_model = done["model"], done.get("control_model") or self.control_model
            write_report(self.output, self.rows, self.planned)

    # -- 0: the start model -------------------------------------------------------------
    def _start(self) -> dict[str, Any]:
        phase = self.phase(0, "start")
        if phase.done is not None:
            return phase.done
        metrics = self._evaluate(phase, self.model, phase.folder)
        row = {"stage": "start", "model": self.model, "eval": metrics, "seconds": dict(phase.timing.seconds)}
        if self.cfg.stage.control:
            row["control_eval"] = metrics  # the control starts from the same model
        return phase.finish(row)

    # -- 1: assisted-manual ---------------------------------------------------------------
    def _assisted_manual(self, phase: Phase) -> dict[str, Any]:
        pool = self.pools["assisted_manual"]
        dataset, truth = self.datasets[-1], Truth(pool["truth"])
        self._annotate(phase, pool["images"], dataset, truth)
        return {"stage": "assisted_manual", **annotation_figures(dataset, truth)}

    # -- 2: semi-automatic ----------------------------------------------------------------
    def _semi_auto(self, phase: Phase) -> dict[str, Any]:
        pool = self.pools["semi_auto"]
        queue, dataset = storage.join(phase.folder, "queue"), self.datasets[-1]
        truth = Truth(pool["truth"])
        t0 = time.perf_counter()
        filled = semi_auto.run(compose.derive(self.cfg, "semi_auto", input=pool["images"], output=queue,
                                              **{"model.checkpoint": self.model, "stage.masks": self.datasets[:-1]}))
        if filled["units_committed"]:  # the detector's training apart from the pre-filling pass
            phase.timing.add("detector", time.perf_counter() - t0 - filled["wall_s"])
            phase.timing.add("semi_auto", filled["wall_s"])
        sources = {r["key"]: r["source"] for r in manifest.read_table(queue).to_pylist()}  # the pool's files
        self._annotate(phase, queue, dataset, truth, sources)
        decisions = storage.join(phase.folder, "decisions.parquet")
        counts = write_decisions(queue, dataset, decisions)
        trained = self._train_verifier(phase, decisions)
        prefill = automatic_figures(queue, truth, sources)
        detector = filled["detector"]
        return {"stage": "semi_auto", **annotation_figures(dataset, truth, sources),
                "prefilled": prefill["masks"], "prefilled_per_image": prefill["masks_per_image"],
                "automatic_recall_0.5": prefill["recall_0.5"], "automatic_precision_0.5": prefill["precision_0.5"],
                "decisions": counts, "verifier": trained,
                "detector": {"version": detector["version"], "steps": detector["steps"],
                             "box_ap": detector["eval"]["box_ap"], "box_ap50": detector["eval"]["box_ap50"]}}

    def _train_verifier(self, phase: Phase, decisions: str) -> dict[str, Any]:
        """The verifier learnt from ``decisions`` (plus synthetic masks if
        ``stage.verifier.synthetic.enabled``): its validation figures, or why there is
        none (e.g. no mask was accepted), in which case stage 3 runs without one."""
        summary = registry.read_summary(self.verifier_dir)
        if summary is None:
            settings = compose.derive(self.cfg, "verifier", output=self.output, **{
                "model.checkpoint": self.model, "stage.version": VERIFIER_VERSION, "stage.decisions": [decisions]})
            try:
                summary = phase.timed("verifier", lambda: verifier.run(settings))
            except ValueError as error:  # too few decisions, or all of one kind
                log.warning("no verifier for stage 3: %s", error)
                return {"skipped": str(error)}
        return {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}

    @property
    def verifier_dir(self) -> str:
        return registry.version_dir(self.output, VERIFIER_VERSION, "verifier")

    # -- 3: fully automatic ---------------------------------------------------------------
    def _fully_auto(self, phase: Phase) -> dict[str, Any]:
        pool = self.pools["fully_auto"]
        dataset = self.datasets[-1]
        values = {"model.checkpoint": self.model}
        filtered = bool(self.cfg.stage.use_verifier) and registry.read_summary(self.verifier_dir) is not None
        if filtered:
            values["amg.verifier"] = self.verifier_dir
        t0 = time.perf_counter()
        annotated = fully_auto.run(compose.derive(self.cfg, "fully_auto", input=pool["images"], output=dataset,
                                                  **values))
        if annotated["units_committed"]:
            phase.timing.add("fully_auto", time.perf_counter() - t0)
        auto = automatic_figures(dataset, Truth(pool["truth"]))
        return {"stage": "fully_auto", "images": auto["images"], "masks": auto["masks"],
                "masks_per_image": auto["masks_per_image"], "label_miou": auto["miou"],
                "automatic_recall_0.5": auto["recall_0.5"], "automatic_precision_0.5": auto["precision_0.5"],
                "verifier": self.verifier_dir if filtered else None}

    # -- shared -----------------------------------------------------------------------------
    def _annotate(self, phase: Phase, images: str, dataset: str, truth: Truth,
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
            phase.timing.add("annotate", time.perf_counter() - t0)
            finished = tool.session.finished()
        finally:
            tool.stop()
        if self.budget is not None:
            self.budget -= saved
        if not finished:
            raise Stopped(f"annotation of {dataset} stopped after {saved} image(s) (stage.stop_after_images)")

    def _train_and_evaluate(self, n: int, phase: Phase) -> dict[str, Any]:
        """Model n from model n-1 on the datasets so far; the control model n from control
        n-1 on the same images' true masks; both evaluated on held-out scenes."""
        name = ENGINE_STAGES[n - 1]
        model, steps = self._retrain(phase, f"engine_{n}", self.model, shards=list(self.datasets))
        row = {"model": model, "from_model": self.model, "training_steps": steps,
               "eval": self._evaluate(phase, model, phase.folder)}
        if self.cfg.stage.control:
            upto = self.pools[name]
            control, _ = self._retrain(phase, f"control_{n}", self.control_model,
                                       coco={"annotations": upto["upto"], "image_dir": upto["image_dir"]})
            row.update(control_model=control,
                       control_eval=self._evaluate(phase, control, storage.join(phase.folder, "control")))
        return row

    def _retrain(self, phase: Phase, version: str, init: str, shards: list[str] | None = None,
                 coco: dict[str, str] | None = None) -> tuple[str, int]:
        steps = int(self.cfg.stage.retrain.steps)
        if not is_trained(self.output, version, steps):
            values: dict[str, Any] = {"stage.version": version, "stage.init_checkpoint": init,
                                      "stage.data.shards": shards}
            if coco is not None:
                values.update({"stage.data.coco.annotations": coco["annotations"],
                               "stage.data.coco.image_dir": coco["image_dir"]})
            settings = compose.derive(self.cfg, "retrain", output=self.output, **values)
            trained = phase.timed("retrain", lambda: retrain.run(settings))
            if not trained["complete"]:
                raise Stopped(f"retrain {version} stopped at step {trained['steps']} of {steps} (stop_at_step)")
        return registry.model_file(self.output, version), steps

    def _evaluate(self, phase: Phase, model: str, out_dir: str) -> dict[str, Any]:
        def evaluate(model: str, out_dir: str) -> dict[str, Any]:
            stage = compose.derive(self.cfg, "eval").stage
            return evaluate_model(self.cfg.stage.retrain.arch, model, stage, self.cfg.amg, out_dir,
                                  device=self.cfg.model.device)

        return phase.evaluated(model, out_dir, evaluate)
