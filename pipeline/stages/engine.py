"""Stage ``engine``: SAM's data engine end to end, its three stages with the model
retrained after every round, annotated by the simulated annotator on a target domain.

    python -m pipeline.run +stage=engine output=DIR [stage.scenes.domain=microscopy] [stage.init_checkpoint=<model>]

0. start: the start model (``stage.init_checkpoint``, else ``model.checkpoint``) is
   evaluated on the held-out set.
1. assisted_manual, in ``stage.rounds.assisted_manual`` rounds: the annotation tool
   (``+stage=annotate``: the real server, the exported decoder) serves the round's part
   of pool 1; the simulated annotator clicks every object, then corrects what remains
   with brush strokes, until IoU 0.9 (or its limits).
2. semi_auto, in rounds: ``+stage=semi_auto`` trains a box detector on the datasets so
   far and pre-fills the round's part of pool 2 with the model's confident box-prompted
   masks; the annotator accepts those that match an object, deletes the others and draws
   the missing ones. The decisions of the stage's rounds train the mask verifier
   (``+stage=verifier``).
3. fully_auto: ``+stage=fully_auto`` with the model and the verifier over pool 3, no person.
After every round the model in use is retrained on every dataset so far (``retrain``,
``stage.retrain.tune``) and gated on the held-out set: a worse model is registered but
not promoted, and the engine goes on with the one it had. control: the same retrains
from the same start model on the same images' true masks.

The annotator sees the truth only through its clicks' answers (``pipeline.annotate.
simulated``). Every figure is computed from committed data (a dataset's records carry
each mask's provenance, clicks, strokes and seconds; ``pipeline.compose.engine_report``),
so a resumed run reports what a straight run would. Layout of DIR:

    scenes/<pool>/, scenes/<pool>.json, scenes/held_out/    the pools and the held-out set, with their truth
    stages/<n>_<stage>/round_<k>/{dataset/, queue/, decisions.parquet, eval.json, timing.json, done.json}
    models/engine_<n>_<k>/, models/control_<n>_<k>/, models/verifier_engine/   registered models
    engine.json                    the start model and settings (a rerun must match)
    engine_report.{md,json,png}    a row per round; rewritten after every round

Rerunning the same command skips finished rounds (``done.json`` is written last) and
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
from pipeline.truth.pools import HELD_OUT, Truth, write_pools

log = logging.getLogger(__name__)

ENGINE_STAGES = ("assisted_manual", "semi_auto", "fully_auto")  # SAM's data engine; not pipeline stages
SCENES_DIR = "scenes"
STAGES_DIR = "stages"
START_FILE = "engine.json"
VERIFIER_VERSION = "engine"


class Stopped(Exception):
    """This invocation's budget (``stage.stop_after_images``, ``stop_at_step``) ran out."""


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs the rounds not finished yet; returns summary (the report's figures, a dict per
    finished round), complete, model (the model in use at the end) and report (the
    markdown report's path; engine_report.json beside it has every round's full record)."""
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
    pools = write_pools(storage.join(output, SCENES_DIR), pool_plan(stage), _pool_source(stage.scenes),
                        int(stage.scenes.held_out))

    started = connect(cfg.cluster)  # one Ray session for every sub-stage
    engine = _Engine(cfg, output, pools, start_model)
    try:
        engine.run()
    except Stopped as stop:
        log.info("%s; rerun the same command to go on", stop)
    finally:
        if started:
            ray.shutdown()
    table = write_report(output, engine.rows, engine.planned, cost=_cost(stage))
    print(table, flush=True)
    return {"summary": report_rows(engine.rows), "complete": len(engine.rows) == engine.planned,
            "model": engine.model, "report": storage.join(output, REPORT + ".md")}


def engine_settings(cfg: DictConfig) -> dict[str, Any]:
    """What the engine's results depend on besides the start model, as dotted keys."""
    return compose.settings({"model.arch": cfg.model.arch, "amg": OmegaConf.to_container(cfg.amg, resolve=True),
                             "stage": OmegaConf.to_container(cfg.stage, resolve=True)},
                            per_run=("stage.init_checkpoint",))


def rounds_of(stage: DictConfig, name: str) -> int:
    return max(1, int(stage.rounds[name]))


def pool_name(name: str, k: int) -> str:
    return f"{name}_{k}"


def pool_plan(stage: DictConfig) -> list[tuple[str, int]]:
    """(pool name, images) of every round: each stage's pool split as evenly as it goes."""
    plan = []
    for name in ENGINE_STAGES:
        count, rounds = int(stage.scenes[name]), rounds_of(stage, name)
        if count < rounds:
            raise ValueError(f"stage.scenes.{name}={count} images cannot be split into stage.rounds.{name}={rounds}")
        plan += [(pool_name(name, k + 1), count // rounds + (k < count % rounds)) for k in range(rounds)]
    return plan


def _pool_source(scenes: DictConfig) -> dict[str, Any]:
    return {"domain": str(scenes.domain), "seed_start": int(scenes.seed_start), "size": list(scenes.size),
            "coco": OmegaConf.to_container(scenes.coco, resolve=True)}


def _cost(stage: DictConfig) -> dict[str, float]:
    return {k: float(v) for k, v in stage.annotator.cost.items()}


class _Engine:
    def __init__(self, cfg: DictConfig, output: str, pools: dict[str, dict[str, str]], start_model: str):
        self.cfg, self.output, self.pools = cfg, output, pools
        self.model = start_model
        self.control_model = start_model
        self.rows: list[dict[str, Any]] = []
        self.planned = 1 + sum(rounds_of(cfg.stage, name) for name in ENGINE_STAGES)
        self.budget = cfg.stage.stop_after_images  # images the annotator may still save in this invocation
        self.datasets: list[str] = []
        self.cost = _cost(cfg.stage)
        self.evals: dict[str, dict[str, Any]] = {}  # held-out figures by model, from the rows so far

    def phase(self, n: int, name: str, k: int | None = None) -> Phase:
        folder = storage.join(self.output, STAGES_DIR, f"{n}_{name}")
        return Phase(folder if k is None else storage.join(folder, f"round_{k}"))

    def _add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.model, self.control_model = row["model"], row.get("control_model") or self.control_model
        self.evals[row["model"]] = row["eval"]
        if row.get("control_eval") is not None:
            self.evals[self.control_model] = row["control_eval"]

    def run(self) -> None:
        self._add(self._start())
        for n, name in enumerate(ENGINE_STAGES, 1):
            rounds = rounds_of(self.cfg.stage, name)
            for k in range(1, rounds + 1):
                phase = self.phase(n, name, k)
                self.datasets.append(storage.join(phase.folder, "dataset"))
                done = phase.done
                if done is None:
                    log.info("engine stage %d (%s), round %d of %d, with %s", n, name, k, rounds, self.model)
                    row = {"stage": name, "round": k, **getattr(self, f"_{name}")(n, phase, k, k == rounds)}
                    row.update(self._train_and_evaluate(n, k, phase))
                    row["seconds"] = dict(phase.timing.seconds)
                    done = phase.finish(row)
                else:
                    log.info("engine stage %d (%s) round %d already finished: %s", n, name, k, done["model"])
                self._add(done)
                write_report(self.output, self.rows, self.planned, cost=self.cost)

    # -- 0: the start model -------------------------------------------------------------
    def _start(self) -> dict[str, Any]:
        phase = self.phase(0, "start")
        if phase.done is not None:
            return phase.done
        metrics = self._evaluate(phase, self.model, phase.folder)
        row = {"stage": "start", "round": 0, "model": self.model, "eval": metrics,
               "seconds": dict(phase.timing.seconds)}
        if self.cfg.stage.control:
            row["control_eval"] = metrics  # the control starts from the same model
        return phase.finish(row)

    # -- 1: assisted-manual ---------------------------------------------------------------
    def _assisted_manual(self, n: int, phase: Phase, k: int, last: bool) -> dict[str, Any]:
        pool = self.pools[pool_name("assisted_manual", k)]
        dataset, truth = self.datasets[-1], Truth(pool["truth"])
        self._annotate(phase, pool["images"], dataset, truth)
        return annotation_figures(dataset, truth, cost=self.cost)

    # -- 2: semi-automatic ----------------------------------------------------------------
    def _semi_auto(self, n: int, phase: Phase, k: int, last: bool) -> dict[str, Any]:
        pool = self.pools[pool_name("semi_auto", k)]
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
        counts = write_decisions(queue, dataset, storage.join(phase.folder, "decisions.parquet"))
        prefill = automatic_figures(queue, truth, sources)
        detector = filled["detector"]
        row = {**annotation_figures(dataset, truth, sources, cost=self.cost),
               "prefilled": prefill["masks"], "prefilled_per_image": prefill["masks_per_image"],
               "automatic_recall_0.5": prefill["recall_0.5"], "automatic_precision_0.5": prefill["precision_0.5"],
               "decisions": counts,
               "detector": {"version": detector["version"], "steps": detector["steps"],
                            "box_ap": detector["eval"]["box_ap"], "box_ap50": detector["eval"]["box_ap50"]}}
        if last:  # the verifier learns from every round's decisions
            decisions = [storage.join(self.phase(n, "semi_auto", r).folder, "decisions.parquet")
                         for r in range(1, k + 1)]
            row["verifier"] = self._train_verifier(phase, decisions)
        return row

    def _train_verifier(self, phase: Phase, decisions: list[str]) -> dict[str, Any]:
        """The verifier learnt from ``decisions`` (plus synthetic masks if
        ``stage.verifier.synthetic.enabled``): its validation figures, or why there is
        none (e.g. no mask was accepted), in which case stage 3 runs without one."""
        summary = registry.read_summary(self.verifier_dir)
        if summary is None:
            settings = compose.derive(self.cfg, "verifier", output=self.output, **{
                "model.checkpoint": self.model, "stage.version": VERIFIER_VERSION, "stage.decisions": decisions})
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
    def _fully_auto(self, n: int, phase: Phase, k: int, last: bool) -> dict[str, Any]:
        pool = self.pools[pool_name("fully_auto", k)]
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
        return {"images": auto["images"], "masks": auto["masks"], "masks_per_image": auto["masks_per_image"],
                "label_miou": auto["miou"], "automatic_recall_0.5": auto["recall_0.5"],
                "automatic_precision_0.5": auto["precision_0.5"], "verifier": self.verifier_dir if filtered else None}

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
                                        target_iou=float(opts.target_iou), max_clicks=int(opts.max_clicks),
                                        max_strokes=int(opts.max_strokes), stall_clicks=int(opts.stall_clicks))
            saved = person.run(self.budget)["images"]
            phase.timing.add("annotate", time.perf_counter() - t0)
            finished = tool.session.finished()
        finally:
            tool.stop()
        if self.budget is not None:
            self.budget -= saved
        if not finished:
            raise Stopped(f"annotation of {dataset} stopped after {saved} image(s) (stage.stop_after_images)")

    def _train_and_evaluate(self, n: int, k: int, phase: Phase) -> dict[str, Any]:
        """The candidate model from the model in use on the datasets so far, gated on the
        held-out set; the control likewise from the control model on the same images' true
        masks. The model in use afterwards is the candidate when promoted, else the old one."""
        upto = self.pools[pool_name(ENGINE_STAGES[n - 1], k)]
        trained = self._retrain(phase, f"engine_{n}_{k}", self.model, shards=list(self.datasets))
        promoted = bool(trained.get("promoted", True))
        model = trained["model"] if promoted else self.model
        row = {"model": model, "candidate": trained["model"], "promoted": promoted, "gate": trained.get("gate"),
               "from_model": self.model, "training_steps": trained["steps"],
               "eval": self._evaluate(phase, model, phase.folder)}
        if self.cfg.stage.control:
            control = self._retrain(phase, f"control_{n}_{k}", self.control_model,
                                    coco={"annotations": upto["upto"], "image_dir": upto["image_dir"]})
            kept = control["model"] if control.get("promoted", True) else self.control_model
            row.update(control_model=kept, control_promoted=bool(control.get("promoted", True)),
                       control_eval=self._evaluate(phase, kept, storage.join(phase.folder, "control")))
        return row

    def _retrain(self, phase: Phase, version: str, init: str, shards: list[str] | None = None,
                 coco: dict[str, str] | None = None) -> dict[str, Any]:
        held_out = self.pools[HELD_OUT]
        values: dict[str, Any] = {
            "stage.version": version, "stage.init_checkpoint": init, "stage.data.shards": shards,
            "stage.gate.coco.annotations": held_out["truth"], "stage.gate.coco.image_dir": held_out["image_dir"],
            "stage.gate.num_images": int(self.cfg.stage.scenes.held_out)}
        if coco is not None:
            values.update({"stage.data.coco.annotations": coco["annotations"],
                           "stage.data.coco.image_dir": coco["image_dir"]})
        settings = compose.derive(self.cfg, "retrain", output=self.output, **values)
        steps = int(settings.stage.steps)
        if not is_trained(self.output, version, steps):
            trained = phase.timed("retrain", lambda: retrain.run(settings))
            if not trained["complete"]:
                raise Stopped(f"retrain {version} stopped at step {trained['steps']} of {steps} (stop_at_step)")
        return registry.read_summary(registry.version_dir(self.output, version))

    def _evaluate(self, phase: Phase, model: str, out_dir: str) -> dict[str, Any]:
        """``model``'s figures on the held-out set: those of an earlier row (a model kept
        by the gate), else measured now and kept in ``out_dir``."""
        if model in self.evals:
            return self.evals[model]
        held_out = self.pools[HELD_OUT]

        def evaluate(model: str, out_dir: str) -> dict[str, Any]:
            stage = compose.derive(self.cfg, "eval", **{
                "stage.source": "coco", "stage.coco.annotations": held_out["truth"],
                "stage.coco.image_dir": held_out["image_dir"], "stage.num_images": int(self.cfg.stage.scenes.held_out),
            }).stage
            return evaluate_model(self.cfg.stage.retrain.arch, model, stage, self.cfg.amg, out_dir,
                                  device=self.cfg.model.device)

        return phase.evaluated(model, out_dir, evaluate)
