"""Nothing outlives its holders: whatever ends a process, what it alone held is freed within 2 s.

Each scenario runs in a private segment directory (a tmpfs of its own, in a
private mount namespace: root and unshare(1)), so the entries and the bytes
of the directory are the scenario's alone and "df back where it was" can be
checked exactly. The holders are real processes ended by SIGKILL, SIGTERM,
``os._exit``, a segfault, a pool's worker killed, a forked child killed, a
Jupyter kernel shut down by jupyter_client, and processes in PID namespaces
of their own sharing one tmpfs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from _procs import run_with_small_dev_shm

pytestmark = pytest.mark.skipif(os.environ.get("SHMARRAY_DIR") not in (None, "", "/dev/shm"),
                                reason="runs its own private /dev/shm")

# Shared by every scenario script: the directory's entries and bytes, and waiting for them.
COMMON = r'''
import json, os, signal, subprocess, sys, time
SHM = "/dev/shm"

def entries():
    return sorted(os.listdir(SHM))

def used():
    st = os.statvfs(SHM)
    return (st.f_blocks - st.f_bfree) * st.f_frsize

def settle(want, timeout=2.0):
    """Seconds until the directory holds exactly *want* (names) and nothing else; None if it never did."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if entries() == sorted(want):
            return time.monotonic() - t0
        time.sleep(0.01)
    return None

def until(done, timeout=2.0):
    """Seconds until done() is true; None if it never was within *timeout*."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if done():
            return time.monotonic() - t0
        time.sleep(0.01)
    return None

def spawn(code, *args):
    """A holder process running *code*; returns it once it printed 'ready'."""
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    assert line == "ready", (line, p.poll())
    return p
'''

HOLDER = r'''
import ctypes, os, sys, time
import numpy as np, shmarray
a = shmarray.share("only-mine", np.ones(2 << 20))          # 16 MiB it alone holds
b = shmarray.share("dropped", np.ones(1 << 20)); del b     # 8 MiB kept for reuse
p = shmarray.create("stays", 512, persistent=True)           # persistent: stays, as today
print("ready", flush=True)
how = sys.argv[1]
if how == "exit":
    os._exit(3)
if how == "segfault":
    ctypes.string_at(0)
time.sleep(120)
'''


def _scenario(tmp_path, body: str, size: str = "256m") -> dict:
    # In a main() under the __main__ guard: spawned pool workers import this script again.
    main = "def main():\n" + textwrap.indent(textwrap.dedent(body), "    ")
    script = COMMON + main + "\n\nif __name__ == '__main__':\n    main()\n"
    out = run_with_small_dev_shm(script, tmp_path, size=size)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "exit", "segfault"])
def test_the_only_holder_dies(tmp_path, how):
    got = _scenario(tmp_path, f'''
        before = used()
        p = spawn({HOLDER!r}, {how!r})
        during = entries()
        if {how!r} in ("SIGKILL", "SIGTERM"):
            p.send_signal(getattr(signal, {how!r}))
        code = p.wait(30)
        stays = [n for n in during if n.startswith("shmarray_stays")]
        took = settle(stays)
        import shmarray
        shmarray.unlink("stays")
        print(json.dumps({{"code": code, "during": during, "took": took, "left": entries(),
                          "freed": used() - before}}))
    ''')
    assert len(got["during"]) >= 5, got  # the two segments, a kept file and its owner, the persistent one
    assert got["took"] is not None and got["took"] <= 2.0, got
    assert got["left"] == [] and got["freed"] <= 4096 * 4, got  # df back where it was


CREATOR = """
import numpy as np, shmarray
a = shmarray.share("handed", np.ones(1 << 20))
print("ready", flush=True)
input()
"""
ATTACHER = """
import shmarray, time
a = shmarray.attach("handed")
print("ready", flush=True)
time.sleep(120)
"""


def test_the_last_attacher_dies_after_the_creator_closed(tmp_path):
    got = _scenario(tmp_path, f'''
        creator = subprocess.Popen([sys.executable, "-c", {CREATOR!r}], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        assert creator.stdout.readline().strip() == "ready"
        attacher = spawn({ATTACHER!r})
        creator.stdin.write("\\n"); creator.stdin.flush()  # the creator exits normally (closes)
        creator.wait(30)
        time.sleep(0.3)
        held = entries()
        attacher.kill()
        attacher.wait(30)
        print(json.dumps({{"held": held, "took": settle([]), "left": entries()}}))
    ''')
    assert any(n.startswith("shmarray_handed") for n in got["held"]), got
    assert got["took"] is not None and got["took"] <= 2.0, got


def test_a_pool_worker_killed_holding_the_last_reference(tmp_path):
    (tmp_path / "poolwork.py").write_text(textwrap.dedent('''
        import os
        KEPT = []
        def keep(a):
            KEPT.append(a)  # this worker now holds the segment
            return os.getpid()
    '''))
    got = _scenario(tmp_path, fr'''
        sys.path.insert(0, {str(tmp_path)!r})
        import multiprocessing as mp, numpy as np, shmarray, poolwork
        ctx = mp.get_context("spawn")
        with ctx.Pool(2) as pool:
            a = shmarray.share("pooled", np.ones(1 << 20))
            pid = pool.apply(poolwork.keep, (a,))
            a.close(); del a  # the worker holds the last reference
            time.sleep(0.2)
            held = entries()
            os.kill(pid, signal.SIGKILL)
            took = settle([n for n in entries() if not n.startswith("shmarray_pooled")])
            left = [n for n in entries() if n.startswith("shmarray_pooled")]
        print(json.dumps({{"held": held, "took": took, "left": left}}))
    ''')
    assert any(n.startswith("shmarray_pooled") for n in got["held"]), got
    assert got["took"] is not None and got["took"] <= 2.0 and got["left"] == [], got


def test_a_forked_child_is_watched_in_its_own_right(tmp_path):
    got = _scenario(tmp_path, r'''
        import numpy as np, shmarray
        a = shmarray.share("forked", np.ones(1 << 20))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, b"x")
            time.sleep(120)
            os._exit(0)
        os.read(r, 1)
        a.close(); del a  # the child is the last holder now
        time.sleep(0.2)
        held = entries()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print(json.dumps({"held": held, "took": settle([n for n in entries() if not n.startswith("shmarray_forked")]),
                          "left": [n for n in entries() if n.startswith("shmarray_forked")]}))
    ''')
    assert any(n.startswith("shmarray_forked") for n in got["held"]), got
    assert got["took"] is not None and got["left"] == [], got


def test_a_jupyter_kernel_shut_down_after_using_a_spawned_pool(tmp_path):
    pytest.importorskip("jupyter_client")
    pytest.importorskip("ipykernel")
    (tmp_path / "kwork.py").write_text("def total(a):\n    return float(a.sum())\n")
    got = _scenario(tmp_path, fr'''
        from jupyter_client.manager import start_new_kernel
        km, kc = start_new_kernel(kernel_name="python3", env={{**os.environ, "PYTHONPATH": {str(tmp_path)!r}}})
        code = """
import multiprocessing as mp, numpy as np, shmarray, kwork
pool = mp.get_context("spawn").Pool(2)
frames = shmarray.share("kernel-frames", np.ones(2 << 20))
sums = pool.map(kwork.total, [frames[i::4] for i in range(4)])
tmp = shmarray.share("kernel-tmp", np.ones(1 << 20)); del tmp   # kept for reuse
print(sum(sums))
"""
        reply = kc.execute_interactive(code, timeout=120)
        assert reply["content"]["status"] == "ok", reply
        held = entries()
        kc.stop_channels()
        km.shutdown_kernel(now=False)  # the notebook's own shutdown (SIGTERM when it does not exit in time)
        print(json.dumps({{"held": held, "took": settle([]), "left": entries()}}))
    ''', size="512m")
    assert any(n.startswith("shmarray_kernel-frames") for n in got["held"]), got
    assert got["took"] is not None and got["left"] == [], got


def _unshare_pid() -> list[str]:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1)")
    probe = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no PID namespaces here: {probe.stderr.decode().strip()}")
    return ["unshare", "-p", "-f", "--mount-proc"]


def test_in_a_private_pid_namespace(tmp_path):
    pidns = _unshare_pid()
    script = tmp_path / "inner.py"
    script.write_text(COMMON + textwrap.dedent(f'''
        before = used()
        p = spawn({HOLDER!r}, "SIGKILL")
        p.kill()
        p.wait(30)
        stays = [n for n in entries() if n.startswith("shmarray_stays")]
        took = settle(stays)
        import shmarray
        shmarray.unlink("stays")
        print(json.dumps({{"pid1": os.getpid() == 1, "took": took, "left": entries(), "freed": used() - before}}))
    '''))
    got = _scenario(tmp_path, f'''
        out = subprocess.run({pidns!r} + [sys.executable, {str(script)!r}], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        print(out.stdout.strip().splitlines()[-1])
    ''')
    assert got["pid1"] and got["took"] is not None and got["left"] == [] and got["freed"] <= 16384, got


def test_two_pid_namespaces_sharing_one_tmpfs(tmp_path):
    """A segment held in the other container is never removed; the dead one's own memory goes."""
    pidns = _unshare_pid()
    a_code = tmp_path / "container_a.py"
    a_code.write_text(textwrap.dedent('''
        import numpy as np, shmarray, sys, time
        shared = shmarray.share("between", np.arange(1 << 20, dtype=np.float64))
        print("ready", flush=True)
        sys.stdin.readline()  # until told
        print(float(shared[12345]), flush=True)
    '''))
    b_code = tmp_path / "container_b.py"
    b_code.write_text(textwrap.dedent('''
        import numpy as np, shmarray, time
        other = shmarray.attach("between")        # held in container A too
        mine = shmarray.share("b-only", np.ones(1 << 20))
        print("ready", flush=True)
        time.sleep(120)
    '''))
    got = _scenario(tmp_path, f'''
        a = subprocess.Popen({pidns!r} + [sys.executable, {str(a_code)!r}], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert a.stdout.readline().strip() == "ready"
        b = subprocess.Popen({pidns!r} + [sys.executable, {str(b_code)!r}], stdout=subprocess.PIPE, text=True)
        assert b.stdout.readline().strip() == "ready"
        held = entries()
        b.kill()  # unshare's forked child goes with it: container B is gone
        subprocess.run(["pkill", "-KILL", "-f", {str(b_code)!r}])
        b.wait(30)
        took = until(lambda: not any(n.startswith("shmarray_b-only") for n in entries()))
        left_b = [n for n in entries() if n.startswith("shmarray_b-only")]
        time.sleep(0.5)
        survived = [n for n in entries() if n.startswith("shmarray_between")]
        a.stdin.write("go\\n"); a.stdin.flush()
        value = a.stdout.readline().strip()
        a.wait(30)
        print(json.dumps({{"held": held, "took": took, "left_b": left_b, "survived": survived, "value": value,
                          "end": settle([])}}))
    ''')
    assert any(n.startswith("shmarray_b-only") for n in got["held"]), got
    assert got["left_b"] == [] and got["took"] is not None, got
    assert got["survived"] and got["value"] == "12345.0", got  # container A's segment, untouched
    assert got["end"] is not None, got  # and it goes when A, its last holder, is gone


def test_the_watcher_installs_no_signal_handler_and_is_shared_by_a_pool(tmp_path):
    (tmp_path / "envwork.py").write_text("import os\ndef env(_):\n    return os.environ.get('SHMARRAY_WATCHER')\n")
    got = _scenario(tmp_path, fr'''
        sys.path.insert(0, {str(tmp_path)!r})
        import envwork, multiprocessing as mp, numpy as np, signal as sg, shmarray
        before = {{s: sg.getsignal(s) for s in (sg.SIGTERM, sg.SIGINT, sg.SIGHUP, sg.SIGCHLD)}}
        a = shmarray.share("pooled", np.ones(1 << 16))
        after = {{s: sg.getsignal(s) for s in (sg.SIGTERM, sg.SIGINT, sg.SIGHUP, sg.SIGCHLD)}}
        with mp.get_context("spawn").Pool(4) as pool:
            envs = pool.map(envwork.env, range(8))
        print(json.dumps({{"same": before == after, "env": os.environ.get("SHMARRAY_WATCHER"),
                          "envs": sorted(set(envs))}}))
    ''')
    assert got["same"], got
    assert got["env"] and got["envs"] == [got["env"]], got  # spawned workers find the same watcher


def test_in_another_directory(tmp_path):
    """dir= segments: the watcher frees them where they live."""
    got = _scenario(tmp_path, r'''
        other = "/dev/shm/elsewhere"
        os.mkdir(other)
        code = ("import numpy as np, shmarray, time; a = shmarray.share('far', np.ones(1 << 16), dir=%r); "
                "b = shmarray.share('far2', np.ones(1 << 16), dir=%r); del b; print('ready', flush=True); "
                "time.sleep(60)" % (other, other))
        p = spawn(code)
        during = sorted(os.listdir(other))
        p.kill()
        p.wait(30)
        took = until(lambda: not os.listdir(other))
        print(json.dumps({"during": during, "took": took, "left": os.listdir(other)}))
    ''')
    assert got["during"] and got["took"] is not None and got["left"] == [], got


LEAVER = r'''
import os, time
import numpy as np, shmarray
from shmarray import _watch
from shmarray._os import TEMP_PREFIX
a = shmarray.share("leaver", np.ones(16))          # connected: it builds in /dev/shm
os.environ["SHMARRAY_WATCH"] = "0"
_watch._drop()                                      # alive, but no longer connected
temp = f"/dev/shm/{TEMP_PREFIX}{os.getpid()}-building"
open(temp, "w").close()                             # stands for a segment being built now
time.sleep(2.5)                                     # past the watcher's wait for an exit
print("kept" if os.path.exists(temp) else "removed", flush=True)
os.unlink(temp)
'''


def test_a_live_process_that_leaves_its_watcher_keeps_its_half_built_files(tmp_path):
    got = _scenario(tmp_path, f'''
        out = subprocess.run([sys.executable, "-c", {LEAVER!r}], capture_output=True, text=True, timeout=60)
        print(json.dumps({{"out": out.stdout.strip(), "err": out.stderr[-500:]}}))
    ''')
    assert got["out"] == "kept", got
