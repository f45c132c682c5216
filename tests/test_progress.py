"""progress=True on share / create(fill=) / share_table: a tqdm bar counting every byte, on request only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shmarray
from shmarray import _progress

pytest.importorskip("tqdm")


@pytest.fixture
def small_chunks(monkeypatch):
    """Cut writes at 1 MiB so small arrays take the multi-chunk path."""
    monkeypatch.setattr(_progress, "CHUNK", 1 << 20)


def _final(err: str) -> str:
    """The last state of a text bar (tqdm redraws with carriage returns)."""
    return err.replace("\r", "\n").strip().splitlines()[-1]


def test_share_progress_counts_every_byte(key, capsys, small_chunks):
    src = np.arange(3 * (1 << 20) // 8 + 5, dtype=np.float64)  # 3 MiB and a bit: four pieces
    a = shmarray.share(key, src, progress=True)
    assert np.array_equal(a, src)
    last = _final(capsys.readouterr().err)
    assert last.startswith(f"share '{key}'") and "100%" in last and "3.00M/3.00M" in last


def test_share_progress_non_contiguous_and_fortran(make_key, capsys, small_chunks):
    src = np.arange(4 * 300_000, dtype=np.int32).reshape(4, -1)
    strided = shmarray.share(make_key(), src[:, ::3], progress=True)
    assert np.array_equal(strided, src[:, ::3])
    fortran = shmarray.share(make_key(), np.asfortranarray(src), progress=True)
    assert np.array_equal(fortran, src) and fortran.flags.f_contiguous
    bars = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if "100%" in ln]
    assert len(bars) >= 2


def test_create_fill_progress(key, capsys, small_chunks):
    a = shmarray.create(key, (5, 1 << 18), np.int16, fill=-3, progress=True)
    assert (a == -3).all()
    last = _final(capsys.readouterr().err)
    assert last.startswith(f"create '{key}'") and "100%" in last and "2.50M/2.50M" in last


def test_create_zeros_with_progress_shows_nothing(key, capsys):
    a = shmarray.create(key, (1000,), np.float64, progress=True)
    assert not a.any()
    assert capsys.readouterr().err == ""  # zeros are reserved in one call: no bytes to count


def test_share_table_progress(key, capsys, small_chunks):
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"x": np.arange(400_000), "s": [f"row{i}" for i in range(400_000)]})
    t = shmarray.share_table(key, table, progress=True)
    assert t.equals(table)
    last = _final(capsys.readouterr().err)
    assert last.startswith(f"share_table '{key}'") and "100%" in last


def test_default_is_silent(make_key, capsys):
    shmarray.share(make_key(), np.ones(1 << 20))
    shmarray.create(make_key(), (1 << 20,), fill=2.0)
    assert capsys.readouterr().err == ""


def test_default_never_imports_tqdm(key):
    code = textwrap.dedent(f"""
        import sys, numpy as np, shmarray
        a = shmarray.share({key!r}, np.ones(1 << 20))
        b = shmarray.create({key + "-b"!r}, (10,), fill=1.0)
        print("tqdm" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False" and out.stderr == ""


def test_missing_tqdm_is_a_clear_error_before_anything_is_made(key, monkeypatch):
    for name in ("tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import tqdm.auto` raise ImportError
    def mine() -> set[str]:  # this process's names only: others may be making segments meanwhile
        return {n for n in os.listdir("/dev/shm") if f"-{os.getpid()}-" in n}

    before = mine()
    for call in (lambda: shmarray.share(key, np.ones(10), progress=True),
                 lambda: shmarray.create(key, (10,), fill=1, progress=True)):
        with pytest.raises(ModuleNotFoundError, match=r"progress=True needs tqdm.*\[progress\]") as info:
            call()
        assert info.value.name == "tqdm" and key in str(info.value)
    pa = pytest.importorskip("pyarrow")
    with pytest.raises(ModuleNotFoundError, match="needs tqdm"):
        shmarray.share_table(key, pa.table({"x": [1]}), progress=True)
    assert mine() - before == set()
    with pytest.raises(shmarray.NotFoundError):
        shmarray.attach(key)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_progress_must_be_a_bool(key, bad):
    with pytest.raises(TypeError, match="progress must be True or False"):
        shmarray.share(key, np.ones(3), progress=bad)
    with pytest.raises(TypeError, match="progress must be True or False"):
        shmarray.create(key, (3,), progress=bad)


def test_failed_write_leaves_no_segment_and_closes_the_bar(key, capsys, monkeypatch, small_chunks):
    src = np.ones(3 << 17)  # 3 MiB

    calls = []
    real = _progress.reporting

    def failing(write, total, desc, enabled):
        def broken(data, offset):
            calls.append(offset)
            if len(calls) >= 3:  # a full /dev/shm stays full (create retries once after giving kept memory back)
                raise OSError(28, "No space left on device")
            write(data, offset)
        return real(broken, total, desc, enabled)

    monkeypatch.setattr("shmarray._array.reporting", failing)
    with pytest.raises(shmarray.OutOfResourcesError):
        shmarray.share(key, src, progress=True)
    with pytest.raises(shmarray.NotFoundError):
        shmarray.attach(key)
    err = capsys.readouterr().err
    assert "100%" not in err and f"share '{key}'" in err
