"""The payload header's reader: kinds, and waiting for a payload still being written."""

from __future__ import annotations

import threading
import time

import pytest

import shmarray
from shmarray._header import HEADER, Kind, pack_header, read_header

_READY = 12  # byte offset of the ready flag


def _block(ready: bool) -> bytearray:
    buf = bytearray(pack_header(Kind.NDARRAY, b"desc", 128, 16, ready=ready))
    buf.extend(bytes(128 + 16 - len(buf)))
    return buf


def test_waits_for_the_creator_to_publish():
    buf = _block(ready=False)
    flip = threading.Timer(0.1, lambda: buf.__setitem__(_READY, 1))
    flip.start()
    t = time.monotonic()
    hdr, desc = read_header(memoryview(buf), expect=Kind.NDARRAY, key="k", wait=5.0)
    flip.join()
    assert hdr.ready and desc == b"desc"
    assert 0.09 <= time.monotonic() - t < 4.0


def test_gives_up_after_wait():
    t = time.monotonic()
    with pytest.raises(shmarray.NotFoundError, match="still being written"):
        read_header(memoryview(_block(ready=False)), expect=Kind.NDARRAY, key="k", wait=0.2)
    assert 0.15 <= time.monotonic() - t < 2.0
    with pytest.raises(shmarray.NotFoundError):  # 0 tries once
        read_header(memoryview(_block(ready=False)), expect=Kind.NDARRAY, key="k", wait=0.0)


def test_wrong_kind_is_named_at_once():
    with pytest.raises(shmarray.HeaderError, match="holds an ndarray, not an arrow table"):
        read_header(memoryview(_block(ready=False)), expect=Kind.ARROW, key="k", wait=5.0)
    assert HEADER.size == 64
