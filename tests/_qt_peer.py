"""The real-Qt side of tests/test_qt_interop.py: PySide6's QSharedMemory in a child process.

Each function runs in a spawned process (tests/_procs.py) and makes the Qt
calls a Qt 6 application makes. *kind* picks the key: "posix" is Qt 6's
``QSharedMemory(QSharedMemory.platformSafeKey(name))`` (PosixRealtime),
"sysv" its SystemV form, "legacy" the pre-6.6 ``QSharedMemory(name)``
(System V, Qt's legacy key). Byte 0 of a segment is the stage of the
exchange; bytes 1-16 carry a message.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

STAGE, MSG = slice(0, 1), slice(1, 17)


def qt_memory(kind: str, name: str) -> Any:
    """A PySide6 QSharedMemory on *name*, keyed as *kind* says."""
    from PySide6.QtCore import QNativeIpcKey, QSharedMemory

    if kind == "posix":
        return QSharedMemory(QSharedMemory.platformSafeKey(name))
    if kind == "sysv":
        return QSharedMemory(QSharedMemory.platformSafeKey(name, QNativeIpcKey.Type.SystemV))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the QString constructor is deprecated since Qt 6.10
        return QSharedMemory(name)


def _stage(m: Any) -> int:
    assert m.lock(), m.errorString()
    try:
        return bytes(m.constData()[STAGE])[0]
    finally:
        m.unlock()


def _wait_stage(m: Any, stage: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while _stage(m) != stage:
        if time.monotonic() > deadline:
            raise TimeoutError(f"stage {stage} not reached")
        time.sleep(0.005)


def _touch(path: str) -> None:
    with open(path, "w"):
        pass


def qt_creates(kind: str, name: str, size: int, ready: str) -> dict[str, Any]:
    """Create, lock, write stage 1 and a message; wait for stage 2 (the other side wrote back)."""
    m = qt_memory(kind, name)
    assert m.create(size), m.errorString()
    assert m.lock()
    m.data()[MSG] = b"written by Qt..."
    m.data()[STAGE] = b"\x01"
    assert m.unlock()
    _touch(ready)
    _wait_stage(m, 2)
    assert m.lock()
    got = bytes(m.constData()[MSG])
    m.unlock()
    facts = {"got": got, "size": m.size(), "native": m.nativeKey()}
    assert m.detach()
    return facts


def qt_attaches(kind: str, name: str) -> dict[str, Any]:
    """Attach an existing segment, lock, read the message, write one back with stage 2."""
    m = qt_memory(kind, name)
    assert m.attach(), m.errorString()
    assert m.lock(), m.errorString()
    got = bytes(m.constData()[MSG])
    stage = bytes(m.constData()[STAGE])[0]
    m.data()[MSG] = b"answered by Qt.."
    m.data()[STAGE] = b"\x02"
    assert m.unlock()
    facts = {"got": got, "stage": stage, "size": m.size(), "native": m.nativeKey()}
    assert m.detach()
    return facts


def qt_locks_and_waits(kind: str, name: str, ready: str, go: str) -> float:
    """Attach (Qt's attach() takes the lock too), then at *go* lock; the seconds lock() took."""
    m = qt_memory(kind, name)
    assert m.attach(), m.errorString()
    _touch(ready)
    deadline = time.monotonic() + 20
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.002)
    t0 = time.monotonic()
    assert m.lock(), m.errorString()
    took = time.monotonic() - t0
    m.data()[STAGE] = b"\x03"
    m.unlock()
    m.detach()
    return took


def qt_holds(kind: str, name: str, seconds: float, ready: str) -> bool:
    """Attach, hold the lock for *seconds*, release."""
    m = qt_memory(kind, name)
    assert m.attach(), m.errorString()
    assert m.lock(), m.errorString()
    _touch(ready)
    time.sleep(seconds)
    assert m.unlock()
    m.detach()
    return True


def qt_dies_holding(kind: str, name: str, ready: str) -> None:
    """Attach, lock, and die without unlocking or detaching (no destructors run)."""
    m = qt_memory(kind, name)
    assert m.attach(), m.errorString()
    assert m.lock(), m.errorString()
    _touch(ready)
    os._exit(0)


def qt_writes_frame(kind: str, name: str, shape: tuple[int, ...], ready: str, done: str) -> None:
    """A camera app: create a uint8 frame segment, fill it (value = index % 251) under the lock; stay until *done*."""
    m = qt_memory(kind, name)
    n = 1
    for d in shape:
        n *= d
    assert m.create(n), m.errorString()
    assert m.lock()
    m.data()[:n] = bytes(i % 251 for i in range(n))
    assert m.unlock()
    _touch(ready)
    deadline = time.monotonic() + 20
    while not os.path.exists(done) and time.monotonic() < deadline:
        time.sleep(0.005)
    m.detach()


def qt_keys(names: list[str]) -> list[tuple[str, ...]]:
    """Qt's derivations for *names*: (platformSafeKey posix, sysv; legacyNativeKey sysv, posix; toStrings)."""
    from PySide6.QtCore import QNativeIpcKey, QSharedMemory

    t = QNativeIpcKey.Type
    out = []
    for n in names:
        keys = [QSharedMemory.platformSafeKey(n), QSharedMemory.platformSafeKey(n, t.SystemV),
                QSharedMemory.legacyNativeKey(n), QSharedMemory.legacyNativeKey(n, t.PosixRealtime)]
        out.append(tuple(k.nativeKey() for k in keys) + tuple(k.toString() for k in keys))
    return out
