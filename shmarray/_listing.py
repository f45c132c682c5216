"""``shmarray.ls()``: the segments in /dev/shm, as the ``shmarray ls`` command shows them.

One code path for the command line and for Python: ``ls()`` returns a
:class:`Listing` of :class:`SegmentEntry` (a list, with a text table for its
repr and an HTML table in Jupyter); the CLI prints the same entries. The
payload column is read from each segment's payload header without
attaching, so listing never changes a segment's life. This module sits above
the payload layers: it asks each of them to describe its own descriptor.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Iterable

from ._admin import SegmentInfo, list_segments, read_head
from ._attachment import sweep_orphans
from ._display import human as _human
from ._os import backend
from ._segment import Dir
from ._errors import HeaderError, ShmError
from ._header import HEADER, Kind, describe_head, parse_header

__all__ = ["ls", "Listing", "SegmentEntry", "describe_payload", "entry_for"]


# -- what a segment holds ----------------------------------------------------------


def _payload_head(info: SegmentInfo) -> dict[str, Any]:
    """The payload header of a segment, read without attaching: describe_head()'s dict."""
    try:
        hdr = parse_header(read_head(info.native_key, HEADER.size, info.dir), info.size)
        head = read_head(info.native_key, hdr.descriptor_offset + hdr.descriptor_length, info.dir)
    except (OSError, ShmError):  # no payload header, removed meanwhile, unreadable
        return {"kind": "raw"}
    return describe_head(head, info.size)


def _describe_array(head: dict[str, Any]) -> str:
    from ._npy import describe_descriptor

    return describe_descriptor(head.get("descriptor", b""))  # 'ndarray float64 (1000, 480) C'


def _describe_arrow(head: dict[str, Any]) -> str:
    from ._arrow import describe_descriptor

    if not head.get("ready", True):
        return "arrow table (being written)"
    return describe_descriptor(head.get("descriptor", b""))


def _describe_ring(head: dict[str, Any]) -> str:
    from ._ring.layout import parse_descriptor

    try:
        lay = parse_descriptor(head.get("descriptor", b""), int(head.get("payload_length", 0)), key=None)
    except HeaderError:
        return "batch ring (corrupt descriptor)"
    fields = ", ".join(f"{f.name}: {f.dtype} {f.shape}" for f in lay.fields)
    if len(fields) > 160:
        fields = fields[:157] + "..."
    return f"batch ring, {lay.slots} slots of {fields}"


def _describe(info: SegmentInfo) -> tuple[str, str]:
    """(kind, one line) of what the segment holds."""
    if info.kept is not None:
        alive, names = info.kept
        text = f"kept for reuse by pid {info.creator_pid}"
        if names:
            text += " (its segment is still in use)"
        if not alive:
            text += " (owner gone: the next create, ls or gc frees it)"
        return "kept", text
    if not info.shmarray:
        return "foreign", "foreign"
    head = _payload_head(info)
    kind = head.get("kind_id")
    if kind == Kind.NDARRAY:
        return "ndarray", _describe_array(head)
    if kind == Kind.ARROW:
        return "arrow table", _describe_arrow(head)
    if kind == Kind.RING:
        return "batch ring", _describe_ring(head)
    return "raw", "raw"


def describe_payload(info: SegmentInfo) -> str:
    """What the segment holds, in a few words: 'ndarray float64 (1000, 480) C', 'arrow table, ...'."""
    return _describe(info)[1]


# -- entries -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SegmentEntry:
    """One segment as ``shmarray.ls()`` lists it (``pandas.DataFrame(shmarray.ls())`` makes a table)."""

    key: str | None
    native_key: str
    size: int
    kind: str
    payload: str
    pids: tuple[int, ...]
    attachments: int
    persistent: bool
    orphan: bool
    lock: str | None
    lock_holder: int | None
    creator_pid: int
    created: float
    shmarray: bool
    dir: str = backend.SHM_DIR  # the directory the segment lives in

    @property
    def processes(self) -> int:
        """How many processes are attached."""
        return len(self.pids)

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
        """The columns of the text and HTML tables (HEADER)."""
        procs = str(self.processes) + (" (orphan: gc removes it)" if self.orphan else "")
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


HEADER_ROW = ("KEY", "NATIVE NAME", "SIZE", "PAYLOAD", "PROCS", "PERSISTENT", "LOCK")


def entry_for(info: SegmentInfo) -> SegmentEntry:
    """The listing entry of *info* (reads the segment's payload header)."""
    kind, payload = _describe(info)
    return SegmentEntry(
        key=info.key, native_key=info.native_key, size=info.size, kind=kind, payload=payload,
        pids=info.attached_pids, attachments=info.attachments, persistent=info.persistent,
        orphan=info.orphan, lock=info.lock, lock_holder=info.lock_holder,
        creator_pid=info.creator_pid, created=info.created, shmarray=info.shmarray, dir=info.dir,
    )


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
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)

    def __repr__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        from ._display import esc, grid

        if not self:
            return f"<p>{esc(self.to_text())}</p>"
        n = len(self)
        return grid(HEADER_ROW, (e._html_cells() for e in self),
                    caption=f"{n} segment{'s' if n != 1 else ''} in {esc(self.dir)}")


def ls(pattern: str | None = None, *, include_foreign: bool = False, dir: Dir = None) -> Listing:
    """The shmarray segments in the segment directory, as ``shmarray ls`` lists them.

    *dir* defaults to ``SHMARRAY_DIR``, else /dev/shm.

    *pattern* keeps the keys that match it (``fnmatch``: ``"frames-*"``);
    segments made by native key match on their native name. With
    *include_foreign*, other objects in /dev/shm are listed too. In Jupyter
    the result shows as a table; it is a list of :class:`SegmentEntry`.
    """
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"ls: pattern must be a str such as 'frames-*', not {type(pattern).__name__}")
    infos = list_segments(include_foreign=include_foreign, dir=dir)
    if not include_foreign:
        # Segments whose users all died are gone for the API already; listing them
        # frees their memory too. The full listing (--all) shows them as they are.
        names = {id(i): backend.qualify(i.dir, i.native_key) for i in infos if i.shmarray}
        gone = set(sweep_orphans(list(names.values())))
        infos = [i for i in infos if names.get(id(i)) not in gone]
    entries = []
    for info in infos:
        name = info.key if info.key is not None else info.native_key
        if pattern is None or fnmatch.fnmatchcase(name, pattern):
            entries.append(entry_for(info))
    return Listing(entries, pattern=pattern, dir=None if dir is None else backend.normal_dir(dir))
