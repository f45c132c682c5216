"""The array segment's bytes: the .npy descriptor codec and the byte spec, with public ``numpy.lib.format`` API only.

Byte layout of an array segment's user bytes (``Segment.data``; the segment
layer's control page comes before them, see ``_control``)::

    offset  size  field
    0       64    payload header (see ``_header``): magic b"SHMAHDR\\0", version,
                  kind 1 (ndarray), ready 1, descriptor offset 64, descriptor
                  length n, payload offset p, payload length
    64      n     descriptor: a .npy header exactly as ``numpy.save`` writes it
                    6    magic b"\\x93NUMPY"
                    2    .npy version: 1.0; 2.0 for headers over 64 KiB; 3.0 for
                         field names outside latin-1
                    2|4  length of the dict text (little-endian; 4 bytes from 2.0)
                    ...  {'descr': <dtype descr>, 'fortran_order': <bool>,
                          'shape': <tuple>, }, padded with spaces and a final
                         '\\n' so that 6 + 2 + (2|4) + len = n is a multiple of 64
                  n is at most MAX_NPY_HEADER (64 KiB)
    p >= 64+n N     the data: N = prod(shape) * itemsize bytes in C or Fortran
                  order. p is a multiple of 64 and the user bytes start on a page
                  boundary, so the data is 64-byte aligned in memory. p is the
                  first such offset after the descriptor, except that ``share``
                  of a large contiguous array puts the data half a page ahead
                  of its source's page offset (up to 4 KiB of zeros before it):
                  a copy to a destination just ahead of its source in page
                  offset runs several times slower (``_array.payload_offset``;
                  benchmarks/results/notes.md). A
                  zero-size array has N = 0: its segment is the header alone.

This module turns a (shape, dtype, order) into the descriptor bytes and back,
and is the one place that decides whether a descriptor read from shared
memory may be turned into a view: :func:`parse_descriptor` checks every field
before anything is built from it. It is also the one dtype and shape rule
(:func:`check_dtype`, :func:`check_shape`) for everything that lays arrays
out in a segment (arrays and the batch ring).

numpy has public writers and readers for .npy 1.0 and 2.0; for 3.0 (2.0 with
the dict text in UTF-8, numpy.lib.format's documented format) it has none, so
that version is coded here from the format's text and the public helpers
(``magic``, ``read_magic``, ``descr_to_dtype``); the tests check the bytes
against what ``numpy.save`` writes, for every version. Reading a plain
dtype's descriptor takes a shortcut that numpy's writer proves (``_guess``).
"""

from __future__ import annotations

import ast
import dataclasses
import io
import math
import operator
import struct
from typing import Any

import numpy as np
from numpy.lib import format as npformat

from ._errors import HeaderError, InvalidSizeError

__all__ = [
    "MAX_NPY_HEADER",
    "MAX_DIMS",
    "NUMPY2",
    "ArraySpec",
    "check_dtype",
    "check_shape",
    "encode_descriptor",
    "parse_descriptor",
    "describe_descriptor",
]

# The descriptor's dict text is parsed with ast.literal_eval (inside
# numpy.lib.format), which is not safe on large inputs: its time and memory
# grow with the text, and deep nesting exhausts the parser. 64 KiB bounds
# that work to well under a millisecond and still fits a structured dtype
# of about a thousand fields; share()/create() refuse a dtype whose header
# would be larger, so every segment they make can be attached.
MAX_NPY_HEADER = 1 << 16
# numpy's limit on the number of dimensions (NPY_MAXDIMS).
NUMPY2 = np.lib.NumpyVersion(np.__version__) >= "2.0.0"
MAX_DIMS = 64 if NUMPY2 else 32
_INTP_MAX = np.iinfo(np.intp).max


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArraySpec:
    """What an array segment holds: shape, dtype and memory order (validated)."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool

    @property
    def nbytes(self) -> int:
        """Bytes of the data (exact Python arithmetic, no overflow)."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def order(self) -> str:
        """'F' or 'C'."""
        return "F" if self.fortran_order else "C"


def _object_fields(dtype: np.dtype[Any]) -> str:
    if dtype.names is None:
        return ""
    bad = [n for n in dtype.names if dtype.fields[n][0].hasobject]  # type: ignore[index]
    return f" (field{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))})" if bad else ""


def check_dtype(dtype: object, what: str) -> np.dtype[Any]:
    """*dtype* as a numpy dtype that can live in shared memory, else TypeError.

    Refused: object dtypes and dtypes with a field holding objects (their
    items are pointers into one process's heap), and variable-width or
    user-defined dtypes (no fixed byte layout the .npy header can describe).
    Metadata attached to a dtype is dropped (the .npy format cannot hold it).
    """
    try:
        dt: np.dtype[Any] = np.dtype(dtype)  # type: ignore[call-overload]
    except Exception as e:  # numpy raises TypeError, ValueError, SyntaxError ...
        raise TypeError(f"{what}: {dtype!r} is not a numpy dtype ({e})") from e
    if dt.hasobject:
        raise TypeError(
            f"{what}: dtype {dt} holds Python objects{_object_fields(dt)}, which are pointers "
            "into one process's memory and cannot be shared; use a fixed-size dtype "
            "(numbers, 'S'/'U' strings, structured dtypes of those)"
        )
    if not getattr(type(dt), "_legacy", True):
        raise TypeError(
            f"{what}: dtype {dt} has no fixed-size memory layout that another process can read; "
            "use a fixed-size dtype (e.g. 'U<n>' instead of StringDType)"
        )
    plain: np.dtype[Any] = _drop_metadata(dt)
    return plain


def _drop_metadata(dt: np.dtype[Any]) -> np.dtype[Any]:
    """*dt* without metadata anywhere in it: ``numpy.lib.format.drop_metadata`` (NumPy >= 1.26), or the same rule.

    The header stores the dtype as ``.npy`` does, which cannot hold
    metadata; NumPy 1.24-1.25 warns on writing one that has some.
    """
    drop = getattr(npformat, "drop_metadata", None)
    if drop is not None:
        return drop(dt)  # type: ignore[no-any-return]
    if dt.names is not None:
        fields = dt.fields
        assert fields is not None
        found = dt.metadata is not None
        names, formats, offsets, titles = [], [], [], []
        for name in dt.names:
            field = fields[name]
            field_dt = _drop_metadata(field[0])
            found = found or field_dt is not field[0]
            names.append(name)
            formats.append(field_dt)
            offsets.append(field[1])
            titles.append(field[2] if len(field) > 2 else None)
        if not found:
            return dt
        return np.dtype({"names": names, "formats": formats, "offsets": offsets, "titles": titles,
                         "itemsize": dt.itemsize}, align=dt.isalignedstruct)
    if dt.subdtype is not None:
        sub, shape = dt.subdtype
        new = _drop_metadata(sub)
        if dt.metadata is None and new is sub:
            return dt
        return np.dtype((new, shape))
    return dt if dt.metadata is None else np.dtype(dt.str)


def check_shape(shape: object, what: str) -> tuple[int, ...]:
    """*shape* (an int or a sequence of ints, each >= 0) as a tuple, else TypeError/ValueError."""
    if isinstance(shape, (bool, np.bool_)):
        raise TypeError(f"{what}: shape must be an int or a tuple of ints, not {shape!r}")
    dims: tuple[int, ...]
    try:
        dims = (operator.index(shape),)  # type: ignore[arg-type]
    except TypeError:
        try:
            items: tuple[Any, ...] = tuple(shape)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"{what}: shape must be an int or a tuple of ints, not {type(shape).__name__} ({shape!r})"
            ) from None
        dims_list: list[int] = []
        for d in items:
            if isinstance(d, (bool, np.bool_)):
                raise TypeError(f"{what}: shape {items!r} holds a bool; dimensions are ints")
            try:
                dims_list.append(operator.index(d))
            except TypeError:
                raise TypeError(
                    f"{what}: shape {items!r} holds {type(d).__name__} {d!r}; dimensions are ints"
                ) from None
        dims = tuple(dims_list)
    if len(dims) > MAX_DIMS:
        raise InvalidSizeError(f"{what}: shape has {len(dims)} dimensions; numpy allows at most {MAX_DIMS}")
    for d in dims:
        if d < 0:
            raise InvalidSizeError(f"{what}: shape {dims} has a negative dimension ({d})")
    return dims


def _dict_text(shape: tuple[int, ...], dtype: np.dtype[Any], fortran_order: bool) -> str:
    """The dict text as numpy.save writes it (sorted keys, repr values, room to grow the first axis)."""
    d = {"descr": npformat.dtype_to_descr(dtype), "fortran_order": bool(fortran_order), "shape": shape}
    text = "{" + "".join(f"'{k}': {v!r}, " for k, v in sorted(d.items())) + "}"
    if shape:
        text += " " * (npformat.GROWTH_AXIS_MAX_DIGITS - len(repr(shape[-1 if fortran_order else 0])))
    return text


def _wrap_3_0(text: str) -> bytes:
    """A .npy 3.0 header: 2.0's framing (4-byte length) around UTF-8 dict text."""
    body = text.encode("utf-8")
    used = npformat.MAGIC_LEN + 4 + len(body) + 1
    pad = (-used) % npformat.ARRAY_ALIGN
    return npformat.magic(3, 0) + struct.pack("<I", len(body) + pad + 1) + body + b" " * pad + b"\n"


def encode_descriptor(shape: tuple[int, ...], dtype: np.dtype[Any], fortran_order: bool, what: str) -> bytes:
    """The .npy header (magic, version, length, dict text, padding) for an array of this kind.

    Version 1.0, or 3.0 for field names outside latin-1 (what ``numpy.save``
    picks). A dict text that needs 2.0 (over 64 KiB) is over our cap anyway.
    """
    header = {"descr": npformat.dtype_to_descr(dtype), "fortran_order": bool(fortran_order), "shape": shape}
    buf = io.BytesIO()
    try:
        npformat.write_array_header_1_0(buf, header)
        out = buf.getvalue()
    except UnicodeEncodeError:
        out = _wrap_3_0(_dict_text(shape, dtype, fortran_order))
    except ValueError:  # the dict text does not fit 1.0's 2-byte length
        out = b""
    if not out or len(out) > MAX_NPY_HEADER:
        raise TypeError(
            f"{what}: the header describing dtype {dtype} would exceed the {MAX_NPY_HEADER}-byte cap "
            "(a structured dtype with too many fields); split it into several arrays"
        )
    return out


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_3_0(fp: io.BytesIO) -> tuple[Any, Any, Any]:
    (hlen,) = struct.unpack("<I", fp.read(4))
    if hlen > MAX_NPY_HEADER:
        raise ValueError(f"header of {hlen} bytes is over the {MAX_NPY_HEADER}-byte cap")
    raw = fp.read(hlen)
    if len(raw) != hlen:
        raise ValueError("the header is cut short")
    d = ast.literal_eval(raw.decode("utf-8"))
    if not isinstance(d, dict) or d.keys() != set(npformat.EXPECTED_KEYS):
        raise ValueError(f"header is not a dict of {sorted(npformat.EXPECTED_KEYS)}: {d!r}")
    return d["shape"], d["fortran_order"], npformat.descr_to_dtype(d["descr"])


def _guess(descriptor: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any]] | None:
    """(shape, fortran_order, dtype) of a plain-dtype 1.0 descriptor, proven by writing it again; else None.

    numpy's reader runs ast.literal_eval on the dict text: slower on a
    process's first call, most of a first attach() (benchmarks/results/notes.md;
    the attach group's fresh-process rows). A descriptor that
    ``numpy.save`` wrote for a plain dtype is cut apart with str.partition
    instead, and the guess counts only if numpy's own public writer turns it
    back into exactly these bytes: then numpy's reader would read the same
    (shape, order, dtype), since it reads back what its writer wrote. So there
    is no second grammar here to get wrong, only a shortcut numpy checks.
    """
    if descriptor[:8] != b"\x93NUMPY\x01\x00":
        return None
    try:
        text = descriptor[10:].decode("latin1")
        _, _, rest = text.partition("{'descr': '")
        descr, sep, rest = rest.partition("', 'fortran_order': ")
        order, sep2, rest = rest.partition(", 'shape': (")
        dims, sep3, _ = rest.partition("), }")
        if not (sep and sep2 and sep3) or order not in ("True", "False"):
            return None
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
        dtype = np.dtype(descr)
    except (ValueError, TypeError, SyntaxError):
        return None
    fortran = order == "True"
    buf = io.BytesIO()
    try:
        npformat.write_array_header_1_0(
            buf, {"descr": npformat.dtype_to_descr(dtype), "fortran_order": fortran, "shape": shape})
    except (ValueError, TypeError):
        return None
    return (shape, fortran, dtype) if buf.getvalue() == descriptor else None


def _read(descriptor: bytes) -> tuple[Any, Any, Any, int]:
    """(shape, fortran_order, dtype, bytes used) as numpy.lib.format reads them."""
    fp = io.BytesIO(descriptor)
    version = npformat.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = npformat.read_array_header_1_0(fp, max_header_size=MAX_NPY_HEADER)
    elif version == (2, 0):
        shape, fortran, dtype = npformat.read_array_header_2_0(fp, max_header_size=MAX_NPY_HEADER)
    elif version == (3, 0):
        shape, fortran, dtype = _read_3_0(fp)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return shape, fortran, dtype, fp.tell()


# Validated specs by their exact descriptor bytes: the same bytes always give
# the same spec, and attaching one array over and over (a worker per task)
# should not parse it each time. Structured dtypes are left out because
# their field names can be changed in place (dtype.names = ...).
_SPECS: dict[bytes, ArraySpec] = {}
_SPECS_MAX = 256


def parse_descriptor(descriptor: bytes, *, key: str | None = None) -> ArraySpec:
    """Validate an ndarray descriptor read from a segment; HeaderError says what is wrong."""
    spec = _SPECS.get(descriptor)
    if spec is not None:
        return spec
    spec = _parse_descriptor(descriptor, key)
    if spec.dtype.names is None:
        if len(_SPECS) >= _SPECS_MAX:
            _SPECS.clear()
        _SPECS[descriptor] = spec
    return spec


def _parse_descriptor(descriptor: bytes, key: str | None) -> ArraySpec:
    label = f"segment {key!r}" if key is not None else "segment"
    if len(descriptor) > MAX_NPY_HEADER:
        raise HeaderError(
            f"{label}: ndarray descriptor of {len(descriptor)} bytes exceeds the {MAX_NPY_HEADER}-byte cap; "
            "the segment is corrupt", key)
    try:
        guess = _guess(descriptor)
        shape, fortran, dtype, used = (*guess, len(descriptor)) if guess is not None else _read(descriptor)
    except Exception as e:  # whatever the parser makes of corrupt bytes
        raise HeaderError(
            f"{label}: corrupt ndarray descriptor ({type(e).__name__}: {_short(str(e))}); "
            "the segment was damaged or written by something else", key) from None
    if used != len(descriptor):
        raise HeaderError(
            f"{label}: ndarray descriptor is {len(descriptor)} bytes but its .npy header "
            f"says {used}; the segment is corrupt", key)
    if type(fortran) is not bool:
        raise HeaderError(f"{label}: fortran_order is {fortran!r}, not a bool", key)
    if type(shape) is not tuple or any(type(d) is not int for d in shape):
        raise HeaderError(f"{label}: shape {_short(repr(shape))} is not a tuple of ints", key)
    if len(shape) > MAX_DIMS:
        raise HeaderError(f"{label}: shape has {len(shape)} dimensions; numpy allows at most {MAX_DIMS}", key)
    if any(d < 0 for d in shape):
        raise HeaderError(f"{label}: shape {shape} has a negative dimension", key)
    if not isinstance(dtype, np.dtype) or not getattr(type(dtype), "_legacy", True):
        raise HeaderError(f"{label}: descriptor names dtype {dtype!r}, which has no fixed layout", key)
    if dtype.hasobject:
        raise HeaderError(
            f"{label}: descriptor names dtype {dtype}, which holds Python objects; "
            "refusing to map pointers from another process", key)
    # numpy needs the element count (and the byte count of a non-empty array)
    # to fit in an intp; checked here with exact arithmetic.
    count = math.prod(d for d in shape if d)
    if count > _INTP_MAX or count * dtype.itemsize > _INTP_MAX:
        raise HeaderError(f"{label}: shape {shape} x {dtype.itemsize} bytes overflows", key)
    return ArraySpec(shape=shape, dtype=dtype, fortran_order=fortran)


def _dtype_label(dtype: np.dtype[Any], limit: int = 48) -> str:
    text = str(dtype)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_spec(spec: ArraySpec) -> str:
    """'ndarray float64 (1000, 480) C'."""
    return f"ndarray {_dtype_label(spec.dtype)} {spec.shape} {spec.order}"


def describe_descriptor(descriptor: bytes, payload_length: int = 0) -> str:
    """A listing's summary of an ndarray descriptor; never raises on corrupt bytes."""
    try:
        return describe_spec(parse_descriptor(descriptor))
    except HeaderError:
        return "ndarray (corrupt header)"
    except Exception:  # pragma: no cover - belt and braces for `shmarray ls`
        return "ndarray (unreadable header)"
