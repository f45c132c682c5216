"""The benchmarks' quick mode runs end to end: every group, the files, a clean /dev/shm.

It asserts no timing (performance claims live in benchmarks/ results, never
in tests); it checks that the harness, every group and the report still work
against the current code, and that a run leaves /dev/shm as it found it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ("lock", "wake", "attach", "share", "arrow", "pool", "handoff", "reference", "cluster", "dirs")


def _bench_entries() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if "shmbench-" in n}


@pytest.mark.timeout(180)
def test_quick_run_completes_and_writes_results(tmp_path):
    before = _bench_entries()
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--quiet", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert not _bench_entries() - before, "the benchmark run left entries in /dev/shm"

    data = json.loads((out / "results.json").read_text())
    assert [g["name"] for g in data["groups"]] == list(GROUPS)
    env = data["env"]
    assert env["conditions"]["mode"] == "quick"
    for field in ("cpu", "cores", "ram_bytes", "dev_shm_bytes", "kernel"):
        assert env["machine"][field], field
    assert env["versions"]["numpy"] and env["versions"]["pyarrow"]
    assert len(env["conditions"]["loadavg_start"]) == 3
    for g in data["groups"]:
        ours = [r for r in g["rows"] if r["role"] == "shmarray"]
        assert ours, f"group {g['name']} measured no shmarray row"
        for r in g["rows"]:
            if r["error"]:
                continue
            st = r["stats"]
            assert st["n"] == len(r["samples"]) >= 3
            assert st["min"] <= st["q1"] <= st["median"] <= st["q3"] <= st["max"]
        assert g["headlines"], f"group {g['name']} has no headline ratio"

    md = (out / "results.md").read_text()
    for g in GROUPS:
        assert f"## {g}:" in md
    assert "load average" in md and "quick run" in md
    if importlib.util.find_spec("matplotlib") is not None:
        for g in GROUPS:
            png = out / f"{g}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_only_and_unknown_group(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "lock,nosuch", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2
    assert "unknown group 'nosuch'" in bad.stderr
    assert not (tmp_path / "results.json").exists()
