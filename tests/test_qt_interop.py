"""Qt 6's key API in shmarray.qt, and shmarray.qt sharing bytes and lock with real Qt (PySide6) processes.

The key derivations are checked against values Qt computed (PySide6 6.12,
written down here) and, where PySide6 is installed, against PySide6 itself.
The interop tests run PySide6's QSharedMemory in spawned processes
(tests/_qt_peer.py) for both key types Linux has, PosixRealtime and
SystemV, and for the legacy key (``QSharedMemory("name")``, System V); and
a C++ Qt program (tests/qt_cpp/peer.cpp, built against the machine's Qt 6
where its development files are installed) on the legacy key.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import random
import time

import numpy as np
import pytest

import shmarray
from _procs import run, start, wait_for
from conftest import new_key
from shmarray import AccessMode
from shmarray.qt import QNativeIpcKey, QSharedMemory, attach_qt, remove_qt_segment

T = QNativeIpcKey.Type
KINDS = ("posix", "sysv", "legacy")


def _has_pyside() -> bool:
    try:
        import PySide6.QtCore  # noqa: F401  # pyflakes: F401 (only whether it imports)
    except ImportError:
        return False
    return True


needs_qt = pytest.mark.skipif(not _has_pyside(), reason="needs PySide6-Essentials (a real Qt)")


def our_memory(kind: str, name: str) -> QSharedMemory:
    """Ours, keyed as tests/_qt_peer.qt_memory keys Qt's."""
    if kind == "posix":
        return QSharedMemory(QSharedMemory.platformSafeKey(name))
    if kind == "sysv":
        return QSharedMemory(QSharedMemory.platformSafeKey(name, T.SystemV))
    return QSharedMemory(name, qt_compat=True)


def our_key(kind: str, name: str) -> QNativeIpcKey:
    return our_memory(kind, name).nativeIpcKey()


def _left(kind: str, name: str) -> list[str]:
    """What Qt's objects for *name* left on this machine."""
    key = our_key(kind, name)
    paths = [key.nativeKey()]
    if kind == "posix":
        paths = ["/dev/shm" + key.nativeKey(), "/dev/shm/sem." + key.nativeKey().lstrip("/")]
    elif kind == "legacy":
        paths.append(QSharedMemory.legacyNativeKey(name).nativeKey().replace("qipc_sharedmemory_",
                                                                              "qipc_systemsem_"))
    return [p for p in paths if os.path.exists(p)]


@pytest.fixture
def qt_name(tmp_path):
    """A unique Qt key name; whatever Qt (or we) left for it in any key form is removed afterwards."""
    name = new_key("qt")
    yield name
    for kind in KINDS:
        remove_qt_segment(our_key(kind, name))
        assert not _left(kind, name)


# -- the key API ----------------------------------------------------------------------------------------

def test_type_values_and_defaults():
    assert (int(T.SystemV), int(T.PosixRealtime), int(T.Windows)) == (0x51, 0x100, 0x101)
    assert QNativeIpcKey.DefaultTypeForOs is T.PosixRealtime
    assert QNativeIpcKey.legacyDefaultTypeForOs() is T.SystemV
    k = QNativeIpcKey()
    assert (k.nativeKey(), k.type(), k.isEmpty(), k.isValid()) == ("", T.PosixRealtime, True, True)
    k = QNativeIpcKey("frames")
    assert (k.nativeKey(), k.type()) == ("frames", T.PosixRealtime)
    assert QNativeIpcKey(T.SystemV).type() is T.SystemV and QNativeIpcKey(T.SystemV).isEmpty()
    assert QNativeIpcKey("a", T.SystemV) != QNativeIpcKey("a") and QNativeIpcKey("a") == QNativeIpcKey("a")
    assert T(5).name == "SystemV_5" and QNativeIpcKey("x", T(5)).toString() == "systemv-5:x"


def test_derivations_as_qt_computes_them(monkeypatch, tmp_path):
    """Values PySide6 6.12 gave (the SHA-1 part does not depend on the machine)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    runtime = tmp_path / "xdg"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    tmp = os.path.realpath(tmp_path)
    legacy = QSharedMemory.legacyNativeKey("frames")
    assert legacy.type() is T.SystemV
    assert legacy.nativeKey() == f"{tmp}/qipc_sharedmemory_framese7d679448a726df93a0ecc139508c9d3ef48b980"
    assert QSharedMemory("frames", qt_compat=True).key() == "frames"
    assert QSharedMemory.legacyNativeKey("frames", T.PosixRealtime).nativeKey() == \
        "/qipc_sharedmemory_framese7d679448a726df93a0ecc139508c9d3ef48b980"
    assert QSharedMemory.legacyNativeKey("fr ames/1").nativeKey().endswith(
        "qipc_sharedmemory_frames1cad13fbb9f234cd29852b9f0514d9e851e29946")
    assert QSharedMemory.legacyNativeKey("frames", T.Windows).nativeKey() == ""
    assert QSharedMemory.platformSafeKey("frames").nativeKey() == "/frames"
    assert QSharedMemory.platformSafeKey("frames", T.SystemV).nativeKey() == f"{runtime}/frames"
    assert oct(os.stat(runtime).st_mode & 0o777) == "0o700"  # made as Qt makes it
    assert QSharedMemory.platformSafeKey("/abs", T.SystemV).nativeKey() == "/abs"
    assert QSharedMemory.platformSafeKey("frames", T.Windows).nativeKey() == ""
    assert QSharedMemory.platformSafeKey("").isEmpty()


@pytest.mark.parametrize("key, text", [
    (QNativeIpcKey("frames"), "posix:frames"),
    (QNativeIpcKey("//x/y", T.SystemV), "systemv:/%2Fx/y"),
    (QNativeIpcKey("100%"), "posix:100%25"),
    (QNativeIpcKey("a?b#c d\t"), "posix:a%3Fb%23c d%09"),
    (QNativeIpcKey("é/ü&=+"), "posix:é/ü&=+"),
])
def test_string_form(key, text):
    assert key.toString() == text
    assert QNativeIpcKey.fromString(text) == key


def test_string_form_carries_the_legacy_key():
    k = QSharedMemory.legacyNativeKey("fr ames&=%#?é+")
    text = k.toString()
    assert text.endswith("?legacyKey=fr ames%26%3D%25%23?é+")
    back = QNativeIpcKey.fromString(text)
    assert back == k and QSharedMemory(back).key() == "fr ames&=%#?é+"


@pytest.mark.parametrize("text", ["posix://host/x", "posix:/x?foo=1", "systemv-0:/x", "systemv-256:/x",
                                  "systemv5:/x", "bogus:x", "nocolon"])
def test_unparsable_strings_give_an_invalid_key(text):
    k = QNativeIpcKey.fromString(text)
    assert not k.isValid() and k.toString() == ""


def test_keys_copy_swap_pickle_and_set_type():
    a, b = QNativeIpcKey("a"), QSharedMemory.legacyNativeKey("b")
    c = QNativeIpcKey(b)
    assert c == b and c is not b
    a.swap(c)
    assert a == b and c.nativeKey() == "a"
    assert pickle.loads(pickle.dumps(b)) == b and {b: 1}[pickle.loads(pickle.dumps(b))] == 1
    c.setType(T.SystemV)
    assert c.type() is T.SystemV
    b.setType(T.PosixRealtime)  # Qt 6: a key carrying a legacy key keeps its type
    assert b.type() is T.SystemV
    b.setNativeKey("/other")  # ... and setNativeKey drops the legacy key
    assert QSharedMemory(b).key() == ""


def test_clear_type_errors():
    with pytest.raises(TypeError, match="QNativeIpcKey.Type"):
        QNativeIpcKey(0x100)
    with pytest.raises(TypeError, match="expected a str key"):
        QNativeIpcKey(b"frames")
    with pytest.raises(TypeError, match="must be a str"):
        QNativeIpcKey(b"frames", T.SystemV)
    with pytest.raises(TypeError, match="QNativeIpcKey.Type"):
        QNativeIpcKey("frames", "posix")
    with pytest.raises(TypeError):
        QSharedMemory.platformSafeKey(b"x")
    with pytest.raises(TypeError, match="str or a QNativeIpcKey"):
        QSharedMemory(b"frames")
    with pytest.raises(TypeError, match="str or a QNativeIpcKey"):
        QSharedMemory(3.5, object())
    with pytest.raises(TypeError, match="str or a QNativeIpcKey"):
        QSharedMemory().setNativeKey(42)
    with pytest.raises(TypeError, match="carries its type"):
        QSharedMemory().setNativeKey(QNativeIpcKey("x"), T.SystemV)
    with pytest.raises(TypeError, match="size must be an int"):
        QSharedMemory(QNativeIpcKey("x")).create("10")


def test_the_qt6_constructor_is_a_key_not_a_parent(qt_name):
    """It used to be taken as the *parent* and fail later with "key is empty"."""
    m = QSharedMemory(QSharedMemory.platformSafeKey(qt_name))
    assert m.nativeKey() == "/" + qt_name and m.key() == ""
    assert m.nativeIpcKey() == QSharedMemory.platformSafeKey(qt_name)
    assert not m.attach() and m.error() == QSharedMemory.NotFound
    assert m.errorString() == "QSharedMemory::attach (shm_open): doesn't exist"
    assert m.create(100) and m.size() == 100 and m.data() is not None
    assert os.path.getsize(f"/dev/shm/{qt_name}") == 100  # no header: the bytes only
    assert m.detach()


def test_unsupported_type_and_empty_key():
    m = QSharedMemory(QNativeIpcKey("x", T.Windows))
    assert m.error() == QSharedMemory.KeyError
    assert m.errorString() == "QSharedMemory::setNativeKey: unsupported key type"
    assert not QSharedMemory.isKeyTypeSupported(T.Windows)
    assert QSharedMemory.isKeyTypeSupported(T.SystemV) and QSharedMemory.isKeyTypeSupported(T.PosixRealtime)
    e = QSharedMemory(QNativeIpcKey())
    assert not e.create(10) and e.error() == QSharedMemory.KeyError
    assert e.errorString() == ("QSharedMemoryPrivate::initKey: unable to set key on lock "
                               "(QSystemSemaphore::handle: key is empty)")
    assert not e.lock() and e.error() == QSharedMemory.LockError


@pytest.mark.parametrize("kind", KINDS)
def test_qt_mode_between_our_own_objects(kind, qt_name):
    a, b = our_memory(kind, qt_name), our_memory(kind, qt_name)
    assert a.create(4096), a.errorString()
    assert b.attach(QSharedMemory.ReadOnly) and b.size() == 4096
    with pytest.raises(TypeError):
        b.data()[0] = 1  # a read-only mapping raises instead of killing the process
    assert a.lock()
    a.data()[:3] = b"abc"
    assert not b.lock(timeout=0.05) and b.error() == QSharedMemory.LockError
    with pytest.raises(ValueError):
        b.lock(timeout=-1)  # the one timeout rule (shmarray._lock.check_timeout), as in shmarray mode
    with pytest.raises(TypeError):
        b.lock(timeout="1")
    assert a.unlock() and b.lock(timeout=5)
    assert bytes(b.constData()[:3]) == b"abc"
    view = b.constData()
    assert b.unlock() and b.detach()
    assert bytes(view[:3]) == b"abc"  # a view outlives detach() without crashing
    del view
    assert a.detach()


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_create_resets_the_lock_as_qt_does(kind, qt_name):
    """Qt's create() opens the semaphore with QSystemSemaphore::Create before it finds the segment exists:
    POSIX unlinks and remakes it, System V sets it to 1. PySide6 6.12 does the same (two objects in one
    process: b.create() fails, b.attach(), and b.lock() succeeds while a holds the lock)."""
    a, b = our_memory(kind, qt_name), our_memory(kind, qt_name)
    assert a.create(64) and a.lock()
    assert not b.create(64) and b.error() == QSharedMemory.AlreadyExists
    assert b.errorString() == ("QSharedMemory::attach (shm_open): already exists" if kind == "posix"
                               else "QSharedMemory::create: already exists")
    assert b.attach()
    assert b.lock(timeout=1)  # not excluded any more
    assert b.unlock() and a.unlock()
    assert b.detach() and a.detach()


def test_a_forked_child_does_not_clean_up_its_parents_objects(qt_name):
    a = our_memory("posix", qt_name)
    assert a.create(64)
    pid = os.fork()
    if pid == 0:  # the child drops its copy of the object: its finalizer runs here, and must do nothing
        try:
            del a
            gc.collect()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.path.exists(f"/dev/shm/sem.{qt_name}")  # the parent's semaphore is still there
    assert a.lock(timeout=5) and a.unlock() and a.detach()


def test_system_v_detach_removes_only_when_nobody_is_attached(qt_name):
    a, b = our_memory("sysv", qt_name), our_memory("sysv", qt_name)
    assert a.create(100) and b.attach()
    assert a.detach()
    assert os.path.exists(a.nativeKey())
    assert b.detach()  # the last one: segment and key file go
    assert not os.path.exists(b.nativeKey())
    assert not b.attach() and b.error() == QSharedMemory.NotFound


def test_posix_segments_stay_as_in_qt(qt_name):
    """Qt never shm_unlinks on Linux: the segment outlives its users, and create() is AlreadyExists."""
    a = our_memory("posix", qt_name)
    assert a.create(100) and a.detach()
    del a
    assert os.path.exists(f"/dev/shm/{qt_name}")
    assert not os.path.exists(f"/dev/shm/sem.{qt_name}")  # the creator's semaphore went with it
    b = our_memory("posix", qt_name)
    assert not b.create(100) and b.error() == QSharedMemory.AlreadyExists
    assert b.attach() and b.size() == 100 and b.detach()
    assert remove_qt_segment(b.nativeIpcKey())
    assert not os.path.exists(f"/dev/shm/{qt_name}")


def test_qt_mode_is_sticky_and_set_key_follows_qt6(qt_name):
    m = QSharedMemory(QSharedMemory.platformSafeKey(qt_name))
    m.setKey(qt_name)  # Qt 6: setNativeKey(legacyNativeKey(key))
    assert m.key() == qt_name and m.nativeIpcKey() == QSharedMemory.legacyNativeKey(qt_name)
    m.setNativeKey("plain")  # Qt 6: QNativeIpcKey("plain"), PosixRealtime
    assert m.nativeIpcKey() == QNativeIpcKey("plain") and m.key() == ""
    m.setNativeKey("/" + qt_name, T.PosixRealtime)
    assert m.nativeKey() == "/" + qt_name
    assert QSharedMemory(qt_compat=True).nativeIpcKey() == QNativeIpcKey(T.SystemV)  # Qt's QSharedMemory()
    shm = QSharedMemory("plain-shmarray-key")  # a str key without qt_compat: shmarray's segment, as before
    assert shm.nativeKey().startswith("shmarray_")


def test_attach_qt_errors(qt_name):
    with pytest.raises(shmarray.NotFoundError, match="doesn't exist"):
        attach_qt(qt_name, np.uint8)
    m = our_memory("posix", qt_name)
    assert m.create(64)
    with pytest.raises(shmarray.InvalidSizeError, match="has 64"):
        attach_qt(qt_name, np.float64, (9,))
    with pytest.raises(shmarray.InvalidSizeError):
        attach_qt(qt_name, np.uint8, (-1,))
    with pytest.raises(TypeError, match="Python objects"):
        attach_qt(qt_name, object)
    with pytest.raises(TypeError):
        attach_qt(3, np.uint8)
    a = attach_qt(qt_name, np.float64, offset=8)
    assert a.shape == (7,) and isinstance(a, shmarray.QtArray)
    with a.locked(timeout=5):
        a[:] = np.arange(7)
    assert (a + 1).__class__ is np.ndarray and isinstance(a[2:], shmarray.QtArray)
    for protocol in (2, 4, 5):
        back = pickle.loads(pickle.dumps(a, protocol=protocol))
        assert back.__class__ is np.ndarray and back.tolist() == list(range(7))
    assert np.frombuffer(bytes(m.constData()[8:]), np.float64).tolist() == list(range(7))
    m.detach()


# -- against PySide6 ---------------------------------------------------------------------------------

@needs_qt
def test_derivations_match_pyside6():
    names = ["frames", "/frames", "a b", "100%", "a?b#c", "é/ü 画像", "x" * 300, "A1_b-2.c", "a+b&=c",
             "~!$'()*,;@", "tab\tx", "//x/y", "Qt-Frames-123"]
    rng = random.Random(18)
    alphabet = "aZ09 _-./%?#&=+:;@~!$'()*,[]\t\x7féüß画像😀"
    names += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    qt = run(_peer().qt_keys, names, timeout=60)
    for name, theirs in zip(names, qt):
        keys = [QSharedMemory.platformSafeKey(name), QSharedMemory.platformSafeKey(name, T.SystemV),
                QSharedMemory.legacyNativeKey(name), QSharedMemory.legacyNativeKey(name, T.PosixRealtime)]
        ours = tuple(k.nativeKey() for k in keys) + tuple(k.toString() for k in keys)
        assert ours == theirs, name
        for text in theirs[4:]:
            assert QNativeIpcKey.fromString(text).toString() == text


@needs_qt
def test_enums_and_keys_of_pyside6_are_taken(qt_name):
    from PySide6.QtCore import QNativeIpcKey as PyKey, QSharedMemory as PyMem, QSystemSemaphore

    assert QSharedMemory.ReadOnly == PyMem.AccessMode.ReadOnly and PyMem.AccessMode.ReadOnly == AccessMode.ReadOnly
    assert QSharedMemory.ReadWrite != PyMem.AccessMode.ReadOnly
    assert QSharedMemory.NotFound == PyMem.SharedMemoryError.NotFound
    assert T.SystemV == PyKey.Type.SystemV and PyKey.Type.PosixRealtime == T.PosixRealtime
    assert T.SystemV != PyKey.Type.PosixRealtime
    assert QSharedMemory.ReadOnly != QSystemSemaphore.AccessMode.Open  # another class's AccessMode
    with pytest.raises(ValueError):
        QSharedMemory().attach(QSystemSemaphore.AccessMode.Open)
    theirs = PyMem.legacyNativeKey(qt_name)
    m = QSharedMemory(theirs)  # their key, their legacy key included
    assert m.key() == qt_name and m.nativeIpcKey() == QSharedMemory.legacyNativeKey(qt_name)
    assert QNativeIpcKey(theirs) == QSharedMemory.legacyNativeKey(qt_name)
    assert m.create(64, PyMem.AccessMode.ReadWrite)
    b = QSharedMemory(theirs)
    assert b.attach(PyMem.AccessMode.ReadOnly) and b.data().readonly
    assert QSharedMemory.isKeyTypeSupported(PyKey.Type.SystemV)
    b.detach()
    m.detach()


def _peer():
    import _qt_peer

    return _qt_peer


@needs_qt
@pytest.mark.parametrize("kind", KINDS)
def test_qt_creates_we_attach_lock_read_and_write_back(kind, qt_name, tmp_path):
    ready = str(tmp_path / "ready")
    child = start(_peer().qt_creates, kind, qt_name, 4096, ready)
    wait_for(ready)
    ours = our_memory(kind, qt_name)
    assert ours.attach(), ours.errorString()
    assert ours.size() == 4096
    assert ours.lock(timeout=10)
    assert bytes(ours.data()[0:1]) == b"\x01" and bytes(ours.data()[1:17]) == b"written by Qt..."
    ours.data()[1:17] = b"python answers.."
    ours.data()[0:1] = b"\x02"
    assert ours.unlock()
    facts = child.result(30)
    assert facts["got"] == b"python answers.." and facts["native"] == ours.nativeKey()
    assert ours.detach()
    # Qt's creator removed the lock's semaphore when its object went; ours made it again to lock
    # for detach(), and removes it when it goes, as a Qt object would.
    del ours
    if kind != "posix":  # System V: the last detacher (us) removed the segment, as Qt would have
        assert not _left(kind, qt_name)


@needs_qt
@pytest.mark.parametrize("kind", KINDS)
def test_we_create_qt_attaches_locks_reads_and_writes_back(kind, qt_name):
    ours = our_memory(kind, qt_name)
    assert ours.create(8192), ours.errorString()
    with attach_qt(ours.nativeIpcKey(), np.uint8, (17,)).locked() as view:
        view[1:17] = np.frombuffer(b"made in python..", np.uint8)
        view[0] = 1
    facts = run(_peer().qt_attaches, kind, qt_name, timeout=30)
    assert facts == {"got": b"made in python..", "stage": 1, "size": 8192, "native": ours.nativeKey()}
    assert ours.lock(timeout=10)
    assert bytes(ours.constData()[0:17]) == b"\x02answered by Qt.."
    assert ours.unlock() and ours.detach()


@needs_qt
@pytest.mark.parametrize("kind", KINDS)
def test_the_lock_is_one_lock_for_qt_and_us(kind, qt_name, tmp_path):
    ours = our_memory(kind, qt_name)
    assert ours.create(64)
    # We hold it: Qt's lock() waits until we let go.
    ready, go = str(tmp_path / "qt-attached"), str(tmp_path / "go")
    waiter = start(_peer().qt_locks_and_waits, kind, qt_name, ready, go)
    wait_for(ready)
    assert ours.lock()
    with open(go, "w"):
        pass
    time.sleep(0.5)
    assert bytes(ours.data()[0:1]) == b"\x00"  # Qt has not got in
    assert ours.unlock()
    assert waiter.result(30) >= 0.4
    assert ours.lock(timeout=10) and bytes(ours.data()[0:1]) == b"\x03" and ours.unlock()
    # Qt holds it: ours times out, then gets it once Qt lets go.
    ready = str(tmp_path / "qt-holds")
    holder = start(_peer().qt_holds, kind, qt_name, 1.0, ready)
    wait_for(ready)
    assert not ours.lock(timeout=0.1) and ours.error() == QSharedMemory.LockError
    t0 = time.monotonic()
    assert ours.lock(timeout=10)
    assert time.monotonic() - t0 > 0.3
    assert ours.unlock() and holder.result(30)
    assert ours.detach()


@needs_qt
@pytest.mark.parametrize("kind", KINDS)
def test_a_dead_qt_holder(kind, qt_name, tmp_path):
    """System V (SEM_UNDO): the kernel gives the lock back. POSIX: it stays taken, as in Qt."""
    ours = our_memory(kind, qt_name)
    assert ours.create(64)
    ready = str(tmp_path / "locked")
    child = start(_peer().qt_dies_holding, kind, qt_name, ready)
    wait_for(ready)
    child.process.join(20)
    assert child.process.exitcode == 0
    if kind == "posix":
        assert not ours.lock(timeout=0.5)
        # Qt's detach() would wait for ever too: give the dead holder's count back by hand.
        import posix_ipc

        posix_ipc.Semaphore(ours.nativeKey()).release()
    else:
        assert ours.lock(timeout=10) and ours.unlock()
    assert ours.detach()


@needs_qt
@pytest.mark.parametrize("kind", KINDS)
def test_attach_qt_reads_a_qt_camera_frame(kind, qt_name, tmp_path):
    ready, done = str(tmp_path / "ready"), str(tmp_path / "done")
    shape = (48, 64, 3)
    camera = start(_peer().qt_writes_frame, kind, qt_name, shape, ready, done)
    wait_for(ready)
    key = our_key(kind, qt_name)
    frame = attach_qt(key, np.uint8, shape, mode=AccessMode.ReadOnly)
    with frame.locked(timeout=10):
        got = frame.copy()
    assert got.__class__ is np.ndarray
    assert np.array_equal(got.ravel(), np.arange(got.size) % 251)
    assert not frame.flags.writeable
    with open(done, "w"):
        pass
    camera.result(30)
    assert frame.qt is not None and frame.qt.detach()


def test_no_key_files_left(qt_name):
    """The fixture's own check, once without any Qt process: key files of ours go with our objects."""
    m = our_memory("legacy", qt_name)
    assert m.create(10) and m.detach()
    assert _left("legacy", qt_name) == [QSharedMemory.legacyNativeKey(qt_name).nativeKey().replace(
        "qipc_sharedmemory_", "qipc_systemsem_")]  # the lock's key file lives as long as its object
    del m
    assert not _left("legacy", qt_name)


# -- against a C++ Qt program ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpp_peer(tmp_path_factory):
    """tests/qt_cpp/peer.cpp built against the machine's Qt 6 (Debian's qt6-base-dev; .ci/run installs it)."""
    import shutil
    import subprocess

    if not shutil.which("g++") or not shutil.which("pkg-config"):
        pytest.skip("needs g++ and pkg-config to build the C++ Qt peer")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "Qt6Core"], capture_output=True, text=True)
    if flags.returncode != 0:
        pytest.skip("needs Qt 6's development files (Debian: qt6-base-dev) to build the C++ Qt peer")
    out = str(tmp_path_factory.mktemp("qtcpp") / "peer")
    source = os.path.join(os.path.dirname(__file__), "qt_cpp", "peer.cpp")
    built = subprocess.run(["g++", "-std=c++17", "-fPIC", "-O1", source, *flags.stdout.split(), "-o", out],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    return out


@contextlib.contextmanager
def _cpp(peer: str, *args: str):
    """The C++ peer running with *args*; killed (if still running) and reaped on the way out."""
    import subprocess

    with subprocess.Popen([peer, *args], stdout=subprocess.PIPE, text=True) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def _line(proc, timeout: float = 30) -> str:
    """The next line the C++ peer prints, bounded by *timeout*."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError("the C++ Qt peer printed nothing")
    return proc.stdout.readline().strip()


def test_a_cpp_qt_program_creates_we_answer(cpp_peer, qt_name):
    ours = our_memory("legacy", qt_name)
    with _cpp(cpp_peer, "create", qt_name, "4096") as peer:
        assert _line(peer) == f"ready {ours.nativeKey()}"
        assert ours.attach(), ours.errorString()
        assert ours.lock(timeout=10)
        assert bytes(ours.constData()[0:17]) == b"\x01written by C++.."
        ours.data()[1:17] = b"python answers.."
        ours.data()[0:1] = b"\x02"
        assert ours.unlock()
        assert _line(peer) == "got python answers.."
        assert peer.wait(30) == 0
    assert ours.detach()


def test_a_cpp_qt_program_attaches_to_ours_and_dies_holding_the_lock(cpp_peer, qt_name):
    ours = our_memory("legacy", qt_name)
    assert ours.create(4096)
    assert ours.lock()
    ours.data()[1:17] = b"made in python.."
    ours.data()[0:1] = b"\x01"
    assert ours.unlock()
    with _cpp(cpp_peer, "attach", qt_name) as peer:
        assert _line(peer) == "got made in python.. stage 1 size 4096"
        assert peer.wait(30) == 0
    assert ours.lock(timeout=10) and bytes(ours.constData()[0:17]) == b"\x02answered by C++."
    assert ours.unlock()
    with _cpp(cpp_peer, "die", qt_name) as dying:
        assert _line(dying) == "locked"
        assert dying.wait(30) == 0
    assert ours.lock(timeout=10)  # System V: the kernel gave the dead C++ holder's lock back
    assert ours.unlock() and ours.detach()
