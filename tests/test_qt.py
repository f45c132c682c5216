"""shmarray.qt.QSharedMemory: a port of Qt's own tst_QSharedMemory, plus the page's promises.

Each test names the Qt test function it follows (qtbase
tests/auto/corelib/kernel/qsharedmemory/test/tst_qsharedmemory.cpp for Qt 5,
tests/auto/corelib/ipc/qsharedmemory/tst_qsharedmemory.cpp for Qt 6). Qt's
"existing" segment, made in init(), is the ``existing`` fixture here. Threads
and processes are in test_qt_concurrency.py.
"""

from __future__ import annotations

import gc
import logging
import os
from multiprocessing import shared_memory

import numpy as np
import pytest

import shmarray
from _procs import start
from shmarray import Segment
from shmarray.qt import QSharedMemory

EXISTING_SIZE = 1024


@pytest.fixture
def existing(make_key):
    """tst_QSharedMemory::init(): a segment that exists during the test."""
    k = make_key("existing")
    sm = QSharedMemory(k)
    assert sm.create(EXISTING_SIZE)
    yield k
    sm.detach()


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0])


# -- basics -----------------------------------------------------------------------


def test_constructor():
    """tst_QSharedMemory::constructor: the default values."""
    sm = QSharedMemory()
    assert sm.key() == "" and sm.nativeKey() == ""
    assert not sm.isAttached()
    assert sm.data() is None and sm.constData() is None
    assert sm.size() == 0
    assert sm.error() == QSharedMemory.NoError
    assert sm.errorString() == ""


class _FakeQObject:
    """Stands in for a QObject parent: the facade must take one without importing Qt."""


def test_constructor_overloads_accept_a_parent():
    """tst_QSharedMemory::constructor, for both constructors of the reference page."""
    parent = _FakeQObject()
    assert QSharedMemory(parent).key() == ""
    assert QSharedMemory(parent=parent).key() == ""
    assert QSharedMemory("k", parent).key() == "k"
    assert QSharedMemory(key="k", parent=parent).key() == "k"
    assert QSharedMemory(None).key() == ""
    with pytest.raises(TypeError):
        QSharedMemory(b"k")


KEY_ROWS = [
    ("", "", ""),
    ("one", "", ""),
    ("", "one", ""),
    ("", "", "one"),
    ("one", "two", ""),
    ("one", "", "two"),
    ("", "one", "two"),
    ("one", "two", "three"),
    ("o/e", "t/o", "|x"),  # Qt's "invalid" row: keys are free text, native keys are checked at use
]


@pytest.mark.parametrize(("constructor_key", "set_key", "set_native_key"), KEY_ROWS)
def test_key(constructor_key, set_key, set_native_key):
    """tst_QSharedMemory::key (Qt 5) / legacyKey (Qt 6): key() and nativeKey() through setKey/setNativeKey."""
    sm = QSharedMemory(constructor_key)
    assert sm.key() == constructor_key
    assert (sm.nativeKey() == "") == (constructor_key == "")
    sm.setKey(set_key)
    assert sm.key() == set_key
    assert (sm.nativeKey() == "") == (set_key == "")
    sm.setNativeKey(set_native_key)
    assert sm.key() == ""  # Qt's null QString, as PyQt/PySide return it
    assert sm.nativeKey() == set_native_key
    assert sm.isAttached() is False
    assert sm.error() == QSharedMemory.NoError
    assert sm.errorString() == ""
    assert sm.data() is None
    assert sm.size() == 0
    assert sm.detach() is False


@pytest.mark.parametrize(("constructor_key", "set_key", "_unused"), KEY_ROWS)
def test_nativeKey(make_key, constructor_key, set_key, _unused):
    """tst_QSharedMemory::nativeKey (Qt 6): a native key is kept verbatim, and a new one detaches."""
    sm = QSharedMemory()
    sm.setNativeKey(constructor_key)
    assert sm.nativeKey() == constructor_key and sm.key() == ""
    sm.setNativeKey(set_key)
    assert sm.nativeKey() == set_key
    assert not sm.isAttached() and sm.error() == QSharedMemory.NoError and sm.errorString() == ""
    assert sm.data() is None and sm.size() == 0 and sm.detach() is False


def test_setKey_of_the_same_key_is_a_no_op(key, make_key):
    """Reference page, setKey()/setNativeKey(): the same key returns without doing anything.

    Qt 6.6+ detaches here; the page (Qt 4.8) wins.
    """
    sm = QSharedMemory(key)
    assert sm.create(64)
    sm.setKey(key)
    assert sm.isAttached() and sm.key() == key
    sm.setKey(make_key())
    assert not sm.isAttached()  # a new key detaches first, and does not attach

    native = QSharedMemory()
    native.setNativeKey(shmarray.Segment(key).native_key)
    assert native.create(64) and native.size() == 64
    native.setNativeKey(native.nativeKey())
    assert native.isAttached()
    # Qt checks "same native key *and* no key": a keyed object detaches and loses its key.
    keyed = QSharedMemory(make_key())
    assert keyed.create(8)
    keyed.setNativeKey(keyed.nativeKey())
    assert not keyed.isAttached() and keyed.key() == ""
    native.detach()


def test_setKey_and_setNativeKey_keep_the_error():
    """QSharedMemory::setKey/setNativeKey (Qt 4.8-6 source): neither touches error()."""
    sm = QSharedMemory()
    assert not sm.attach()
    assert sm.error() == QSharedMemory.KeyError
    sm.setKey("anything")
    sm.setNativeKey("shmarray_whatever")
    assert sm.error() == QSharedMemory.KeyError and sm.errorString() == "QSharedMemory::attach: key is empty"


CREATE_ROWS = [
    # (key, size, can_create, error); "existing" is replaced by the existing segment's key.
    ("", 1024, False, QSharedMemory.KeyError),
    ("negsize", -1, False, QSharedMemory.InvalidSize),
    ("zerosize", 0, False, QSharedMemory.InvalidSize),
    ("norsize", 1024, True, QSharedMemory.NoError),
    ("existing", EXISTING_SIZE, False, QSharedMemory.AlreadyExists),
]


@pytest.mark.parametrize(("name", "size", "can_create", "error"), CREATE_ROWS)
def test_create(make_key, existing, name, size, can_create, error):
    """tst_QSharedMemory::create (plus a zero size, which Qt also refuses)."""
    k = existing if name == "existing" else (make_key(name) if name else "")
    sm = QSharedMemory(k)
    assert sm.create(size) is can_create
    assert sm.error() == error
    assert sm.key() == k
    if can_create:
        assert sm.errorString() == ""
        assert sm.data() is not None and sm.size() == size
        assert sm.isAttached()
    else:
        assert sm.data() is None and sm.size() == 0 and not sm.isAttached()
        assert sm.errorString().startswith("QSharedMemory::create: ")


def test_create_error_strings_name_the_call(key, existing):
    """tst_QSharedMemory::create: errorString() as Qt's setErrorString words it."""
    sm = QSharedMemory(existing)
    assert not sm.create(16)
    assert sm.errorString() == "QSharedMemory::create: already exists"
    assert not sm.create(-1)
    assert sm.errorString() == "QSharedMemory::create: create size is less then 0"  # Qt's words
    assert not QSharedMemory(key).attach()
    empty = QSharedMemory()
    assert not empty.create(16)
    assert empty.errorString() == "QSharedMemory::create: key is empty"


ATTACH_ROWS = [
    ("", False, QSharedMemory.KeyError),
    ("doesntexist", False, QSharedMemory.NotFound),
    ("existing", True, QSharedMemory.NoError),
]


@pytest.mark.parametrize(("name", "exists", "error"), ATTACH_ROWS)
def test_attach(make_key, existing, name, exists, error):
    """tst_QSharedMemory::attach: attach, detach, and attach again."""
    k = existing if name == "existing" else (make_key(name) if name else "")
    sm = QSharedMemory(k)
    assert sm.attach() is exists
    assert sm.isAttached() is exists
    assert sm.error() == error
    assert sm.key() == k
    if exists:
        assert sm.data() is not None and sm.size() == EXISTING_SIZE
        assert sm.errorString() == ""
        assert sm.detach()
        assert sm.attach()  # detach did not break anything
        assert sm.data() is not None and sm.size() != 0
        assert sm.detach()
        assert sm.size() == 0 and sm.data() is None
    else:
        assert sm.data() is None and sm.size() == 0
        assert sm.errorString() != ""
        assert sm.detach() is False


def test_create_and_attach_success_clear_the_error(key):
    """QSharedMemoryPrivate::initKey (source): create() and attach() start by resetting error()."""
    sm = QSharedMemory(key)
    assert not sm.create(-1) and sm.error() == QSharedMemory.InvalidSize
    assert sm.create(8)
    assert sm.error() == QSharedMemory.NoError and sm.errorString() == ""
    other = QSharedMemory(key)
    assert not other.create(8) and other.error() == QSharedMemory.AlreadyExists
    assert other.attach()
    assert other.error() == QSharedMemory.NoError and other.errorString() == ""


def test_attach_when_attached_and_detach_when_not(existing):
    """QSharedMemory::attach/detach (source): False, and error() left as it was."""
    sm = QSharedMemory(existing)
    assert not sm.create(1)  # AlreadyExists
    assert sm.attach() and sm.error() == QSharedMemory.NoError
    assert not sm.create(-1)
    assert sm.attach() is False
    assert sm.error() == QSharedMemory.InvalidSize  # untouched
    assert sm.detach() is True
    assert sm.error() == QSharedMemory.InvalidSize  # a detach does not clear it
    assert sm.detach() is False


def test_changeKeyType(existing, make_key):
    """tst_QSharedMemory::changeKeyType (Qt 6): a new native key detaches; the new name is not found."""
    sm = QSharedMemory(existing)
    assert sm.attach()
    sm.setNativeKey(f"shmarray_{make_key('other')}")
    assert sm.isAttached() is False
    assert not sm.attach()
    assert sm.error() == QSharedMemory.NotFound
    assert sm.errorString() == "QSharedMemory::attach: doesn't exist"


def test_lock(key):
    """tst_QSharedMemory::lock (Qt 5): no lock before create(); a second lock() is True."""
    shm = QSharedMemory()
    assert not shm.lock()
    assert shm.error() == QSharedMemory.LockError
    shm.setKey(key)
    assert not shm.lock()
    assert shm.error() == QSharedMemory.LockError
    assert shm.errorString() == "QSharedMemory::lock: unable to lock"
    assert shm.create(100)
    assert shm.lock()
    assert shm.lock()  # Qt warns "already locked" and returns true
    assert shm.unlock()
    assert shm.unlock() is False


def test_lock_again_warns_like_qt(key, caplog):
    """tst_QSharedMemory::lock: ignoreMessage("QSharedMemory::lock: already locked")."""
    shm = QSharedMemory(key)
    assert shm.create(8) and shm.lock()
    with caplog.at_level(logging.WARNING, logger="shmarray.qt"):
        assert shm.lock()
    assert "QSharedMemory::lock: already locked" in caplog.messages
    shm.unlock()


def test_lock_with_a_native_key_is_false(key):
    """tst_QSharedMemory::lock (Qt 6 form, native key): the page wins, lock() is False (LockError)."""
    shm = QSharedMemory()
    shm.setNativeKey(Segment(key).native_key)
    assert not shm.lock()
    assert shm.create(100)
    assert shm.lock() is False
    assert shm.error() == QSharedMemory.LockError
    assert shm.unlock() is False


def test_lock_after_failed_create_or_attach_is_false(key, existing):
    """Reference page, lock(): False when a false return from create()/attach() was ignored."""
    shm = QSharedMemory(key)
    assert not shm.attach()
    assert not shm.lock() and shm.error() == QSharedMemory.LockError
    other = QSharedMemory(existing)
    assert not other.create(8)
    assert not other.lock() and other.error() == QSharedMemory.LockError


def test_lock_and_unlock_keep_the_error(existing):
    """QSharedMemory::lock/unlock (source): success does not reset error(); a stray unlock() is False."""
    sm = QSharedMemory(existing)
    assert sm.attach()
    assert not sm.create(0)
    assert sm.unlock() is False
    assert sm.lock() and sm.error() == QSharedMemory.InvalidSize
    assert sm.unlock() and sm.error() == QSharedMemory.InvalidSize


# -- custom edge cases ------------------------------------------------------------


def test_removeWhileAttached(key):
    """tst_QSharedMemory::removeWhileAttached: after the last user goes, a new attach finds nothing."""
    sm_one = QSharedMemory(key)
    assert sm_one.create(1024) and sm_one.isAttached()
    sm_two = QSharedMemory(key)
    assert sm_two.attach() and sm_two.isAttached()
    del sm_one, sm_two  # Qt deletes them; their destructors detach
    gc.collect()
    sm_three = QSharedMemory(key)
    assert not sm_three.attach()
    assert sm_three.error() == QSharedMemory.NotFound


def test_unlink_while_attached(key):
    """tst_QSharedMemory::removeWhileAttached, shmarray's way: unlink() keeps attached users' memory."""
    sm = QSharedMemory(key)
    assert sm.create(16)
    sm.data()[:3] = b"abc"
    shmarray.unlink(key)
    assert sm.isAttached() and bytes(sm.constData()[:3]) == b"abc"
    late = QSharedMemory(key)
    assert not late.attach() and late.error() == QSharedMemory.NotFound


def test_emptyMemory(key):
    """tst_QSharedMemory::emptyMemory: a new segment is zero-filled (created ReadOnly, as Qt's test does)."""
    sm = QSharedMemory(key)
    assert sm.create(1024, QSharedMemory.ReadOnly)
    assert bytes(sm.data()) == bytes(1024)


def _readonly_segfault(key: str) -> tuple[str, bool, bytes]:
    """Qt's helper readonly_segfault: create ReadOnly, lock, write. Qt crashes here."""
    sm = QSharedMemory(key)
    assert sm.create(1024, QSharedMemory.ReadOnly)
    assert sm.lock()
    try:
        sm.data()[0] = ord("a")
        outcome = "written"
    except TypeError:
        outcome = "TypeError"
    array = np.frombuffer(sm.data(), dtype=np.uint8)
    try:
        array.setflags(write=True)
        made_writable = True
    except ValueError:
        made_writable = False
    assert sm.unlock()
    return outcome, made_writable, bytes(sm.constData()[:1])


def test_readOnly(key):
    """tst_QSharedMemory::readOnly: writing a ReadOnly segment raises TypeError instead of crashing."""
    assert start(_readonly_segfault, key).result() == ("TypeError", False, b"\x00")


def test_readOnly_attach_and_constData(existing):
    """tst_QSharedMemory::readOnly, in process: ReadOnly attach gives read-only data(); constData() always is."""
    writer, reader = QSharedMemory(existing), QSharedMemory(existing)
    assert writer.attach() and reader.attach(QSharedMemory.ReadOnly)
    assert writer.data().readonly is False
    assert writer.constData().readonly is True
    assert reader.data().readonly is True
    with pytest.raises(TypeError):
        reader.data()[0] = 1
    writer.data()[0] = 7
    assert reader.data()[0] == 7


def test_attachBeforeCreate(key):
    """tst_QSharedMemory::attachBeforeCreate (Qt 6): a failed attach() does not block create()."""
    mem = QSharedMemory(key)
    assert not mem.attach()
    assert mem.create(100)


def test_createWithSameKey(key):
    """tst_QSharedMemory::createWithSameKey (Qt 6, QTBUG-111855): a failed create() leaves attach() possible."""
    mem1 = QSharedMemory(key)
    assert mem1.create(100)
    for _ in range(2):
        mem2 = QSharedMemory(key)
        assert not mem2.create(100)
        assert mem2.attach()
        mem2.detach()


# -- basics all together -------------------------------------------------------------


@pytest.mark.parametrize("mode", [QSharedMemory.ReadOnly, QSharedMemory.ReadWrite])
def test_simpleProducerConsumer(key, mode):
    """tst_QSharedMemory::simpleProducerConsumer: two mappings of one segment see each other's writes."""
    producer, consumer = QSharedMemory(key), QSharedMemory(key)
    size = 512
    assert producer.create(size)
    assert consumer.attach(mode)
    put, get = producer.data(), consumer.data()
    # One attachment per process and access mode: the same mode shares the mapping.
    assert (_address(put) == _address(get)) == (mode == QSharedMemory.ReadWrite)
    for i in range(size):
        put[i] = ord("Q")
        assert get[i] == ord("Q")
    assert consumer.detach()


def test_simpleDoubleProducerConsumer(key):
    """tst_QSharedMemory::simpleDoubleProducerConsumer: create, detach, create again."""
    producer = QSharedMemory(key)
    assert producer.create(512)
    assert producer.detach()
    assert producer.create(512)
    consumer = QSharedMemory(key)
    assert consumer.attach()


# -- extreme cases ----------------------------------------------------------------------


def test_useTooMuchMemory(key):
    """tst_QSharedMemory::useTooMuchMemory: a create() beyond what the system holds is OutOfResources.

    Qt's test creates 32 MiB segments until the kernel refuses; that would fill
    the /dev/shm that every process on this machine shares, so this port asks
    for more than is free in one call instead.
    """
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    sm = QSharedMemory(key)
    assert not sm.create(2 * free + (1 << 30))
    assert not sm.isAttached()
    assert sm.key() == key
    assert sm.size() == 0 and sm.data() is None
    assert sm.error() == QSharedMemory.OutOfResources
    assert sm.errorString().startswith("QSharedMemory::create: out of resources")
    assert not sm.attach()
    assert not sm.detach()


def test_attachTooMuch(key):
    """tst_QSharedMemory::attachTooMuch: upstream it is disabled (QSKIP) as it nearly kills systems.

    Bounded port: 128 objects attached to one segment all work.
    """
    government = QSharedMemory(key)
    assert government.create(1024)
    government.data()[0] = 42
    war = [QSharedMemory(government.key()) for _ in range(128)]
    assert all(w.attach() for w in war)
    assert all(w.data()[0] == 42 and w.size() == 1024 for w in war)
    assert all(w.detach() for w in war)


UNIQUE_ROWS = [
    ("", ""),
    ("key", "key"),
    ("key1", "key1"),
    ("key", "key1"),
    ("ke1y", "key1"),
    ("key1", "key2"),
    ("No\u00ebl", "Nol"),  # Qt 6's row: a non-ASCII letter must not vanish from the name
]


@pytest.mark.parametrize(("key1", "key2"), UNIQUE_ROWS)
def test_uniqueKey(key1, key2):
    """tst_QSharedMemory::uniqueKey: equal keys, equal native keys; different keys, different ones."""
    sm1, sm2 = QSharedMemory(key1), QSharedMemory(key2)
    same = key1 == key2
    assert (sm1.key() == sm2.key()) is same
    assert (sm1.nativeKey() == sm2.nativeKey()) is same


# -- the facade itself ------------------------------------------------------------------------


def test_enums_as_class_attributes():
    """The reference page's Types section: every value, with Qt's numbers."""
    assert (QSharedMemory.ReadOnly, QSharedMemory.ReadWrite) == (0, 1)
    assert QSharedMemory.AccessMode.ReadOnly is QSharedMemory.ReadOnly
    names = ["NoError", "PermissionDenied", "InvalidSize", "KeyError", "AlreadyExists",
             "NotFound", "LockError", "OutOfResources", "UnknownError"]
    assert [int(getattr(QSharedMemory, n)) for n in names] == list(range(9))
    assert [m.name for m in QSharedMemory.SharedMemoryError] == names


def test_shares_segments_with_Segment(key):
    """A QSharedMemory and a shmarray.Segment of one key are one segment, with one lock."""
    sm = QSharedMemory(key)
    assert sm.create(32)
    with Segment(key).attach() as seg:
        seg.data[:2] = b"hi"
        assert bytes(sm.data()[:2]) == b"hi"
        assert sm.lock()
        assert seg.lock(timeout=0) is False
        assert sm.unlock()


def test_native_key_reaches_a_stdlib_segment():
    """Reference page, setNativeKey(): interoperation with non-Qt (here: non-shmarray) segments."""
    other = shared_memory.SharedMemory(create=True, size=4096)
    try:
        other.buf[:3] = b"abc"
        sm = QSharedMemory()
        sm.setNativeKey(other.name)
        assert sm.attach()
        assert sm.size() == 4096 and bytes(sm.data()[:3]) == b"abc"
        assert not sm.lock()  # the page: no lock with a native key
        assert sm.detach()
        assert os.path.exists(f"/dev/shm/{other.name.lstrip('/')}")  # a foreign segment stays
    finally:
        other.close()
        other.unlink()


def test_bad_native_and_overlong_keys_fail_at_use(make_key):
    """Qt takes any key in setKey/setNativeKey and fails at create()/attach() with KeyError."""
    sm = QSharedMemory()
    sm.setNativeKey("bad/name")
    assert sm.nativeKey() == "bad/name"
    assert not sm.attach() and sm.error() == QSharedMemory.KeyError
    assert sm.errorString().startswith("QSharedMemory::attach: bad name")
    long_key = make_key() + "x" * 2000
    sm.setKey(long_key)
    assert sm.key() == long_key and sm.nativeKey() != ""
    assert not sm.create(8) and sm.error() == QSharedMemory.KeyError
    assert not sm.create(-1) and sm.error() == QSharedMemory.InvalidSize  # size is checked first, as Qt 4.8


def test_programming_errors_raise():
    """What PyQt/PySide refuse with an exception is refused the same way, before the OS is touched."""
    sm = QSharedMemory("k")
    with pytest.raises(TypeError):
        sm.create("10")
    with pytest.raises(ValueError):
        sm.attach(5)
    with pytest.raises(TypeError):
        sm.setKey(3)
    with pytest.raises(TypeError):
        sm.setNativeKey(b"x")
    assert sm.error() == QSharedMemory.NoError
