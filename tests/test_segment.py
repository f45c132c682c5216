"""Segment: create / attach / detach, sizes, modes, keys, errors, persistence."""

from __future__ import annotations

import gc
import os
import stat
from multiprocessing import shared_memory

import posix_ipc
import pytest

import shmarray
from conftest import SHM, needs_dev_shm
from _procs import run
from shmarray import AccessMode, Segment
from shmarray import SharedMemoryError as E


def _read(key: str, n: int) -> bytes:
    with Segment(key).attach(AccessMode.ReadOnly) as seg:
        return bytes(seg.data[:n])


def _write(key: str, payload: bytes) -> int:
    with Segment(key).attach() as seg:
        seg.data[: len(payload)] = payload
        return seg.size


def _write_readonly(key: str) -> str:
    with Segment(key).attach(AccessMode.ReadOnly) as seg:
        try:
            seg.data[0] = 1
        except TypeError as e:
            return f"refused: {e}"
        return "wrote"


def test_create_attach_detach(key):
    seg = Segment(key)
    assert not seg.is_attached and seg.size == 0 and seg.data is None and seg.mode is None
    assert seg.create(1000) is seg
    assert seg.is_attached and seg.size == 1000 and seg.mode is AccessMode.ReadWrite
    assert seg.error is E.NoError and seg.error_string == ""
    assert len(seg.data) == 1000 and bytes(seg.data) == bytes(1000)  # zero-filled
    assert seg.detach() is True
    assert seg.detach() is False
    assert not seg.is_attached and seg.size == 0


def test_two_processes_see_each_others_writes(key):
    with Segment(key).create(4096) as seg:
        seg.data[:5] = b"hello"
        assert run(_read, key, 5) == b"hello"
        assert run(_write, key, b"world") == 4096
        assert bytes(seg.data[:5]) == b"world"


def test_readonly_attach_refuses_writes(key):
    with Segment(key).create(64):
        assert run(_write_readonly, key).startswith("refused")
        with Segment(key).attach(AccessMode.ReadOnly) as ro:
            assert ro.data.readonly and ro.const_data.readonly
            with pytest.raises(TypeError):
                ro.data[0] = 1


def test_const_data_is_read_only(key):
    with Segment(key).create(64) as seg:
        assert not seg.data.readonly
        assert seg.const_data.readonly


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 1 << 20])
def test_creator_and_attacher_see_the_same_size(key, size):
    with Segment(key).create(size) as seg, Segment(key).attach() as other:
        assert seg.size == other.size == size
        assert len(other.data) == size


def test_create_existing_is_already_exists_and_does_not_attach(key):
    with Segment(key).create(10):
        other = Segment(key)
        with pytest.raises(shmarray.AlreadyExistsError) as info:
            other.create(10)
        assert key in str(info.value) and "attach()" in str(info.value)
        assert not other.is_attached
        assert other.error is E.AlreadyExists and other.error_string


def test_attach_missing_is_not_found(key):
    seg = Segment(key)
    with pytest.raises(shmarray.NotFoundError) as info:
        seg.attach()
    assert key in str(info.value)
    assert seg.error is E.NotFound
    with pytest.raises(FileNotFoundError):
        seg.attach()


def test_error_resets_after_success(key):
    seg = Segment(key)
    with pytest.raises(shmarray.NotFoundError):
        seg.attach()
    seg.create(10)
    assert seg.error is E.NoError and seg.error_string == ""
    seg.detach()


@pytest.mark.parametrize("bad", [0, -1, -(1 << 40)])
def test_bad_sizes(key, bad):
    seg = Segment(key)
    with pytest.raises(shmarray.InvalidSizeError):
        seg.create(bad)
    assert seg.error is E.InvalidSize
    assert not os.path.exists(f"{SHM}/{seg.native_key}")


@pytest.mark.parametrize("bad", [1.5, "10", None, True])
def test_non_int_sizes(key, bad):
    with pytest.raises(shmarray.InvalidSizeError):
        Segment(key).create(bad)


def test_size_beyond_free_space_is_out_of_resources(key):
    free = os.statvfs(SHM).f_bavail * os.statvfs(SHM).f_frsize
    seg = Segment(key)
    with pytest.raises(shmarray.OutOfResourcesError) as info:
        seg.create(2 * free + (1 << 30))
    msg = str(info.value)
    assert key in msg and "free" in msg and "GiB" in msg
    assert seg.error is E.OutOfResources
    assert isinstance(info.value, (MemoryError, OSError))
    # Only this process's names: another program may be creating segments right now.
    assert not [n for n in os.listdir(SHM)
                if n.startswith((seg.native_key, f".shmarray-tmp-{os.getpid()}-"))]


def test_no_key(key):
    seg = Segment()
    assert seg.key is None and seg.native_key is None
    with pytest.raises(shmarray.InvalidKeyError):
        seg.create(10)
    with pytest.raises(shmarray.InvalidKeyError):
        seg.attach()
    assert seg.error is E.KeyError


def test_set_key_same_is_noop_and_other_detaches(key, make_key):
    seg = Segment(key).create(10)
    native = seg.native_key
    seg.set_key(key)
    assert seg.is_attached and seg.native_key == native
    other = make_key()
    seg.set_key(other)
    assert not seg.is_attached and seg.key == other
    assert seg.native_key != native


def test_set_native_key(key):
    seg = Segment(key).create(10)
    native = seg.native_key
    reader = Segment()
    reader.set_native_key("/" + native)
    assert reader.key is None and reader.native_key == native
    reader.attach()
    assert reader.size == 10 and not reader.is_foreign
    reader.set_native_key(native)  # same: no-op
    assert reader.is_attached
    reader.set_key(key)  # a different identity (key set): detaches
    assert not reader.is_attached and reader.key == key and reader.native_key == native
    seg.detach()


def test_permissions(key):
    with Segment(key).create(10, permissions=0o640) as seg:
        mode = stat.S_IMODE(os.stat(f"{SHM}/{seg.native_key}").st_mode)
        assert mode == 0o640


def test_create_readonly_mode(key):
    with Segment(key).create(10, AccessMode.ReadOnly) as seg:
        assert seg.mode is AccessMode.ReadOnly and seg.data.readonly


def test_last_detach_destroys(key):
    a = Segment(key).create(10)
    b = Segment(key).attach()
    path = f"{SHM}/{a.native_key}"
    a.detach()
    assert os.path.exists(path)
    b.detach()
    assert not os.path.exists(path)
    with pytest.raises(shmarray.NotFoundError):
        Segment(key).attach()


def test_garbage_collection_detaches(key):
    seg = Segment(key).create(10)
    path = f"{SHM}/{seg.native_key}"
    del seg
    gc.collect()
    assert not os.path.exists(path)


def test_views_survive_detach(key):
    seg = Segment(key).create(100)
    view = seg.data
    view[:3] = b"abc"
    seg.detach()
    assert bytes(view[:3]) == b"abc"
    view[3:6] = b"def"  # still mapped, no crash
    assert bytes(view[:6]) == b"abcdef"
    del view


def test_persistent_survives_last_detach(key):
    Segment(key).create(10, persistent=True).detach()
    seg = Segment(key).attach()
    assert seg.persistent
    seg.data[0] = 7
    seg.detach()
    with Segment(key).attach() as again:
        assert again.data[0] == 7
    shmarray.unlink(key)
    with pytest.raises(shmarray.NotFoundError):
        Segment(key).attach()


def test_unlink_keeps_mappings(key):
    seg = Segment(key).create(10)
    seg.data[0] = 9
    assert seg.unlink() is True
    assert seg.unlink() is False
    with pytest.raises(shmarray.NotFoundError):
        Segment(key).attach()
    assert seg.data[0] == 9
    with Segment(key).create(10) as fresh:  # the key is free again
        assert fresh.data[0] == 0
    seg.detach()


def test_module_unlink_missing_is_not_found(key):
    with pytest.raises(shmarray.NotFoundError):
        shmarray.unlink(key)


def test_context_manager_detaches(key):
    with Segment(key).create(10) as seg:
        assert seg.is_attached
    assert not seg.is_attached


def test_double_create_or_attach_through_one_object(key):
    seg = Segment(key).create(10)
    with pytest.raises(shmarray.AlreadyExistsError):
        seg.attach()
    seg.detach()


def test_repr(key):
    seg = Segment(key)
    assert key in repr(seg) and "detached" in repr(seg)
    seg.create(10, persistent=True)
    assert "size=10" in repr(seg) and "persistent" in repr(seg)
    seg.unlink()
    seg.detach()


# -- foreign segments -------------------------------------------------------------------


def _read_native(name: str, n: int) -> bytes:
    with Segment(native_key=name).attach() as seg:
        return bytes(seg.data[:n])


@needs_dev_shm
def test_stdlib_segment_by_native_key():
    sm = shared_memory.SharedMemory(create=True, size=100)
    try:
        sm.buf[:4] = b"ping"
        seg = Segment(native_key=sm.name).attach()
        assert seg.is_foreign and seg.key is None
        assert seg.size == 100 and bytes(seg.data[:4]) == b"ping"
        seg.data[4:8] = b"pong"
        assert bytes(sm.buf[4:8]) == b"pong"
        with pytest.raises(shmarray.LockError):
            seg.lock()
        assert run(_read_native, sm.name, 8) == b"pingpong"
        seg.detach()
        # Never removed by detach: its other users are unknown.
        again = shared_memory.SharedMemory(name=sm.name)
        again.close()
    finally:
        sm.close()
        sm.unlink()


@needs_dev_shm
def test_posix_ipc_segment_by_native_key(key):
    name = "/" + key
    mem = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=8192)
    try:
        os.pwrite(mem.fd, b"xyz", 0)
        with Segment(native_key=name).attach(AccessMode.ReadOnly) as seg:
            assert seg.size == 8192 and bytes(seg.data[:3]) == b"xyz"
        assert os.path.exists(f"{SHM}/{key}")
    finally:
        mem.close_fd()
        mem.unlink()


def test_keyed_name_that_is_not_ours_is_refused(key):
    name = shmarray._os.native_key_for(key)
    fd = os.open(f"{SHM}/{name}", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 8192)
        with pytest.raises(shmarray.ShmError, match="not a shmarray segment"):
            Segment(key).attach()
        with pytest.raises(shmarray.AlreadyExistsError):
            Segment(key).create(10)
        assert os.path.exists(f"{SHM}/{name}")
    finally:
        os.close(fd)
        os.unlink(f"{SHM}/{name}")


def test_corrupt_control_block_is_a_clean_error(key):
    seg = Segment(key).create(100, persistent=True)
    path = f"{SHM}/{seg.native_key}"
    seg.detach()
    with open(path, "r+b") as f:
        f.seek(16)
        f.write((1 << 62).to_bytes(8, "little"))  # size far beyond the object
    with pytest.raises(shmarray.ShmError, match="corrupt"):
        Segment(key).attach()
    shmarray.unlink(key)
