"""Input enumeration: any accepted input -> named entries, in a deterministic order.

Accepted inputs (local paths or any fsspec URL):
  - a directory, searched recursively for images (and WebDataset / SA-1B ``.tar`` shards);
  - a glob such as ``photos/**/*.jpg`` or ``s3://bucket/sa_0000*.tar``;
  - a text file (``.txt``, ``.lst``) or Parquet file listing one path per line / row;
    relative paths are relative to the list's own directory;
  - one ``.tar`` shard; every image member becomes an item, read back by byte range.

Enumeration is a pure function of the input: files are sorted (lists keep their order).
An entry's ``name`` (its path relative to the input) is its identity; which image id,
key and unit it gets is decided once, by the run's recorded plan (``pipeline.dataset.plan``).

One bad entry never stops the enumeration. What cannot be read or must not be opened (a
FIFO, a device, a socket, a symbolic link leading out of the input, a damaged tar, a list
line with an unusable URL scheme) becomes an ``Entry`` with ``problem`` set, which the
worker records as an error row without opening it. Entries that are not inputs at all
(other extensions, symbolic links to folders) are skipped and the driver's log says which
and why. Names that are not valid UTF-8 are shown with backslash escapes in names and
sources, while ``url`` keeps the real name so the file still opens.
"""
from __future__ import annotations

import logging
import os
import posixpath
import stat
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipeline import storage
from pipeline.storage import filesystem

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
TAR_EXTENSIONS = (".tar",)
LIST_EXTENSIONS = (".txt", ".lst")
PARQUET_EXTENSIONS = (".parquet",)
PARQUET_PATH_COLUMNS = ("path", "source", "file", "filename")


class InputError(ValueError):
    """The input cannot be used at all; raised before any work starts."""


class ReadRefused(ValueError):
    """An input ``read_item`` will not read (not a regular file, over the size limit, cut
    short); ``str(error)`` is the reason."""


@dataclass(frozen=True, slots=True)  # slots: a million entries must stay cheap on the driver
class Entry:
    """One input image as enumerated.

    name: its identity, the path relative to the input (for a tar member:
        ``<tar>/<member>``; for a list line: the line as written).
    url: the file to read (for a tar member: the tar itself).
    member: name of the member inside ``url`` when it is a tar, else None.
    offset, size: byte range of the member's data inside the tar.
    problem: why the entry must not be opened, found at enumeration (None: readable); the
        worker writes it as the entry's error row.
    """

    name: str
    url: str
    member: str | None = None
    offset: int | None = None
    size: int | None = None
    problem: str | None = None

    @property
    def source(self) -> str:
        """Where the image came from, as written to the manifest and error tables (valid
        UTF-8: bytes of a name that are not are shown as backslash escapes)."""
        return printable(self.url if self.member is None else f"{self.url}#{self.member}")


@dataclass(frozen=True, slots=True)
class Item(Entry):
    """An entry placed by the plan: ``image_id`` (dataset-unique, stable across resumes)
    and ``key``, its name in the shard (``sa_<image_id>``)."""

    key: str = ""
    image_id: int = 0


@dataclass(frozen=True)
class Unit:
    """A fixed slice of the plan that becomes exactly one shard, ``sa_<index>.tar``."""

    index: int
    items: tuple[Item, ...]


def enumerate_input(url: str, exclude: str | None = None, follow_symlinks: bool = False) -> list[Entry]:
    """Lists every image of ``url`` as an ``Entry``, in a deterministic order.

    ``exclude`` is a directory to skip (the run's own output when it lies inside the
    input), compared by resolved path. ``follow_symlinks`` follows symbolic links that
    lead out of a directory or glob input (``stage.follow_symlinks``); links inside it
    are always followed. A name listed twice is listed once. Raises ``InputError`` when
    the input does not exist or holds no image; a bad entry becomes an entry with
    ``problem`` set instead.
    """
    fs, path = filesystem(url)
    skipped = _Skipped(url)
    entries: list[Entry] = []
    seen: set[str] = set()
    for relative, file_url, problem in _names(fs, url, path, exclude, follow_symlinks, skipped):
        if problem is None and file_url.lower().endswith(TAR_EXTENSIONS):
            found = _tar_entries(fs, relative, file_url, skipped)
        else:
            found = [Entry(relative, file_url, problem=problem)]
        for entry in found:
            if entry.name not in seen:  # a list naming the same file twice: annotate it once
                seen.add(entry.name)
                entries.append(entry)
    skipped.report()
    if not entries:
        raise InputError(f"no images found in {url!r} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return entries


def printable(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes of a file name that are not UTF-8 (which Python
    keeps as lone surrogates) become backslash escapes, e.g. ``caf\\xe9.jpg``."""
    if name.isascii():
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# --- listing ---------------------------------------------------------------------------
Named = tuple[str, str, "str | None"]  # (printable relative name, file url, problem)


def _names(
    fs: AbstractFileSystem, url: str, path: str, exclude: str | None, follow_symlinks: bool, skipped: "_Skipped"
) -> Iterator[Named]:
    """Yields ``(relative name, file url, problem)`` for each file the input names."""
    local = _is_local(fs)
    # A name that exists is taken as it is, so a folder called "photos [2019]" is a
    # folder, not a pattern; only a name that does not exist is tried as a glob.
    exists = fs.exists(path) or (local and os.path.lexists(path))
    if not exists and _has_magic(path):
        yield from _glob(fs, url, path, follow_symlinks, skipped)
        return
    if not exists:
        raise InputError(f"input {url!r} does not exist")
    if fs.isdir(path):
        if local:
            yield from _local_tree(path, exclude, follow_symlinks, skipped)
        else:
            yield from _remote_tree(fs, path, exclude, skipped)
        return
    lower = path.lower()
    if lower.endswith(LIST_EXTENSIONS + PARQUET_EXTENSIONS):
        base = posixpath.dirname(path)
        schemes: dict[str, str | None] = {}
        for listed in _listed(fs, path):
            # The name as listed (not resolved) keeps keys stable if the list moves.
            yield (printable(listed), *_resolve(fs, base, listed, schemes))
        return
    if lower.endswith(IMAGE_EXTENSIONS + TAR_EXTENSIONS):
        # Named explicitly, so a link is followed wherever it leads; special files are not.
        problem = _local_problem(path, posixpath.dirname(path), True) if local else None
        yield printable(posixpath.basename(path)), storage.url(fs, path), problem
        return
    raise InputError(
        f"cannot tell what {url!r} is: expected a directory, a glob, a list "
        f"({', '.join(LIST_EXTENSIONS + PARQUET_EXTENSIONS)}), an image or a .tar shard"
    )


def _glob(fs: AbstractFileSystem, url: str, path: str, follow_symlinks: bool, skipped: "_Skipped") -> Iterator[Named]:
    root = _glob_root(path)
    found: list[Named] = []
    for p in sorted(fs.glob(path)):
        if not _wanted(p):
            continue
        if _is_local(fs):
            if os.path.isdir(p):
                continue
            problem = _local_problem(p, root, follow_symlinks)
        elif fs.isfile(p):
            problem = None
        else:
            continue
        found.append((printable(posixpath.relpath(p, root)), storage.url(fs, p), problem))
    if not found:
        hint = (
            " (a name with [ ] * ? is read as a pattern when nothing of that exact name exists)"
            if "[" in path else ""
        )
        raise InputError(f"glob {url!r} matches no image or .tar file{hint}")
    yield from found


def _local_tree(root: str, exclude: str | None, follow_symlinks: bool, skipped: "_Skipped") -> Iterator[Named]:
    """The wanted files under a local folder, sorted by path, each with its problem.

    Walks with ``os.scandir`` rather than ``fs.find`` to see what each entry is without
    opening it: special files and links leading out of the input are reported, not read.
    """
    real_root = os.path.realpath(root)
    real_exclude = os.path.realpath(exclude) if exclude else None
    if real_exclude and _inside(real_root, real_exclude):
        raise InputError(f"the input {root!r} lies inside the run's output {exclude!r}")
    found: list[tuple[str, str | None]] = []
    walked: set[tuple[int, int]] = set()  # directories seen, by (device, inode): no cycles
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            info = os.stat(directory)
            entries = list(os.scandir(directory))
        except OSError as e:
            skipped.add(f"folder that cannot be listed ({e.strerror})", directory)
            continue
        if (info.st_dev, info.st_ino) in walked:
            skipped.add("folder already listed (a loop of symbolic links)", directory)
            continue
        walked.add((info.st_dev, info.st_ino))
        for entry in entries:
            path = posixpath.join(directory, entry.name)
            if entry.is_dir(follow_symlinks=False):
                if real_exclude and _inside(os.path.realpath(path), real_exclude):
                    continue  # the run's own output
                pending.append(path)
            elif entry.is_symlink() and os.path.isdir(path):
                target = os.path.realpath(path)
                if real_exclude and _inside(target, real_exclude):
                    continue
                if _inside(target, real_root):
                    skipped.add("symbolic link to a folder inside the input (its images are listed there)", path)
                elif not follow_symlinks:
                    skipped.add(
                        "symbolic link to a folder outside the input (set stage.follow_symlinks=true to follow it)",
                        path,
                    )
                else:
                    pending.append(path)
            elif not _wanted(entry.name):
                skipped.extension(entry.name)
            elif entry.is_symlink() and real_exclude and _inside(os.path.realpath(path), real_exclude):
                continue
            elif entry.is_file(follow_symlinks=False):
                found.append((path, None))  # a regular file: the common case, no extra stat
            else:
                found.append((path, _local_problem(path, real_root, follow_symlinks)))
    for path, problem in sorted(found):
        yield printable(posixpath.relpath(path, root)), path, problem


def _remote_tree(fs: AbstractFileSystem, path: str, exclude: str | None, skipped: "_Skipped") -> Iterator[Named]:
    # Object stores hold only plain objects: no special files, no links to follow.
    skip = None if exclude is None else posixpath.normpath(filesystem(exclude)[1]) + "/"
    for p in sorted(fs.find(path)):
        if skip and posixpath.normpath(p).startswith(skip):
            continue
        if _wanted(p):
            yield printable(posixpath.relpath(p, path)), storage.url(fs, p), None
        else:
            skipped.extension(p)


def _local_problem(path: str, root: str, follow_symlinks: bool) -> str | None:
    """Why the local file ``path`` must not be opened, or None when it is a regular file
    (or a link to one inside ``root``, or anywhere with ``follow_symlinks``)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError as e:
        return f"cannot inspect the file: {e.strerror}"
    if not stat.S_ISLNK(mode):
        kind = _special_kind(mode)
        return None if kind is None else f"is {kind}, not a regular file: not opened"
    target = printable(os.path.realpath(path))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"broken symbolic link: its target {target} does not exist (file not found)"
    except OSError as e:
        return f"symbolic link that cannot be followed ({e.strerror})"
    kind = _special_kind(mode)
    if kind is not None:
        return f"symbolic link to {target}, which is {kind}, not a regular file: not opened"
    if not follow_symlinks and not _inside(os.path.realpath(path), os.path.realpath(root)):
        return (
            f"symbolic link to {target}, outside the input: not followed "
            "(set stage.follow_symlinks=true to follow links out of the input)"
        )
    return None


def _special_kind(mode: int) -> str | None:
    """What a non-regular file is ("a FIFO (named pipe)", ...), None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


class _Skipped:
    """What the enumeration passed over, and why; logged once at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.by_reason: dict[str, list[str]] = defaultdict(list)
        self.extensions: dict[str, int] = defaultdict(int)

    def add(self, reason: str, path: str) -> None:
        self.by_reason[reason].append(printable(path))

    def extension(self, name: str) -> None:
        self.extensions[posixpath.splitext(posixpath.basename(name))[1].lower() or "(no extension)"] += 1

    def report(self) -> None:
        for reason, paths in self.by_reason.items():
            shown = ", ".join(paths[:5]) + (f", ... ({len(paths)} in all)" if len(paths) > 5 else "")
            log.warning("%s: skipped %d %s: %s", self.url, len(paths), reason, shown)
        if self.extensions:
            counts = ", ".join(f"{ext} ({n})" for ext, n in sorted(self.extensions.items()))
            log.info("%s: skipped %d files that are neither images nor .tar: %s",
                     self.url, sum(self.extensions.values()), counts)


# --- lists -----------------------------------------------------------------------------
def _listed(fs: AbstractFileSystem, path: str) -> list[str]:
    """The names a list file holds, in order; raises ``InputError`` if it is unreadable."""
    try:
        if path.lower().endswith(PARQUET_EXTENSIONS):
            return _parquet_listed(fs, path)
        with fs.open(path, "rb") as f:
            data = f.read()
    except InputError:
        raise
    except Exception as e:  # unreadable list file: nothing of the input can be used
        raise InputError(f"cannot read the list {path!r}: {type(e).__name__}: {e}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16, as some Windows tools write
        lines = data.decode("utf-16").splitlines()
    else:
        # Line by line: a name that is not UTF-8 (a latin-1 list) keeps its bytes, so the
        # file of that exact name still opens, and shows escaped in the errors if not.
        lines = [line.decode("utf-8", "surrogateescape") for line in data.split(b"\n")]
    names = (line.strip().removeprefix("\ufeff").strip() for line in lines)
    return [name for name in names if name and not name.startswith("#")]


def _parquet_listed(fs: AbstractFileSystem, path: str) -> list[str]:
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except Exception as e:
        raise InputError(f"cannot read the Parquet list {path!r}: {type(e).__name__}: {e}") from None
    present = [c for c in PARQUET_PATH_COLUMNS if c in table.column_names]
    textual = [c for c in present if _is_text(table.schema.field(c).type)]
    if not textual:
        found = ", ".join(f"{c} ({table.schema.field(c).type})" for c in present) or "none of them"
        raise InputError(
            f"{path}: Parquet list needs a column named one of {PARQUET_PATH_COLUMNS} holding paths "
            f"as strings; found {found} among its columns {table.column_names}"
        )
    names = []
    for value in table.column(textual[0]).to_pylist():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "surrogateescape")
        if value and value.strip():
            names.append(value.strip())
    return names


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) \
        or pa.types.is_large_binary(kind) or getattr(pa.types, "is_string_view", lambda _: False)(kind)


def _resolve(fs: AbstractFileSystem, base: str, listed: str, schemes: dict[str, str | None]) -> tuple[str, str | None]:
    """The URL of a listed name and, for a URL whose scheme cannot be read here, why."""
    if "://" in listed:
        scheme = listed.split("://", 1)[0].lower()
        if scheme not in schemes:
            schemes[scheme] = _scheme_problem(scheme)
        return listed, schemes[scheme]
    if posixpath.isabs(listed):
        return storage.url(fs, listed), None
    return storage.url(fs, posixpath.join(base, listed)), None


def _scheme_problem(scheme: str) -> str | None:
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as e:  # a known protocol whose package is not installed
        return f"URL scheme '{scheme}://' needs a package that is not installed: {e}"
    except ValueError:
        return f"unsupported URL scheme '{printable(scheme)}://' (no fsspec file system knows it)"
    return None


# --- tars ------------------------------------------------------------------------------
def _tar_entries(fs: AbstractFileSystem, relative: str, url: str, skipped: "_Skipped") -> list[Entry]:
    """An entry for each image member of a tar; a tar that cannot be (fully) listed adds
    one entry for itself carrying the reason."""
    members, problem = _tar_members(fs, url)
    entries = [Entry(printable(f"{relative}/{m.name}"), url, m.name, m.offset_data, m.size, p) for m, p in members]
    if problem is not None:
        entries.append(Entry(relative, url, problem=problem))
    elif not members:
        skipped.add("tar holding no image member", url)
    return entries


def _tar_members(fs: AbstractFileSystem, url: str) -> tuple[list[tuple[tarfile.TarInfo, str | None]], str | None]:
    """The image members of a WebDataset tar (one per key, the first image extension),
    each with its problem, and why the listing stopped early (None if it did not)."""
    if _is_local(fs):
        path = filesystem(url)[1]
        problem = _local_problem(path, posixpath.dirname(path), True)
        if problem is not None:  # never open a FIFO or a device, even to list it
            return [], problem
    members: list[tarfile.TarInfo] = []
    problem = None
    size = None
    try:
        size = fs.size(url)
        with fs.open(url, "rb") as f:
            # Mode "r:" seeks over member data, so listing reads only the headers.
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:
                    if m.isfile():
                        members.append(m)
                problem = _tar_rest(f, tar.offset, size, len(members))
    except FileNotFoundError:
        problem = "file not found: it was listed or enumerated but does not exist"
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        problem = _tar_problem(fs, url, size, e, len(members))
    by_key: dict[str, tuple[tarfile.TarInfo, str | None]] = {}
    for m in members:
        if not m.name.lower().endswith(IMAGE_EXTENSIONS) or _wds_key(m.name) in by_key:
            continue
        cut = size is not None and m.offset_data + m.size > size
        by_key[_wds_key(m.name)] = (m, "the tar ends inside this member's data (truncated tar)" if cut else None)
    if size is not None and members and members[-1].offset_data + members[-1].size > size:
        problem = None  # a tar cut inside its last member: that member's own row says so
    return list(by_key.values()), problem


def _tar_rest(f, offset: int, size: int | None, listed: int) -> str | None:
    """tarfile stops quietly at a damaged header; what follows the last member says so."""
    if size is None or offset >= size:
        return None
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    if not block.strip(b"\0"):
        return None  # the end-of-archive blocks
    return (f"damaged tar: a bad header at byte {offset} of {size} after {listed} members; "
            "the members after it are not listed")


def _tar_problem(fs: AbstractFileSystem, url: str, size: int | None, error: Exception, listed: int) -> str:
    if size == 0:
        return "empty file (0 bytes), not a tar archive"
    head = b""
    try:
        with fs.open(url, "rb") as f:
            head = f.read(4)
    except OSError:
        pass
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed: only uncompressed .tar shards are read (gunzip it first)"
    if listed:
        return f"damaged tar: listing stopped after {listed} members ({error})"
    return f"not a readable tar archive ({type(error).__name__}: {error})"


def _wds_key(name: str) -> str:
    directory, base = posixpath.split(name)
    return posixpath.join(directory, base.split(".")[0])


def _wanted(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS + TAR_EXTENSIONS)


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _glob_root(pattern: str) -> str:
    parts = pattern.split("/")
    fixed = []
    for part in parts:
        if _has_magic(part):
            break
        fixed.append(part)
    return "/".join(fixed) or "/"


# --- reading ---------------------------------------------------------------------------
def read_item(item: Entry, max_bytes: int | None = None) -> bytes:
    """The encoded bytes of ``item``: the whole file, or its member's range in a tar.

    Raises ``ReadRefused`` for a file larger than ``max_bytes`` (checked before reading
    it: ``stage.image.max_file_bytes``), a local file that is not a regular file (it is
    not opened: a FIFO would block forever, /dev/zero never end), and a tar member cut
    short; ``OSError`` subclasses for files that are missing or unreadable.
    """
    if item.size is not None:
        _check_size(item.size, max_bytes)
    fs, path = filesystem(item.url)
    if _is_local(fs):
        return _read_local(path, item, max_bytes)
    with fs.open(path, "rb") as f:
        if item.offset is None:
            size = getattr(f, "size", None)
            if size is not None:
                _check_size(size, max_bytes)
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
            if max_bytes is not None and len(data) > max_bytes:
                _check_size(len(data), max_bytes)
            return data
        f.seek(item.offset)
        return _whole_member(f.read(item.size), item)


def _read_local(path: str, item: Entry, max_bytes: int | None) -> bytes:
    # stat before opening: a device or FIFO is refused without being opened at all...
    kind = _special_kind(os.stat(path).st_mode)
    if kind is not None:
        raise (IsADirectoryError(path) if kind == "a directory"
               else ReadRefused(f"is {kind}, not a regular file: not opened"))
    # ...and O_NONBLOCK keeps a FIFO swapped in since from blocking the open itself.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        kind = _special_kind(info.st_mode)
        if kind is not None:
            raise ReadRefused(f"is {kind}, not a regular file: not opened")
        if item.offset is None:
            _check_size(info.st_size, max_bytes)
            return f.read()
        f.seek(item.offset)
        return _whole_member(f.read(item.size), item)


def _check_size(size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ReadRefused(
            f"file of {size} bytes exceeds stage.image.max_file_bytes={max_bytes}; raise the limit if it is genuine"
        )


def _whole_member(data: bytes, item: Entry) -> bytes:
    if len(data) != item.size:
        raise ReadRefused(f"tar member cut short: {len(data)} of its {item.size} bytes are in the file (truncated tar)")
    return data
