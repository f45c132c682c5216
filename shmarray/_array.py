"""Typed arrays in a segment: SharedArray, create / share / attach.

The bytes of an array segment (payload header, .npy descriptor, data) are
specified in ``_npy``, next to their codec.

The segment is written completely (header, descriptor, data, ready = 1)
through its fd before its name becomes visible (``Segment._create``), so an
attacher never sees a half-written array. ``attach`` checks the payload
header, then every field of the descriptor, then that shape x itemsize equals
the payload length, before it builds the view.

A pickled SharedArray is a reference (``_reference``): the segment instance,
and as its detail the view's offset from user byte 0, shape, strides and
dtype; so a reference to a segment that was replaced never reads its
successor, and one that reached another host says so. Unpickling in a process that holds the segment opens
and maps nothing; elsewhere it attaches once for the process. Either way it
checks that the view lies inside the segment's data.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Iterator

import numpy as np

from ._control import PAGE_SIZE
from ._display import human as _human
from ._errors import (
    AccessMode,
    AlreadyExistsError,
    HeaderError,
    InvalidSizeError,
    LockError,
    NotFoundError,
    user_facing,
)
from ._header import HEADER, Kind, PayloadHeader, header_from, layout, pack_header, read_header
from ._lock import Guard
from ._npy import (
    NUMPY2,
    ArraySpec,
    check_dtype,
    check_shape,
    encode_descriptor,
    parse_descriptor,
)
from ._progress import check_progress, label, reporting
from ._segment import Dir, Segment
from ._reference import Reference, rebuild, reduce

__all__ = ["SharedArray", "create", "share", "attach"]

# Writes go through the fd in pieces of this size: a non-contiguous source is
# gathered into a bounce buffer this big, and a fill value is repeated in one.
# Small enough to stay in cache, large enough that syscalls are amortised.
_CHUNK = 4 << 20
_INTP_MAX = np.iinfo(np.intp).max

Write = Callable[[memoryview, int], None]


def _plain(result: Any) -> Any:
    """A result that does not live in a segment, as a plain ndarray (tuples and lists too)."""
    if isinstance(result, MappedArray):
        return result if result._home() is not None else result.view(np.ndarray)
    if type(result) in (tuple, list):
        return type(result)(_plain(r) for r in result)
    return result


class MappedArray(np.ndarray):
    """The ``numpy.memmap`` model, for ndarrays over a mapping (SharedArray, and shmarray.qt's QtArray).

    ``_HOME`` names the attributes that say where the memory lives (the first
    is None outside any mapping). Views of it carry them on; results that
    live elsewhere (ufunc outputs, copies, fancy indexing) are plain ndarrays.
    """

    _HOME: tuple[str, ...] = ()
    # As numpy.memmap: mixed with plain arrays, the plain type wins.
    __array_priority__ = -100.0

    def _home(self) -> Any:
        return getattr(self, self._HOME[0])

    def __array_finalize__(self, obj: Any) -> None:
        if getattr(obj, self._HOME[0], None) is not None and (
                np.may_share_memory(self, obj) or (self.size == 0 and self.base is not None)):
            for name in self._HOME:
                setattr(self, name, getattr(obj, name))

    def __array_wrap__(self, arr: Any, context: Any = None, return_scalar: bool = False) -> Any:
        arr = super().__array_wrap__(arr, context)
        if isinstance(arr, MappedArray) and arr._home() is not None:
            return arr  # written in place into the mapping (out=)
        # NumPy 2 says when the result should be a scalar (a reduction, a ufunc of 0-d
        # inputs); NumPy 1.x asks no such thing of subclasses and returns what wrap gives.
        # There every 0-d result is a scalar, as it is for a plain ndarray.
        if return_scalar or (not NUMPY2 and arr.ndim == 0):
            return arr[()]
        return arr.view(np.ndarray)

    def __getitem__(self, index: Any) -> Any:
        res = super().__getitem__(index)
        if isinstance(res, MappedArray) and res._home() is None:
            return res.view(np.ndarray)
        return res

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        return _plain(super().__array_function__(func, types, args, kwargs))


class SharedArray(MappedArray):
    """An ndarray whose memory lives in a shared-memory segment (the ``numpy.memmap`` model).

    Made by :func:`create`, :func:`share` and :func:`attach`, never directly.
    Views (slices, reshapes, transposes, ``.view(dtype)``) are SharedArrays too
    and keep the segment attached and mapped; results that do not live in the
    segment (ufunc outputs, fancy-index copies, ``.copy()``) are plain
    ndarrays, and reductions give scalars. Pickling sends a reference (key and
    view geometry, about 100 bytes); the receiver attaches. ``np.asarray(a)``
    is a plain ndarray view and pickles by value.

    See Also
    --------
    create, share, attach

    Examples
    --------
    >>> import numpy as np, pickle, shmarray
    >>> a = shmarray.share("doc-sharedarray", np.arange(6.0).reshape(2, 3))
    >>> type(a[0]).__name__, type(a + 1).__name__
    ('SharedArray', 'ndarray')
    >>> len(pickle.dumps(a[:, 1])) < 300
    True
    """

    # Class-level defaults: a SharedArray outside any segment (e.g. a copy
    # that escaped the downgrades) behaves as a plain array.
    _shm_seg: Segment | None = None
    _shm_map: Any = None  # the segment's data mapping: user byte 0 is its first byte
    _HOME = ("_shm_seg", "_shm_map")

    def __new__(cls, *args: Any, **kwargs: Any) -> SharedArray:
        raise TypeError(
            "SharedArray is not built directly; use shmarray.create(key, shape, dtype), "
            "shmarray.share(key, array) or shmarray.attach(key)"
        )

    # -- the segment ------------------------------------------------------------------

    @property
    def key(self) -> str | None:
        """The key of the segment the array lives in (None for an array outside any segment)."""
        seg = self._shm_seg
        return seg.key if seg is not None else None

    @property
    def segment(self) -> Segment | None:
        """The :class:`Segment` the array lives in (detached after :meth:`close`)."""
        return self._shm_seg

    @user_facing
    def lock(self, timeout: float | None = None, *, shared: bool = False) -> Guard:
        """Take the segment lock now; the guard it returns releases it (``with``, or :meth:`unlock`).

        ``a.lock()`` as a statement holds the lock until ``a.unlock()``, as
        ``threading.Lock.acquire`` does; ``with a.lock(): a[0] = 1`` releases on
        exit (``as`` gives the array). Between processes it is the segment's lock;
        within a process the threads using this array (and its views) exclude
        each other too, and a thread that holds it may lock again (each hold is
        released once).

        Parameters
        ----------
        timeout : float or None, optional
            Seconds to wait: None (the default) waits forever, 0 tries once.
        shared : bool, optional
            Take the lock as a reader (many at once) instead of exclusively.

        Returns
        -------
        guard
            A context manager that releases this hold on exit; entering it
            gives the array.

        Raises
        ------
        LockError
            When *timeout* runs out, or the array's segment is closed.
        ValueError, TypeError
            For a *timeout* that is not None or a finite number >= 0.

        Examples
        --------
        >>> import shmarray
        >>> a = shmarray.create("doc-lock", 1, "i8")
        >>> with a.lock(timeout=1):
        ...     a[0] += 1
        >>> int(a[0])
        1
        """
        seg = self._shm_seg
        if seg is None:
            raise LockError("this array does not live in a segment (it is a copy); it has no segment lock")
        return seg._holds("lock").acquire(self, timeout, shared, f"lock of array {seg.key!r}")

    @user_facing
    def unlock(self) -> None:
        """Release this thread's latest hold of the segment lock (taken by :meth:`lock`).

        Raises
        ------
        LockError
            When this thread holds none: a second unlock never releases another
            hold.
        """
        seg = self._shm_seg
        if seg is None:
            raise LockError("this array does not live in a segment (it is a copy); it has no segment lock")
        seg._holds("unlock").release()

    def close(self) -> None:
        """Detach the segment now; views already taken keep working until they are collected.

        Idempotent. Without ``close()``, the segment stays attached while any
        view of it is alive; the segment is destroyed when the last holder in any
        process goes (unless persistent).
        """
        seg = self._shm_seg
        if seg is not None:
            seg.detach()

    def __enter__(self) -> SharedArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        text = super().__repr__()
        seg = self._shm_seg
        if seg is None or not text.endswith(")"):
            return text
        return f"{text[:-1]}, key={seg.key!r})"

    def _repr_html_(self) -> str | None:
        """Jupyter's rich display: the segment's facts, dtype, shape, order and a preview of the values."""
        seg = self._shm_seg
        if seg is None:
            return None  # a copy outside any segment: IPython shows the plain repr
        from ._display import facts, preformatted
        from ._segment import segment_facts

        flags = self.flags
        order = "C" if flags.c_contiguous else "F" if flags.f_contiguous else "strided view"
        mine = [("dtype", str(self.dtype)), ("shape", str(self.shape)), ("order", order),
                ("nbytes", f"{_human(self.nbytes)} ({self.nbytes:,} bytes)"),
                ("writeable", "yes" if flags.writeable else "no (read-only)")]
        seg_rows = [("segment size" if name == "size" else name, value) for name, value in segment_facts(seg)]
        rows = seg_rows[:1] + mine + seg_rows[1:]
        preview = np.array2string(np.asarray(self), threshold=60, edgeitems=3, max_line_width=100)
        return facts("shmarray.SharedArray", rows) + preformatted(preview)

    # -- pickling by reference ------------------------------------------------------------

    def __reduce_ex__(self, protocol: Any) -> Any:
        seg = self._shm_seg
        if seg is None or seg.key is None:
            return np.asarray(self).__reduce_ex__(protocol)
        ref = Reference.to(seg, AccessMode.ReadWrite if self.flags.writeable else AccessMode.ReadOnly)
        if ref.by_value():  # a transport sends this to another host: the bytes, as a plain ndarray
            return np.asarray(self).__reduce_ex__(protocol)
        offset = _address(self) - _address(self._shm_map)
        dt = self.dtype
        # A plain dtype travels as its string: unpickling a dtype object costs
        # more than the rest of the reference.
        spec: Any = dt.str if dt.fields is None and dt.subdtype is None and not dt.metadata else dt
        if spec is not dt and np.dtype(spec) != dt:  # pragma: no cover - e.g. a user-defined dtype
            spec = dt
        return reduce(_rebuild, ref, (offset, self.shape, self.strides, spec))

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)


def _copy_returns_plain(name: str) -> None:
    """Make ``MappedArray.<name>`` give a plain ndarray when its result is a copy."""
    method = getattr(np.ndarray, name)

    def wrapper(self: MappedArray, *args: Any, **kwargs: Any) -> Any:
        return _plain(method(self, *args, **kwargs))

    wrapper.__name__ = name
    wrapper.__qualname__ = f"MappedArray.{name}"
    wrapper.__doc__ = method.__doc__
    setattr(MappedArray, name, wrapper)


# The ndarray methods that can return a new array of the caller's type
# without going through a ufunc (ufunc results pass __array_wrap__).
for _name in ("copy", "__copy__", "__deepcopy__", "astype", "flatten", "ravel", "reshape",
              "repeat", "take", "compress", "choose", "dot", "argsort", "argpartition", "byteswap"):
    _copy_returns_plain(_name)
del _name

SharedArray.__module__ = "shmarray"


def _address(arr: np.ndarray) -> int:
    return int(arr.__array_interface__["data"][0])


def _view(seg: Segment, shape: tuple[int, ...], dtype: np.dtype[Any], offset: int,
          strides: tuple[int, ...] | None = None, order: str = "C") -> SharedArray:
    """A SharedArray over the segment's mapping; it holds the Segment (so the segment stays attached)."""
    mapping = seg._root()
    arr: SharedArray = np.ndarray.__new__(
        SharedArray, shape, dtype, buffer=mapping, offset=offset, strides=strides,
        order="F" if order == "F" else "C")
    arr._shm_seg = seg
    arr._shm_map = mapping
    return arr


# -- attach --------------------------------------------------------------------------------


def _attach_segment(key: str, readonly: bool, dir: Dir = None) -> Segment:
    return Segment(key, dir=dir).attach(AccessMode.ReadOnly if readonly else AccessMode.ReadWrite)


def _array_header(seg: Segment, key: str) -> tuple[PayloadHeader, bytes]:
    """The validated payload header and descriptor of an attached array segment."""
    # Arrays are published complete and never rewritten, so the header bytes
    # read at attach are the header; the mapping is read only when they fall short.
    got = header_from(seg._head(), seg.size, expect=Kind.NDARRAY, key=key)
    if got is not None:
        return got
    data = seg.const_data
    if data is None:  # pragma: no cover - attached just before
        raise HeaderError(f"segment {key!r} is not attached", key)
    # No wait for 'ready': an array is published complete or not at all.
    return read_header(data, expect=Kind.NDARRAY, key=key, wait=0.0)


def _read_spec(seg: Segment, key: str) -> tuple[ArraySpec, int]:
    """The validated (spec, payload offset) of an attached array segment."""
    hdr, descriptor = _array_header(seg, key)
    spec = parse_descriptor(descriptor, key=key)
    if spec.nbytes != hdr.payload_length:
        raise HeaderError(
            f"segment {key!r}: shape {spec.shape} x {spec.dtype.itemsize} bytes = {spec.nbytes} "
            f"does not match the payload length {hdr.payload_length}; the segment is corrupt", key)
    return spec, hdr.payload_offset


@user_facing
def attach(key: str, *, readonly: bool = False, dir: Dir = None) -> SharedArray:
    """Attach the array that segment *key* holds: same dtype, shape and order, zero-copy.

    Parameters
    ----------
    key : str
        The segment's key.
    readonly : bool, optional
        Map the memory read-only, so nothing can write it through this array,
        its views or its buffer.
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).

    Returns
    -------
    SharedArray
        A view of the segment's data; it holds the segment while it (or a
        view of it) is alive.

    Raises
    ------
    NotFoundError
        When there is no such segment (never created, or the last process
        holding it detached or exited).
    HeaderError
        When the segment holds something else (a table, a ring) or its
        header is corrupt.

    Examples
    --------
    >>> import numpy as np, shmarray
    >>> a = shmarray.create("doc-attach", (2, 3), np.float32)
    >>> b = shmarray.attach("doc-attach")          # usually in another process
    >>> b.shape, b.dtype
    ((2, 3), dtype('float32'))
    """
    seg = _attach_segment(key, readonly, dir)
    try:
        spec, offset = _read_spec(seg, key)
        return _view(seg, spec.shape, spec.dtype, offset, order=spec.order)
    except BaseException:
        seg.detach()
        raise


def _payload(seg: Segment, key: str) -> tuple[int, int]:
    """(offset, length) of the array data in an attached array segment, parsed once per attachment."""
    cache = seg._cache()
    got = cache.get("array")
    if got is None:
        hdr, _ = _array_header(seg, key)
        got = cache["array"] = (hdr.payload_offset, hdr.payload_length)
    return got


def _rebuild(fields: tuple[Any, ...], detail: tuple[Any, ...]) -> SharedArray:
    """Unpickle a SharedArray reference (``_reference``)."""
    return rebuild(_rebuild, _view_of, fields, detail)  # type: ignore[no-any-return]


def _view_of(seg: Segment, ref: Reference, detail: tuple[Any, ...]) -> SharedArray:
    """The view a reference names, checked against the array its segment instance holds."""
    offset, shape, strides, dtype = detail
    dtype = np.dtype(dtype)
    key = ref.label or ""
    p_off, p_len = _payload(seg, key)
    lo, hi = _extent(offset, shape, strides, dtype.itemsize)
    if lo < p_off or hi > p_off + p_len:
        raise HeaderError(
            f"segment {key!r}: the pickled view (bytes {lo}..{hi}) does not lie inside the array "
            f"(bytes {p_off}..{p_off + p_len}); the segment was replaced since the array was pickled",
            key)
    return _view(seg, shape, dtype, offset, strides=strides)


def _extent(offset: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """The byte range [lo, hi) a view touches (empty views: [offset, offset))."""
    if len(shape) != len(strides):
        raise HeaderError(f"a pickled view has shape {shape} but strides {strides}")
    if any(d == 0 for d in shape):
        return offset, offset
    lo = hi = offset
    for d, s in zip(shape, strides):
        if s < 0:
            lo += (d - 1) * s
        else:
            hi += (d - 1) * s
    return lo, hi + itemsize


# -- create / share -----------------------------------------------------------------------------


def _phase_for(src: np.ndarray) -> int | None:
    """Where in a page the payload should start so that copying *src* in runs at full speed.

    Destination half a page ahead of the source (the user bytes start on a
    page boundary): far from the slow case of a destination just ahead of
    its source (several times slower: benchmarks/results/notes.md).
    Large contiguous sources only; others keep the compact layout.
    """
    if src.nbytes < _PHASE_MIN or not (src.flags.c_contiguous or src.flags.f_contiguous):
        return None
    return ((_address(src) + 2048) % 4096) // 64 * 64


_PHASE_MIN = 1 << 20


def _prepare(key: str, shape: tuple[int, ...], dtype: np.dtype[Any], fortran: bool,
             what: str, phase: int | None = None, dir: Dir = None) -> tuple[Segment, bytes, int, int]:
    """(segment, header + descriptor, payload offset, total user bytes), after every check that needs no OS."""
    seg = Segment(key, dir=dir)  # the key is checked here, before anything else is done
    descriptor = encode_descriptor(shape, dtype, fortran, what)
    nbytes = math.prod(shape) * dtype.itemsize
    p_off, total = layout(len(descriptor), nbytes, phase, seg._boundary())
    # Segment._create checks the free space of /dev/shm before writing; sizes no
    # file system holds (and that the header's 64-bit fields cannot) stop here.
    if total >= 1 << 62:
        raise seg._no_space(PAGE_SIZE + total, what)
    if math.prod(d for d in shape if d) > _INTP_MAX:
        raise InvalidSizeError(f"{what}: shape {shape} has more elements than numpy can index", key)
    return seg, pack_header(Kind.NDARRAY, descriptor, p_off, nbytes), p_off, total


def _fill_value(fill: object, dtype: np.dtype[Any], what: str) -> np.ndarray | None:
    """The fill value as one item of *dtype*, None when the item's bytes are all zero."""
    if fill is None:
        return None
    item = np.zeros((), dtype)
    try:
        item[()] = fill
    except Exception as e:  # numpy: ValueError, TypeError, OverflowError
        cls = TypeError if isinstance(e, TypeError) else ValueError
        raise cls(f"{what}: fill value {fill!r} does not fit dtype {dtype} ({e})") from e
    return item if item.tobytes().strip(b"\0") else None


def _write_repeated(write: Write, item: np.ndarray, count: int, offset: int) -> None:
    """*count* copies of *item* at *offset*, through a cache-sized chunk."""
    per = max(1, _CHUNK // max(item.itemsize, 1))
    chunk = np.empty(min(per, count), item.dtype)
    chunk[...] = item
    raw = chunk.view(np.uint8).data
    step = chunk.nbytes
    done = 0
    total = count * item.itemsize
    while done < total:
        n = min(step, total - done)
        write(raw[:n], offset + done)
        done += n


def _blocks(a: np.ndarray, limit: int) -> Iterator[np.ndarray]:
    """Consecutive pieces of *a* in C order, each at most *limit* bytes (or one item)."""
    if a.ndim == 0 or a.nbytes <= limit:
        yield a
        return
    n = a.shape[0]
    row = a.nbytes // n
    if row > limit:
        for i in range(n):
            yield from _blocks(a[i], limit)
    else:
        step = max(1, limit // row)
        for i in range(0, n, step):
            yield a[i : i + step]


def _write_array(write: Write, src: np.ndarray, offset: int, fortran: bool) -> None:
    """The array's bytes at *offset*: straight from its memory when contiguous, else gathered in C order."""
    if src.nbytes == 0:
        return
    if src.flags.c_contiguous or src.flags.f_contiguous:
        flat = src.reshape(-1, order="F" if fortran else "C")
        write(flat.view(np.uint8).data, offset)
        return
    bounce = np.empty(max(1, _CHUNK // src.itemsize), src.dtype)
    for blk in _blocks(src, _CHUNK):
        k = blk.size
        np.copyto(bounce[:k].reshape(blk.shape), blk)
        write(bounce[:k].view(np.uint8).data, offset)
        offset += blk.nbytes


@user_facing
def create(key: str, shape: object, dtype: object = float, *, order: str = "C", fill: object = None,
           persistent: bool = False, exist_ok: bool = False, progress: bool = False,
           dir: Dir = None) -> SharedArray:
    """A new array in segment *key*: zero-filled, or every item set to *fill*.

    The segment lives while some process holds it (this array, a view of it,
    or an array attached elsewhere). When the last of them goes, or its
    process exits, the segment goes too: keep the result until the other
    processes have attached it, or pass ``persistent=True``.

    Parameters
    ----------
    key : str
        The segment's key (any non-empty str of at most 1024 characters
        without NUL).
    shape : int or tuple of int
        The array's shape.
    dtype : data-type, optional
        Any fixed-size dtype (default float64); ``object`` is refused.
    order : {"C", "F"}, optional
        Memory order.
    fill : scalar, optional
        Every item's value; None (the default) leaves the array zero-filled.
    persistent : bool, optional
        Keep the segment after its last holder goes, until
        :func:`unlink` or ``shmarray rm KEY``.
    exist_ok : bool, optional
        Get-or-create (a notebook cell run again): when *key* already holds
        an array of the same dtype, shape and order it is attached and
        returned untouched (*fill* is not applied).
    progress : bool, optional
        Show a bar (``tqdm.auto``) while a *fill* value is written; zeros
        need none. Needs tqdm.
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).

    Returns
    -------
    SharedArray
        The new array.

    Raises
    ------
    AlreadyExistsError
        When *key* exists (with ``exist_ok=True``: when it holds something
        different, or its persistence differs; the message names both).
    OutOfResourcesError
        When the directory is full: pages are reserved now, so a full
        /dev/shm fails here, never with a crash later.
    InvalidKeyError, InvalidSizeError
        For a bad key, or a shape too large.
    TypeError, ValueError
        For a dtype that cannot be shared, a bad shape, *order* or *fill*.

    Examples
    --------
    >>> import numpy as np, shmarray
    >>> a = shmarray.create("doc-create", (2, 2), np.int16, fill=7)
    >>> a.tolist()
    [[7, 7], [7, 7]]
    >>> b = shmarray.create("doc-create", (2, 2), np.int16, exist_ok=True)
    >>> b.key == a.key
    True
    """
    what = f"create array {key!r}"
    dims = check_shape(shape, what)
    dt = check_dtype(dtype, what)
    if order not in ("C", "F"):
        raise ValueError(f"{what}: order must be 'C' or 'F', not {order!r}")
    item = _fill_value(fill, dt, what)
    show = check_progress(progress, what)
    if not exist_ok:
        return _create_new(key, dims, dt, order, item, persistent, show, dir)
    # Get-or-create. Racing creators: one create wins, the others attach what it published
    # (a segment is visible only once complete); one that went meanwhile is created again.
    for _ in range(16):
        try:
            return _create_new(key, dims, dt, order, item, persistent, show, dir)
        except AlreadyExistsError:
            pass
        try:
            seg = _attach_segment(key, False, dir)
        except NotFoundError:
            continue
        try:
            try:
                spec, offset = _read_spec(seg, key)
            except HeaderError as e:
                raise AlreadyExistsError(f"{what}: segment {key!r} exists and does not hold an array ({e})",
                                         key) from None
            _check_same(what, key, spec, dims, dt, order)
            if seg.persistent != persistent:
                raise AlreadyExistsError(
                    f"{what}: segment {key!r} already holds this array, but "
                    f"{'persistent' if seg.persistent else 'not persistent'} (asked: persistent={persistent}); "
                    "a segment's lifetime is set when it is created: unlink it and create it again", key)
            return _view(seg, spec.shape, spec.dtype, offset, order=spec.order)
        except BaseException:
            seg.detach()
            raise
    raise AlreadyExistsError(f"{what}: segment {key!r} kept appearing and disappearing; try again", key)


def _check_same(what: str, key: str, spec: ArraySpec, shape: tuple[int, ...], dtype: np.dtype[Any],
                order: str) -> None:
    """AlreadyExistsError naming both when the existing array is not the one asked for."""
    # An array with at most one dimension longer than 1 has one layout in either order.
    orders_differ = spec.order != order and sum(d > 1 for d in shape) > 1
    if spec.shape != shape or spec.dtype != dtype or orders_differ:
        raise AlreadyExistsError(
            f"{what}: segment {key!r} already holds an array of dtype {spec.dtype}, shape {spec.shape}, "
            f"order {spec.order!r}, not dtype {dtype}, shape {shape}, order {order!r}; use another key, "
            "or unlink it first (shmarray.unlink / `shmarray rm`)", key)


def _create_new(key: str, dims: tuple[int, ...], dt: np.dtype[Any], order: str, item: np.ndarray | None,
                persistent: bool, show: bool, dir: Dir) -> SharedArray:
    what = f"create array {key!r}"
    fortran = order == "F"
    seg, head, p_off, total = _prepare(key, dims, dt, fortran, what, dir=dir)
    count = math.prod(dims)

    def fill_segment(write: Write) -> None:
        write(memoryview(head), 0)
        if item is not None and count:
            with reporting(write, count * dt.itemsize, label("create", key), show) as w:
                _write_repeated(w, item, count, p_off)

    # Zeros: posix_fallocate reserves zeroed pages. A fill value: pwrite
    # writes (and so reserves) every page; ENOSPC surfaces there.
    seg._create(total, persistent=persistent, fill=fill_segment, reserve=item is None)
    return _view(seg, dims, dt, p_off, order=order)


@user_facing
def share(key: str, array: np.ndarray, *, persistent: bool = False, progress: bool = False,
          dir: Dir = None) -> SharedArray:
    """Copy *array* into a new segment *key* and return it as a SharedArray.

    The segment lives while some process holds it (the returned array, a view
    of it, or an array attached elsewhere): keep the result (``share(key, x)``
    as a bare statement is gone at once), or pass ``persistent=True``. An
    array made inside :func:`allocating` is published without a copy: it
    and the result are then two mappings of the same bytes, which NumPy
    cannot see overlap (copy one before assigning it to the other).

    Parameters
    ----------
    key : str
        The segment's key.
    array : numpy.ndarray
        The data. Dtype and shape are kept, and Fortran order when the array
        is Fortran-contiguous; a non-contiguous array is stored C-contiguous.
    persistent : bool, optional
        Keep the segment after its last holder goes, until :func:`unlink`.
    progress : bool, optional
        Show a bar (``tqdm.auto``: a widget in Jupyter, text on stderr in a
        terminal) while the data is copied in. Needs tqdm.
    dir : str or os.PathLike, optional
        The segment directory (default ``SHMARRAY_DIR``, else /dev/shm).

    Returns
    -------
    SharedArray
        The shared copy.

    Raises
    ------
    AlreadyExistsError
        When *key* exists.
    OutOfResourcesError
        When the directory has no room for it.
    TypeError
        For something other than an ndarray, or an ``object`` dtype.

    Examples
    --------
    >>> import numpy as np, shmarray
    >>> w = shmarray.share("doc-share", np.arange(4.0))
    >>> float(w[1:].sum())
    6.0
    """
    what = f"share array {key!r}"
    if not isinstance(array, np.ndarray):
        raise TypeError(
            f"{what}: expected a numpy.ndarray, not {type(array).__name__}; "
            "convert it first, e.g. share(key, np.asarray(data))")
    show = check_progress(progress, what)
    src = np.asarray(array)
    dt = check_dtype(src.dtype, what)
    if dt is not src.dtype:
        src = src.view(dt)  # the same bytes without dtype metadata
    fortran = bool(src.flags.f_contiguous and not src.flags.c_contiguous)
    # Only a process that entered allocating() has loaded the allocator, and only there can
    # an array live in one of its files: the others never import it (nor ctypes) for share().
    allocator = sys.modules.get("shmarray._reuse.allocator")
    if allocator is not None and allocator.holds(src):
        published = _share_in_place(key, src, dt, fortran, persistent, dir, what)
        if published is not None:
            return published
    seg, head, p_off, total = _prepare(key, src.shape, dt, fortran, what, _phase_for(src), dir)

    def fill_segment(write: Write) -> None:
        write(memoryview(head), 0)
        with reporting(write, src.nbytes, label("share", key), show and src.nbytes > 0) as w:
            _write_array(w, src, p_off, fortran)

    # pwrite from the source writes every page, so no separate reservation.
    seg._create(total, persistent=persistent, fill=fill_segment, reserve=False)
    return _view(seg, src.shape, dt, p_off, order="F" if fortran else "C")


def _share_in_place(key: str, src: np.ndarray, dt: np.dtype[Any], fortran: bool, persistent: bool, dir: Dir,
                    what: str) -> SharedArray | None:
    """share() of an ``allocating()`` array: publish the file its data lives in (no copy); None to copy instead.

    Only an array that is exactly its allocation (contiguous, all of it, a
    view of the same bytes included) and not shared before; and only when
    its descriptor fits the room kept for it.
    """
    from ._reuse import allocator  # loaded already: share() found the array in it

    seg = Segment(key, dir=dir)  # the key is checked here
    block = allocator.block_for(src, seg._dir)
    if block is None:
        return None
    descriptor = encode_descriptor(src.shape, dt, fortran, what)
    if HEADER.size + len(descriptor) > block.room:
        return None
    head = pack_header(Kind.NDARRAY, descriptor, block.room, src.nbytes)
    with allocator.publishing(block) as source:
        seg._publish_block(block.room + src.nbytes, block.fd, source, head, block.room, persistent=persistent)
    return _view(seg, src.shape, dt, block.room, order="F" if fortran else "C")

