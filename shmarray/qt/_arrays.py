"""Qt segments as ndarrays: :func:`attach_qt` and the :class:`QtArray` it returns."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal

import numpy as np

from .._array import MappedArray
from .._errors import AccessMode, InvalidSizeError, LockError, error_class
from .._npy import check_dtype, check_shape
from ._facade import QSharedMemory
from ._keys import QNativeIpcKey, as_key

__all__ = ["QtArray", "attach_qt"]


class QtArray(MappedArray):
    """An ndarray over a Qt segment's bytes, made by :func:`attach_qt`; ``.qt`` is its QSharedMemory.

    Views (slices, reshapes, ``.view()``) are QtArrays of the same segment;
    results that live elsewhere (ufunc outputs, ``.copy()``) are plain
    ndarrays (numpy.memmap's model, as SharedArray). It pickles by value, as
    a plain ndarray. The mapping lives as long as any view of it, even past
    ``detach()``.
    """

    qt: QSharedMemory | None = None
    _HOME = ("qt",)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return np.asarray(self).copy().__reduce_ex__(protocol)

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)

    def _memory(self) -> QSharedMemory:
        if self.qt is None:
            raise LockError("this array is not a view of a Qt segment")
        return self.qt

    def lock(self, timeout: float | None = None) -> bool:
        """Take Qt's lock of the segment (its semaphore); False when *timeout* seconds ran out."""
        return self._memory().lock(timeout)

    def unlock(self) -> bool:
        """Release Qt's lock; False when this array's QSharedMemory does not hold it."""
        return self._memory().unlock()

    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[QtArray]:
        """Hold Qt's lock for the block; raises LockError when *timeout* seconds run out."""
        memory = self._memory()
        if not memory.lock(timeout):
            raise LockError(f"{memory.errorString()} ({memory.nativeKey()!r})")
        try:
            yield self
        finally:
            memory.unlock()


def attach_qt(
    key: str | QNativeIpcKey | Any,
    dtype: Any,
    shape: int | tuple[int, ...] | None = None,
    *,
    offset: int = 0,
    mode: AccessMode | int = AccessMode.ReadWrite,
    legacy: bool = False,
    order: Literal["C", "F"] = "C",
) -> QtArray:
    """Attach a segment a Qt program made, as an ndarray of *dtype* and *shape* at byte *offset*.

    The segment holds no header: the caller says what it holds. Lock with
    ``arr.locked()`` (Qt's semaphore).

    Parameters
    ----------
    key : str or QNativeIpcKey
        A ``QNativeIpcKey`` (ours or PySide6's/PyQt6's), or a str: Qt 6's
        ``QSharedMemory.platformSafeKey(key)`` (PosixRealtime,
        ``/dev/shm/<key>``), or with ``legacy=True`` Qt's legacy key
        (``QSharedMemory("key")`` in Qt, System V).
    dtype : data-type
        The items' dtype.
    shape : int or tuple of int, optional
        None takes as many items as fit after *offset*.
    offset : int, optional
        Where the array starts in the segment's bytes.
    mode : shmarray.AccessMode, optional
        ReadWrite (the default) or ReadOnly.
    legacy : bool, optional
        A str *key* is Qt's legacy (System V) key.
    order : {"C", "F"}, optional
        Memory order.

    Returns
    -------
    QtArray
        An ndarray over the segment; ``.qt`` is its :class:`QSharedMemory`.

    Raises
    ------
    NotFoundError
        When there is no such segment (Qt's error text).
    ShmError
        The other failures, as their ShmError subclasses.
    """
    if isinstance(key, str):
        key = QSharedMemory.legacyNativeKey(key) if legacy else QSharedMemory.platformSafeKey(key)
    native = as_key(key)
    if native is None:
        raise TypeError(f"attach_qt: key must be a str or a QNativeIpcKey, not {type(key).__name__}")
    dt = check_dtype(dtype, "attach_qt")
    dims = None if shape is None else check_shape(shape, "attach_qt")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidSizeError(f"attach_qt: offset must be an int >= 0, not {offset!r}", None)
    memory = QSharedMemory(native)
    if not memory.attach(mode):
        raise error_class(memory.error())(f"{memory.errorString()} ({native.nativeKey()!r})", native.nativeKey())
    size = memory.size()
    if dims is None:  # as many items as fit after offset
        dims = (max(0, size - offset) // dt.itemsize if dt.itemsize else 0,)
    nbytes = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    if offset + nbytes > size:
        memory.detach()
        raise InvalidSizeError(
            f"attach_qt: {dims} of {dt} at offset {offset} needs {offset + nbytes} bytes; "
            f"the segment {native.nativeKey()!r} has {size}", native.nativeKey())
    buffer = memory.data()
    assert buffer is not None
    array = np.ndarray(dims, dtype=dt, buffer=buffer, offset=offset, order=order).view(QtArray)
    array.qt = memory
    return array


attach_qt.__module__ = "shmarray"
QtArray.__module__ = "shmarray"
