"""share_table / attach_table: types across processes, zero-copy, lifetime, bad input, corruption."""

from __future__ import annotations

import datetime
import decimal
import gc
import json
import random
import weakref

import numpy as np
import pyarrow as pa
import pytest

import shmarray
from shmarray._header import Kind, read_header
from _procs import run


# -- a user extension type, registered here and (by importing this module) in every child --


class PointIdType(pa.ExtensionType):
    """A UUID-like 16-byte id, the kind of extension type users register."""

    def __init__(self) -> None:
        super().__init__(pa.binary(16), "shmarray-test.point-id")

    def __arrow_ext_serialize__(self) -> bytes:
        return b"v1"

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type: pa.DataType, serialized: bytes) -> "PointIdType":
        if serialized != b"v1":
            raise ValueError(f"unknown point-id version {serialized!r}")
        return cls()


try:
    pa.register_extension_type(PointIdType())
except pa.ArrowKeyError:  # imported twice in one process
    pass


# -- tables -----------------------------------------------------------------------------


def _columns() -> dict[str, pa.Array]:
    """One column per kind of Arrow type the IPC format carries, nulls included."""
    paris = datetime.datetime(2024, 3, 31, 1, 30, tzinfo=datetime.timezone.utc)
    dense = pa.UnionArray.from_dense(
        pa.array([0, 1, 0, 1, 0], type=pa.int8()), pa.array([0, 0, 1, 1, 2], type=pa.int32()),
        [pa.array([1, None, 3]), pa.array(["a", "bé"])], field_names=["i", "s"])
    sparse = pa.UnionArray.from_sparse(
        pa.array([1, 0, 0, 1, 1], type=pa.int8()),
        [pa.array([1.5, 2.5, None, 4.5, 5.5]), pa.array([True, None, False, True, False])])
    ids = [bytes(range(i, i + 16)) for i in range(4)] + [None]
    return {
        "null": pa.nulls(5),
        "bool": pa.array([True, False, None, True, False]),
        "i8": pa.array([-128, 0, None, 1, 127], type=pa.int8()),
        "u16": pa.array([0, 1, None, 3, 65535], type=pa.uint16()),
        "i32": pa.array([1, 2, 3, None, -5], type=pa.int32()),
        "u64": pa.array([0, 2**64 - 1, None, 7, 8], type=pa.uint64()),
        "i64": pa.array([1, -(2**63), None, 2**63 - 1, 0]),
        "f16": pa.array([np.float16(1.5), None, np.float16(-2), np.float16(0), np.float16(3)], type=pa.float16()),
        "f32": pa.array([1.5, None, float("inf"), -0.0, 3.25], type=pa.float32()),
        "f64": pa.array([2.5, 1e300, None, -1.0, 0.5]),  # NaN != NaN for equals(): see test_nan
        "dec32": pa.array([decimal.Decimal("12.34"), None, decimal.Decimal("-0.01"), decimal.Decimal("0"),
                           decimal.Decimal("99999.99")], type=pa.decimal32(7, 2)),
        "dec64": pa.array([decimal.Decimal("1.001"), None, None, decimal.Decimal("-5.5"), decimal.Decimal("0")],
                          type=pa.decimal64(15, 3)),
        "dec128": pa.array([decimal.Decimal("1234567890.0123456789"), None, decimal.Decimal("-1"),
                            decimal.Decimal("0"), decimal.Decimal("3.14")], type=pa.decimal128(38, 10)),
        "dec256": pa.array([decimal.Decimal("1" * 50 + ".5"), None, decimal.Decimal("-2.25"), decimal.Decimal("0"),
                            decimal.Decimal("7")], type=pa.decimal256(76, 20)),
        "date32": pa.array([datetime.date(2024, 2, 29), None, datetime.date(1970, 1, 1), datetime.date(1, 1, 1),
                            datetime.date(9999, 12, 31)]),
        "date64": pa.array([datetime.date(2024, 2, 29), None, None, datetime.date(2000, 1, 1),
                            datetime.date(1999, 12, 31)], type=pa.date64()),
        "time32": pa.array([0, 86399, None, 3600, 1], type=pa.time32("s")),
        "time64": pa.array([0, 86_399_999_999_000, None, 1000, 2000], type=pa.time64("ns")),
        "ts_paris": pa.array([paris, None, paris, paris, paris], type=pa.timestamp("us", tz="Europe/Paris")),
        "ts_offset": pa.array([paris, paris, None, paris, paris], type=pa.timestamp("ms", tz="+05:30")),
        "ts_naive": pa.array([0, None, 1, 2**62, -5], type=pa.timestamp("ns")),
        "duration": pa.array([1, None, -1, 0, 10**12], type=pa.duration("ms")),
        "interval": pa.array([pa.MonthDayNano([1, 2, 3]), None, pa.MonthDayNano([0, 0, 0]),
                              pa.MonthDayNano([-1, 15, 10**15]), pa.MonthDayNano([12, 0, 1])],
                             type=pa.month_day_nano_interval()),
        "binary": pa.array([b"", b"\x00\xff", None, b"abc", b"x" * 100]),
        "large_binary": pa.array([b"q", None, b"", b"\x01" * 7, b"z"], type=pa.large_binary()),
        "string": pa.array(["", "héllo", None, "日本", "z" * 50]),
        "large_string": pa.array(["a", None, "", "ω" * 3, "end"], type=pa.large_string()),
        "string_view": pa.array(["short", None, "a string longer than twelve bytes", "", "x"],
                                type=pa.string_view()),
        "binary_view": pa.array([b"\x00" * 20, b"ab", None, b"", b"y"], type=pa.binary_view()),
        "fixed_binary": pa.array([b"abcd", None, b"\x00\x00\x00\x00", b"wxyz", b"1234"], type=pa.binary(4)),
        "list": pa.array([[1, 2], [], None, [None], [5, 6, 7]], type=pa.list_(pa.int32())),
        "large_list_str": pa.array([["a"], None, [], ["b", None, "c"], ["d"]], type=pa.large_list(pa.string())),
        "fixed_list": pa.array([[1.0, 2.0], None, [3.0, None], [0.0, 0.0], [9.0, 8.0]],
                               type=pa.list_(pa.float32(), 2)),
        "list_view": pa.array([[1, 2], None, [], [3], [4, 5, 6]], type=pa.list_view(pa.int16())),
        "large_list_view": pa.array([["x"], [], None, ["y", "z"], []], type=pa.large_list_view(pa.string())),
        "struct": pa.array([{"a": 1, "b": "x"}, None, {"a": None, "b": "y"}, {"a": 3, "b": None},
                            {"a": 4, "b": "z"}], type=pa.struct([("a", pa.int64()), ("b", pa.string())])),
        "map": pa.array([[("k", 1)], None, [], [("a", None), ("b", 2)], [("z", 26)]],
                        type=pa.map_(pa.string(), pa.int32())),
        "dense_union": dense,
        "sparse_union": sparse,
        "dict": pa.array(["red", "green", None, "red", "blue"]).dictionary_encode(),
        "dict_ordered": pa.DictionaryArray.from_arrays(
            pa.array([0, 1, None, 1, 0], type=pa.int8()), pa.array(["low", "high"]), ordered=True),
        "struct_dict": pa.StructArray.from_arrays(
            [pa.array(["p", "q", "p", None, "q"]).dictionary_encode(), pa.array([1, 2, 3, 4, 5])],
            names=["d", "n"]),
        "list_dict": pa.ListArray.from_arrays(
            pa.array([0, 2, 2, 3, 5, 6], type=pa.int32()),
            pa.array(["u", "v", "u", None, "v", "u"]).dictionary_encode()),
        "ree": pa.RunEndEncodedArray.from_arrays(pa.array([2, 4, 5], type=pa.int32()),
                                                 pa.array(["run", None, "end"])),
        "ext": pa.ExtensionArray.from_storage(PointIdType(), pa.array(ids, type=pa.binary(16))),
        "uuid": pa.array(ids, type=pa.uuid()),
    }


def all_types_table() -> pa.Table:
    """A 5-row table with every column kind, plus table-level and field-level metadata."""
    cols = _columns()
    fields = [pa.field(name, arr.type, metadata={"unit": "m"} if name == "f64" else None)
              for name, arr in cols.items()]
    schema = pa.schema(fields, metadata={"source": "test", "ünï": "cödé"})
    return pa.Table.from_arrays(list(cols.values()), schema=schema)


def chunked_table() -> pa.Table:
    """Columns in several chunks, each dictionary chunk with a dictionary of its own."""
    d1 = pa.array(["a", "b", "a"]).dictionary_encode()
    d2 = pa.array(["c", "c", None, "d"]).dictionary_encode()
    d3 = pa.array([], type=pa.string()).dictionary_encode()
    b1 = pa.record_batch({"n": pa.array([1, 2, 3]), "d": d1, "s": pa.array(["x", None, "y"])})
    b2 = pa.record_batch({"n": pa.array([4, None, 6, 7]), "d": d2, "s": pa.array(["z", "", "w", "v"])})
    b3 = pa.record_batch({"n": pa.array([], type=pa.int64()), "d": d3, "s": pa.array([], type=pa.string())})
    return pa.Table.from_batches([b1, b2, b3])


def bench_like_table(rows: int) -> pa.Table:
    """The benchmark's four column kinds, small."""
    rng = np.random.default_rng(rows)
    return pa.table({"i": pa.array(np.arange(rows)), "f": pa.array(rng.random(rows)),
                     "s": pa.array([f"s{i % 97}" for i in range(rows)]),
                     "b": pa.array(rng.random(rows) < 0.5)})


BUILDERS = {"all_types": all_types_table, "chunked": chunked_table,
            "empty": lambda: all_types_table().slice(0, 0),
            "no_columns": lambda: pa.table({}),
            "no_columns_5_rows": lambda: pa.Table.from_batches(
                [pa.RecordBatch.from_struct_array(pa.array([{}] * 5, type=pa.struct([])))])}


# -- checks used here and in children -----------------------------------------------------


def _root(buf: pa.Buffer) -> pa.Buffer:
    while buf.parent is not None:
        buf = buf.parent
    return buf


def _array_buffers(arr: pa.Array) -> list[pa.Buffer]:
    """Every buffer below *arr*, walked by hand: own, children, dictionaries, extension storage."""
    if isinstance(arr, pa.ExtensionArray):
        return _array_buffers(arr.storage)
    t = arr.type
    if pa.types.is_dictionary(t):
        return _array_buffers(arr.indices) + _array_buffers(arr.dictionary)
    own = [b for b in arr.buffers()[: t.num_buffers] if b is not None]
    if pa.types.is_struct(t) or pa.types.is_union(t):
        kids = [arr.field(i) for i in range(t.num_fields)]
    elif pa.types.is_run_end_encoded(t):
        kids = [arr.run_ends, arr.values]
    elif t.num_fields:
        kids = [arr.values]
    else:
        kids = []
        if pa.types.is_binary_view(t) or pa.types.is_string_view(t):
            own = [b for b in arr.buffers() if b is not None]  # the variadic data buffers
    return own + [b for k in kids for b in _array_buffers(k)]


def mapping_report(table: pa.Table, segment_size: int) -> dict[str, object]:
    """Where the table's buffers live: one root buffer the size of the segment, all inside it."""
    buffers = [b for col in table.columns for chunk in col.chunks for b in _array_buffers(chunk)]
    nonempty = [b for b in buffers if b.size]
    roots = {(r.address, r.size) for r in map(_root, nonempty)}
    outside = []
    if len(roots) == 1:
        (lo, size), = roots
        outside = [b for b in nonempty if not (lo <= b.address and b.address + b.size <= lo + size)]
    return {"buffers": len(nonempty), "roots": len(roots),
            "root_size_ok": all(size == segment_size for _, size in roots),
            "page_aligned": all(addr % 4096 == 0 for addr, _ in roots),
            "outside": len(outside), "min_align": min((b.address % 64 or 64 for b in nonempty), default=64)}


def _child_round_trip(key: str, builder: str, validate: str) -> dict[str, object]:
    expected = BUILDERS[builder]()
    t = shmarray.attach_table(key, validate=validate)
    report = mapping_report(t, shmarray.segment_info(key).size)
    report["equal"] = t.equals(expected, check_metadata=True)
    report["schema_equal"] = t.schema.equals(expected.schema, check_metadata=True)
    report["rows"] = t.num_rows
    report["chunks"] = [c.num_chunks for c in t.columns]
    report["pylist_equal"] = t.to_pylist() == expected.to_pylist() if builder != "all_types" else None
    report["ext_type"] = str(t.schema.field("ext").type) if "ext" in t.column_names else None
    report["attachments"] = shmarray.segment_info(key).attachments
    return report


# -- round trips across processes --------------------------------------------------------


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_round_trip_in_another_process(key, builder):
    expected = BUILDERS[builder]()
    mine = shmarray.share_table(key, expected)
    assert mine.equals(expected, check_metadata=True)
    size = shmarray.segment_info(key).size
    own = mapping_report(mine, size)  # the creator's table lives in its own attachment
    assert own["roots"] <= 1 and own["outside"] == 0 and own["root_size_ok"], own
    r = run(_child_round_trip, key, builder, "full")
    assert r["equal"] and r["schema_equal"], r
    assert r["rows"] == expected.num_rows
    assert r["roots"] <= 1 and r["outside"] == 0 and r["root_size_ok"] and r["page_aligned"], r
    assert r["min_align"] >= 8, r
    assert r["attachments"] == 2
    if builder == "all_types":
        assert r["buffers"] > 60
        assert r["ext_type"] == "extension<shmarray-test.point-id<PointIdType>>"
    if builder == "chunked":
        assert r["chunks"] == [2, 2, 2]  # chunk boundaries kept; the empty chunk is not written
        assert r["pylist_equal"]


def test_nan_and_signed_zero_survive_bit_for_bit(key):
    values = np.array([np.nan, -0.0, np.inf, -np.nan, 1e-310])
    mine = shmarray.share_table(key, pa.table({"f": values}))
    back = shmarray.attach_table(key).column("f").to_numpy()
    assert back.tobytes() == values.tobytes()


def test_every_buffer_lies_in_the_mapping(key):
    shmarray.share_table(key, all_types_table(), persistent=True)
    t = shmarray.attach_table(key)
    report = mapping_report(t, shmarray.segment_info(key).size)
    # More buffers than columns: children, dictionaries, views' data, storage.
    assert report["buffers"] > 80 and report["roots"] == 1 and report["outside"] == 0, report
    # The library's own check agrees on a table built elsewhere (buffers outside).
    from shmarray._arrow import _first_outside

    root = _root(t.column("i64").chunk(0).buffers()[1])
    assert _first_outside(t, root.address, root.address + root.size) is None
    assert _first_outside(all_types_table(), root.address, root.address + root.size) == "bool"


def test_record_batch_and_capsule_stream_inputs(make_key):
    batch = bench_like_table(100).to_batches()[0]
    t = shmarray.share_table(make_key(), batch)
    assert t.equals(pa.Table.from_batches([batch]))

    class CapsuleOnly:
        """An object that speaks only the Arrow PyCapsule stream protocol (as polars does)."""

        def __init__(self, table: pa.Table) -> None:
            self._table = table

        def __arrow_c_stream__(self, requested_schema: object = None) -> object:
            return self._table.__arrow_c_stream__(requested_schema)

    src = chunked_table()
    t2 = shmarray.share_table(make_key(), CapsuleOnly(src))
    assert t2.equals(src) and [c.num_chunks for c in t2.columns] == [2, 2, 2]


@pytest.mark.parametrize("bad", [np.arange(3), pa.array([1, 2]), pa.chunked_array([[1]]), {"a": [1]},
                                 [1, 2], "table", None, pa.schema([("a", pa.int8())])])
def test_non_tables_are_refused_before_any_segment(key, bad):
    with pytest.raises(TypeError, match="pyarrow.Table, a pyarrow.RecordBatch, a pandas.DataFrame"):
        shmarray.share_table(key, bad)
    with pytest.raises(shmarray.NotFoundError):
        shmarray.Segment(key).attach()


def test_bad_key_and_validate_are_refused_before_the_os():
    with pytest.raises(shmarray.InvalidKeyError):
        shmarray.share_table("", pa.table({"a": [1]}))
    with pytest.raises(ValueError, match="'metadata', 'bounds', 'full'"):
        shmarray.attach_table("no-such-key", validate="everything")  # type: ignore[arg-type]


def test_existing_key_is_refused_and_left_alone(key):
    first = shmarray.share_table(key, pa.table({"a": [1, 2]}))
    with pytest.raises(shmarray.AlreadyExistsError):
        shmarray.share_table(key, pa.table({"b": ["x"]}))
    assert shmarray.attach_table(key).equals(first)


def test_failed_write_publishes_nothing(key, monkeypatch):
    from shmarray import _arrow

    calls = {"n": 0}
    real = _arrow._FdSink.write

    def failing(self, data):
        calls["n"] += 1
        if calls["n"] >= 3:  # a full /dev/shm stays full (create retries once after giving kept memory back)
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(_arrow._FdSink, "write", failing)
    with pytest.raises(shmarray.OutOfResourcesError, match=key):
        shmarray.share_table(key, bench_like_table(50_000))
    with pytest.raises(shmarray.NotFoundError):
        shmarray.attach_table(key)


def test_missing_segment(key):
    with pytest.raises(shmarray.NotFoundError, match=key):
        shmarray.attach_table(key)


# -- lifetime --------------------------------------------------------------------------


def _attachments(key: str) -> int:
    gc.collect()
    return shmarray.segment_info(key).attachments


def test_segment_lives_while_any_buffer_does(key):
    shmarray.share_table(key, bench_like_table(1000), persistent=True)
    assert _attachments(key) == 0  # persistent: nobody attached, still there
    t = shmarray.attach_table(key)
    assert _attachments(key) == 1
    col = t.column("f")
    piece = t.column("s").chunk(0).slice(10, 5)
    buf = t.column("i").chunk(0).buffers()[1]
    gone = weakref.ref(t)
    del t
    assert gone() is None  # the table is collected; what was taken from it holds the segment
    assert _attachments(key) == 1
    del col
    assert _attachments(key) == 1
    del piece
    assert _attachments(key) == 1
    assert np.frombuffer(buf, dtype=np.int64)[999] == 999
    del buf
    assert _attachments(key) == 0


def test_non_persistent_segment_goes_with_its_last_table(key):
    mine = shmarray.share_table(key, bench_like_table(100))
    other = shmarray.attach_table(key)
    assert _attachments(key) == 1  # one attachment per process serves both tables
    del mine
    assert _attachments(key) == 1
    kept = other.column("i")
    del other
    assert _attachments(key) == 1
    del kept
    gc.collect()
    with pytest.raises(shmarray.NotFoundError):
        shmarray.segment_info(key)


def _child_holds_until_told(key: str) -> int:
    t = shmarray.attach_table(key)
    return int(t.column("i").chunk(0)[7].as_py())


def test_crashed_or_finished_reader_detaches(key):
    mine = shmarray.share_table(key, bench_like_table(100))
    assert run(_child_holds_until_told, key) == 7
    assert _attachments(key) == 1
    del mine


# -- pandas ---------------------------------------------------------------------------------


def frame():
    pd = pytest.importorskip("pandas")
    idx = pd.date_range("2024-01-01", periods=6, freq="h", tz="Europe/Paris", name="when")
    return pd.DataFrame({
        "ints": np.arange(6, dtype=np.int64),
        "floats": np.linspace(0, 1, 6),
        "nullable": pd.array([1, None, 3, 4, None, 6], dtype="Int64"),
        "text": pd.array(["a", None, "c", "d", "e", "f"], dtype="string"),
        "cat": pd.Categorical(["x", "y", "x", None, "y", "x"]),
        "flags": [True, False, True, True, False, False],
    }, index=idx)


def _child_frame(key: str) -> object:
    return shmarray.attach_table(key).to_pandas()


def test_pandas_frame_round_trip_keeps_index_and_dtypes(make_key):
    pd = pytest.importorskip("pandas")
    df = frame()
    k = make_key()
    mine = shmarray.share_table(k, df)
    # Arrow keeps the index values, name and time zone, not a DatetimeIndex's freq.
    pd.testing.assert_frame_equal(run(_child_frame, k), df, check_freq=False)
    # A RangeIndex travels as metadata, not as a column.
    plain = df.reset_index(drop=True)
    k2 = make_key()
    t = shmarray.share_table(k2, plain)
    assert t.num_columns == plain.shape[1]
    pd.testing.assert_frame_equal(shmarray.attach_frame(k2), plain)


def test_share_frame_attach_frame(make_key):
    pd = pytest.importorskip("pandas")
    df = frame()
    k = make_key()
    back = shmarray.share_frame(k, df)
    pd.testing.assert_frame_equal(back, df, check_freq=False)
    pd.testing.assert_frame_equal(shmarray.attach_frame(k), df, check_freq=False)
    with pytest.raises(TypeError, match="pandas.DataFrame"):
        shmarray.share_frame(make_key(), pa.table({"a": [1]}))


def _in(lo: int, hi: int, series: object) -> bool:
    arr = getattr(series, "array", None)
    chunked = getattr(arr, "_pa_array", None)  # pandas >= 3 keeps large strings Arrow-backed
    if chunked is not None:
        bufs = [b for c in chunked.chunks for b in c.buffers() if b is not None and b.size]
        return bool(bufs) and all(lo <= b.address and b.address + b.size <= hi for b in bufs)
    v = series.to_numpy()  # type: ignore[attr-defined]
    addr = v.__array_interface__["data"][0]
    return lo <= addr and addr + v.nbytes <= hi


def test_pandas_zero_copy_columns_keep_the_segment(make_key):
    pd = pytest.importorskip("pandas")
    n = 1000
    k = make_key()
    src = pa.table({
        "i": np.arange(n), "f": np.linspace(0, 1, n), "u8": np.arange(n, dtype=np.uint8),
        "ts": pa.array(np.arange(n).astype("datetime64[ns]")), "td": pa.array(np.arange(n).astype("timedelta64[us]")),
        "ls": pa.array([f"s{i}" for i in range(n)], type=pa.large_string()),
        "with_null": pa.array([None] + [1.0] * (n - 1)), "flag": pa.array(np.arange(n) % 2 == 0),
    })
    shmarray.share_table(k, src, persistent=True)
    t = shmarray.attach_table(k)
    root = _root(t.column("i").chunk(0).buffers()[1])
    lo, hi = root.address, root.address + root.size
    del root
    df = t.to_pandas(split_blocks=True)
    del t
    zero_copy = {c: _in(lo, hi, df[c]) for c in df.columns}
    # pandas 3 keeps large strings in Arrow (no copy); pandas 2 makes Python objects of them.
    arrow_strings = int(pd.__version__.split(".")[0]) >= 3
    assert zero_copy == {"i": True, "f": True, "u8": True, "ts": True, "td": True, "ls": arrow_strings,
                         "with_null": False, "flag": False}
    assert _attachments(k) == 1  # the frame alone holds the segment
    assert df["i"].iloc[999] == 999 and df["ls"].iloc[7] == "s7"
    del df
    assert _attachments(k) == 0
    strict = shmarray.attach_frame(k, split_blocks=True, zero_copy_only=True, columns=["i", "f", "ts"])
    assert list(strict.columns) == ["i", "f", "ts"]
    del strict
    with pytest.raises(pa.ArrowInvalid):
        shmarray.attach_frame(k, split_blocks=True, zero_copy_only=True, columns=["with_null"])
    with pytest.raises(pa.ArrowInvalid):  # without split_blocks pandas consolidates: a copy
        shmarray.attach_frame(k, zero_copy_only=True, columns=["i", "f"])


# -- kinds, listings ------------------------------------------------------------------------


def test_attach_table_on_other_kinds_says_what_is_there(make_key):
    raw = make_key()
    with shmarray.Segment(raw).create(4096):
        with pytest.raises(shmarray.HeaderError, match="raw bytes"):
            shmarray.attach_table(raw)
    arr = make_key()
    mine = shmarray.share(arr, np.arange(4.0))
    with pytest.raises(shmarray.ShmError, match=r"holds an ndarray, not an arrow table; use shmarray.attach\(\)"):
        shmarray.attach_table(arr)
    del mine


def test_array_readers_are_told_it_is_a_table(key):
    mine = shmarray.share_table(key, pa.table({"a": [1]}))
    with pytest.raises(shmarray.ShmError, match=r"holds an arrow table, not an ndarray; use shmarray.attach_table\(\)"):
        shmarray.attach(key)
    with shmarray.Segment(key).attach(shmarray.AccessMode.ReadOnly) as seg:
        with pytest.raises(shmarray.HeaderError, match="holds an arrow table"):
            read_header(seg.data, expect=Kind.NDARRAY, key=key)
    del mine


def test_ls_shows_rows_columns_and_schema(key, capsys):
    from shmarray._cli import main

    mine = shmarray.share_table(key, bench_like_table(1234))
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith(key))
    assert "arrow table, 1,234 rows x 4 columns: i: int64, f: double, s: string, b: bool" in line
    assert main(["info", key, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["payload"].startswith("arrow table, 1,234 rows")


def test_schema_summary_is_capped(key):
    wide = pa.table({f"column_{i:05d}": [i] for i in range(3000)})
    mine = shmarray.share_table(key, wide)
    from shmarray._arrow import describe_descriptor

    with shmarray.Segment(key).attach(shmarray.AccessMode.ReadOnly) as seg:
        _, raw = read_header(seg.data, expect=Kind.ARROW, key=key)
    assert len(raw) < 1000
    text = describe_descriptor(raw)
    assert text.startswith("arrow table, 1 row x 3000 columns: column_00000: int64") and "more)" in text


# -- corruption -----------------------------------------------------------------------------


def _buffer_offset(table: pa.Table, column: str, index: int) -> int:
    """Where buffer *index* of *column*'s first chunk starts, in the segment's user bytes."""
    buf = table.column(column).chunk(0).buffers()[index]
    return buf.address - _root(buf).address


def _corrupt_and_attach(key: str, offset: int, data: bytes, modes: tuple[str, ...]) -> dict[str, str]:
    with shmarray.Segment(key).attach() as seg:
        seg.data[offset : offset + len(data)] = data
    out = {}
    for mode in modes:
        try:
            t = shmarray.attach_table(key, validate=mode)
            del t
            out[mode] = "ok"
        except shmarray.HeaderError as e:
            out[mode] = f"HeaderError: {e}"
    return out


def test_a_middle_string_offset_needs_the_bounds_check(key):
    t = shmarray.share_table(key, pa.table({"s": [f"v{i}" for i in range(100)]}))
    at = _buffer_offset(t, "s", 1) + 4 * 50
    r = run(_corrupt_and_attach, key, at, (1 << 30).to_bytes(4, "little"), ("metadata", "bounds", "full"))
    # Arrow's structural check alone misses it (a later access would read 1 GiB away) ...
    assert r["metadata"] == "ok"
    # ... so the default checks every offset.
    assert "column 's' is corrupt" in r["bounds"] and "out of bounds" in r["bounds"]
    assert r["full"].startswith("HeaderError")


def test_dictionary_index_out_of_range_is_caught(key):
    t = shmarray.share_table(key, pa.table({"d": pa.array(["a", "b"] * 20).dictionary_encode()}))
    at = _buffer_offset(t, "d", 1) + 4 * 7
    r = run(_corrupt_and_attach, key, at, (1000).to_bytes(4, "little"), ("metadata", "bounds"))
    assert r["metadata"] == "ok"
    assert "column 'd' is corrupt" in r["bounds"]


def test_invalid_utf8_only_full_catches(key):
    t = shmarray.share_table(key, pa.table({"s": ["abcdef"] * 10}))
    at = _buffer_offset(t, "s", 2) + 3
    r = run(_corrupt_and_attach, key, at, b"\xff", ("bounds", "full"))
    assert r["bounds"] == "ok"
    assert "column 's' is corrupt" in r["full"]


def test_corrupt_descriptor_and_header(key):
    shmarray.share_table(key, pa.table({"a": [1, 2, 3]}), persistent=True)
    seg = shmarray.Segment(key).attach()
    try:
        _, raw = read_header(seg.data, expect=Kind.ARROW, key=key)
        fake = raw.replace(b'"rows":3', b'"rows":4')
        seg.data[64 : 64 + len(fake)] = fake
        with pytest.raises(shmarray.HeaderError, match="3 rows x 1 columns, its descriptor says 4 x 1"):
            shmarray.attach_table(key)
        seg.data[64:66] = b"[]"
        with pytest.raises(shmarray.HeaderError, match="not valid JSON|not a JSON object"):
            shmarray.attach_table(key)
        seg.data[0:8] = b"XXXXXXXX"
        with pytest.raises(shmarray.HeaderError, match="raw bytes"):
            shmarray.attach_table(key)
    finally:
        seg.detach()


def test_truncated_stream_is_a_header_error(key):
    shmarray.share_table(key, bench_like_table(100), persistent=True)
    with shmarray.Segment(key).attach() as seg:
        # Payload length (header bytes 40..48) cut to 100: the stream ends mid-message.
        seg.data[40:48] = (100).to_bytes(8, "little")
        with pytest.raises(shmarray.HeaderError, match="corrupt Arrow IPC payload"):
            shmarray.attach_table(key)


def _fuzz_base() -> pa.Table:
    return pa.table({
        "i": pa.array(range(40)), "s": pa.array([f"str{i}" * (i % 3) for i in range(40)]),
        "l": pa.array([[j for j in range(i % 4)] for i in range(40)]),
        "d": pa.array(["a", "b", None, "c"] * 10).dictionary_encode(),
        "st": pa.array([{"x": i, "y": str(i)} for i in range(40)]),
        "m": pa.array([[("k", i)] for i in range(40)], type=pa.map_(pa.string(), pa.int64())),
        "v": pa.array([f"view-{i}-padding-past-12" for i in range(40)], type=pa.string_view()),
    })


FUZZ_TABLES = {"mixed": _fuzz_base, "all_types": all_types_table}


def fuzz(prefix: str, rounds: int, seed: int, mode: str, builder: str = "mixed") -> dict[str, int]:
    """Share a table, flip random bytes, attach with *mode* and read every value, *rounds* times.

    Any crash kills this process, which fails the calling test. Returns
    counts of outcomes.
    """
    rng = random.Random(seed)
    base = FUZZ_TABLES[builder]()
    outcomes = dict.fromkeys(
        ("header_error", "attached", "unicode", "python_refused", "clean", "pandas_refused"), 0)
    for r in range(rounds):
        key = f"{prefix}-{r}"
        t = shmarray.share_table(key, base, persistent=True)
        spans = [(b.address - _root(b).address, b.size) for col in t.columns for chunk in col.chunks
                 for b in _array_buffers(chunk) if b.size]
        seg = shmarray.Segment(key).attach()
        try:
            for _ in range(rng.randint(1, 6)):
                if r % 2:  # half the rounds aim at the column buffers (offsets, indices, views)
                    start, size = rng.choice(spans)
                    pos = start + rng.randrange(size)
                else:
                    pos = rng.randrange(seg.size)
                seg.data[pos] = seg.data[pos] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
            try:
                got = shmarray.attach_table(key, validate=mode)
            except shmarray.HeaderError:
                outcomes["header_error"] += 1
                continue
            outcomes["attached"] += 1
            try:
                got.to_pylist()
            except UnicodeDecodeError:  # "bounds" does not check UTF-8
                outcomes["unicode"] += 1
                continue
            except (ValueError, ArithmeticError, KeyError):
                # Values Python cannot hold: a date past 9999, a decimal past its precision, a time
                # zone name that is not one (pytz's UnknownTimeZoneError is a KeyError).
                outcomes["python_refused"] += 1
            try:
                # pandas has no block for unions; every other column goes through to_pandas.
                got.select([i for i, f in enumerate(got.schema) if not pa.types.is_union(f.type)]).to_pandas()
                outcomes["clean"] += 1
            except (ValueError, ArithmeticError, KeyError, pa.ArrowException):
                # Valid Arrow pandas refuses: a dictionary with repeated values, nanoseconds in time64,
                # a time zone name that is not one (pandas 2 with pytz: UnknownTimeZoneError, a KeyError).
                outcomes["pandas_refused"] += 1
            finally:
                del got
        finally:
            seg.detach()
            del t
            shmarray.unlink(key)
    return outcomes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("builder", sorted(FUZZ_TABLES))
@pytest.mark.parametrize("mode", ["bounds", "full"])
def test_fuzzed_payloads_never_crash(key, mode, builder):
    seed = {"bounds": 1234, "full": 99}[mode] + len(builder)
    out = run(fuzz, key, 600, seed, mode, builder, timeout=110)
    assert out["header_error"] + out["attached"] == 600
    assert out["header_error"] > 20 and out["clean"] + out["pandas_refused"] > 20, out
    if mode == "full":
        assert out["unicode"] == 0, out


# -- large ------------------------------------------------------------------------------------


def _child_large(key: str, rows: int, width: int) -> dict[str, object]:
    t = shmarray.attach_table(key, validate="metadata")
    col = t.column("s").chunk(0)
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64)
    data = col.buffers()[2]
    return {"rows": t.num_rows, "type": str(col.type), "last": int(offsets[-1]), "data": data.size,
            "first": col[0].as_py()[:5], "end": col[rows - 1].as_py()[-3:], "len": len(col[rows // 2].as_py()),
            "report": mapping_report(t, shmarray.segment_info(key).size)}


@pytest.mark.timeout(180)
def test_more_than_2_gib_of_strings(key):
    width = 1024
    rows = (2**31 + 64 * 2**20) // width  # 2.06 GiB of string data, one chunk
    data = np.full(rows * width, ord("x"), dtype=np.uint8)
    data[:5] = np.frombuffer(b"first", dtype=np.uint8)
    data[-3:] = np.frombuffer(b"end", dtype=np.uint8)
    offsets = np.arange(0, rows * width + 1, width, dtype=np.int64)
    col = pa.Array.from_buffers(pa.large_string(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    mine = shmarray.share_table(key, pa.table({"s": col}))
    del data, col, offsets
    assert mine.column("s").chunk(0).buffers()[2].size == rows * width
    r = run(_child_large, key, rows, width, timeout=150)
    assert r["rows"] == rows and r["type"] == "large_string" and r["last"] == rows * width > 2**31
    assert r["first"] == "first" and r["end"] == "end" and r["len"] == width
    assert r["report"]["outside"] == 0 and r["report"]["roots"] == 1


def test_attach_frame_without_pandas_says_what_to_install(key, monkeypatch):
    import sys

    shmarray.share_table(key, bench_like_table(10))
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"needs pandas.*\[pandas\]") as err:
        shmarray.attach_frame(key)
    assert err.value.name == "pandas" and key in str(err.value)
