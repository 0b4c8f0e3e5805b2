"""The assisted-manual stage: people click, the model answers in the browser.

    python -m pipeline.run +stage=annotate input=<images | dataset> output=<dataset>

Starts the annotation tool (``pipeline.annotate``) and prints the URL to open; runs
until interrupted (Ctrl-C), or with ``stage.exit_when_done`` until every unit is
committed. Rerunning on the same output resumes: saved masks, done marks and committed
units are kept.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from omegaconf import DictConfig

from pipeline.annotate.app import build

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Serves the tool until done or interrupted; returns the session's progress
    (images, done, failed, units, units_committed)."""
    tool = build(cfg)
    url = tool.start()
    progress = tool.session.progress()
    print(f"annotate: {progress['images']} images in {progress['units']} units "
          f"({progress['units_committed']} committed); open {url}", flush=True)
    try:
        while not (cfg.stage.exit_when_done and tool.session.finished()):
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("interrupted: every saved mask is kept; rerun the same command to go on")
    finally:
        tool.stop()
    return tool.session.progress()
