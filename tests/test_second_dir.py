"""Segments outside /dev/shm: SHMARRAY_DIR, dir= and --dir; a huge-page tmpfs.

The segment, array, table, ring, lifetime, reuse, lock and listing suites
run again with SHMARRAY_DIR set to a directory of this run under /dev/shm
(no root needed), and as root on a ``huge=within_size`` tmpfs mounted in a
private mount namespace, where the huge=advise and hugetlbfs tests mount
theirs too.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pytest

import shmarray
from conftest import new_key
from shmarray._reuse import idle_maps, kept_files

ROOT = Path(__file__).parent.parent


@pytest.fixture
def seg_dir() -> Iterator[str]:
    """An empty segment directory of this test under /dev/shm, checked empty and removed afterwards."""
    d = f"/dev/shm/{new_key('dir')}"
    os.mkdir(d, 0o700)
    yield d
    import gc

    gc.collect()
    kept_files.release_all()  # what this process kept there for reuse (exit would free it too)
    left = os.listdir(d)
    for n in left:
        os.unlink(os.path.join(d, n))
    os.rmdir(d)
    assert not left, f"left in {d}: {left}"


# Every lifetime, lock, crash, reuse and listing rule, and the payload kinds.
CORE_SUITES = ["tests/test_segment.py", "tests/test_array.py", "tests/test_arrow.py", "tests/test_ring.py",
               "tests/test_lifetime.py", "tests/test_reuse.py", "tests/test_lock.py", "tests/test_listing.py"]


@pytest.mark.timeout(600)
def test_the_core_suites_pass_in_another_directory(seg_dir: str) -> None:
    env = {**os.environ, "SHMARRAY_DIR": seg_dir}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *CORE_SUITES],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=580)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


@pytest.mark.timeout(600)
def test_the_core_suites_pass_on_a_huge_page_tmpfs(tmp_path: Path) -> None:
    """The same suites with SHMARRAY_DIR on a ``huge=within_size`` tmpfs (a private mount namespace)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to mount a huge-page tmpfs in a private mount namespace")
    mnt = tmp_path / "huge"
    mnt.mkdir()
    suites = " ".join(CORE_SUITES)
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f"mount -t tmpfs -o size=4g,huge=within_size tmpfs {mnt} && SHMARRAY_DIR={mnt} exec "
           f"{sys.executable} -m pytest -q -p no:cacheprovider -x {suites}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=580)
    if out.returncode != 0 and "mount" in out.stderr and " passed" not in out.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()[-300:]}")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


def test_processes_that_agree_on_the_directory_see_the_same_segment(seg_dir: str, key: str) -> None:
    a = shmarray.share(key, np.arange(10.0), dir=seg_dir)
    assert a.segment is not None and a.segment.dir == seg_dir
    assert os.listdir(seg_dir) == [a.segment.native_key]
    with pytest.raises(shmarray.NotFoundError):
        shmarray.attach(key)  # the default directory has no such segment
    code = f"import shmarray; print(float(shmarray.attach({key!r}).sum()))"
    for env in ({"SHMARRAY_DIR": seg_dir}, {}):
        got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**{k: v for k, v in os.environ.items() if k != "SHMARRAY_DIR"}, **env})
        if env:
            assert got.stdout.strip() == "45.0", got.stderr
        else:
            assert "NotFoundError" in got.stderr
    # A reference says its directory: a process looking at /dev/shm by default attaches it there.
    raw = pickle.dumps(a[2:4])
    code = f"import pickle; v = pickle.loads({raw!r}); print(v.segment.dir, v.tolist())"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert got.stdout.split() == [seg_dir, "[2.0,", "3.0]"], got.stderr


def test_tables_rings_and_listing_in_a_directory(seg_dir: str, make_key) -> None:  # noqa: ANN001
    tk, rk, pk = make_key(), make_key(), make_key()
    t = shmarray.share_table(tk, pa.table({"x": np.arange(5)}), dir=seg_dir)
    assert shmarray.attach_table(tk, dir=seg_dir).equals(t)
    assert shmarray.attach_table(pickle.loads(pickle.dumps(shmarray.table_handle(t)))).equals(t)
    ring = shmarray.BatchRing.create(rk, {"x": ((2,), "f8")}, slots=2, dir=seg_dir)
    again = pickle.loads(pickle.dumps(ring))
    assert again.key == rk
    p = shmarray.share(pk, np.zeros(3), persistent=True, dir=seg_dir)
    del p
    keys = shmarray.ls(dir=seg_dir).keys()
    assert sorted(k for k in keys if k) == sorted([tk, rk, pk])
    assert all(k not in shmarray.ls().keys() for k in (tk, rk, pk))
    out = subprocess.run([sys.executable, "-m", "shmarray", "ls", "--dir", seg_dir, "--json"],
                         capture_output=True, text=True, timeout=60)
    rows = json.loads(out.stdout)
    assert {r["key"] for r in rows} == {tk, rk, pk} and {r["dir"] for r in rows} == {seg_dir}
    info = subprocess.run([sys.executable, "-m", "shmarray", "info", pk, "--dir", seg_dir, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert json.loads(info.stdout)["persistent"] is True
    rm = subprocess.run([sys.executable, "-m", "shmarray", "rm", pk, "--dir", seg_dir],
                        capture_output=True, text=True, timeout=60)
    assert rm.returncode == 0 and pk not in shmarray.ls(dir=seg_dir).keys()
    del t, ring, again


def test_a_crashed_attacher_leaves_nothing(seg_dir: str, key: str, unwatched: None) -> None:
    code = textwrap.dedent(f"""
        import os, numpy as np, shmarray
        a = shmarray.share({key!r}, np.ones(1000), dir={seg_dir!r})
        os.kill(os.getpid(), 9)
    """)
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert got.returncode == -9
    assert os.listdir(seg_dir), "the killed process's segment is still named"
    shmarray.collect_garbage(dir=seg_dir)
    assert os.listdir(seg_dir) == []


def _kept_in(d: str) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith(kept_files.KEEP_PREFIX))


def test_memory_is_recycled_inside_a_directory(seg_dir: str, make_key) -> None:  # noqa: ANN001
    import gc

    idle_maps.set_budget(1 << 30)
    try:
        default_before = set(os.listdir("/dev/shm"))
        k1, k2 = make_key(), make_key()
        a = shmarray.share(k1, np.random.default_rng(0).random(1 << 18), dir=seg_dir)  # 2 MiB
        ino = os.stat(os.path.join(seg_dir, a.segment.native_key)).st_ino
        del a
        gc.collect()
        kept = _kept_in(seg_dir)
        assert len(kept) == 2, kept  # the owner file and the segment's file
        assert not {n for n in set(os.listdir("/dev/shm")) - default_before if n.startswith(kept_files.KEEP_PREFIX)}
        out = subprocess.run([sys.executable, "-m", "shmarray", "ls", "--dir", seg_dir, "--all", "--json"],
                             capture_output=True, text=True, timeout=60)
        rows = [r for r in json.loads(out.stdout) if r["kind"] == "kept"]
        assert len(rows) == 1 and rows[0]["creator_pid"] == os.getpid() and rows[0]["dir"] == seg_dir, rows
        b = shmarray.create(k2, (1 << 18,), np.float64, dir=seg_dir)
        assert os.stat(os.path.join(seg_dir, b.segment.native_key)).st_ino == ino, "not built in the kept file"
        assert not np.asarray(b).any(), "a recycled file must read as zeros"
        b[:] = 7.0
        got = subprocess.run([sys.executable, "-c", f"import shmarray; print(float(shmarray.attach({k2!r}, "
                              f"dir={seg_dir!r}).sum()))"], capture_output=True, text=True, timeout=60)
        assert got.stdout.strip() == str(7.0 * (1 << 18)), got.stderr
        del b
        gc.collect()
        kept_files.release_all()
        assert os.listdir(seg_dir) == []
    finally:
        idle_maps.set_budget(None)


def test_a_killed_creators_kept_memory_in_a_directory_is_reaped(seg_dir: str, key: str, unwatched: None) -> None:
    code = textwrap.dedent(f"""
        import gc, os, numpy as np, shmarray
        a = shmarray.share({key!r}, np.ones(1 << 18), dir={seg_dir!r})
        del a
        gc.collect()
        os.kill(os.getpid(), 9)
    """)
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                         env={**os.environ, "SHMARRAY_REUSE_BYTES": "1G"})
    assert got.returncode == -9
    assert len(_kept_in(seg_dir)) == 2, os.listdir(seg_dir)
    out = subprocess.run([sys.executable, "-m", "shmarray", "gc", "--dir", seg_dir],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert os.listdir(seg_dir) == []


def test_a_bad_directory_is_a_clear_error(tmp_path: Path, key: str) -> None:
    missing = tmp_path / "nope"
    for call in (lambda: shmarray.share(key, np.zeros(2), dir=missing),
                 lambda: shmarray.attach(key, dir=missing),
                 lambda: shmarray.ls(dir=missing),
                 lambda: shmarray.collect_garbage(dir=missing)):
        with pytest.raises(shmarray.ShmError, match=f"{missing}.* does not exist"):
            call()
    assert not missing.exists()  # never created
    with pytest.raises(TypeError):
        shmarray.share(key, np.zeros(2), dir=3)  # type: ignore[arg-type]
    afile = tmp_path / "afile"
    afile.write_bytes(b"")
    with pytest.raises(shmarray.ShmError, match="is not a directory"):
        shmarray.share(key, np.zeros(2), dir=afile)
    if os.geteuid() != 0:  # root writes anywhere: the unwritable case needs another user
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(shmarray.ShmError, match="cannot be written"):
            shmarray.share(key, np.zeros(2), dir=ro)
    out = subprocess.run([sys.executable, "-m", "shmarray", "ls", "--dir", str(missing)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "does not exist" in out.stderr


def _run_in_huge_tmpfs(tmp_path: Path, script: str, mounts: str = "",
                       mount: str = "-t tmpfs -o size=256m,huge=within_size tmpfs") -> dict[str, str]:
    """Run *script* with a ``huge=within_size`` tmpfs (or what *mount* says) mounted at argv[1].

    In a private mount namespace; *mounts* are more mount commands run
    first. Returns the script's ``name value`` output lines as a dict;
    skips where that is not allowed.
    """
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to mount a huge-page tmpfs in a private mount namespace")
    path = tmp_path / "in_huge.py"
    path.write_text(script)
    mnt = tmp_path / "huge"
    mnt.mkdir()
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f"{mounts}mount {mount} {mnt} && exec {sys.executable} {path} {mnt}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0 and "mount" in out.stderr and not out.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


HUGE = r"""
import os, sys, numpy as np, shmarray
from shmarray._os import backend
d = sys.argv[1]
a = shmarray.share("huge", np.arange(8 << 20, dtype=np.float64), dir=d)   # 64 MiB
seg = a.segment
st = os.stat(os.path.join(d, seg.native_key))
float(a.sum())
# The creator's mapping shows the file's first (temporary) name: matched by device and inode.
print("pmd_kb", backend.huge_mapped_bytes(st.st_dev, st.st_ino) >> 10)
print("same", bool(shmarray.attach("huge", dir=d).sum() == a.sum()))
del a, seg
print("left", os.listdir(d))
"""


def test_a_huge_page_tmpfs_backs_segments_with_huge_pages(tmp_path: Path) -> None:
    lines = _run_in_huge_tmpfs(tmp_path, HUGE)
    assert int(lines["pmd_kb"]) >= 32 << 10, lines  # at least half of the 64 MiB by 2 MiB pages
    assert lines["same"] == "True"
    assert lines["left"] == "[]"


PMD = r"""
def pmd_kb(seg):
    st = os.stat(os.path.join(seg.dir, seg.native_key))
    return shmarray._os.backend.huge_mapped_bytes(st.st_dev, st.st_ino) >> 10
"""


def test_huge_mapped_bytes_sees_no_huge_pages_on_a_4k_tmpfs(seg_dir: str, key: str) -> None:
    if shmarray.doctor(seg_dir).huge_pages_back_new_segments:
        pytest.skip(f"{seg_dir} gives huge pages here")
    a = shmarray.share(key, np.ones(4 << 17), dir=seg_dir)  # 4 MiB
    float(a.sum())
    st = os.stat(os.path.join(seg_dir, a.segment.native_key))
    assert shmarray._os.backend.huge_mapped_bytes(st.st_dev, st.st_ino) == 0


ADVISE = r"""
import errno, os, subprocess, sys, numpy as np, shmarray
from shmarray._os import backend
""" + PMD + r"""
d = sys.argv[1]
doc = shmarray.doctor(d)
print("doctor", doc.huge, doc.huge_pages_back_new_segments, [p.what for p in doc.problems if d in p.what])
a = shmarray.share("adv", np.arange(8 << 20, dtype=np.float64), dir=d)   # 64 MiB
float(a.sum())  # mapped on first touch
print("pmd_kb", pmd_kb(a.segment))
z = shmarray.create("zeros", (4 << 20,), np.float64, dir=d)               # 32 MiB, no fill
print("zeros", int(np.count_nonzero(z)), pmd_kb(z.segment))
code = "import shmarray, sys; print(float(shmarray.attach('adv', dir=sys.argv[1]).sum()))"
other = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, timeout=60)
print("other", other.stdout.strip() == str(float(a.sum())), other.stderr[-300:].replace(chr(10), " ") or "-")
# More than the tmpfs holds, past the free-space check: ENOSPC from populating, never SIGBUS.
fd = os.open(os.path.join(d, "big"), os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 300 << 20)
try:
    backend.map_populated_huge(fd, 300 << 20)
    print("populate", "no-error")
except OSError as e:
    print("populate", errno.errorcode[e.errno])
os.close(fd)
os.unlink(os.path.join(d, "big"))
try:
    shmarray.share("huge2", np.ones(40 << 20), dir=d)                     # 320 MiB on a 256 MiB tmpfs
except shmarray.OutOfResourcesError as e:
    print("full", "OutOfResourcesError")
del a, z
shmarray._reuse.kept_files.release_all()
print("left", os.listdir(d))
"""


def test_a_huge_advise_tmpfs_gets_huge_pages_through_a_populated_mapping(tmp_path: Path) -> None:
    lines = _run_in_huge_tmpfs(tmp_path, ADVISE, mount="-t tmpfs -o size=256m,huge=advise tmpfs")
    assert lines["doctor"] == "advise True []", lines
    assert int(lines["pmd_kb"]) >= 32 << 10, lines  # at least half of the 64 MiB by 2 MiB pages
    count, pmd = lines["zeros"].split()
    assert count == "0" and int(pmd) >= 16 << 10, lines
    assert lines["other"].startswith("True"), lines
    assert lines["populate"] == "ENOSPC", lines
    assert lines["full"] == "OutOfResourcesError"
    assert lines["left"] == "[]"


HUGETLBFS_OTHER = r"""
import shmarray, sys
d = sys.argv[1]
a = shmarray.attach("h", dir=d)
with a.segment.locked():
    a[0] = -1.0
r = shmarray.BatchRing.attach("r", dir=d)
with r.get(timeout=30) as b:
    s = float(b["x"].sum())
r.close()
print(float(a[1:].sum()), shmarray.attach_table("t", dir=d).column("x").to_numpy().sum(), s)
"""

HUGETLBFS = r"""
import os, subprocess, sys, numpy as np, pyarrow as pa, shmarray
""" + PMD + r"""
d = sys.argv[1]
doc = shmarray.doctor(d)
print("kind", shmarray._os.backend.huge_pages(d), doc.huge)
print("doctor", doc.huge_pages_back_new_segments, doc.page_size, doc.free_bytes >= 80 << 20,
      [p.what for p in doc.problems if d in p.what])
a = shmarray.share("h", np.arange(1 << 20, dtype=np.float64), dir=d)       # 8 MiB
print("size", a.segment.size, os.stat(os.path.join(d, a.segment.native_key)).st_size % (2 << 20))
float(a.sum())  # mapped on first touch
print("pmd_kb", pmd_kb(a.segment))
t = shmarray.share_table("t", pa.table({"x": np.arange(1000)}), dir=d)
r = shmarray.BatchRing.create("r", {"x": ((1000,), "f8")}, slots=2, dir=d)
with r.acquire() as slot:
    slot["x"][:] = 3.0
other = subprocess.run([sys.executable, "-c", OTHER, d], capture_output=True, text=True, timeout=120)
print("other", other.stdout.strip().replace(" ", ","), other.stderr[-300:].replace(chr(10), " ") or "-")
print("first", float(a[0]))
free = shmarray.doctor(d).free_bytes
try:
    shmarray.share("toobig", np.ones((free + (8 << 20)) // 8), dir=d)
except shmarray.OutOfResourcesError:
    print("full", "OutOfResourcesError")
r.close()
del a, t, r
shmarray._reuse.kept_files.release_all()
print("left", os.listdir(d))
"""


def test_hugetlbfs_holds_segments_where_huge_pages_are_reserved(tmp_path: Path) -> None:
    """hugetlbfs has no write() and takes only whole huge pages; the machine must have pages reserved.

    As root the test reserves 40 more 2 MiB pages for itself (80 MiB) and
    gives them back; where that is refused it skips.
    """
    knob = Path("/proc/sys/vm/nr_hugepages")
    if os.geteuid() != 0 or not knob.exists():
        pytest.skip("needs root to reserve huge pages for a hugetlbfs")
    before = int(knob.read_text())
    try:
        try:
            knob.write_text(str(before + 40))
        except OSError as e:
            pytest.skip(f"cannot reserve huge pages here: {e}")
        if int(knob.read_text()) < before + 40:
            pytest.skip("the kernel could not find 40 free 2 MiB pages")
        script = HUGETLBFS.replace("OTHER,", repr(HUGETLBFS_OTHER) + ",")
        lines = _run_in_huge_tmpfs(tmp_path, script, mount="-t hugetlbfs -o pagesize=2M none")
    finally:
        knob.write_text(str(before))
    assert lines["kind"] == "hugetlbfs hugetlbfs", lines
    assert lines["doctor"] == f"True {2 << 20} True []", lines
    size, rest = lines["size"].split()
    # The data starts on a 2 MiB boundary and the file is whole huge pages; the segment keeps its size.
    assert size == str((2 << 20) - 4096 + (8 << 20)) and rest == "0", lines
    assert int(lines["pmd_kb"]) >= 8 << 10, lines  # *_Hugetlb in smaps: the array's pages are huge pages
    assert lines["other"].startswith(f"{float(sum(range(1, 1 << 20)))},499500,3000.0"), lines
    assert lines["first"] == "-1.0"
    assert lines["full"] == "OutOfResourcesError"
    assert lines["left"] == "[]"


# -- shmarray doctor ---------------------------------------------------------------


def test_doctor_reports_the_facts_and_fixes(tmp_path: Path) -> None:
    report = shmarray.doctor()
    assert report.dir == shmarray._os.backend.SHM_DIR and report.exists and report.fs_type == "tmpfs"
    assert report.size_bytes and report.free_bytes is not None and report.page_size == 4096
    assert report.nofile_soft > 0 and report.max_map_count
    if not report.huge_pages_back_new_segments:
        assert any("huge=within_size" in p.fix for p in report.advice)
        assert not any("huge" in p.what for p in report.problems)  # advice, not a problem
    text = report.to_text()
    assert "segment directory" in text and "RLIMIT_NOFILE" in text
    out = subprocess.run([sys.executable, "-m", "shmarray", "doctor", "--json"],
                         capture_output=True, text=True, timeout=60)
    data = json.loads(out.stdout)
    assert data["dir"] == report.dir and isinstance(data["problems"], list)
    missing = shmarray.doctor(tmp_path / "nope")
    assert not missing.exists and "does not exist" in missing.problems[0].what
    disk = shmarray.doctor(tmp_path)
    if disk.fs_type not in ("tmpfs", None):
        assert any("disk file system" in p.what for p in disk.problems)


DOCTOR_IN_NAMESPACE = r"""
import json, sys, shmarray
print("small", json.dumps(shmarray.doctor("/dev/shm").as_dict()))
print("huge", json.dumps(shmarray.doctor(sys.argv[1]).as_dict()))
"""


def test_doctor_on_a_small_dev_shm_and_a_huge_page_tmpfs(tmp_path: Path) -> None:
    lines = _run_in_huge_tmpfs(tmp_path, DOCTOR_IN_NAMESPACE, mounts="mount -t tmpfs -o size=64m tmpfs /dev/shm && ")
    small, huge = json.loads(lines["small"]), json.loads(lines["huge"])
    assert small["small_container_default"] and any("--shm-size" in p["fix"] for p in small["problems"])
    assert huge["huge"] == "within_size" and huge["huge_pages_back_new_segments"]
    assert not any("huge" in p["what"] for p in huge["problems"])


ALIGNED = r"""
import sys, numpy as np, pyarrow as pa, shmarray
d = sys.argv[1]
a = shmarray.share("big", np.ones(1 << 20), dir=d)        # 8 MiB
t = shmarray.share_table("tab", pa.table({"x": np.arange(1 << 20)}), dir=d)
r = shmarray.BatchRing.create("ring", {"x": ((1 << 19,), "f8")}, slots=2, dir=d)
base = a.segment._att.region.mm
addr = np.asarray(a).__array_interface__["data"][0]
import ctypes
start = ctypes.addressof(ctypes.c_char.from_buffer(base))
print("offset", addr - start)
print("same", float(shmarray.attach("big", dir=d).sum()), shmarray.attach_table("tab", dir=d).num_rows)
"""


def test_payloads_start_on_a_huge_page_boundary(tmp_path: Path) -> None:
    lines = _run_in_huge_tmpfs(tmp_path, ALIGNED)
    assert int(lines["offset"]) % (2 << 20) == 0, lines  # file offset of the data: a 2 MiB multiple
    assert lines["same"] == "1048576.0 1048576"
