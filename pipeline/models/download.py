"""Official checkpoints fetched on first use: ``model=vit_h`` (or any model whose config
names a ``download`` source) works on a machine that has the internet and not the file.

    model:
      checkpoint: ${project_root:}/models/sam_vit_h_4b8939.pth   # used when it exists
      download: {url: https://dl.fbaipublicfiles.com/.../sam_vit_h_4b8939.pth, sha256: a7bf...}

When the configured file is missing and its name is the download's, the file is fetched
into the cache (``$SAM_DATA_ENGINE_CACHE`` or ``~/.cache/sam-data-engine/checkpoints``)
and the run uses it there. The bytes are checked against the published sha256 before the
file is committed (a mismatch is refused and nothing is kept); an interrupted download
resumes where it stopped; a progress bar shows it; without a network the error names the
URL and where to put the file by hand. A checkpoint whose name differs from the
download's is never replaced: a typo in a user's path stays an error.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, open_dict
from tqdm import tqdm

from pipeline.paths import is_url

log = logging.getLogger(__name__)

CACHE_ENV = "SAM_DATA_ENGINE_CACHE"
BLOCK = 1 << 20


class DownloadError(RuntimeError):
    """A checkpoint that could not be fetched, or whose bytes are not the published ones."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sam-data-engine" / "checkpoints")


def fetch(url: str, sha256: str | None, name: str | None = None, timeout_s: float = 60.0) -> Path:
    """The cached file of ``url`` (fetched now if it is not cached yet), its bytes
    checked against ``sha256`` (None: recorded, not checked: no published hash)."""
    name = name or posixpath.basename(urllib.parse.urlparse(url).path)
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    if final.is_file():
        return final
    partial = directory / f".{name}.part"
    try:
        _download(url, partial, timeout_s)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        kept = (f"; the {partial.stat().st_size:,} bytes received stay in {partial} and the next run resumes from "
                "there" if partial.exists() and partial.stat().st_size else "")
        raise DownloadError(
            f"could not download {url} ({err}){kept}. Without a network, download it elsewhere and put it at "
            f"{final} (or pass model.checkpoint=PATH)") from err
    actual = file_sha256(partial)
    if sha256 is not None and actual != sha256:
        partial.unlink()
        raise DownloadError(f"{url}: sha256 {actual}, but the published one is {sha256}: refused (the file is "
                            "not the official checkpoint, or the download was corrupted); nothing was kept")
    os.replace(partial, final)
    log.info("downloaded %s to %s (sha256 %s%s)", url, final, actual, "" if sha256 else ", no published hash")
    return final


def _download(url: str, partial: Path, timeout_s: float) -> None:
    """Appends the rest of ``url`` to ``partial`` (an HTTP Range request when part of it
    is there already; a server that ignores the range sends it all again)."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the range starts at the end: the part is complete
            return
        raise
    with response:
        resumed = have and response.status == 206
        total = response.headers.get("Content-Length")
        total = int(total) + (have if resumed else 0) if total else None
        mode = "ab" if resumed else "wb"
        with open(partial, mode) as out, tqdm(total=total, initial=have if resumed else 0, unit="B",
                                              unit_scale=True, unit_divisor=1024,
                                              desc=f"download {posixpath.basename(url)}") as bar:
            for block in iter(lambda: response.read(BLOCK), b""):
                out.write(block)
                bar.update(len(block))
    if total is not None and partial.stat().st_size < total:  # the connection ended early
        raise http.client.IncompleteRead(b"", total - partial.stat().st_size)


def file_sha256(path: os.PathLike | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_checkpoint(model: DictConfig) -> None:
    """Points ``model.checkpoint`` at the cached download when the configured file is
    missing and ``model.download`` is its source (see the module doc); in place."""
    source: Mapping[str, Any] | None = model.get("download")
    checkpoint = model.get("checkpoint")
    if not source or checkpoint is None or is_url(str(checkpoint)) or os.path.exists(str(checkpoint)):
        return
    url = str(source["url"])
    if os.path.basename(str(checkpoint)) != posixpath.basename(urllib.parse.urlparse(url).path):
        return  # another file than the download: the loader's "not found" stands
    path = fetch(url, source.get("sha256"))
    log.info("model.checkpoint %s is missing: using the download %s", checkpoint, path)
    with open_dict(model):
        model.checkpoint = str(path)
