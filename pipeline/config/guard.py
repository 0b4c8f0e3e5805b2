"""Configuration cannot execute code, nor come from outside ``conf/``.

Hydra, and the libraries it hands configuration to, import and call what a config
names: ``_target_`` nodes (Hydra instantiates ``hydra.callbacks``, the launcher and the
sweeper before the task function runs), the logging configs (``class``, ``()`` and
``ext://`` in ``hydra.job_logging`` / ``hydra.hydra_logging`` go to
``logging.config.dictConfig``), Ray's ``worker_process_setup_hook``,
``hydra.job.env_set`` (``LD_PRELOAD`` or ``PYTHONPATH`` for every process started
later), ``--experimental-rerun`` (a pickle), and config groups loaded from anywhere
(``+stage=../../x``, ``hydra.searchpath``, ``--config-dir``). Multirun is refused too:
each job of a sweep composes a config of its own that no check here would see.

``check_command_line`` composes the configuration a command line would run, as Hydra
will, and refuses it before Hydra runs (``pipeline/run.py``, ``jobs/submit.py``);
``check_config`` checks a composed configuration (``run_stage`` calls it, so configs
composed in Python are checked too). Every callable a config may name is listed here.
"""
from __future__ import annotations

import os
import posixpath
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.paths import PROJECT_ROOT

CONF_DIR = PROJECT_ROOT / "conf"

# Hydra's own plugins; nothing in conf/ instantiates anything.
ALLOWED_TARGETS = frozenset({
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
})
ALLOWED_SETUP_HOOKS = frozenset({"pipeline.execution.cluster.quiet_local_workers"})
# What Hydra's shipped logging configs use.
ALLOWED_LOGGING_CLASSES = frozenset({"logging.StreamHandler", "logging.FileHandler",
                                     "logging.NullHandler", "logging.Formatter"})
ALLOWED_LOGGING_EXTERNALS = frozenset({"ext://sys.stdout", "ext://sys.stderr"})
# Resolvers that build a config from a string: a node made by them is never seen here.
CONTAINER_RESOLVERS = ("oc.create", "oc.decode")
CONFIG_PROVIDERS = frozenset({"hydra", "main", "schema"})  # Hydra's defaults, conf/, dataclasses

REFUSED_FLAGS = {
    "experimental_rerun": "--experimental-rerun loads a pickle",
    "config_dir": "--config-dir adds configs from outside conf/",
    "config_path": "--config-path reads the configuration from outside conf/",
    "config_name": "--config-name: the entry point has one primary config, conf/config.yaml",
    "multirun": "--multirun: run one configuration per command (loop in the shell to sweep)",
}


class ConfigRefused(ValueError):
    """A configuration that names code to run or configs from outside ``conf/``."""


def check_config(cfg: DictConfig) -> None:
    """Raises ``ConfigRefused`` listing every problem of ``cfg`` (a composed config, with
    or without its ``hydra`` node)."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigRefused("configuration refused:\n  " + "\n  ".join(problems))


def config_problems(cfg: DictConfig) -> list[str]:
    """Every reason to refuse ``cfg``, one line each, naming the config key."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    problems = []
    for path, key, value in _walk(tree, ""):
        logging_config = path.startswith(("hydra.job_logging.", "hydra.hydra_logging."))
        if key == "_target_" and value not in ALLOWED_TARGETS:
            problems.append(f"{path}: _target_ {value!r} is not allowed (configs may not name "
                            f"code to instantiate; allowed: {', '.join(sorted(ALLOWED_TARGETS))})")
        elif key == "worker_process_setup_hook" and value not in ALLOWED_SETUP_HOOKS:
            problems.append(f"{path}: Ray setup hook {value!r} is not allowed")
        elif logging_config and key == "()":
            problems.append(f"{path}: a logging factory '()' is not allowed")
        elif logging_config and key == "class" and value not in ALLOWED_LOGGING_CLASSES:
            problems.append(f"{path}: logging class {value!r} is not allowed "
                            f"(allowed: {', '.join(sorted(ALLOWED_LOGGING_CLASSES))})")
        elif logging_config and isinstance(value, str) and value.startswith("ext://") \
                and value not in ALLOWED_LOGGING_EXTERNALS:
            problems.append(f"{path}: logging external {value!r} imports a module; not allowed")
        elif logging_config and key == "filename" and not _inside_run_dir(value):
            problems.append(f"{path}: log file {value!r} is outside the run folder; logs stay in it "
                            f"({LOG_FILE_DEFAULT})")
        if isinstance(value, str) and "${" in value and any(r in value for r in CONTAINER_RESOLVERS):
            problems.append(f"{path}: {value!r} builds a config from a string "
                            f"({' / '.join(CONTAINER_RESOLVERS)}); not allowed")
    hydra = tree.get("hydra") if isinstance(tree, dict) else None
    if isinstance(hydra, dict):
        problems += _hydra_problems(hydra)
    return problems


LOG_FILE_DEFAULT = "${hydra.runtime.output_dir}/${hydra.job.name}.log"


def _inside_run_dir(value: Any) -> bool:
    """Whether a logging handler's file name stays in the run folder: a name under
    ``${hydra.runtime.output_dir}/`` (Hydra's default) without a ``..`` component."""
    prefix = "${hydra.runtime.output_dir}/"
    return (isinstance(value, str) and value.startswith(prefix)
            and ".." not in value[len(prefix):].replace("\\", "/").split("/"))


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, key, value) of every entry of a plain container, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        here = f"{path}.{key}" if path else str(key)
        yield here, key, value
        yield from _walk(value, here)


def _hydra_problems(hydra: dict) -> list[str]:
    problems = []
    env = (hydra.get("job") or {}).get("env_set") or {}
    if env:
        problems.append(f"hydra.job.env_set {sorted(env)}: not allowed (a variable such as "
                        "LD_PRELOAD or PYTHONPATH runs code; set variables in the shell)")
    if hydra.get("mode") not in (None, "RUN"):
        problems.append(f"hydra.mode={hydra['mode']}: "
                        f"{REFUSED_FLAGS['multirun'].split(': ', 1)[1]}")
    if (hydra.get("sweeper") or {}).get("params"):
        problems.append("hydra.sweeper.params: sweeps compose configs this check never sees; "
                        "not allowed")
    if hydra.get("searchpath"):
        problems.append(f"hydra.searchpath {hydra['searchpath']}: configs come from conf/ only")
    runtime = hydra.get("runtime") or {}
    for source in runtime.get("config_sources") or []:
        if source.get("provider") not in CONFIG_PROVIDERS or (
                source.get("provider") == "main" and not _same_dir(source.get("path"), CONF_DIR)):
            problems.append(f"config source {source.get('schema')}://{source.get('path')} "
                            f"({source.get('provider')}): configs come from conf/ only")
    for group, option in (runtime.get("choices") or {}).items():
        problem = _group_problem(str(group), option)
        if problem:
            problems.append(problem)
    return problems


def _same_dir(a: str | None, b: os.PathLike) -> bool:
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


def _group_problem(group: str, option: Any) -> str | None:
    """Why selecting ``option`` of config group ``group`` could read a file outside
    ``conf/`` (a ``..`` component or an absolute path), or None."""
    options = option if isinstance(option, (list, tuple, ListConfig)) else [option]
    for name in [group, *(str(o) for o in options if o is not None)]:
        parts = name.replace("\\", "/").split("/")
        if ".." in parts or posixpath.isabs(name) or ":" in name:
            return (f"config group {group}={option}: {name!r} points outside conf/ "
                    f"(choose an option by name, e.g. {group.rsplit('/', 1)[-1]}=<name> "
                    f"for conf/{group}/<name>.yaml)")
    return None


def _groups() -> set[str]:
    return {d.name for d in CONF_DIR.iterdir() if d.is_dir()}


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuses group overrides that point outside ``conf/`` before anything is read:
    ``+stage=../../x`` loaded any YAML file Hydra could reach."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = _groups()
    problems = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        is_group = key in groups or "/" in key  # hydra/launcher=..., stage=...
        if ".." in key.replace("\\", "/").split("/"):
            problems.append(f"{override.input_line}: the key points outside conf/")
        elif is_group:
            problem = _group_problem(key, override.value())
            if problem:
                problems.append(problem)
    if problems:
        raise ConfigRefused("configuration refused:\n  " + "\n  ".join(problems))


def check_command_line(argv: Sequence[str]) -> None:
    """Raises ``ConfigRefused`` unless ``python -m pipeline.run <argv>`` is safe to hand
    to Hydra: no refused flag, no override pointing outside ``conf/``, and the composed
    configuration, Hydra's own part included, passes ``check_config``."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(list(argv))
    refused = [reason for flag, reason in REFUSED_FLAGS.items() if getattr(args, flag, None)]
    if refused:
        raise ConfigRefused("command line refused:\n  " + "\n  ".join(refused))
    check_overrides(args.overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(args.overrides), return_hydra_config=True)
    check_config(cfg)
