"""The command line: ls, info, rm, gc; no noise at interpreter exit; a full /dev/shm."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

import shmarray
from _procs import run_with_small_dev_shm, start, wait_for
from conftest import SHM
from shmarray import Segment
from shmarray._cli import main


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmarray", *args], capture_output=True, text=True, timeout=60)


def test_ls_and_info(key, capsys):
    with Segment(key).create(1000, persistent=True) as seg:
        out = _cli("ls")
        assert out.returncode == 0, out.stderr
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith(key))
        assert f"/{seg.native_key}" in line and "1000 B" in line and "yes" in line
        assert main(["ls", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        row = next(r for r in rows if r["key"] == key)
        assert row["size"] == 1000 and row["persistent"] is True and row["processes"] == 1
        assert row["pids"] == [os.getpid()]
        assert main(["info", key]) == 0
        assert "persistent" in capsys.readouterr().out
        seg.lock()
        assert main(["info", key, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["lock"] == "exclusive" and info["lock_holder"] == os.getpid()
        seg.unlock()
    shmarray.unlink(key)


def test_info_missing_is_an_error(key):
    out = _cli("info", key)
    assert out.returncode == 1 and key in out.stderr and "Traceback" not in out.stderr


def test_rm(key):
    Segment(key).create(10, persistent=True).detach()
    out = _cli("rm", key)
    assert out.returncode == 0 and key in out.stdout
    with pytest.raises(shmarray.NotFoundError):
        Segment(key).attach()
    assert _cli("rm", key).returncode == 1


def test_gc_keeps_live_and_persistent(make_key):
    live, keep = make_key(), make_key()
    with Segment(live).create(10):
        Segment(keep).create(10, persistent=True).detach()
        assert main(["gc"]) == 0
        Segment(live).attach().detach()
        Segment(keep).attach().detach()
    shmarray.unlink(keep)


def test_console_script_and_module_agree():
    script = shutil.which("shmarray", path=os.path.dirname(sys.executable))
    assert script is not None
    a = subprocess.run([script, "ls", "--json"], capture_output=True, text=True, timeout=60)
    b = _cli("ls", "--json")
    assert a.returncode == b.returncode == 0


def test_no_noise_at_exit(key):
    code = textwrap.dedent(f"""
        import shmarray
        a = shmarray.Segment({key!r}).create(1 << 20)
        b = shmarray.Segment({key!r}).attach()
        view = a.data
        b.lock()
    """)
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "" and out.stdout == ""
    assert not os.path.exists(f"/dev/shm/{shmarray._os.native_key_for(key)}")


FULL_SHM = textwrap.dedent("""
    import os, sys
    import shmarray
    from shmarray._os import backend
    seg = shmarray.Segment("full-a").create(40 << 20)   # 40 of 64 MiB
    try:
        shmarray.Segment("full-b").create(40 << 20)
    except shmarray.OutOfResourcesError as e:
        print("precheck:", e)
    # Pretend the space check passed (another process raced us): posix_fallocate must still refuse.
    backend.free_bytes = lambda *_: 1 << 40
    try:
        shmarray.Segment("full-c").create(40 << 20)
    except shmarray.OutOfResourcesError as e:
        print("fallocate:", e)
    print("left:", sorted(n for n in os.listdir("/dev/shm") if n.startswith(("shmarray_", ".shmarray"))))
""")


def test_full_dev_shm_is_out_of_resources_not_sigbus(tmp_path):
    """A 64 MiB /dev/shm (Docker's default), in a private mount namespace."""
    out = run_with_small_dev_shm(FULL_SHM, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "precheck:" in out.stdout and "full-b" in out.stdout and "MiB free" in out.stdout
    assert "fallocate:" in out.stdout and "full-c" in out.stdout and "needs 40.0 MiB" in out.stdout
    assert "left: ['shmarray_full-a_" in out.stdout and "full-c" not in out.stdout.split("left:")[1]


# -- edges a new user met (issue 16) -----------------------------------------------------------


def test_rm_goes_on_past_a_missing_key(key):
    other = key + "-b"
    Segment(key).create(8, persistent=True).detach()
    Segment(other).create(8, persistent=True).detach()
    out = _cli("rm", key + "-missing", key, other)
    assert out.returncode == 1
    assert "no segment" in out.stderr and key + "-missing" in out.stderr
    assert f"removed {key}" in out.stdout and f"removed {other}" in out.stdout
    for k in (key, other):
        with pytest.raises(shmarray.NotFoundError):
            shmarray.segment_info(k)


def test_a_closed_pipe_is_no_traceback(key):
    made = [Segment(f"{key}-{i}").create(8, persistent=True) for i in range(300)]
    try:
        proc = subprocess.Popen([sys.executable, "-m", "shmarray", "ls", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.read(10)
        proc.stdout.close()  # as `| head -c 10` does
        err = proc.stderr.read().decode()
        proc.stderr.close()
        proc.wait(timeout=60)
        assert "Traceback" not in err and "BrokenPipe" not in err, err
    finally:
        for seg in made:
            seg.unlink()
            seg.detach()


def test_version():
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"shmarray {shmarray.__version__}"


def test_info_of_a_foreign_object_invents_nothing(key):
    name = f"foreign-{key}"
    with open(f"/dev/shm/{name}", "wb") as f:
        f.write(b"abc")
    try:
        out = _cli("info", "--native", name)
        assert out.returncode == 0, out.stderr
        rows = dict(line.split(None, 1) for line in out.stdout.splitlines())
        assert rows["key"] == "-" and rows["created"] == "-" and rows["creator_pid"] == "-"
        assert "0.0" not in out.stdout and "None" not in out.stdout
        data = json.loads(_cli("info", "--native", name, "--json").stdout)
        assert data["created"] is None and data["creator_pid"] is None and data["key"] is None
    finally:
        os.unlink(f"/dev/shm/{name}")


def test_a_key_that_is_not_a_str_is_the_public_invalid_key_error():
    with pytest.raises(shmarray.InvalidKeyError) as err:
        shmarray.attach(3)  # type: ignore[arg-type]
    assert type(err.value) is shmarray.InvalidKeyError and isinstance(err.value, TypeError)
    with pytest.raises(TypeError):
        Segment(b"frames")  # type: ignore[arg-type]


# -- what a new user meets first (issue: small things that cost trust) ----------------------------


def test_bare_shmarray_prints_the_help():
    out = _cli()
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.startswith("usage: shmarray") and all(c in out.stdout for c in ("ls", "gc", "doctor", "demo"))


def _create_and_hang(key: str, ready: str) -> None:
    """In a child: create *key* (1 MiB), say so, and wait to be killed."""
    seg = Segment(key).create(1 << 20)
    seg.data[0] = 1
    open(ready, "w").close()
    time.sleep(300)


def test_ls_shows_what_a_killed_holder_left_and_gc_frees_it(key, tmp_path, unwatched):
    ready = str(tmp_path / "ready")
    child = start(_create_and_hang, key, ready)
    wait_for(ready)
    child.kill()  # SIGKILL: its segment has no user left
    path = os.path.join(SHM, shmarray._os.native_key_for(key))
    for _ in range(2):  # looking twice, through every door, frees nothing
        out = _cli("ls")
        assert out.returncode == 0, out.stderr
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith(key))
        assert "1.0 MiB" in line and "orphan" in line
        assert "`shmarray gc` frees" in out.stdout
        assert [e.orphan for e in shmarray.ls() if e.key == key] == [True]
        assert [e.size for e in shmarray.list_segments() if e.key == key] == [1 << 20]
        assert os.path.exists(path)
    out = _cli("gc")
    assert out.returncode == 0, out.stderr
    assert f"removed {key}  1.0 MiB" in out.stdout.splitlines(), out.stdout
    assert "freed" in out.stdout.splitlines()[-1]
    assert not os.path.exists(path)
    again = _cli("gc")
    assert key not in again.stdout


def test_doctor_tells_problems_from_advice():
    report = shmarray.doctor()
    assert all("huge" not in p.what for p in report.problems)
    text = _cli("doctor").stdout
    data = json.loads(_cli("doctor", "--json").stdout)
    assert isinstance(data["problems"], list) and isinstance(data["advice"], list)
    if report.huge_pages_back_new_segments:
        pytest.skip("huge pages back new segments here: no advice to give")
    assert any("huge pages would be faster" in p.what for p in report.advice)
    assert "no problems found" in text or "problems:" in text
    assert text.index("advice") > text.index("problems" if report.problems else "no problems found")
