"""What made a dataset: its recorded configuration, model identity and code version.

A dataset is made by one model and one configuration: the first run records them in
``<out>/config.yaml``; every later run on the output compares the fields that define the
dataset (the stage names them) and refuses to go on when they differ.
"""
from __future__ import annotations

import json
import logging
import subprocess
from functools import cache
from typing import Any, Mapping, Sequence

import yaml

from pipeline import storage
from pipeline.config.compare import differences as changed
from pipeline.config.compare import flatten
from pipeline.paths import PROJECT_ROOT

log = logging.getLogger(__name__)


@cache
def code_version() -> str:
    """The commit the code runs from (``-dirty`` with local edits), else the package
    version: recorded with every output so a dataset names the code that made it."""
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "sam-data-engine " + version("sam-data-engine")
        except PackageNotFoundError:
            return "unknown"


CONFIG_FILE = "config.yaml"
HISTORY_DIR = "config_history"


class ConfigMismatch(ValueError):
    """A resumed run whose model or dataset-defining settings differ from the output's."""


def identity(config: Mapping[str, Any], fields: Sequence[str], ignore: Sequence[str] = ()) -> dict[str, Any]:
    """The values of dotted ``fields`` of a plain config, without the ``ignore``d sub-keys."""
    values = {}
    for name in fields:
        value = _select(config, name)
        if isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if f"{name}.{k}" not in ignore}
        values[name] = value
    return values


def record_or_check(
    output: str,
    config: dict[str, Any],
    fields: Sequence[str],
    ignore: Sequence[str] = (),
    allow_change: bool = False,
) -> None:
    """Records ``config`` as the output's ``config.yaml`` at its first run; on a later run,
    refuses one whose ``fields`` differ, so one dataset is made by one model and one
    configuration.

    ``config``: the plain, resolved configuration, with ``model_sha256`` (the checkpoint's
    identity) set. ``allow_change``: record the new configuration beside the first one
    (``config_history/``) and go on; the manifest's model_sha256 column tells the two
    apart. config.yaml itself is never overwritten.
    """
    fs, root = storage.filesystem(output)
    path = storage.join(root, CONFIG_FILE)
    config = {**config, "code_version": code_version()}
    if not fs.exists(path):
        _write_yaml(fs, path, config)
        return
    # Read without resolvers: a recorded value must never run anything (${oc.env:...}).
    saved = yaml.safe_load(fs.cat_file(path)) or {}
    before, now = flatten(identity(saved, fields, ignore)), flatten(identity(config, fields, ignore))
    differences = [f"  {name}: {_show(then)} (recorded) vs {_show(current)} (this run)"
                   for name, then, current in changed(before, now)]
    if not differences:
        return
    if not allow_change:
        raise ConfigMismatch(
            f"{output} was made with other settings; resuming would mix two configurations in "
            "one dataset:\n" + "\n".join(differences) + "\nWrite to a new output=, or pass "
            "stage.allow_config_change=true to go on and record both (config_history/)."
        )
    history = storage.join(root, HISTORY_DIR)
    count = len(fs.ls(history, detail=False)) if fs.isdir(history) else 0
    _write_yaml(fs, storage.join(history, f"{count + 1:06d}.yaml"), config)
    log.warning("%s: settings changed (allowed by stage.allow_config_change):\n%s", output, "\n".join(differences))


def _select(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


def _write_yaml(fs, path: str, config: Mapping[str, Any]) -> None:
    with storage.atomic_open(fs, path) as f:
        f.write(yaml.safe_dump(dict(config), sort_keys=False).encode("utf-8"))
