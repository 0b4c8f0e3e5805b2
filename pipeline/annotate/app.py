"""Builds the annotation tool from the stage's configuration: the queue, the model, the
exported decoder, the session and the web app (what the stage serves and the latency
benchmark drives)."""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.annotate.embeddings import exported_decoder, feature_shapes
from pipeline.annotate.queue import load_queue
from pipeline.annotate.server import BackgroundServer, create_app
from pipeline.annotate.session import ModelInfo, Session
from pipeline.annotate.store import WORK_DIR
from pipeline.dataset.lease import Lease
from pipeline.dataset.listing import read_categories, write_categories
from pipeline.dataset.provenance import ConfigMismatch, code_version
from pipeline.models.loader import ModelSpec, load_sam, model_identity
from pipeline.paths import is_url


@dataclass
class Tool:
    """A built tool: ``start()`` serves it and returns the URL to open (token included)."""

    session: Session
    app: object
    token: str
    host: str
    port: int
    lease: Lease
    server: BackgroundServer | None = None

    def start(self) -> str:
        self.server = BackgroundServer(self.app, self.host, self.port).start()
        return f"{self.server.url}/?token={self.token}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.session.close()
        self.lease.release()


def build(cfg: DictConfig) -> Tool:
    """The tool for ``cfg`` (the root config with ``stage=annotate``), holding the
    output's lease (one writer per output) until ``stop``; records the plan and
    ``config.yaml`` (without the token) and exports the decoder if needed."""
    stage = cfg.stage
    output, source = str(cfg.output), str(cfg.input)
    lease = Lease(output, ttl_s=float(stage.output_lease_ttl_s))
    lease.acquire()
    try:
        return _build(cfg, stage, output, source, lease)
    except BaseException:
        lease.release()
        raise


def _build(cfg: DictConfig, stage: DictConfig, output: str, source: str, lease: Lease) -> Tool:
    queue = load_queue(source, output, int(stage.images_per_unit), prefill=bool(stage.prefill))
    identity = model_identity(cfg.model.checkpoint)
    sam = load_sam(ModelSpec.of(cfg.model, sha256=identity))
    _save_config(output, cfg, sam.family)
    categories = _categories(stage.labels, source, output)
    if stage.decoder_cache:
        cache = str(stage.decoder_cache)
    elif is_url(output):
        cache = os.path.join(os.path.expanduser("~"), ".cache", "sam-data-engine", "decoder")
    else:
        cache = os.path.join(output, WORK_DIR, "decoder")
    decoder = exported_decoder(sam, cfg.model.arch, identity, cache)
    model = ModelInfo(cfg.model.arch, identity, sam.img_size, feature_shapes(sam), decoder, family=sam.family)
    session = Session(queue, output, sam, model, OmegaConf.to_container(stage.image, resolve=True),
                      lease_s=float(stage.lease_s), lookahead=int(stage.lookahead),
                      cache_size=int(stage.embedding_cache), check_output_lease=lease.confirm,
                      categories=categories)
    token = str(stage.token) if stage.token else secrets.token_urlsafe(24)
    app = create_app(session, token, annotator=str(stage.annotator), max_body_bytes=int(stage.max_body_mb * 1e6),
                     threads=int(stage.browser_threads))
    return Tool(session, app, token, str(stage.host), int(stage.port), lease)


def _categories(labels: Any, source: str, output: str) -> list[dict[str, Any]]:
    """The session's label set as COCO categories: ``stage.labels`` (ids 1, 2, ... in
    order), else the input dataset's categories, else the output's own (a labelled output
    reopened), else none (class-free); committed as the output's ``categories.json``,
    refusing an output labelled with another set, and labels that would rename the input
    dataset's."""
    recorded = read_categories(output)
    given = read_categories(source)  # an input dataset's: its masks open with these ids
    if labels:
        names = [str(n) for n in labels]
        if len(set(names)) != len(names) or any(not n.strip() for n in names):
            raise ValueError(f"stage.labels={names}: label names must be distinct and not empty")
        categories = [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(names)]
        if given and [(c["id"], c["name"]) for c in given] != [(c["id"], c["name"]) for c in categories]:
            raise ConfigMismatch(f"the input's masks are labelled {[(c['id'], c['name']) for c in given]}, "
                                 f"stage.labels would make {[(c['id'], c['name']) for c in categories]}: leave "
                                 "stage.labels out to annotate with the input's labels")
    else:
        categories = given or recorded or []  # a labelled output stays labelled when reopened
    if not categories:
        return []
    if recorded is not None and recorded != categories:
        raise ConfigMismatch(f"{output} is labelled with {[c['name'] for c in recorded]}, this session with "
                             f"{[c['name'] for c in categories]}: one dataset, one label set. Use its labels "
                             "(stage.labels=...), or a new output=")
    if recorded is None:
        write_categories(output, categories)
    return categories


def _save_config(output: str, cfg: DictConfig, family: str) -> None:
    """Records the session's settings (the latest session's), refusing an output whose
    masks another model family made: SAM 1 and SAM 2 answers never share a dataset."""
    fs, root = storage.filesystem(output)
    path = storage.join(root, "config.yaml")
    if fs.exists(path):
        recorded = (yaml.safe_load(fs.cat_file(path)) or {}).get("model_family", "sam")
        if recorded != family:
            raise ConfigMismatch(
                f"{output} was annotated with a {recorded} model (model_family: {recorded!r} recorded vs {family!r} "
                f"this session): one dataset holds one model family's masks. Use its model, or a new output=")
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["stage"].pop("token", None)  # a secret: never written to the dataset
    saved["code_version"] = code_version()
    saved["model_family"] = family
    with storage.atomic_open(fs, storage.join(root, "config.yaml")) as f:
        f.write(OmegaConf.to_yaml(saved).encode("utf-8"))
