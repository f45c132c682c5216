"""The array header: hand-made bad headers, fuzzing (in a child process, so a crash fails the test),
the .npy fast path against numpy's reader, and what `shmarray ls` shows."""

from __future__ import annotations

import gc
import io
import os
import struct
import warnings

import numpy as np
import pytest
from _procs import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_array import ALL_DTYPES

import shmarray
from shmarray import _npy as npy_codec
from shmarray._cli import describe_payload
from shmarray._header import HEADER, Kind, pack_header, parse_header


def _npy(text: str | bytes, version: tuple[int, int] = (1, 0), length: int | None = None) -> bytes:
    """A .npy header around *text* (padded like numpy's), with an optionally wrong length field."""
    raw = text.encode("latin1") if isinstance(text, str) else text
    fmt = "<H" if version == (1, 0) else "<I"
    pre = 6 + 2 + struct.calcsize(fmt)
    pad = -(pre + len(raw) + 1) % 64
    body = raw + b" " * pad + b"\n"
    n = len(body) if length is None else length
    return b"\x93NUMPY" + bytes(version) + struct.pack(fmt, n) + body


def _dict(descr: str = "'<f8'", fortran: str = "False", shape: str = "(3,)") -> str:
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}"


def _user_bytes(descriptor: bytes, payload_length: int, *, kind: Kind = Kind.NDARRAY, room: int = 0) -> bytes:
    p_off = (HEADER.size + len(descriptor) + 63) // 64 * 64
    head = pack_header(kind, descriptor, p_off, payload_length)
    return head + b"\0" * (p_off - len(head) + max(payload_length, 0) + room)


def _raw_segment(key: str, user: bytes) -> shmarray.Segment:
    seg = shmarray.Segment(key).create(len(user))
    seg.data[: len(user)] = user
    return seg


@pytest.mark.parametrize("user, exc, words", [
    (b"\0" * 4096, shmarray.HeaderError, "raw bytes"),
    (b"\0" * 10, shmarray.HeaderError, "too small"),
    (_user_bytes(b"{}", 10, kind=Kind.ARROW), shmarray.HeaderError, "arrow table.*attach_table"),
    (_user_bytes(b"{}", 10, kind=Kind.RING), shmarray.HeaderError, "batch ring"),
    (_user_bytes(b"\x93NUMPX\x01\x00" + _npy(_dict())[8:], 24), shmarray.HeaderError, "corrupt ndarray descriptor"),
    (_user_bytes(_npy(_dict())[:6] + b"\x09\x09" + _npy(_dict())[8:], 24), shmarray.HeaderError, "corrupt"),
    (_user_bytes(_npy(_dict(descr="'foo'")), 24), shmarray.HeaderError, "corrupt ndarray descriptor"),
    (_user_bytes(_npy(_dict(descr="'<f7'")), 24), shmarray.HeaderError, "corrupt ndarray descriptor"),
    (_user_bytes(_npy(_dict(descr="'|O'")), 24), shmarray.HeaderError, "Python objects"),
    (_user_bytes(_npy(_dict(descr="[('a', '<i4'), ('b', '|O')]")), 48), shmarray.HeaderError, "Python objects"),
    (_user_bytes(_npy(_dict(shape="(-1, 3)")), 24), shmarray.HeaderError, "negative"),
    (_user_bytes(_npy(_dict(shape="(3.0,)")), 24), shmarray.HeaderError, "shape"),
    (_user_bytes(_npy(_dict(shape="(True,)")), 8), shmarray.HeaderError, "not a tuple of ints"),
    (_user_bytes(_npy(_dict(shape="3")), 24), shmarray.HeaderError, "shape"),
    (_user_bytes(_npy(_dict(shape="(4611686018427387904, 4611686018427387904)")), 64),
     shmarray.HeaderError, "overflows"),
    (_user_bytes(_npy(_dict(descr="'|V0'", shape="(4611686018427387904, 4611686018427387904)")), 0),
     shmarray.HeaderError, "overflows"),
    (_user_bytes(_npy(_dict(shape="(" + "1, " * 65 + ")")), 8), shmarray.HeaderError, "dimensions"),
    (_user_bytes(_npy(_dict(fortran="1")), 24), shmarray.HeaderError, "fortran_order"),
    (_user_bytes(_npy(_dict(fortran="'yes'")), 24), shmarray.HeaderError, "fortran_order"),
    (_user_bytes(_npy(_dict()), 16), shmarray.HeaderError, "does not match the payload length"),
    (_user_bytes(_npy(_dict()), 32), shmarray.HeaderError, "does not match the payload length"),
    (_user_bytes(_npy(_dict(), length=500), 24), shmarray.HeaderError, "corrupt"),
    (_user_bytes(_npy(_dict())[:-64] + b" " * 64, 24), shmarray.HeaderError, "corrupt"),
    (_user_bytes(_npy(_dict() + " " * 64, length=len(_dict()) + 20), 24), shmarray.HeaderError, "says"),
    (_user_bytes(_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), 'x': 1}"), 24),
     shmarray.HeaderError, "corrupt"),
    (_user_bytes(_npy("[" * 150 + "]" * 150), 24), shmarray.HeaderError, "corrupt"),
    (_user_bytes(_npy("{'descr': " + "[" * 120 + "'<f8'" + "]" * 120 + ", 'fortran_order': False, 'shape': (3,), }"),
                 24), shmarray.HeaderError, "corrupt"),
    (_user_bytes(_npy("-" * 5000 + "1"), 24), shmarray.HeaderError, "corrupt"),
    (_user_bytes(_npy(_dict(shape="(" + "9" * 5000 + ",)")), 24), shmarray.HeaderError, "corrupt"),
    (_user_bytes(_npy(_dict(descr="'" + "x" * 70000 + "'"), version=(2, 0)), 24),
     shmarray.HeaderError, "cap"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_headers_are_clean_errors(key, user, exc, words):
    seg = _raw_segment(key, user)
    with pytest.raises(exc, match=words) as e:
        shmarray.attach(key)
    assert isinstance(e.value, shmarray.ShmError) and e.value.key == key
    assert seg.is_attached


def test_a_payload_overrunning_the_segment(key):
    user = bytearray(_user_bytes(_npy(_dict(shape="(1000,)")), 8000))
    seg = _raw_segment(key, bytes(user[:1000]))  # shorter than the header says
    with pytest.raises(shmarray.HeaderError, match="overruns"):
        shmarray.attach(key)
    del seg


def test_a_payload_still_being_written_is_not_waited_for(key):
    desc = _npy(_dict())
    p_off = (HEADER.size + len(desc) + 63) // 64 * 64
    user = pack_header(Kind.NDARRAY, desc, p_off, 24, ready=False)
    seg = _raw_segment(key, user + b"\0" * (p_off - len(user) + 24))
    with pytest.raises(shmarray.NotFoundError, match="being written"):
        shmarray.attach(key)
    del seg


def test_a_foreign_object_under_the_name(key):
    path = f"/dev/shm/{shmarray._os.native_key_for(key)}"
    with open(path, "wb") as f:
        f.write(os.urandom(8192))
    try:
        with pytest.raises(shmarray.ShmError, match="not a shmarray segment"):
            shmarray.attach(key)
    finally:
        os.unlink(path)


def test_a_truncated_segment(key):
    a = shmarray.create(key, 10_000, persistent=True)
    native = a.segment.native_key
    a.close()
    del a
    gc.collect()
    os.truncate(f"/dev/shm/{native}", 4096 + 100)
    with pytest.raises(shmarray.ShmError):
        shmarray.attach(key)


def test_attach_after_hand_made_valid_header(key):
    """A header built by hand exactly as numpy would write it attaches."""
    user = _user_bytes(_npy(_dict(descr="'>i2'", fortran="True", shape="(2, 3)")), 12)
    seg = _raw_segment(key, user)
    a = shmarray.attach(key)
    assert a.dtype == np.dtype(">i2") and a.shape == (2, 3) and a.flags.f_contiguous
    del seg


# -- fuzzing, in a child process ---------------------------------------------------------------------


def _check_view_inside(key: str) -> str:
    """attach(key): a ShmError, or a view lying inside its own mapping (read completely)."""
    try:
        b = shmarray.attach(key)
    except shmarray.ShmError as e:
        return type(e).__name__
    try:
        mapping = b.segment._mapping()
        start = np.frombuffer(mapping, np.uint8).__array_interface__["data"][0]
        lo, hi = np.lib.array_utils.byte_bounds(b) if hasattr(np.lib, "array_utils") else np.byte_bounds(b)
        if b.nbytes and not (start <= lo <= hi <= start + len(mapping)):
            raise AssertionError(f"view {lo:#x}..{hi:#x} outside the mapping {start:#x}+{len(mapping)}")
        b.tobytes()  # touches every byte
        return "view"
    finally:
        b.close()


_DESCRS = ["'<f8'", "'|u1'", "'>i4'", "'<M8[ns]'", "'|S3'", "'<U2'", "'|V4'", "'|O'", "'<f7'", "'x'", "''",
           "[('a', '<i4')]", "[('a', '<i4', (2,))]", "[('a', [('b', '|O')])]", "('<i4', (2,))", "5", "None",
           "[('', '|V0')]", "'|V0'", "[('a', '<i4'), ('a', '<i4')]", "{'x': 1}", "b'<f8'"]
_FORTRAN = ["False", "True", "0", "1", "None", "'F'"]


def _shapes() -> st.SearchStrategy[str]:
    dims = st.one_of(st.integers(-3, 70), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 2**31, 2**63 - 1]))
    tuples = st.lists(dims, max_size=5).map(lambda ds: "(" + "".join(f"{d}, " for d in ds) + ")")
    return st.one_of(tuples, st.sampled_from(["()", "(3)", "[3]", "(3.5,)", "(True,)", "('3',)", "None"]))


def _fuzz_child(key: str, examples: int) -> dict:
    """Runs in a child: corrupt the array header of *key* in every way drawn, attach after each."""
    shape, dtype = (10, 20), np.dtype([("a", "<i4"), ("b", ">f8")])
    a = shmarray.share(key, np.zeros(shape, dtype))
    seg = shmarray.Segment(key).attach()
    original = bytes(seg.data)
    size = len(original)
    outcomes: dict[str, int] = {}

    def attempt(user: bytes) -> None:
        seg.data[:] = original
        seg.data[: min(len(user), size)] = user[:size]
        out = _check_view_inside(key)
        outcomes[out] = outcomes.get(out, 0) + 1

    common = settings(max_examples=examples, database=None, deadline=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))

    @common
    @given(st.integers(0, size - 1), st.binary(min_size=1, max_size=64))
    def overwrite(at: int, junk: bytes) -> None:
        attempt(original[:at] + junk + original[at + len(junk):])

    @common
    @given(st.binary(min_size=0, max_size=512))
    def random_start(junk: bytes) -> None:
        attempt(junk)

    @common
    @given(st.sampled_from(_DESCRS), st.sampled_from(_FORTRAN), _shapes(), st.integers(-8, 3000),
           st.sampled_from([(1, 0), (2, 0), (3, 0)]), st.booleans())
    def descriptor(descr: str, fortran: str, shp: str, payload: int, version: tuple, extra: bool) -> None:
        text = _dict(descr, fortran, shp) + (" 'x': 1," if extra else "")
        desc = _npy(text, version)
        p_off = (HEADER.size + len(desc) + 63) // 64 * 64
        head = pack_header(Kind.NDARRAY, desc, p_off, max(payload, 0))
        attempt(head)

    @common
    @given(st.lists(st.integers(0, 2**64 - 1), min_size=6, max_size=6), st.integers(0, 2**16 - 1),
           st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1))
    def header_fields(fields: list, version: int, kind: int, ready: int) -> None:
        d_off, d_len, p_off, p_len = fields[:4]
        head = HEADER.pack(b"SHMAHDR\0", version % 3, kind % 5, ready % 3, d_off % 4096 if fields[4] % 2 else 64,
                           d_len % 8192 if fields[5] % 2 else d_len, p_off % 8192 if fields[4] % 3 else p_off,
                           p_len % 8192 if fields[5] % 3 else p_len)
        attempt(head + original[HEADER.size:])

    for test in (overwrite, random_start, descriptor, header_fields):
        test()
    seg.data[:] = original
    assert _check_view_inside(key) == "view"
    seg.detach()
    a.close()
    return outcomes


@pytest.mark.timeout(300)
def test_fuzzed_headers_never_crash_or_escape_the_segment(key):
    outcomes = run(_fuzz_child, key, 250, timeout=280)
    assert outcomes.get("view", 0) > 0 and outcomes.get("HeaderError", 0) > 100, outcomes
    assert set(outcomes) <= {"view", "HeaderError", "NotFoundError"}, outcomes


# -- the .npy codec: numpy.save's bytes, and numpy's reading of them ----------------------------------------


def _saved_header(shape: tuple[int, ...], dt: np.dtype, fortran: bool, version: tuple[int, int] | None) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # numpy warns that 2.0 and 3.0 need a newer numpy to read
        warnings.simplefilter("ignore", UserWarning)
        np.lib.format.write_array(buf, np.zeros(shape, dt, order="F" if fortran else "C"), version=version)
    return buf.getvalue()


_UTF8 = np.dtype([("température", "<f8"), ("測定", "<i2")])  # names outside latin-1: .npy 3.0


@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (1, 2, 3, 4, 5)])
def test_descriptors_are_the_bytes_numpy_save_writes(shape):
    cases = [(dt, None) for dt in ALL_DTYPES] + [(_UTF8, (3, 0))]
    for dt, version in cases:
        for fortran in (False, True) if len(shape) > 1 else (False,):
            desc = npy_codec.encode_descriptor(shape, dt, fortran, "test")
            saved = _saved_header(shape, dt, fortran, version)
            assert saved[: len(desc)] == desc, (dt, shape, fortran)
            assert len(desc) % 64 == 0 and (version is None or desc[6:8] == bytes(version))
            spec = npy_codec.parse_descriptor(desc)
            assert (spec.shape, spec.dtype, spec.fortran_order) == (shape, dt, fortran)


_TOKENS = st.sampled_from(["{", "}", "'descr'", "'fortran_order'", "'shape'", ": ", ", ", "'<f8'", "'>i2'",
                           "'<M8[25s]'", "'|S0'", "'|V0'", "True", "False", "(", ")", "3", "0", "007", "-1",
                           "12345678901234567890", ",", " ", "\n", "'", "[", "]", "\\", "'<f8\\x00'", "'é'",
                           "[('測', '<f8')]"])


def _numpys_reading(desc: bytes) -> object:
    """What numpy's own reader (the private one behind its public readers; the oracle) makes of *desc*."""
    try:
        from numpy.lib import _format_impl  # NumPy 2
    except ImportError:
        from numpy.lib import format as _format_impl  # NumPy 1.x

    fp = io.BytesIO(desc)
    try:
        version = np.lib.format.read_magic(fp)
        shape, fortran, dtype = _format_impl._read_array_header(fp, version, max_header_size=npy_codec.MAX_NPY_HEADER)
    except Exception:  # noqa: BLE001 - any refusal
        return "refused"
    return shape, fortran, dtype, fp.tell()


def _ours(desc: bytes) -> object:
    try:
        return npy_codec._read(desc)
    except Exception:  # noqa: BLE001
        return "refused"


@settings(max_examples=600, database=None, deadline=None, derandomize=True)
@given(st.lists(_TOKENS, max_size=40), st.sampled_from([(1, 0), (2, 0), (3, 0)]), st.integers(-3, 3))
def test_reader_agrees_with_numpy_on_token_soup(tokens, version, skew):
    raw = "".join(tokens).encode("utf-8" if version == (3, 0) else "latin1", "replace")
    desc = _npy(raw, version)
    assert _ours(desc) == _numpys_reading(desc)
    assert npy_codec._guess(desc) is None or _shortcut_agrees(desc)
    if skew:
        desc = _npy(raw, version, length=len(desc) - 10 + skew)
        assert _ours(desc) == _numpys_reading(desc)


def _shortcut_agrees(desc: bytes) -> bool:
    """The attach shortcut (guess, proven by numpy's writer) gives what numpy's reader gives, or stands aside."""
    guess = npy_codec._guess(desc)
    if guess is None:
        return False
    shape, fortran, dtype, used = npy_codec._read(desc)
    assert guess[0] == shape and all(type(d) is int for d in guess[0]) and guess[1] is fortran
    assert guess[2] == dtype and guess[2].str == dtype.str and used == len(desc)
    return True


def test_the_shortcut_takes_every_plain_dtype_numpy_writes():
    taken = 0
    for dt in ALL_DTYPES:
        for shape in [(), (0,), (7,), (3, 4), (1, 2, 3, 4, 5)]:
            for fortran in (False, True):
                taken += _shortcut_agrees(npy_codec.encode_descriptor(shape, dt, fortran, "test"))
    assert taken >= 400


_PLAIN_DESCRS = ["<f8", "|b1", "=i8", "<m8[W]", "<M8", ">U10", "<f2", "<c16", "|u1", ">i4", "<M8[ns]",
                 "<M8[25s]", "|S0", "|S3", "|V0", "|V16", "<U0", ">c8", "<g", "<G", "|O", "<f7", "<M8[xy]"]


@settings(max_examples=1000, database=None, deadline=None, derandomize=True)
@given(st.sampled_from(_PLAIN_DESCRS), st.booleans(), st.lists(st.integers(0, 2**64), max_size=4).map(tuple),
       st.sampled_from(["", " ", "  \n", "\n"]), st.data())
def test_the_shortcut_agrees_with_numpy_near_canonical(descr, fortran, shape, tail, data):
    body = _dict(repr(descr), repr(fortran), repr(shape))
    for variant in (body, body + tail, body.replace(", }", "}"), body.replace(", ", ",")):
        _shortcut_agrees(_npy(variant))
    text = bytearray(_npy(body))
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(10, len(text) - 1))
        text[at] = data.draw(st.sampled_from(b"0123456789-+(),' []TrueFalsxjM<>|\\\n\t\x00\xe9"))
    try:
        _shortcut_agrees(bytes(text))
    except (ValueError, SyntaxError):  # numpy refuses it: then the shortcut must have stood aside
        assert npy_codec._guess(bytes(text)) is None


@settings(max_examples=300, database=None, deadline=None, derandomize=True)
@given(st.binary(max_size=300), st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00"]))
def test_reader_agrees_with_numpy_on_random_bytes(junk, version):
    length = struct.pack("<H" if version == b"\x01\x00" else "<I", len(junk))
    desc = b"\x93NUMPY" + version + length + junk
    assert _ours(desc) == _numpys_reading(desc)
    assert npy_codec._guess(desc) is None or _shortcut_agrees(desc)


# -- what `shmarray ls` shows ---------------------------------------------------------------------------------


def test_ls_payload_column(make_key):
    a = shmarray.create(make_key(), (1000, 480))
    b = shmarray.share(make_key(), np.zeros((2, 3), ">i2", order="F"))
    c = shmarray.share(make_key(), np.zeros(4, [("x", "f4"), ("y", "u1")]))
    assert describe_payload(shmarray.segment_info(a.key)) == "ndarray float64 (1000, 480) C"
    assert describe_payload(shmarray.segment_info(b.key)) == "ndarray >i2 (2, 3) F"
    assert describe_payload(shmarray.segment_info(c.key)).startswith("ndarray [('x', '<f4'), ('y', 'u1')] (4,) C")
    k = make_key()
    seg = _raw_segment(k, _user_bytes(_npy(_dict(descr="'<f7'")), 24))
    assert describe_payload(shmarray.segment_info(k)) == "ndarray (corrupt header)"
    seg.data[HEADER.size + 10 : HEADER.size + 40] = os.urandom(30)
    assert describe_payload(shmarray.segment_info(k)).startswith("ndarray")
    from shmarray._cli import main

    assert main(["ls"]) == 0


# -- the header bytes read at attach, and the mapping when they fall short -------------------------


def test_long_descriptor_is_read_from_the_mapping(key):
    """attach() reads the control block and the first HEAD_BYTES of the user area in one pread; a
    descriptor longer than that (many structured fields) is read through the mapping instead."""
    from shmarray._control import HEAD_BYTES

    dt = np.dtype([(f"field_{i:03d}", "<f4") for i in range(40)])
    src = np.arange(3 * 40, dtype="<f4").view(dt)
    # Persistent and detached, so that attach() opens the segment afresh (a process that holds
    # a segment shares its attachment, whose creator read no header).
    shmarray.share(key, src, persistent=True).close()
    try:
        b = shmarray.attach(key)
        assert len(b.segment._head()) == HEAD_BYTES
        hdr = parse_header(b.segment._head(), b.segment.size)
        assert hdr.descriptor_offset + hdr.descriptor_length > HEAD_BYTES  # the fallback is what ran
        assert b.dtype == dt and b.tobytes() == src.tobytes()
        b.close()
    finally:
        shmarray.unlink(key)


def test_header_from_short_or_unready_bytes():
    from shmarray._header import header_from

    user = _user_bytes(_npy(_dict()), 24)
    hdr, desc = header_from(user[:200], len(user), expect=Kind.NDARRAY)
    assert desc == _npy(_dict()) and hdr.payload_length == 24
    assert header_from(user[:HEADER.size + 10], len(user), expect=Kind.NDARRAY) is None
    assert header_from(b"", len(user), expect=Kind.NDARRAY) is None
    unready = pack_header(Kind.NDARRAY, _npy(_dict()), 192, 24, ready=False)
    assert header_from(unready, 192 + 24, expect=Kind.NDARRAY) is None
    with pytest.raises(shmarray.HeaderError, match="arrow table"):
        header_from(_user_bytes(b"{}", 10, kind=Kind.ARROW), 200, expect=Kind.NDARRAY)
