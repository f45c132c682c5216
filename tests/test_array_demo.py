"""`python -m shmarray demo`: end to end in its quick mode, and cleanup when interrupted."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

import shmarray


def _demo_entries(tag: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"shmarray_{tag}")]


def _children(pid: int) -> set[int]:
    """Processes whose parent is *pid* (the demo's pool workers and resource tracker)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(120)
def test_quick_demo_end_to_end():
    out = subprocess.run([sys.executable, "-m", "shmarray", "demo", "--quick"], capture_output=True,
                         text=True, timeout=100)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "16 MiB float64 array" in text and "same result: yes" in text
    assert re.search(r"zero-copy.*\n\s+[0-9.]+ s", text) and re.search(r"pickled.*\n\s+[0-9.]+ s", text)
    assert re.search(r"Zero-copy was [0-9.]+x faster", text)
    assert "cleaned up: no demo segment left" in text
    tag = re.search(r"segment '(demo-\d+-[0-9a-f]+)'", text).group(1)
    assert not _demo_entries(tag)


def test_demo_refuses_bad_sizes():
    from shmarray._cli import main

    assert main(["demo", "--size-mb", "0"]) == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_cleans_up(sig):
    # A shell that runs us in the background ignores SIGINT, and the child
    # would inherit that: give it the default, as a terminal's Ctrl-C finds it.
    p = subprocess.Popen([sys.executable, "-m", "shmarray", "demo", "--size-mb", "16", "--repeat", "100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = []
        for line in p.stdout:
            seen.append(line)
            if "zero-copy:" in line:
                break
        text = "".join(seen)
        tag = re.search(r"segment '(demo-\d+-[0-9a-f]+)'", text).group(1)
        assert len(_demo_entries(tag)) == 2  # the array and the accumulator
        workers = _children(p.pid)
        assert len(workers) >= 2
        time.sleep(0.3)  # inside the job now
        p.send_signal(sig)
        rest, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, text + rest + err
    assert "interrupted" in rest and "cleaned up: no demo segment left" in rest
    assert not _demo_entries(tag)
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers)
    assert not [s for s in shmarray.list_segments() if s.key and s.key.startswith(tag)]


@pytest.mark.timeout(180)
def test_ctrl_c_in_the_pickled_phase_exits_at_once():
    p = subprocess.Popen([sys.executable, "-m", "shmarray", "demo", "--size-mb", "512", "--repeat", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stdout:
            if "pickled:" in line:
                break
        time.sleep(0.5)  # slices are being pickled to the workers now
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, rest + err
    assert "cleaned up" in rest
    assert took < 3.0, f"the demo took {took:.1f} s to stop"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("delay", [0.15, 0.4, 0.8])
def test_ctrl_c_to_the_group_while_workers_start_prints_no_worker_traceback(delay):
    p = subprocess.Popen([sys.executable, "-m", "shmarray", "demo", "--size-mb", "16", "--repeat", "100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in p.stdout:
            if "share():" in line:
                break
        time.sleep(delay)  # the pool's workers are being spawned (and importing)
        os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        rest, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert p.returncode in (0, 130), rest + err


# Each phase of the demo, by the line that starts it, and how long after that line
# the Ctrl-C may come (at random, so that the tries fall all over the phase).
PHASES = {
    "making the data": ("shmarray demo:", 0.15),
    "share": ("made the data", 0.04),
    "starting the workers": ("share():", 0.3),  # where a Ctrl-C used to be thrown away
    "zero-copy": ("zero-copy:", 0.05),
    "pickled": ("pickled:", 0.4),
    "the end": ("same result", 0.02),
}
TRIES = 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("phase", list(PHASES))
def test_ctrl_c_stops_the_demo_within_a_second_in_every_phase(phase):
    """A terminal's Ctrl-C (SIGINT to the process group), TRIES times in *phase*: out within 1 s, clean."""
    start, most = PHASES[phase]
    for _ in range(TRIES):
        p = subprocess.Popen([sys.executable, "-m", "shmarray", "demo", "--size-mb", "64", "--repeat", "3"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            seen = []
            for line in p.stdout:
                seen.append(line)
                if start in line:
                    break
            time.sleep(random.uniform(0, most))
            t0 = time.monotonic()
            try:
                os.killpg(p.pid, signal.SIGINT)
            except ProcessLookupError:  # "the end": it may have finished already
                pass
            rest, err = p.communicate(timeout=30)
            took = time.monotonic() - t0
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        text = "".join(seen) + rest
        assert p.returncode == 130 or (phase == "the end" and p.returncode == 0), text + err
        assert took < 1.0, f"the demo took {took:.2f} s to stop after Ctrl-C in {phase}:\n{text}{err}"
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        tag = re.search(r"segment '(demo-\d+-[0-9a-f]+)'", text)
        if tag is not None:
            assert not _demo_entries(tag.group(1)), text
        assert "cleaned up: no demo segment left" in text, text + err
