"""Arrow tables and pandas frames in a segment, zero-copy: share_table / attach_table.

Byte layout of the user bytes (after the payload header of ``_header``,
kind ARROW)::

    64      descriptor: UTF-8 JSON, at most MAX_DESCRIPTOR bytes, e.g.
            {"format": "arrow-ipc-stream", "version": 1, "rows": 5000000,
             "columns": 4, "schema": "i: int64, f: double, ..."}
            "schema" is a summary for listings (cut at SCHEMA_SUMMARY characters);
            the payload's own schema message is the truth.
    p       payload: one Arrow IPC *stream* (schema message, dictionary and
            record batch messages, end-of-stream marker), uncompressed, little-endian.

Why the stream format rather than the file (Feather) format: a stream may
replace a column's dictionary from one batch to the next, so a chunked
dictionary column is written as it is (the file format would first unify the
dictionaries, a copy), and a reader needs no footer. Both read zero-copy from
a buffer. The payload starts 64-byte aligned and IPC aligns every body buffer
to 8 bytes inside the stream, so every buffer is at least 8-byte aligned in
memory.

Writing. The stream is sized first by writing it to a ``pa.MockOutputStream``
(metadata only, no bytes move), then written once, straight into the new
segment through its fd (``Segment._create``'s ``write``: pwrite, faster
than faulting fresh pages through a mapping; the ``arrow`` group measures both). The segment
is published only once the stream is complete.

Reading (``attach_table``). The segment is mapped read-only; the mapping is
wrapped in one Arrow buffer whose base object holds the ``Segment``, and the
IPC reader slices every column buffer out of it. So the segment stays
attached while any buffer of any table, column, slice or pandas block
derived from it is alive, and detaches when the last one is collected.

What an attacher checks (``validate=``):

``"metadata"``
    the payload header and descriptor; the IPC metadata (Arrow verifies every
    flatbuffer and that each buffer lies inside its message body); row and
    column counts against the descriptor; Arrow's structural validation
    (lengths, buffer sizes, first and last offsets); every buffer lies inside
    the mapping (so nothing was copied, decompressed or byte-swapped).
    Cost: O(columns x chunks), independent of the row count (the ``arrow``
    group's "attach_table alone" rows; benchmarks/results/notes.md).
``"bounds"`` (default)
    the above, plus every offset, list size, dictionary index, union type
    code and run end of the columns whose types have them (strings, binary,
    lists, maps, views, dictionaries, unions, run-end encoded), so no access
    can leave a buffer. UTF-8 validity is not checked (decoding such a string
    in Python raises UnicodeDecodeError). Cost: O(rows of those columns);
    columns of fixed-width types cost nothing. A string column's offsets are
    checked as binary's (``"full"`` checks UTF-8 as well, several times
    slower: the ``arrow`` group's "attach_table alone" rows).
``"full"``
    Arrow's full validation of every column (``Table.validate(full=True)``),
    UTF-8 included. Cost: O(data).

A corrupt payload is a HeaderError at attach. A middle string offset flipped
to a large value passes ``"metadata"`` and can crash a later access, so
``"metadata"`` is for writers you trust. No attach-time check can guard
against a process that writes the segment *after* you attached; the default
permissions (0o600) limit writers to your own user.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

from ._errors import AccessMode, HeaderError, NotFoundError, ShmError, WrongKindError, user_facing
from ._header import MAX_DESCRIPTOR, Kind, layout, pack_header, read_header
from ._progress import check_progress, label, reporting
from ._segment import Dir, Segment
from ._reference import Reference, rebuild, reduce

if TYPE_CHECKING:  # pragma: no cover
    import pandas
    import pyarrow

__all__ = [
    "share_table",
    "attach_table",
    "share_frame",
    "attach_frame",
    "TableDescriptor",
    "parse_descriptor",
    "describe_descriptor",
]

FORMAT = "arrow-ipc-stream"
DESCRIPTOR_VERSION = 1
# The schema summary is for `shmarray ls`; a table of 100 000 columns must
# not make a 100 000-column descriptor.
SCHEMA_SUMMARY = 400
# Writes smaller than this (IPC metadata, padding) are gathered into one
# pwrite: an IPC stream of many small batches is otherwise thousands of calls.
_GATHER = 64 * 1024

Validate = Literal["metadata", "bounds", "full"]
_VALIDATE = ("metadata", "bounds", "full")
ACCEPTED = (
    "a pyarrow.Table, a pyarrow.RecordBatch, a pandas.DataFrame, or an object with "
    "__arrow_c_stream__ (e.g. a polars DataFrame)"
)


# -- the descriptor -----------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TableDescriptor:
    """The parsed JSON descriptor of a table segment."""

    rows: int
    columns: int
    schema: str


def _summary(schema: "pyarrow.Schema") -> str:
    parts: list[str] = []
    used = 0
    for i, field in enumerate(schema):
        part = f"{field.name}: {field.type}"
        if used + len(part) > SCHEMA_SUMMARY and parts:
            parts.append(f"... (+{len(schema) - i} more)")
            break
        parts.append(part[:SCHEMA_SUMMARY])
        used += len(part) + 2
    return ", ".join(parts)


def _descriptor(table: "pyarrow.Table") -> bytes:
    d = {
        "format": FORMAT,
        "version": DESCRIPTOR_VERSION,
        "rows": table.num_rows,
        "columns": table.num_columns,
        "schema": _summary(table.schema),
    }
    return json.dumps(d, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _count(d: dict[str, Any], name: str, label: str, key: str | None) -> int:
    value = d.get(name)
    if type(value) is not int or value < 0:
        raise HeaderError(f"{label}: descriptor field {name!r} is not a count: {value!r}", key)
    return value


def parse_descriptor(raw: bytes, *, key: str | None = None) -> TableDescriptor:
    """Validate the JSON descriptor of a table segment; HeaderError when it is corrupt."""
    label = f"segment {key!r}"
    if len(raw) > MAX_DESCRIPTOR:
        raise HeaderError(f"{label}: table descriptor of {len(raw)} bytes exceeds the cap", key)
    try:
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HeaderError(f"{label}: table descriptor is not valid JSON ({e})", key) from e
    if not isinstance(d, dict):
        raise HeaderError(f"{label}: table descriptor is not a JSON object: {raw[:80]!r}", key)
    if d.get("format") != FORMAT:
        raise HeaderError(f"{label}: table payload format {d.get('format')!r} is not {FORMAT!r}", key)
    if d.get("version") != DESCRIPTOR_VERSION:
        raise HeaderError(
            f"{label}: table descriptor version {d.get('version')!r}; this shmarray reads "
            f"{DESCRIPTOR_VERSION}", key)
    schema = d.get("schema")
    if not isinstance(schema, str):
        raise HeaderError(f"{label}: descriptor field 'schema' is not a string: {schema!r}", key)
    return TableDescriptor(rows=_count(d, "rows", label, key), columns=_count(d, "columns", label, key),
                           schema=schema)


def describe_descriptor(raw: bytes, payload_length: int = 0) -> str:
    """One line for `shmarray ls`: rows, columns and the schema summary (never raises on corrupt bytes)."""
    try:
        d = parse_descriptor(raw)
    except HeaderError:
        return "arrow table (corrupt descriptor)"
    rows = "row" if d.rows == 1 else "rows"
    cols = "column" if d.columns == 1 else "columns"
    schema = f": {d.schema}" if d.schema else ""
    return f"arrow table, {d.rows:,} {rows} x {d.columns} {cols}{schema}"


# -- input --------------------------------------------------------------------


def _pa() -> Any:
    import pyarrow

    return pyarrow


def _is_frame(data: object) -> bool:
    # pandas is optional: an object can only be a DataFrame if pandas is loaded.
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(data, pd.DataFrame)


def _as_table(data: object, key: str) -> "pyarrow.Table":
    pa = _pa()
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if _is_frame(data):
        # preserve_index=None: a RangeIndex goes into the pandas metadata, any
        # other index becomes columns, so to_pandas() gives the same frame back.
        try:
            return pa.Table.from_pandas(data, preserve_index=None)
        except (pa.ArrowException, ValueError, TypeError) as e:
            raise TypeError(f"share_table({key!r}): this DataFrame has no Arrow form ({e})") from e
    if isinstance(data, (pa.Array, pa.ChunkedArray)):
        raise TypeError(
            f"share_table({key!r}) takes {ACCEPTED}, not a {type(data).__name__}; "
            "wrap columns in pyarrow.table({'name': array})")
    if hasattr(type(data), "__arrow_c_stream__"):
        try:
            reader = pa.RecordBatchReader.from_stream(data)
            return reader.read_all()
        except (pa.ArrowException, ValueError, TypeError) as e:
            raise TypeError(
                f"share_table({key!r}): {type(data).__name__}.__arrow_c_stream__ did not give a "
                f"stream of record batches ({e})") from e
    raise TypeError(f"share_table({key!r}) takes {ACCEPTED}, not {type(data).__module__}."
                    f"{type(data).__qualname__}")


# -- writing --------------------------------------------------------------------


class _FdSink:
    """A file-like sink for pa.PythonFile that pwrites into the segment being built.

    Large writes (column buffers, which pyarrow hands over as pa.Buffer
    without a copy) go straight to ``write``; small ones are gathered first.
    """

    closed = False

    def __init__(self, write: Callable[[memoryview, int], None], offset: int) -> None:
        self._write = write
        self.offset = offset
        self._pending = bytearray()
        self._pending_at = offset

    def write(self, data: Any) -> int:
        view = memoryview(data)
        n = view.nbytes
        if n < _GATHER:
            if not self._pending:
                self._pending_at = self.offset
            self._pending += view
            if len(self._pending) >= _GATHER:
                self.flush()
        else:
            self.flush()
            self._write(view, self.offset)
        self.offset += n
        return n

    def flush(self) -> None:
        if self._pending:
            self._write(memoryview(self._pending), self._pending_at)
            self._pending = bytearray()

    def close(self) -> None:
        self.flush()
        self.closed = True


def _write_options() -> Any:
    pa = _pa()
    # allow_64bit: batches of more than 2**31 - 1 rows are legal in memory.
    return pa.ipc.IpcWriteOptions(allow_64bit=True, use_threads=False)


def _write_stream(sink: Any, table: "pyarrow.Table") -> None:
    pa = _pa()
    with pa.ipc.new_stream(sink, table.schema, options=_write_options()) as writer:
        writer.write_table(table)


@user_facing
def share_table(key: str, data: object, *, persistent: bool = False,
                progress: bool = False, dir: Dir = None) -> "pyarrow.Table":
    """Write a table into a new segment *key* and return it, read back zero-copy from there.

    The segment lives while some process holds it: this table, anything
    derived from it, or a table attached elsewhere. When the last of them
    goes (or its process exits) the segment goes too, so keep the result
    until the other processes have attached it, or pass ``persistent=True``
    to keep it until ``shmarray.unlink(key)``.

    Parameters
    ----------
    key : str
        The segment's key.
    data : pyarrow.Table, pyarrow.RecordBatch, pandas.DataFrame or Arrow stream
        The table: a ``pandas.DataFrame`` goes through
        ``pa.Table.from_pandas`` (the index and the pandas metadata are kept,
        so ``to_pandas()`` gives the same frame back); any object with
        ``__arrow_c_stream__`` (a polars DataFrame, a DuckDB result ...) is
        read as a stream.
    persistent : bool, optional
        Keep the segment after the last detach, until ``shmarray.unlink(key)``.
    progress : bool, optional
        Show a bar (``tqdm.auto``) while the stream is written; needs tqdm.
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).

    Returns
    -------
    pyarrow.Table
        The table as it lives in the segment (mapped read-only). Holding it (or
        anything derived from it) keeps the segment attached.

    Raises
    ------
    AlreadyExistsError
        When a live segment has *key*.
    OutOfResourcesError
        When the directory has no room for the stream.
    TypeError
        For *data* of another type.

    Examples
    --------
    >>> import pyarrow as pa, shmarray
    >>> t = shmarray.share_table("doc-table", pa.table({"px": [1.5, 2.5], "qty": [10, 20]}))
    >>> shmarray.attach_table("doc-table").num_rows
    2
    """
    seg = Segment(key, dir=dir)  # refuses a bad key before anything else
    show = check_progress(progress, f"share_table({key!r})")
    table = _as_table(data, key)
    pa = _pa()
    try:
        table.validate()
    except pa.ArrowException as e:
        raise ValueError(f"share_table({key!r}): the table is not valid Arrow data ({e})") from e
    # Sizing pass: the same writer into a sink that only counts.
    mock = pa.MockOutputStream()
    _write_stream(mock, table)
    stream_size = mock.size()
    descriptor = _descriptor(table)
    payload_offset, total = layout(len(descriptor), stream_size, boundary=seg._boundary())
    head = pack_header(Kind.ARROW, descriptor, payload_offset, stream_size)

    def fill(write: Callable[[memoryview, int], None]) -> None:
        # reserve=False: these writes cover every byte, header padding included.
        write(memoryview(head + bytes(payload_offset - len(head))), 0)
        with reporting(write, stream_size, label("share_table", key), show) as w:
            sink = _FdSink(w, payload_offset)
            _write_stream(pa.PythonFile(sink, mode="w"), table)
            sink.close()
        if sink.offset != total:
            raise HeaderError(
                f"share_table({key!r}): the IPC stream came out {sink.offset - payload_offset} bytes "
                f"long, {stream_size} were sized; nothing was published", key)

    seg._create(total, AccessMode.ReadOnly, persistent=persistent, fill=fill, reserve=False)
    try:
        # Our own bytes, just written: the structural checks are enough.
        return _read_table(seg, key, "metadata")
    except BaseException:
        seg.detach()
        raise


# -- reading ----------------------------------------------------------------------


class _Mapped:
    """The base object of the Arrow buffer over a segment: keeps the Segment attached."""

    __slots__ = ("segment", "view", "__weakref__")

    def __init__(self, segment: Segment, view: Any) -> None:
        self.segment = segment
        self.view = view


def _check_validate(validate: object) -> str:
    if validate not in _VALIDATE:
        raise ValueError(f"validate must be one of {', '.join(map(repr, _VALIDATE))}, not {validate!r}")
    return str(validate)


@user_facing
def attach_table(key: "str | TableHandle", *, validate: Validate = "bounds", dir: Dir = None) -> "pyarrow.Table":
    """Map the table in segment *key* (or the one a :class:`TableHandle` names), zero-copy.

    Every buffer lies in the segment. The segment is attached read-only and
    stays attached while any buffer of the table (or of a slice, column or
    zero-copy pandas block of it) is alive.

    Parameters
    ----------
    key : str or TableHandle
        The segment's key, or a handle from :func:`table_handle`.
    validate : {"bounds", "metadata", "full"}, optional
        What is checked before the table is built. ``"metadata"``:
        O(columns), for writers you trust. ``"bounds"`` (the default): also
        every offset and index, so no access can leave its buffer; O(rows) of
        variable-size columns. ``"full"``: UTF-8 too; O(data).
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm; a
        handle knows its own).

    Returns
    -------
    pyarrow.Table
        The table, every buffer in the segment's mapping.

    Raises
    ------
    NotFoundError
        When there is no segment *key* (or the handle's segment is gone or
        was replaced).
    HeaderError
        When the segment holds something else (naming what), or a corrupt
        payload.
    """
    mode = _check_validate(validate)
    if isinstance(key, TableHandle):
        return key._table(mode)
    seg = Segment(key, dir=dir)
    seg.attach(AccessMode.ReadOnly)
    try:
        return _read_table(seg, key, mode)
    except BaseException:
        seg.detach()
        raise


class TableHandle:
    """A small picklable handle on a table that lives in a segment; ``attach_table(handle)`` maps it.

    Made by :func:`table_handle`. ``pyarrow.Table`` pickles its bytes; a
    handle pickles as a reference to the segment instance (about 100 bytes),
    as a SharedArray does, so the receiver maps the same buffers. Holding a
    handle keeps its segment attached (so alive, when it is not persistent).
    A handle sent by a transport to another host (``shmarray.dask``) carries
    the table's bytes instead, and ``attach_table`` there gives that copy.
    """

    __slots__ = ("_key", "_seg", "_value")

    def __init__(self, key: str, *, dir: Dir = None) -> None:
        """A handle on the table in segment *key* (attached read-only now: NotFoundError if there is none)."""
        seg = Segment(key, dir=dir)
        seg.attach(AccessMode.ReadOnly)
        try:
            _read_table(seg, key, "metadata")  # it must hold a table; the table itself is dropped
        except BaseException:
            seg.detach()
            raise
        self._key = key
        self._seg: Segment | None = seg
        self._value: Any = None

    @classmethod
    def _of(cls, key: str, seg: Segment | None, value: Any = None) -> TableHandle:
        """A handle on *seg* (attached), or, with no segment, on the table *value* that arrived by value."""
        handle = cls.__new__(cls)
        handle._key, handle._seg, handle._value = key, seg, value
        return handle

    @property
    def key(self) -> str:
        """The key of the table's segment."""
        return self._key

    @property
    def by_value(self) -> bool:
        """True for a handle that arrived from another host with the table's bytes (no segment)."""
        return self._seg is None

    def _table(self, mode: str) -> "pyarrow.Table":
        if self._seg is None:
            return self._value
        seg = _another_user(self._seg)
        try:
            return _read_table(seg, self._key, mode)
        except BaseException:
            seg.detach()
            raise

    def __reduce__(self) -> tuple[Any, ...]:
        if self._seg is None:
            return _handle_by_value, (self._key, self._value)
        ref = Reference.to(self._seg, AccessMode.ReadOnly)
        if ref.by_value():
            return _handle_by_value, (self._key, self._table("metadata"))
        return reduce(_rebuild_handle, ref)

    def __repr__(self) -> str:
        where = "by value" if self._seg is None else "in its segment"
        return f"<shmarray.TableHandle {self._key!r} ({where})>"


TableHandle.__module__ = "shmarray"


@user_facing
def table_handle(table_or_key: "pyarrow.Table | str", *, dir: Dir = None) -> TableHandle:
    """A :class:`TableHandle` on a table from ``share_table``/``attach_table``, or on segment *key*.

    Parameters
    ----------
    table_or_key : pyarrow.Table or str
        A table that lives in a segment, or a segment's key.
    dir : str or os.PathLike, optional
        The segment directory, for a key (default ``SHMARRAY_DIR``, else
        /dev/shm).

    Returns
    -------
    TableHandle
        A ~100-byte picklable reference that keeps the segment while held.

    Raises
    ------
    TypeError
        For a table that does not live in a segment (pickle it by value, or
        ``share_table`` it first).
    NotFoundError
        For a key with no segment.

    Examples
    --------
    >>> import pickle, pyarrow as pa, shmarray
    >>> t = shmarray.share_table("doc-handle", pa.table({"x": list(range(1000))}))
    >>> h = shmarray.table_handle(t)
    >>> len(pickle.dumps(h)) < 300
    True
    >>> shmarray.attach_table(pickle.loads(pickle.dumps(h))).num_rows
    1000
    """
    if isinstance(table_or_key, str):
        return TableHandle(table_or_key, dir=dir)
    seg = _segment_of(table_or_key)
    if seg is None:
        raise TypeError(f"table_handle(): a {type(table_or_key).__name__} that does not live in a shmarray "
                        "segment (give a key, or a table from share_table/attach_table)")
    return TableHandle._of(seg.key or "", _another_user(seg))


def _another_user(seg: Segment) -> Segment:
    """One more read-only Segment object on the instance *seg* is attached to (nothing is opened)."""
    ref = Reference.to(seg, AccessMode.ReadOnly)
    return Segment._of_instance(ref.key, None, AccessMode.ReadOnly, ref.host, ref.incarnation, ref.dir)


def _rebuild_handle(fields: tuple[Any, ...], detail: Any = ()) -> TableHandle:
    """Unpickle a table handle's reference (``_reference``)."""
    return rebuild(_rebuild_handle, _handle_of, fields, detail)  # type: ignore[no-any-return]


def _handle_of(seg: Segment, ref: Reference, detail: Any) -> TableHandle:
    return TableHandle._of(ref.key or "", seg)


def _handle_by_value(key: str, table: "pyarrow.Table") -> TableHandle:
    return TableHandle._of(key, None, table)


# The segment behind each live table that _read_table made, by the table's id
# (pyarrow tables are not hashable, so not weakly keyed); the table's finalizer
# removes its entry.
_HOLDERS: dict[int, "_Mapped"] = {}


def _segment_of(table: object) -> Segment | None:
    holder = _HOLDERS.get(id(table))
    return holder.segment if holder is not None else None


def _read_table(seg: Segment, key: str, mode: str) -> "pyarrow.Table":
    pa = _pa()
    data = seg.const_data
    if data is None:  # pragma: no cover - attached just above
        raise HeaderError(f"segment {key!r} is not attached", key)
    try:
        # share_table publishes complete segments only: no waiting for "ready".
        hdr, raw = read_header(data, expect=Kind.ARROW, key=key, wait=0)
    except WrongKindError:
        raise
    except NotFoundError as e:
        raise HeaderError(f"segment {key!r} is marked as still being written, which a published "
                          "table never is; the segment is corrupt", key) from e
    desc = parse_descriptor(raw, key=key)
    # Over the attachment's root ndarray: its death tells the segment layer
    # that the mapping is idle and can be kept for the next table (_reuse.idle_maps).
    view = pa.py_buffer(seg._root())
    holder = _Mapped(seg, view)
    whole = pa.foreign_buffer(view.address, view.size, base=holder)
    lo = view.address + hdr.payload_offset
    try:
        table = pa.ipc.open_stream(whole.slice(hdr.payload_offset, hdr.payload_length)).read_all()
        _check_table(table, desc, key, lo, lo + hdr.payload_length, mode)
    except ShmError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever fails to decode or check is a corrupt payload
        raise HeaderError(f"segment {key!r} holds a corrupt Arrow IPC payload ({type(e).__name__}: {e}); "
                          "share_table() it again", key) from e
    # Buffers keep the segment; so does the table object itself, because a
    # table without rows or columns has no buffer in the segment at all.
    _HOLDERS[id(table)] = holder
    weakref.finalize(table, _release, id(table), holder).atexit = False
    return table


def _check_table(table: "pyarrow.Table", desc: TableDescriptor, key: str, lo: int, hi: int, mode: str) -> None:
    """The checks of *mode* (module docs) on a table just read from [lo, hi); HeaderError or others on failure."""
    table.validate()
    _check_schema(table.schema)
    if table.num_rows != desc.rows or table.num_columns != desc.columns:
        raise HeaderError(
            f"segment {key!r}: the payload has {table.num_rows} rows x {table.num_columns} columns, "
            f"its descriptor says {desc.rows} x {desc.columns}; the segment is corrupt", key)
    outside = _first_outside(table, lo, hi)
    if outside is not None:
        raise HeaderError(
            f"segment {key!r}: column {outside!r} was not mapped in place (compressed or "
            "byte-swapped IPC, which share_table never writes); the segment is corrupt", key)
    if mode != "metadata":
        _validate_values(table, key, full=mode == "full")


def _release(ident: int, holder: _Mapped) -> None:
    """Drop the last reference a table object held on its segment."""
    if _HOLDERS.get(ident) is holder:
        del _HOLDERS[ident]


# -- checks -------------------------------------------------------------------------


def _array_buffers(arr: Any) -> Iterator[Any]:
    """Every buffer of *arr*: its own, its children's and its dictionaries'."""
    pa = _pa()
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    t = arr.type
    if pa.types.is_dictionary(t):
        yield from _array_buffers(arr.indices)
        yield from _array_buffers(arr.dictionary)
        return
    # buffers() covers the children of nested types, but not dictionaries
    # found below the top level: walk children that may hold one.
    if not _has_dictionary(t):
        yield from (b for b in arr.buffers() if b is not None)
        return
    # A nested type with a dictionary inside: own buffers, then each child.
    own = t.num_buffers
    yield from (b for b in arr.buffers()[:own] if b is not None)
    for child in _children(arr):
        yield from _array_buffers(child)


def _children(arr: Any) -> list[Any]:
    pa = _pa()
    t = arr.type
    if pa.types.is_struct(t):
        return [arr.field(i) for i in range(t.num_fields)]
    if pa.types.is_union(t):
        return [arr.field(i) for i in range(t.num_fields)]
    if pa.types.is_run_end_encoded(t):
        return [arr.run_ends, arr.values]
    if hasattr(arr, "values"):
        return [arr.values]
    return []  # pragma: no cover - every nested type is handled above


def _has_dictionary(t: Any) -> bool:
    pa = _pa()
    if isinstance(t, pa.ExtensionType):
        return _has_dictionary(t.storage_type)
    if pa.types.is_dictionary(t):
        return True
    return any(_has_dictionary(t.field(i).type) for i in range(t.num_fields))


def _first_outside(table: "pyarrow.Table", lo: int, hi: int) -> str | None:
    """The name of the first column with a buffer outside [lo, hi), else None."""
    for name, col in zip(table.column_names, table.columns):
        for chunk in col.chunks:
            for b in _array_buffers(chunk):
                if b.size and not (lo <= b.address and b.address + b.size <= hi):
                    return str(name)
    return None


def _check_schema(schema: "pyarrow.Schema") -> None:
    """Decode every name and type string now: corrupt UTF-8 there fails here, not in a user's loop."""
    for field in schema:
        _check_field(field)


def _check_field(field: Any) -> None:
    str(field.name)
    str(field.type)  # names of nested fields, time zones, extension names
    t = field.type
    if isinstance(t, _pa().ExtensionType):
        t = t.storage_type
    for i in range(t.num_fields):
        _check_field(t.field(i))
    value_type = getattr(t, "value_type", None)  # dictionary values, run-end encoded values
    if value_type is not None and not t.num_fields:
        _check_field(_pa().field("values", value_type))


def _needs_bounds(t: Any) -> bool:
    """True when values of type *t* hold offsets, sizes or indices that steer memory access."""
    pa = _pa()
    if isinstance(t, pa.ExtensionType):
        return _needs_bounds(t.storage_type)
    if (pa.types.is_dictionary(t) or pa.types.is_union(t) or pa.types.is_run_end_encoded(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t) or pa.types.is_binary_view(t) or pa.types.is_string_view(t)
            or pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)
            or pa.types.is_large_list_view(t) or pa.types.is_map(t)):
        return True
    return any(_needs_bounds(t.field(i).type) for i in range(t.num_fields))


def _no_utf8(t: Any) -> Any:
    """*t* with every string type replaced by its binary twin (same layout, no UTF-8 check)."""
    pa = _pa()
    if pa.types.is_string(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.large_binary()
    if pa.types.is_string_view(t):
        return pa.binary_view()
    if pa.types.is_dictionary(t):
        return pa.dictionary(t.index_type, _no_utf8(t.value_type), t.ordered)
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_no_utf8(f.type)) for f in t])
    if pa.types.is_map(t):
        return pa.map_(t.key_field.with_type(_no_utf8(t.key_type)),
                       t.item_field.with_type(_no_utf8(t.item_type)), t.keys_sorted)
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_no_utf8(t.value_type)))
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_no_utf8(t.value_type)))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_no_utf8(t.value_type)), t.list_size)
    if pa.types.is_list_view(t):
        return pa.list_view(t.value_field.with_type(_no_utf8(t.value_type)))
    if pa.types.is_large_list_view(t):
        return pa.large_list_view(t.value_field.with_type(_no_utf8(t.value_type)))
    if pa.types.is_run_end_encoded(t):
        return pa.run_end_encoded(t.run_end_type, _no_utf8(t.value_type))
    return t  # unions and everything else: validated as they are


def _validate_values(table: "pyarrow.Table", key: str, *, full: bool) -> None:
    pa = _pa()
    for name, col in zip(table.column_names, table.columns):
        t = col.type
        if not full and not _needs_bounds(t):
            continue
        for chunk in col.chunks:
            arr = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            try:
                if not full:
                    target = _no_utf8(arr.type)
                    if target != arr.type:
                        try:
                            arr = arr.view(target)
                        except pa.ArrowException:
                            pass  # no zero-copy twin: check it as it is (UTF-8 too)
                arr.validate(full=True)
            except pa.ArrowException as e:
                raise HeaderError(f"segment {key!r}: column {name!r} is corrupt ({e}); "
                                  "share_table() it again", key) from e


# -- pandas -------------------------------------------------------------------------


@user_facing
def share_frame(key: str, frame: "pandas.DataFrame", *, persistent: bool = False,
                dir: Dir = None) -> "pandas.DataFrame":
    """Share a pandas DataFrame (index and dtypes kept) and return it read back from the segment.

    The same as ``share_table(key, frame).to_pandas()``; see
    :func:`attach_frame` for which columns come back without a copy.

    Parameters
    ----------
    key : str
        The segment's key.
    frame : pandas.DataFrame
        The frame.
    persistent : bool, optional
        Keep the segment after the last detach, until ``shmarray.unlink(key)``.
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).

    Returns
    -------
    pandas.DataFrame
        The frame, read back from the segment.

    Raises
    ------
    AlreadyExistsError, OutOfResourcesError
        As :func:`share_table`.
    ModuleNotFoundError
        Without pandas.
    """
    if not _is_frame(frame):
        raise TypeError(f"share_frame({key!r}) takes a pandas.DataFrame, not {type(frame).__name__}; "
                        "share_table() takes Arrow data")
    return share_table(key, frame, persistent=persistent, dir=dir).to_pandas()


@user_facing
def attach_frame(key: str, *, columns: Sequence[str] | None = None, validate: Validate = "bounds",
                 dir: Dir = None, **to_pandas: Any) -> "pandas.DataFrame":
    """``attach_table(key, validate=validate, dir=dir).select(columns).to_pandas(**to_pandas)``.

    Columns that come back without a copy (and so keep the segment attached
    while the frame lives), measured with pandas 3 and pyarrow 26, pass
    ``split_blocks=True`` (without it pandas consolidates same-dtype columns
    into one block, a copy):

    - integer and floating-point columns without nulls;
    - timestamps without a time zone, and durations, without nulls;
    - ``large_string`` columns (pandas >= 3 keeps them Arrow-backed; pandas'
      own strings arrive as large_string, so a shared frame's strings do).

    Copied: columns with nulls (NaN/None filling), booleans (bit-packed in
    Arrow), time-zone-aware timestamps, ``string`` (cast to large_string),
    dictionaries (categoricals), dates and nested types. Add
    ``zero_copy_only=True`` (with ``split_blocks=True``) to get an
    ArrowInvalid instead of a silent copy.

    Parameters
    ----------
    key : str
        The segment's key.
    columns : sequence of str, optional
        The columns to read (default all).
    validate : {"bounds", "metadata", "full"}, optional
        As :func:`attach_table`.
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).
    **to_pandas
        Passed to ``pyarrow.Table.to_pandas`` (``split_blocks=True`` ...).

    Returns
    -------
    pandas.DataFrame
        The frame.

    Raises
    ------
    NotFoundError, HeaderError
        As :func:`attach_table`.
    ModuleNotFoundError
        Without pandas (``pip install '.[pandas]'``).
    """
    _need_pandas(f"attach_frame({key!r})")
    table = attach_table(key, validate=validate, dir=dir)
    if columns is not None:
        table = table.select(list(columns))
    return table.to_pandas(**to_pandas)


def _need_pandas(what: str) -> None:
    """Say what to install, before anything is attached, when pandas is missing."""
    try:
        import pandas  # noqa: F401
    except ImportError as e:
        raise ModuleNotFoundError(
            f"{what} needs pandas, which is not installed; pip install '.[pandas]' from a checkout "
            "(or pip install pandas), or use attach_table() for a pyarrow.Table", name="pandas") from e

