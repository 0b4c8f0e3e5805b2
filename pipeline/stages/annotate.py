"""The assisted-manual stage: people click, the model answers in the browser.

    python -m pipeline.run +stage=annotate input=<images | dataset> output=<dataset>

Starts the annotation server (``pipeline.annotate``) and prints the URL to open; runs
until interrupted (Ctrl-C), or with ``stage.exit_when_done`` until every unit is
committed. Rerunning on the same output resumes: saved masks, done marks and committed
units are kept.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import storage
from pipeline.annotate.embeddings import exported_decoder, load_sam
from pipeline.annotate.queue import plan_queue
from pipeline.annotate.server import BackgroundServer, create_app
from pipeline.annotate.session import ModelInfo, Session
from pipeline.annotate.store import WORK_DIR
from pipeline.model import model_identity
from pipeline.paths import is_url, user_path
from pipeline.provenance import code_version

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Serves the tool until done or interrupted; returns the session's progress
    (images, done, failed, units, units_committed) and the URL it served."""
    stage = cfg.stage
    output, source = user_path(str(cfg.output)), user_path(str(cfg.input))
    plan = plan_queue(source, output, int(stage.images_per_unit), prefill=bool(stage.prefill))
    checkpoint = user_path(cfg.model.checkpoint) if cfg.model.checkpoint else None
    identity = model_identity(checkpoint)
    sam = load_sam(cfg.model.arch, checkpoint, cfg.model.get("device", "auto"))
    cache = user_path(stage.decoder_cache) if stage.decoder_cache else (
        os.path.join(os.path.expanduser("~"), ".cache", "sam-data-engine", "decoder") if is_url(output)
        else os.path.join(output, WORK_DIR, "decoder"))
    decoder = exported_decoder(sam, cfg.model.arch, identity, cache)
    _save_config(output, cfg)
    h, w = sam.prompt_encoder.image_embedding_size
    model = ModelInfo(cfg.model.arch, identity, sam.image_encoder.img_size, (1, sam.prompt_encoder.embed_dim, h, w), decoder)
    session = Session(plan, output, sam, model, OmegaConf.to_container(stage.image, resolve=True),
                      lease_s=float(stage.lease_s), lookahead=int(stage.lookahead), cache_size=int(stage.embedding_cache))
    token = str(stage.token) if stage.token else secrets.token_urlsafe(24)
    app = create_app(session, token, annotator=str(stage.annotator), max_body_bytes=int(stage.max_body_mb * 1e6),
                     threads=int(stage.browser_threads))
    server = BackgroundServer(app, str(stage.host), int(stage.port)).start()
    progress = session.progress()
    print(f"annotate: {progress['images']} images in {progress['units']} units "
          f"({progress['units_committed']} committed); open {server.url}/?token={token}", flush=True)
    try:
        while not (stage.exit_when_done and session.finished()):
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("interrupted: every saved mask is kept; rerun the same command to go on")
    finally:
        server.stop()
        session.close()
    return {**session.progress(), "url": server.url}


def _save_config(output: str, cfg: DictConfig) -> None:
    fs, root = storage.filesystem(output)
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["stage"].pop("token", None)  # a secret: never written to the dataset
    saved["code_version"] = code_version()
    with storage.atomic_open(fs, storage.join(root, "config.yaml")) as f:
        f.write(OmegaConf.to_yaml(saved).encode("utf-8"))
