"""The annotation queue: which images, with which ids and keys, in which units; and the
leases that keep two annotators off the same image.

``load_queue`` is the one place that decides the images, their ids and their units: the
output's recorded plan (``pipeline.dataset.plan``), as fully_auto's. ``ImageLeases`` here are per
image, between annotators of one server; the output itself is held by the server's
run through ``pipeline.dataset.lease`` (one writer per output).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline import storage
from pipeline.dataset import listing as dataset
from pipeline.dataset import plan, shards
from pipeline.inputs.entries import Item, enumerate_input

log = logging.getLogger(__name__)

LEASES_FILE = "leases.json"


@dataclass(frozen=True)
class QueueImage:
    """One image of the queue: its SA-1B key ``sa_<image_id>``, its unit, where to read it."""

    key: str
    image_id: int
    unit: int
    item: Item

    @property
    def source(self) -> str:
        return self.item.source


@dataclass
class Queue:
    """The queue's images in order, and the masks some of them come with.

    entries: every image of the input, in enumeration order.
    units: unit index -> the keys of its images.
    prefill: key -> SA-1B annotations of the input record (images from a dataset).
    """

    entries: list[QueueImage]
    units: dict[int, list[str]]
    prefill: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_key = {e.key: e for e in self.entries}
        self.position = {e.key: i for i, e in enumerate(self.entries)}


def load_queue(input_spec: str, output: str, images_per_unit: int, prefill: bool = True) -> Queue:
    """The images of ``input_spec`` as a queue of units of ``images_per_unit``.

    Inputs are what ``pipeline.inputs.entries.enumerate_input`` accepts; a dataset written by
    this project counts by its committed shards only. Ids, keys (``sa_<image_id>``) and
    units come from the output's plan, recorded at the first start and extended with new
    inputs later (an input named ``sa_<n>.jpg``, e.g. from an SA-1B-style dataset, keeps
    id ``n``). Images read from a tar (a dataset or SA-1B tars) come with the masks of
    their JSON record when ``prefill``. The caller holds the output's lease.
    """
    if dataset.is_dataset(input_spec):
        found = [e for url in dataset.committed_shards(input_spec) for e in enumerate_input(url)]
    else:
        found = enumerate_input(input_spec, exclude=output)
    plan.check_images_per_unit(output, images_per_unit)
    recorded = plan.load_or_extend(output, found, images_per_unit, keep_sa1b_ids=True)
    entries, units = [], {}
    for unit in recorded.units:
        units[unit.index] = [item.key for item in unit.items]
        entries += [QueueImage(item.key, item.image_id, unit.index, item) for item in unit.items]
    queue = Queue(entries, units)
    if prefill:
        queue.prefill = _prefill(entries)
    return queue


def _prefill(entries: list[QueueImage]) -> dict[str, list[dict[str, Any]]]:
    """The annotations stored next to each tar member image (SA-1B JSON records)."""
    tars: dict[str, dict[str, str]] = {}  # tar url -> member key -> queue key
    for entry in entries:
        if entry.item.member is not None:
            member_key, _ = shards.split_member(entry.item.member)
            tars.setdefault(entry.item.url, {})[member_key] = entry.key
    found: dict[str, list[dict[str, Any]]] = {}
    for url, members in tars.items():
        for sample in shards.iter_shard(url, images=False):
            if sample.key in members:
                found[members[sample.key]] = list(sample.record.get("annotations", []))
    if found:
        log.info("%d image(s) come with masks from the input; they open pre-filled as automatic", len(found))
    return found


@dataclass
class ImageLease:
    client: str
    expires: float


class ImageLeases:
    """Who holds which image, until when; saved in the output so a restart keeps them.

    A client holds at most one image; a lease not renewed within ``lease_s`` expires and
    the image can be given to someone else.
    """

    def __init__(self, directory: str, lease_s: float, clock: Callable[[], float] = time.time) -> None:
        self.lease_s = lease_s
        self.clock = clock
        self._fs, root = storage.filesystem(directory)
        self._path = storage.join(root, LEASES_FILE)
        self._lock = threading.Lock()
        self._leases: dict[str, ImageLease] = {}
        if self._fs.exists(self._path):
            saved = json.loads(self._fs.cat_file(self._path))
            self._leases = {k: ImageLease(v["client"], float(v["expires"])) for k, v in saved.items()}

    def holder(self, key: str) -> str | None:
        """The client holding ``key`` now, if any."""
        lease = self._leases.get(key)
        return lease.client if lease is not None and lease.expires > self.clock() else None

    def free_for(self, key: str, client: str) -> bool:
        return self.holder(key) in (None, client)

    def acquire(self, key: str, client: str) -> bool:
        """Gives ``key`` to ``client`` (releasing what it held before) unless someone
        else holds it; renews it when ``client`` already does."""
        with self._lock:
            if not self.free_for(key, client):
                return False
            for other in [k for k, lease in self._leases.items() if lease.client == client and k != key]:
                del self._leases[other]
            self._leases[key] = ImageLease(client, self.clock() + self.lease_s)
            self._expire()
            self._save()
            return True

    def release(self, key: str, client: str) -> None:
        with self._lock:
            if self.holder(key) == client:
                del self._leases[key]
                self._save()

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, lease in self._leases.items() if lease.expires <= now]:
            del self._leases[key]

    def _save(self) -> None:
        payload = {k: {"client": v.client, "expires": v.expires} for k, v in self._leases.items()}
        with storage.atomic_open(self._fs, self._path) as f:
            f.write(json.dumps(payload).encode("utf-8"))
