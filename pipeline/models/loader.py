"""Loading SAM, the one way every stage, worker, trainer and the annotation server does:
a ``ModelSpec`` (``cfg.model``: arch, checkpoint path or URL, device; plus the sha256 a
run recorded) -> the model on its device, its bytes checked against that sha256.
Also the generator of ``cfg.amg`` on such a model.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import tempfile
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

import sam_core
import sam_core.sizes
from pipeline import storage
from pipeline.models.registry import TUNED_FILE
from pipeline.paths import is_url
from sam_core.checkpoint import load_checkpoint
from sam_core.training.tune import TunedSpec, apply_tuned

RANDOM_WEIGHTS = "random-init"


def model_identity(checkpoint: str | None) -> str:
    """The model identity recorded in the manifest: the checkpoint file's sha256."""
    if checkpoint is None:
        return RANDOM_WEIGHTS
    require_checkpoint(checkpoint)
    if not is_url(checkpoint):
        return sam_core.checkpoint_sha256(checkpoint)
    digest = hashlib.sha256()
    fs, path = storage.filesystem(checkpoint)
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_checkpoint(checkpoint: str) -> None:
    """Fails early, and clearly, when the configured checkpoint is missing."""
    fs, path = storage.filesystem(checkpoint)
    if not fs.isfile(path):
        raise FileNotFoundError(
            f"model checkpoint {checkpoint} does not exist. Train or download it, or pass "
            "model.checkpoint=<path> (model.checkpoint=null runs random weights, for benchmarks)"
        )


@contextlib.contextmanager
def local_checkpoint(checkpoint: str | None) -> Iterator[str | None]:
    """A local path to ``checkpoint``: itself, or a temporary copy of a URL's object
    (removed on exit); ``sam_core`` loads local files only."""
    if checkpoint is None or not is_url(checkpoint):
        yield checkpoint
        return
    require_checkpoint(checkpoint)
    fs, path = storage.filesystem(checkpoint)
    with tempfile.TemporaryDirectory(prefix="checkpoint_") as tmp:
        local = os.path.join(tmp, os.path.basename(path) or "model.pth")
        fs.get_file(path, local)
        yield local


def model_family(model: "ModelSpec | Mapping[str, Any] | DictConfig") -> str:
    """"sam" or "sam2": the family of ``model``'s architecture, which every dataset
    records (a run is never resumed with the other family)."""
    return sam_core.sizes.family(ModelSpec.of(model).arch)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class ModelSpec:
    """The one description of a SAM to load, whoever loads it (stages, workers, the
    annotation server, training).

    arch: a key of ``sam_core.sam_model_registry``; checkpoint: a local path or an fsspec
    URL (user paths made absolute by ``pipeline.config.paths``), None for random weights
    (seeded: the same ones in every process); device: "auto", "cpu", "cuda", "cuda:1";
    sha256: the identity a run recorded (``model_identity``), against which the bytes
    loaded are checked, or None to load whatever the file holds now.
    """

    arch: str
    checkpoint: str | None = None
    device: str = "auto"
    sha256: str | None = None
    base: str | None = None  # an adapter checkpoint's base, where it lives now (None: where it was trained)

    @classmethod
    def of(cls, model: "ModelSpec | Mapping[str, Any] | DictConfig", sha256: str | None = None) -> "ModelSpec":
        """A spec from ``cfg.model`` (or a plain mapping with its keys), or ``model`` itself;
        ``sha256`` given here wins over the mapping's."""
        if isinstance(model, ModelSpec):
            return model if sha256 is None else replace(model, sha256=sha256)
        model = plain(model)
        return cls(arch=model["arch"], checkpoint=model.get("checkpoint"), device=model.get("device") or "auto",
                   sha256=sha256 if sha256 is not None else model.get("sha256"), base=model.get("base"))


def load_sam(model: ModelSpec | Mapping[str, Any] | DictConfig, expected_sha256: str | None = None,
             resize: bool = False) -> "sam_core.modeling.Sam":
    """The SAM ``model`` describes (a ``ModelSpec`` or ``cfg.model``), on its device, in
    eval mode.

    ``expected_sha256``: the identity the driver recorded (``model_identity``); the bytes
    loaded are checked against it (``sam_core.ChecksumError`` if the file changed since).
    ``resize``: the checkpoint may come from the same architecture at another input size
    (position tables are resampled, ``sam_core.checkpoint.resize_positions``), e.g. to
    fine-tune a 256-px model at 512 px.
    """
    spec = ModelSpec.of(model, expected_sha256)
    if spec.checkpoint is not None and is_tuned(spec.checkpoint):
        return _load_tuned(spec)
    if spec.arch not in sam_core.sam_model_registry:
        raise ValueError(f"unknown model.arch {spec.arch!r}; known: {', '.join(sorted(sam_core.sam_model_registry))}")
    if spec.checkpoint is not None:
        require_checkpoint(spec.checkpoint)
    elif spec.sha256 not in (None, RANDOM_WEIGHTS):
        raise ValueError(f"model.checkpoint is null but the run recorded model {spec.sha256}")
    sha = None if spec.sha256 == RANDOM_WEIGHTS else spec.sha256
    build = sam_core.sam_model_registry[spec.arch]
    with local_checkpoint(spec.checkpoint) as path:
        if path is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # random weights (benchmarks, tests): the same ones everywhere
                sam = build()
        elif resize:
            sam = load_checkpoint(build(), path, arch=spec.arch, resize=True, expected_sha256=sha)
        else:
            sam = build(checkpoint=path, expected_sha256=sha)
    return sam.to(resolve_device(spec.device)).eval()


def is_tuned(checkpoint: str | None) -> bool:
    """Whether ``checkpoint`` is an adapter file (a model tuned with adapters or LoRA)."""
    return checkpoint is not None and posixpath.basename(str(checkpoint)) == TUNED_FILE


def read_tuned(checkpoint: str, expected_sha256: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors) of an adapter file, read with ``weights_only=True`` from the same
    bytes that are checked against ``expected_sha256``. meta: arch, base (where the base
    model was), base_sha256, tune (``sam_core.training.TunedSpec`` fields)."""
    require_checkpoint(checkpoint)
    fs, path = storage.filesystem(checkpoint)
    data = fs.cat_file(path)
    if expected_sha256 not in (None, RANDOM_WEIGHTS) and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise sam_core.ChecksumError(f"{checkpoint}: sha256 {hashlib.sha256(data).hexdigest()}, but the run recorded "
                                     f"{expected_sha256}: the file changed since")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        meta, tensors = payload["meta"], payload["tuned"]
        TunedSpec(**meta["tune"])
    except Exception as err:  # not a torch file, a pickle with code, another layout
        raise sam_core.CheckpointError(f"{checkpoint}: not an adapter file of this project "
                                       f"({type(err).__name__}: {err})") from err
    return meta, tensors


def _load_tuned(spec: ModelSpec) -> "sam_core.modeling.Sam":
    """An adapter file on its base: the base must be the very model it was tuned from
    (its sha256), else the load is refused."""
    meta, tensors = read_tuned(spec.checkpoint, spec.sha256)
    if meta["arch"] != spec.arch:
        raise ValueError(f"{spec.checkpoint} was tuned from a {meta['arch']} model, not {spec.arch}: "
                         f"use model.arch={meta['arch']}")
    base = spec.base or meta["base"]
    found = model_identity(base)
    if found != meta["base_sha256"]:
        raise ValueError(f"{spec.checkpoint} adapts the model with sha256 {meta['base_sha256']} "
                         f"({meta['base']}); {base} is another model (sha256 {found}): refused. Point "
                         "model.base at the model it was tuned from")
    sam = load_sam(ModelSpec(meta["arch"], base, "cpu", sha256=found))
    apply_tuned(sam, TunedSpec(**meta["tune"]), tensors)
    return sam.to(resolve_device(spec.device)).eval()


# Keys of cfg.amg that are the pipeline's, not the generator's: the mask verifier that
# filters the generator's output (pipeline.models.verifier, used by pipeline.masks.sources).
PIPELINE_AMG_KEYS = ("verifier", "verifier_precision", "objects")


def generator_kwargs(amg_cfg: Mapping[str, Any] | DictConfig, with_boxes: bool = False) -> dict[str, Any]:
    """``cfg.amg`` as SamAutomaticMaskGenerator keyword arguments, asking for compressed
    COCO RLE (what SA-1B stores). ``with_boxes``: the caller passes a detector's boxes to
    ``generate`` (fully_auto does); anyone else refuses amg.prompting=objects."""
    kwargs = {**{k: v for k, v in plain(amg_cfg).items() if k not in PIPELINE_AMG_KEYS}, "output_mode": "coco_rle"}
    if kwargs.get("prompting") == "objects" and not with_boxes:
        raise ValueError("amg.prompting=objects takes a detector's boxes, which only fully_auto reads "
                         "(amg.objects.detector); use amg.prompting=adaptive or grid here")
    return kwargs


def build_generator(
    model_cfg: Mapping[str, Any] | DictConfig,
    amg_cfg: Mapping[str, Any] | DictConfig,
    expected_sha256: str | None = None,
    with_boxes: bool = False,
) -> sam_core.SamAutomaticMaskGenerator:
    """The automatic mask generator of ``cfg.amg`` (``generator_kwargs``)."""
    sam = load_sam(model_cfg, expected_sha256)
    return sam_core.SamAutomaticMaskGenerator(sam, **generator_kwargs(amg_cfg, with_boxes))


def plain(cfg: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    """A plain dict of a config node (resolved), or of a mapping."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)
