"""A drop-in for Qt's ``QSharedMemory`` (PyQt/PySide), without Qt.

``from shmarray.qt import QSharedMemory`` behaves as PyQt's page for Qt 4.8's
class documents it: camelCase methods, ``bool`` returns instead of
exceptions, the last failure in ``error()``/``errorString()``, and the
``AccessMode``/``SharedMemoryError`` values as class attributes. Where the
page is silent the facade does what Qt's own implementation does; where
later Qt releases changed course (Qt 6.6+ locks with a native key and
detaches on ``setKey`` of the same key) the page wins.

Each object drives one :class:`shmarray.Segment`, so a ``QSharedMemory`` and
a ``Segment`` of the same key share one segment. On purpose, unlike Qt:

* ``data()`` and ``constData()`` are memoryviews (None when not attached);
  after a ReadOnly attach ``data()`` is read-only, so a write raises
  ``TypeError`` instead of killing the process.
* A segment whose last user crashed is gone, not leaked; a lock holder's
  death releases the lock.
* ``lock()`` is False whenever the object is not attached: the lock belongs
  to a segment (Qt locks its side semaphore once create()/attach() has been
  tried, even when they failed).

Null strings: Qt returns a null ``QString`` from ``key()`` after
``setNativeKey()`` (and from ``key()``/``nativeKey()`` when nothing is set);
PyQt and PySide turn a null ``QString`` into ``''``, and so does this facade.

Qt 6 keys, and real Qt processes. ``QSharedMemory(QNativeIpcKey(...))``,
``setNativeKey(QNativeIpcKey)``, ``setNativeKey(name, type)`` or
``QSharedMemory(key, qt_compat=True)`` put the object in Qt mode: it creates,
attaches, locks and detaches exactly as Qt 6 does for that key type (see
``shmarray.qt._native``), so a C++ or PySide6 program on the same key shares
its bytes and its lock. shmarray's own guarantees (no leak after a crash, a
lock that a dying holder gives back, a header) do not hold there: Qt's
rules do. An object in Qt mode stays in it (``setKey("k")`` then means Qt's
legacy key). :func:`attach_qt` maps such a segment as an ndarray.

Inside: ``_facade`` (``QSharedMemory``) delegates to one backend
(``_backend.Backend``, which holds the error state): ``_segment_backend``
(shmarray mode) or ``_native`` (Qt mode, with ``_semaphore`` for Qt's lock
and ``_keys`` for Qt 6's key API); ``_arrays`` maps a Qt segment as an
ndarray.
"""

from __future__ import annotations

from ._arrays import QtArray, attach_qt
from ._facade import QSharedMemory, remove_qt_segment
from ._keys import QNativeIpcKey

__all__ = ["QSharedMemory", "QNativeIpcKey", "QtArray", "attach_qt", "remove_qt_segment"]
