"""NotFoundError says why a segment is missing, and is raised from the public call, not from deep inside.

The cases a user meets: a key never created, or whose last holder detached
or exited (the README's "in any other process" blocks run one after the
other); a reference whose segment is gone or was replaced; the wrong kind
of payload; a Qt program's segment; a missing directory.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import traceback

import numpy as np
import pytest

import shmarray
from shmarray._os import native_key_for

from _procs import run

RULE = "A segment lives while some process holds it"


def _frames(exc: BaseException) -> list[str]:
    return [f.filename for f in traceback.extract_tb(exc.__traceback__)]


def _creator_that_exits(key: str) -> None:
    a = shmarray.create(key, (4,), np.float32)
    a[:] = 1


def test_a_key_whose_creator_exited_says_the_lifetime_rule(key):
    run(_creator_that_exits, key)  # the two README blocks as two scripts, one after the other
    with pytest.raises(shmarray.NotFoundError) as err:
        shmarray.attach(key)
    text = str(err.value)
    assert key in text and "never created, or the last process holding it detached or exited" in text
    assert RULE in text and "persistent=True" in text and "create() it first" not in text
    assert err.value.key == key and err.value.code == shmarray.SharedMemoryError.NotFound
    # Raised from the public function: no frame of shmarray's internals but the one that raises.
    inside = [f for f in _frames(err.value) if os.sep + "shmarray" + os.sep in f]
    assert len(inside) <= 1, _frames(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_share_whose_result_is_not_kept(key):
    shmarray.share(key, np.arange(3.0))  # a bare statement: the array goes at once, and its segment
    with pytest.raises(shmarray.NotFoundError, match=RULE):
        shmarray.attach(key)
    with pytest.raises(shmarray.NotFoundError, match=RULE):
        shmarray.attach_table(key)


def test_never_created_in_a_script_shows_one_frame_of_shmarray(key, tmp_path):
    script = tmp_path / "user.py"
    script.write_text(f"import shmarray\nshmarray.attach({key!r})\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    tb = out.stderr
    assert "NotFoundError" in tb and RULE in tb
    assert tb.count('File "') == 2, tb  # the user's line and the public function


def _pickled_and_dropped(key: str) -> bytes:
    a = shmarray.create(key, 4)
    return pickle.dumps(a[1:3])


def test_a_reference_whose_segment_is_gone(key):
    ref = run(_pickled_and_dropped, key)  # its creator exited: the segment went with it
    with pytest.raises(shmarray.NotFoundError, match="this reference refers to is gone or was replaced") as err:
        pickle.loads(ref)
    assert RULE in str(err.value)


def test_a_reference_whose_segment_was_replaced(key):
    ref = run(_pickled_and_dropped, key)
    other = shmarray.create(key, 4)  # the key names another segment now
    with pytest.raises(shmarray.NotFoundError, match="gone or was replaced: the key now names another segment"):
        pickle.loads(ref)
    assert other.key == key


def test_the_wrong_kind_names_the_right_call(make_key):
    pa = pytest.importorskip("pyarrow")
    tk, ak = make_key(), make_key()
    t = shmarray.share_table(tk, pa.table({"x": [1, 2]}))
    a = shmarray.create(ak, 3)
    with pytest.raises(shmarray.NotFoundError, match=r"holds an arrow table, not an ndarray; use shmarray.attach_table"):
        shmarray.attach(tk)
    with pytest.raises(shmarray.HeaderError, match=r"holds an ndarray, not an arrow table; use shmarray.attach\(\)"):
        shmarray.attach_table(ak)  # still a HeaderError too, as before
    assert t.num_rows == 2 and a.size == 3


def test_a_qt_segment_names_attach_qt(key):
    qt_name = key  # Qt 6's QSharedMemory(key) on Linux: shm_open("/" + key)
    path = f"/dev/shm/{qt_name}"
    if os.environ.get("SHMARRAY_DIR") not in (None, "", "/dev/shm"):
        pytest.skip("Qt's segments live in /dev/shm")
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    try:
        with pytest.raises(shmarray.NotFoundError, match="attach_qt") as err:
            shmarray.attach(key)
        assert f"native_key={qt_name!r}" in str(err.value)
    finally:
        os.unlink(path)
    assert not os.path.exists(f"/dev/shm/{native_key_for(key)}")


def test_a_missing_directory_is_named(key, tmp_path):
    where = tmp_path / "nowhere"
    for call in (lambda: shmarray.attach(key, dir=where), lambda: shmarray.attach_table(key, dir=where),
                 lambda: shmarray.Segment(key, dir=where).attach()):
        with pytest.raises(shmarray.NotFoundError, match=f"{where}.*does not exist"):
            call()


def test_docstrings_state_the_lifetime_rule():
    for f in (shmarray.create, shmarray.share, shmarray.share_table):
        doc = f.__doc__ or ""
        assert "lives while some process holds it" in doc and "persistent=True" in doc, f


def test_lock_and_listing_errors_raise_from_the_public_call(key, tmp_path):
    a = shmarray.create(key, 3)
    a.close()
    for call in (a.lock, a.unlock, lambda: shmarray.ls(dir=tmp_path / "nowhere")):
        with pytest.raises(shmarray.ShmError) as err:
            call()
        inside = [f for f in _frames(err.value) if os.sep + "shmarray" + os.sep in f]
        assert len(inside) <= 1, _frames(err.value)
    with pytest.raises(shmarray.LockError, match="unlock"):
        a.unlock()
