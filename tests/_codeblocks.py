"""Running the code blocks of a Markdown page (the README, the docs) as written.

A block is cut at its ``# in any other process`` / ``# in each worker process``
/ ``# in the trainer`` comments: the first part runs in one process, which
keeps what it made while the next part runs in a second process, and so on;
each part is bounded by a timeout. The blocks use fixed keys ("frames",
"trades", ...), as a user's would, so they run with a private /dev/shm (a
mount namespace of their own: root and unshare(1)); they are skipped where
that is not possible rather than touching the keys of a user's own pipelines.
Used by tests/test_readme.py and tests/test_docs.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

_FENCE = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)
_CUT = re.compile(r"^# in (any other process|each worker process|the trainer)\b.*$", re.M)


def blocks(path: str) -> list[tuple[int, str]]:
    """(line number, source) of every python block of the Markdown file *path*, dedented."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append((line, textwrap.dedent(m.group(2))))
    return out


def parts(src: str) -> list[str]:
    """The block cut into the parts that run in separate processes."""
    pieces = _CUT.split(src)
    # re.split keeps the captured group: drop those.
    return [p for i, p in enumerate(pieces) if i % 2 == 0]


_DRIVER = r'''
import os, subprocess, sys, time
parts = sys.argv[1:]
procs = []
for i, path in enumerate(parts):
    ready, done = path + ".ready", path + ".done"
    last = i == len(parts) - 1
    with open(path) as f:
        code = f.read()
    if not last:
        # Keep what this part made until the later parts are done.
        code += ("\nopen(%r, 'w').close()\nimport time as _t\nwhile not __import__('os').path.exists(%r):\n"
                 "    _t.sleep(0.01)\n" % (ready, done))
        with open(path, "w") as f:
            f.write(code)
        p = subprocess.Popen([sys.executable, path])
        procs.append((p, done))
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            if p.poll() is not None:
                sys.exit(f"part {i} exited early with {p.returncode}")
            if time.monotonic() > deadline:
                for q, _ in procs:
                    q.kill()
                sys.exit(f"part {i} did not finish within 60 s")
            time.sleep(0.01)
    else:
        try:
            r = subprocess.run([sys.executable, path], timeout=120)
            code = r.returncode
        except subprocess.TimeoutExpired:
            code = "a timeout (120 s)"
        if code:
            for p, _ in procs:
                p.kill()
            sys.exit(f"part {i} failed with {code}")
for p, done in reversed(procs):
    open(done, "w").close()
    if p.wait(timeout=60):
        sys.exit(f"an earlier part failed with {p.returncode}")
left = [n for n in os.listdir("/dev/shm") if n.startswith("shmarray_")]
if left:
    sys.exit(f"left in /dev/shm: {left}")
print("ok")
'''



def run_block(src: str, tmp_path: "os.PathLike[str]", where: str) -> None:
    """Run block *src* (from *where*, for the failure message) part by part in a private /dev/shm."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("the blocks' keys are fixed: needs root and unshare(1) for a private /dev/shm")
    if "import numpy as np, shmarray, torch" in src:
        pytest.importorskip("torch", reason="the DataLoader block needs torch (see the README's test command)")
    if "from PySide6" in src:
        pytest.importorskip("PySide6.QtCore", reason="the Qt block needs PySide6-Essentials (in the test extras)")
    if "from distributed import" in src:
        pytest.importorskip("distributed", reason="the Dask blocks need dask[distributed] (in the test extras)")
    paths = []
    for i, part in enumerate(parts(src)):
        path = os.path.join(os.fspath(tmp_path), f"part{i}.py")
        with open(path, "w") as f:
            f.write(part)
        paths.append(path)
    driver = os.path.join(os.fspath(tmp_path), "driver.py")
    with open(driver, "w") as f:
        f.write(_DRIVER)
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f"mount -t tmpfs -o size=2g tmpfs /dev/shm && exec {sys.executable} {driver} {' '.join(paths)}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=os.fspath(tmp_path))
    if out.returncode != 0 and "mount" in out.stderr and not out.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {out.stderr.strip()}")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (
        f"block at {where}:\n{src}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}")
