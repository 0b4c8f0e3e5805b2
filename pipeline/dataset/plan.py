"""The run's plan: which input becomes which image id, key and unit, recorded in the output.

A run's first start lists the input and records the result before any work::

    <out>/plan/part_000000.parquet    name, url, member, offset, size, problem, image_id, unit

and every later start of the same command resumes from it, so the answer never depends
on what the input looks like at that later moment:

- inputs found later (new files in the folder, new lines in the list) go into new units
  with new image ids, recorded in a new part; ids are never reused;
- inputs that disappeared keep their place: a committed unit keeps their records, an
  uncommitted one records them as failed ("file not found"), and the run reports them;
- ``images_per_unit`` is fixed by the first start; a different explicit value is refused.

Image ids: an input named like an SA-1B image (``sa_<n>.jpg``, e.g. a member of an SA-1B
tar being re-annotated) keeps ``n`` when no other input of the plan has it; every other
input gets the next free id. The key (WebDataset ``__key__`` and file stem in the shard)
is ``sa_<image_id>``, SA-1B's own naming.
"""
from __future__ import annotations

import logging
import math
import posixpath
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.inputs.entries import Entry, Item, Unit, printable

log = logging.getLogger(__name__)

PLAN_DIR = "plan"
PART_PATTERN = "part_{:06d}.parquet"
_PART_RE = re.compile(r"^part_(\d{6})\.parquet$")
_SA1B_NAME = re.compile(r"^sa_(\d{1,15})\.[A-Za-z]+$")
IMAGES_PER_UNIT_KEY = b"images_per_unit"

SCHEMA = pa.schema(
    [
        ("name", pa.string()),  # the input's identity: its name relative to the input
        ("url", pa.string()),
        ("member", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("problem", pa.string()),
        ("image_id", pa.int64()),
        ("unit", pa.int64()),
    ]
)


class PlanError(ValueError):
    """The output's recorded plan and this run's settings disagree."""


def image_key(image_id: int) -> str:
    """``sa_123`` for image 123: the member stem in the shard and the manifest key."""
    return f"sa_{image_id}"


@dataclass
class Plan:
    """The units of a run and what changed since the plan was last extended.

    units: every unit of the output, in index order. images_per_unit: fixed at the first
    start. added: inputs recorded by this start (all of them on the first). gone: inputs
    of the plan that the input no longer lists (their records stay; see the module doc).
    """

    images_per_unit: int
    units: list[Unit]
    added: int = 0
    gone: list[Item] = field(default_factory=list)

    @property
    def items(self) -> int:
        return sum(len(u.items) for u in self.units)


def recorded_images_per_unit(output: str) -> int | None:
    """The unit size the output's plan was made with, or None when it has no plan yet."""
    parts = _parts(output)
    if not parts:
        return None
    fs, _ = storage.filesystem(output)
    with fs.open(parts[0], "rb") as f:
        return int(pq.read_schema(f).metadata[IMAGES_PER_UNIT_KEY])


def load_or_extend(
    output: str, entries: list[Entry], images_per_unit: int, keep_sa1b_ids: bool = True
) -> Plan:
    """Reads the output's plan, records the entries it lacks, and returns the whole plan.

    ``images_per_unit`` is used only when the output has no plan yet (check a user's
    explicit value with ``check_images_per_unit`` first).
    """
    recorded = _read(output)
    if recorded:
        images_per_unit = recorded_images_per_unit(output)
    by_name = {row["name"]: row for row in recorded}
    fresh = [e for e in entries if e.name not in by_name]
    if fresh:
        rows = _assign(fresh, recorded, images_per_unit, keep_sa1b_ids)
        _write_part(output, len(_parts(output)), rows, images_per_unit)
        recorded += rows
    present = {e.name: e for e in entries}
    units: dict[int, list[Item]] = {}
    gone: list[Item] = []
    for row in recorded:
        entry = present.get(row["name"])
        item = _item(row, entry)
        units.setdefault(row["unit"], []).append(item)
        if entry is None:
            gone.append(item)
    if gone:
        log.warning(
            "%d input(s) recorded in the plan of %s are no longer in the input (committed records "
            "of them are kept; not yet annotated ones are recorded as failed): %s",
            len(gone), output, ", ".join(i.name for i in gone[:5]) + (" ..." if len(gone) > 5 else ""),
        )
    return Plan(
        images_per_unit=images_per_unit,
        units=[Unit(index, tuple(items)) for index, items in sorted(units.items())],
        added=len(fresh),
        gone=gone,
    )


def check_images_per_unit(output: str, requested: int | None) -> None:
    """Refuses an explicit ``images_per_unit`` that differs from the output's plan."""
    recorded = recorded_images_per_unit(output)
    if requested is not None and recorded is not None and requested != recorded:
        raise PlanError(
            f"{output} was planned with stage.images_per_unit={recorded} at its first run; resuming "
            f"with {requested} would move images between units (lost or duplicated). Leave "
            f"stage.images_per_unit unset (or {recorded}) to resume, or write to a new output"
        )


def auto_images_per_unit(images: int, actors: int, units_per_actor: int, low: int, high: int) -> int:
    """A unit size that gives every actor ``units_per_actor`` units, within [low, high]:
    small enough that all actors have work, large enough that shards are not tiny."""
    if images <= 0:
        return max(1, low)
    return max(low, min(high, math.ceil(images / max(1, actors * units_per_actor))))


def _assign(fresh: list[Entry], recorded: list[dict], images_per_unit: int, keep_sa1b_ids: bool) -> list[dict]:
    taken = {row["image_id"] for row in recorded}
    wanted: dict[int, int] = {}  # entry position -> its SA-1B id
    if keep_sa1b_ids:
        for position, entry in enumerate(fresh):
            match = _SA1B_NAME.match(posixpath.basename(entry.name))
            if match:
                image_id = int(match.group(1))
                if image_id > 0 and image_id not in taken:
                    taken.add(image_id)
                    wanted[position] = image_id
    next_id = max(taken, default=0) + 1
    first_unit = max((row["unit"] for row in recorded), default=-1) + 1
    rows = []
    for position, entry in enumerate(fresh):
        image_id = wanted.get(position)
        if image_id is None:
            image_id, next_id = next_id, next_id + 1
        rows.append(
            {
                # Parquet strings must be UTF-8: a name with other bytes is recorded escaped;
                # reads use today's listing (the real name) while the input is there.
                "name": entry.name, "url": printable(entry.url),
                "member": None if entry.member is None else printable(entry.member), "offset": entry.offset,
                "size": entry.size, "problem": entry.problem, "image_id": image_id,
                "unit": first_unit + position // images_per_unit,
            }
        )
    return rows


def _item(row: dict, entry: Entry | None) -> Item:
    # Where to read comes from today's listing when the input is still there (a list
    # may have moved, a tar may have been rewritten); the recorded one otherwise.
    where = entry if entry is not None else Entry(
        name=row["name"], url=row["url"], member=row["member"], offset=row["offset"],
        size=row["size"], problem=row["problem"],
    )
    return Item(
        key=image_key(row["image_id"]), image_id=row["image_id"], name=row["name"], url=where.url,
        member=where.member, offset=where.offset, size=where.size, problem=where.problem,
    )


def _parts(output: str) -> list[str]:
    fs, root = storage.filesystem(output)
    directory = storage.join(root, PLAN_DIR)
    if not fs.isdir(directory):
        return []
    return sorted(p for p in fs.ls(directory, detail=False) if _PART_RE.match(posixpath.basename(p)))


def _read(output: str) -> list[dict]:
    fs, _ = storage.filesystem(output)
    rows: list[dict] = []
    for path in _parts(output):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f, schema=SCHEMA).to_pylist()
    return rows


def _write_part(output: str, index: int, rows: list[dict], images_per_unit: int) -> None:
    schema = SCHEMA.with_metadata({IMAGES_PER_UNIT_KEY: str(images_per_unit).encode()})
    table = pa.Table.from_pylist(rows, schema=schema)
    fs, root = storage.filesystem(output)
    with storage.atomic_open(fs, storage.join(root, PLAN_DIR, PART_PATTERN.format(index))) as f:
        pq.write_table(table, f)


@dataclass
class Audit:
    """A dataset checked against its plan.

    lost: planned keys of committed units with no manifest row. duplicated: keys with more
    than one manifest row. unplanned: manifest keys the plan does not know. pending:
    planned units not committed yet (the run has not finished; nothing is lost).
    """

    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unplanned: list[str] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)


def audit(output: str) -> Audit | None:
    """Compares ``output``'s manifest with its plan; None when it has no plan."""
    from collections import Counter

    from pipeline.dataset import manifest

    rows = _read(output)
    if not rows:
        return None
    committed = manifest.committed_units(output)
    rows_by_key = Counter(manifest.read_table(output).column("key").to_pylist())
    planned = {image_key(r["image_id"]): r["unit"] for r in rows}
    return Audit(
        lost=sorted(k for k, unit in planned.items() if unit in committed and rows_by_key[k] == 0),
        duplicated=sorted(k for k, n in rows_by_key.items() if n > 1),
        unplanned=sorted(k for k in rows_by_key if k not in planned),
        pending=sorted({unit for unit in planned.values()} - committed),
    )
