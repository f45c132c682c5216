"""Looking at segments without attaching: one record per segment, for ``ls()``, the CLI and ``segment_info``.

``shmarray ls``, ``shmarray info``, ``shmarray.ls()``, ``list_segments()``
and ``segment_info()`` all give :class:`SegmentEntry` records (also named
``SegmentInfo``: one type). Each is read with one open of the segment: one
pread of its control block and the start of its user bytes (a second only
for a long descriptor), then /proc/locks for who is attached. Nothing is
attached, and nothing is freed: looking never changes a segment's life.
What dead processes left (segments whose users all died, memory a killed
creator kept for reuse) is listed as an orphan with its size; freeing it is
``shmarray gc``'s job (``_admin.collect_garbage``), which then reports it.

What a segment holds (the ``kind`` and ``payload`` columns) comes from its
payload header; each payload kind describes its own descriptor (``_KINDS``:
``_npy``, ``_arrow``, ``_ring.layout``), loaded only when a segment of that
kind is listed. This module sits above the payload layers for that reason.
To change what ``shmarray ls`` prints: :meth:`SegmentEntry._cells` (the
table) and :meth:`SegmentEntry.as_dict` (``--json``); what a Segment shows in
Jupyter: ``_segment.segment_facts``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
from typing import Callable, Iterable

from ._reuse import kept_files
from ._admin import _name, _where
from ._control import HEAD_BYTES, MAGIC, PAGE_SIZE, parse_control
from ._display import human as _human
from ._errors import AccessMode, HeaderError, NotFoundError, user_facing
from ._header import HEADER, Kind, parse_header
from ._os import PREFIX, TEMP_PREFIX, backend
from ._segment import Dir, Segment
from ._reuse.kept_files import KEEP_PREFIX

__all__ = ["SegmentEntry", "SegmentInfo", "Listing", "ls", "list_segments", "segment_info", "describe_payload"]


@dataclasses.dataclass(frozen=True)
class SegmentEntry:
    """One segment as ``shmarray ls`` lists it (``pandas.DataFrame(shmarray.ls())`` makes a table).

    Made by :func:`ls`, :func:`list_segments` and :func:`segment_info`,
    read without attaching. Also named ``SegmentInfo``.

    Attributes
    ----------
    key : str or None
        The key (None for a segment made by native key, or a foreign object).
    native_key : str
        The file's name in the directory.
    size : int
        Usable bytes.
    kind : str
        'ndarray', 'arrow table', 'batch ring', 'raw', 'foreign' or 'kept'
        (memory a process keeps for reuse).
    payload : str
        What it holds, in a few words (``ndarray float64 (1000, 480) C``).
    pids : tuple of int
        The attached processes.
    attachments : int
        How many attachments hold it.
    persistent : bool
        It outlives its last holder.
    orphan : bool
        Its users (or, for kept memory, its owner) died: ``shmarray gc``
        frees it; listing only shows it.
    lock : str or None
        'exclusive' or 'shared' while someone holds the segment lock.
    lock_holder : int or None
        The pid of the exclusive holder.
    creator_pid : int
        Who created it.
    created : float
        When (UNIX seconds).
    shmarray : bool
        False for a foreign object.
    dir : str
        The directory it lives in.
    kept : tuple or None
        For kept memory: (owner alive, other names).
    """

    key: str | None
    native_key: str
    size: int
    kind: str
    payload: str
    pids: tuple[int, ...]
    attachments: int
    persistent: bool
    orphan: bool  # its users (or, for kept memory, its owner) died: gc frees it; ls only shows it
    lock: str | None
    lock_holder: int | None
    creator_pid: int
    created: float
    shmarray: bool
    dir: str = backend.SHM_DIR  # the directory the segment lives in
    kept: tuple[bool, int] | None = None

    @property
    def processes(self) -> int:
        """How many processes are attached."""
        return len(self.pids)

    @property
    def attached_pids(self) -> tuple[int, ...]:
        """The attached processes' pids (the same as ``pids``)."""
        return self.pids

    def as_dict(self) -> dict[str, object]:
        """The entry as ``shmarray ls --json`` prints it."""
        return {
            "key": self.key,
            "native_key": self.native_key,
            "size": self.size,
            "kind": self.kind,
            "payload": self.payload,
            "processes": self.processes,
            "attachments": self.attachments,
            "pids": list(self.pids),
            "persistent": self.persistent,
            "orphan": self.orphan,
            "lock": self.lock,
            "lock_holder": self.lock_holder,
            # A foreign object has no creator or creation time (not 0, not 1970).
            "creator_pid": self.creator_pid if self.shmarray else None,
            "created": self.created if self.shmarray and self.created else None,
            "dir": self.dir,
        }

    def _cells(self) -> tuple[str, ...]:
        """The columns of the text and HTML tables (HEADER_ROW)."""
        procs = str(self.processes) + (" (orphan: shmarray gc frees it)" if self.orphan else "")
        lock = self.lock or "-"
        if self.lock == "exclusive" and self.lock_holder is not None:
            lock = f"exclusive (pid {self.lock_holder})"
        return (
            self.key if self.key is not None else "-",
            "/" + self.native_key,
            _human(self.size),
            self.payload,
            procs,
            "yes" if self.persistent else "no",
            lock,
        )

    def _html_cells(self) -> tuple[str, ...]:
        """The table's columns, with the attached pids spelled out (HTML has the room)."""
        cells = list(self._cells())
        if self.pids:
            cells[4] += f" (pid{'s' if len(self.pids) > 1 else ''} {', '.join(map(str, self.pids))})"
        return tuple(cells)

    def __repr__(self) -> str:
        name = repr(self.key) if self.key is not None else f"/{self.native_key}"
        extra = ", persistent" if self.persistent else ""
        return (f"<shmarray segment {name}: {_human(self.size)}, {self.payload}, "
                f"{self.processes} attached{extra}>")

    def _repr_html_(self) -> str:
        from ._display import grid

        return grid(HEADER_ROW, [self._html_cells()])


#: The same record under the name ``list_segments`` and ``segment_info`` have always returned.
SegmentInfo = SegmentEntry
SegmentEntry.__module__ = "shmarray"

HEADER_ROW = ("KEY", "NATIVE NAME", "SIZE", "PAYLOAD", "PROCS", "PERSISTENT", "LOCK")


# -- what a segment holds: each payload kind describes itself -------------------------------------

# kind -> (label, module, its describer: descriptor bytes, payload length -> one line)
_KINDS = {
    Kind.NDARRAY: ("ndarray", "._npy", "describe_descriptor"),
    Kind.ARROW: ("arrow table", "._arrow", "describe_descriptor"),
    Kind.RING: ("batch ring", "._ring.layout", "describe_descriptor"),
}


def _describe(head: bytes, size: int, read_more: Callable[[int], bytes]) -> tuple[str, str]:
    """(kind, one line) of what the user bytes starting with *head* hold; never raises on bad bytes."""
    try:
        hdr = parse_header(head[: HEADER.size], size)
    except HeaderError:
        return "raw", "raw"
    label, module, name = _KINDS[hdr.kind]
    if not hdr.ready and hdr.kind == Kind.ARROW:  # a table is published by its ready flag
        return label, f"{label} (being written)"
    end = hdr.descriptor_offset + hdr.descriptor_length
    if end > len(head):
        try:
            head = read_more(end)
        except OSError:
            return label, f"{label} (unreadable header)"
    descriptor = bytes(head[hdr.descriptor_offset : end])
    describe = getattr(importlib.import_module(module, __package__), name)
    try:
        return label, describe(descriptor, hdr.payload_length)
    except Exception:  # noqa: BLE001 - belt and braces for `shmarray ls`: the describers do not raise
        return label, f"{label} (unreadable header)"


def _read(name: str, directory: str | None) -> SegmentEntry | None:
    """The record of the object *name* in *directory*, None when it cannot be opened."""
    try:
        fd = backend.open_existing(backend.qualify(directory, name), False)
    except OSError:
        return None
    try:
        size = backend.size_of(fd)
        raw = backend.pread(fd, PAGE_SIZE + HEAD_BYTES, 0)
        try:
            cb = parse_control(raw[:PAGE_SIZE], size)
        except Exception:  # noqa: BLE001 - a corrupt control block lists as foreign
            cb = None
        where = directory or backend.SHM_DIR
        if cb is None:
            return SegmentEntry(None, name, size, "foreign", "foreign", (), 0, False, False, None, None, 0, 0.0,
                                False, where)
        user = raw[cb.data_offset : cb.data_offset + min(cb.size, HEAD_BYTES)]
        if cb.data_offset > PAGE_SIZE:  # made on a machine with larger pages: read where its data is
            user = backend.pread(fd, min(cb.size, HEAD_BYTES), cb.data_offset)
        kind, payload = _describe(user, cb.size,
                                  lambda n: backend.pread(fd, min(n, cb.size), cb.data_offset))
        dev, ino = backend.identity(fd)
        pids, attachments, lock, holder = backend.lock_report(dev, ino)
    finally:
        backend.close(fd)
    return SegmentEntry(
        key=cb.key, native_key=name, size=cb.size, kind=kind, payload=payload, pids=tuple(sorted(pids)),
        attachments=attachments, persistent=cb.persistent, orphan=attachments == 0 and not cb.persistent,
        lock=lock, lock_holder=holder if lock else None, creator_pid=cb.creator, created=cb.created,
        shmarray=True, dir=where,
    )


def _kept(name: str, pid: int, size: int, alive: bool, nlink: int, where: str) -> SegmentEntry:
    text = f"kept for reuse by pid {pid}"
    if nlink > 1:
        text += " (its segment is still in use)"
    if not alive:
        text += " (owner gone: shmarray gc frees it)"
    # Memory only this hidden name holds, of a dead owner, is what that owner left behind.
    return SegmentEntry(None, name, size, "kept", text, (), 0, False, not alive and nlink <= 1, None, None,
                        pid, 0.0, True, where, kept=(alive, nlink - 1))


def describe_payload(entry: SegmentEntry) -> str:
    """What the segment holds, in a few words: 'ndarray float64 (1000, 480) C', 'arrow table, ...'."""
    return entry.payload


# -- listing -----------------------------------------------------------------------------------------


@user_facing
def list_segments(*, include_foreign: bool = False, dir: Dir = None) -> list[SegmentEntry]:
    """Every shmarray segment in the segment directory (and, with *include_foreign*, other objects and kept memory).

    Segments whose users all died, and memory a dead process kept for reuse,
    are listed as orphans (``orphan`` is True); nothing is freed
    (:func:`collect_garbage` does that).

    Parameters
    ----------
    include_foreign : bool, optional
        Also list other objects, and memory kept for reuse.
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).

    Returns
    -------
    list of SegmentEntry
    """
    d = _where(dir, "list")
    out = []
    for name in sorted(backend.list_names(d)):
        if name.startswith(TEMP_PREFIX) or name.startswith(KEEP_PREFIX):
            continue
        if not include_foreign and not name.startswith(PREFIX):
            # Segments created by native key carry our magic under any name.
            try:
                if backend.peek(backend.qualify(d, name), 8) != MAGIC:
                    continue
            except OSError:
                continue
        entry = _read(name, d)
        if entry is not None and (include_foreign or entry.shmarray):
            out.append(entry)
    for name, pid, size, alive, nlink in kept_files.kept_entries(d):
        kept = _kept(name, pid, size, alive, nlink, d or backend.SHM_DIR)
        if include_foreign or kept.orphan:  # a live process's kept memory is its own business
            out.append(kept)
    return out


@user_facing
def segment_info(key: str | None = None, *, native_key: str | None = None, dir: Dir = None) -> SegmentEntry:
    """The listing entry of one segment.

    Parameters
    ----------
    key : str, optional
        The segment's key.
    native_key : str, optional
        Its OS name instead.
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).

    Returns
    -------
    SegmentEntry

    Raises
    ------
    NotFoundError
        When there is no such segment.
    """
    name, label = _name(key, native_key)
    entry = _read(name, _where(dir, "info"))
    if entry is None:
        raise NotFoundError(f"no segment {label!r}; `shmarray ls` lists the segments there are", key)
    return entry


class Listing(list[SegmentEntry]):
    """The result of ``shmarray.ls()``: a list of SegmentEntry, shown as a table."""

    pattern: str | None = None  # what ls() was asked for, for the "nothing" message
    dir: str = backend.SHM_DIR  # the directory listed

    def __init__(self, entries: Iterable[SegmentEntry] = (), *, pattern: str | None = None,
                 dir: str | None = None) -> None:
        super().__init__(entries)
        self.pattern = pattern
        self.dir = dir or backend.SHM_DIR

    def keys(self) -> list[str | None]:
        """The keys, in listing order (None for segments made by native key)."""
        return [e.key for e in self]

    def to_text(self) -> str:
        """The table ``shmarray ls`` prints."""
        if not self:
            if self.pattern is not None:
                return f"no shmarray segments match {self.pattern!r}"
            return f"no shmarray segments in {self.dir}"
        lines = [HEADER_ROW, *(e._cells() for e in self)]
        widths = [max(len(r[i]) for r in lines) for i in range(len(HEADER_ROW))]
        text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)
        summary = self.orphans_text()
        return text + ("\n\n" + summary if summary else "")

    def orphans_text(self) -> str:
        """One line on what dead processes left in this listing ('' when nothing): gc is what frees it."""
        orphans = [e for e in self if e.orphan]
        if not orphans:
            return ""
        n = len(orphans)
        total = sum(e.size for e in orphans)
        return (f"{n} orphan{'s' if n != 1 else ''} ({_human(total)}): left by processes that died; "
                f"`shmarray gc` frees {'them' if n != 1 else 'it'}")

    def __repr__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        from ._display import esc, grid

        if not self:
            return f"<p>{esc(self.to_text())}</p>"
        n = len(self)
        caption = f"{n} segment{'s' if n != 1 else ''} in {esc(self.dir)}"
        if self.orphans_text():
            caption += f"; {esc(self.orphans_text())}"
        return grid(HEADER_ROW, (e._html_cells() for e in self), caption=caption)


Listing.__module__ = "shmarray"


@user_facing
def ls(pattern: str | None = None, *, include_foreign: bool = False, dir: Dir = None) -> Listing:
    """The shmarray segments in the segment directory, as ``shmarray ls`` lists them.

    Listing never frees anything: segments whose users all died are shown as
    orphans (:func:`collect_garbage` frees them).

    Parameters
    ----------
    pattern : str, optional
        Keep the keys that match it (``fnmatch``: ``"frames-*"``); segments
        made by native key match on their native name.
    include_foreign : bool, optional
        Also list other objects in the directory, and memory kept for reuse.
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).

    Returns
    -------
    Listing
        A list of :class:`SegmentEntry`; printed as a table, an HTML table in
        Jupyter; ``pandas.DataFrame(shmarray.ls())`` makes a frame of it.

    Examples
    --------
    >>> import numpy as np, shmarray
    >>> a = shmarray.create("doc-ls-frames", (10, 10), np.uint8)
    >>> [(e.key, e.kind) for e in shmarray.ls("doc-ls-*")]
    [('doc-ls-frames', 'ndarray')]
    """
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"ls: pattern must be a str such as 'frames-*', not {type(pattern).__name__}")
    # Segments whose users all died are listed as orphans, not freed: a listing that
    # freed memory on the way left `shmarray gc` nothing to report (issue: 1 GiB gone unseen).
    entries = list_segments(include_foreign=include_foreign, dir=dir)
    kept = []
    for e in entries:
        name = e.key if e.key is not None else e.native_key
        if pattern is None or fnmatch.fnmatchcase(name, pattern):
            kept.append(e)
    return Listing(kept, pattern=pattern, dir=None if dir is None else backend.normal_dir(dir))
