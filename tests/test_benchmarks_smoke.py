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
GROUPS = ("lock", "wake", "attach", "share", "create", "writes", "progress", "arrow", "pool", "handoff",
          "reference", "cluster", "dirs", "ring", "watch")


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


@pytest.mark.timeout(120)
def test_opt_in_gpu_group_quick(tmp_path):
    """The gpu group runs only when named; without CUDA it runs its CPU check."""
    before = _bench_entries()
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--quiet", "--only", "gpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert not _bench_entries() - before
    data = json.loads((out / "results.json").read_text())
    assert [g["name"] for g in data["groups"]] == ["gpu"]
    assert any(r["role"] == "shmarray" and r["samples"] for r in data["groups"][0]["rows"])


def test_interleave_rotates_and_drops_the_first_of_each_block():
    sys.path.insert(0, ROOT)
    try:
        from benchmarks._harness import Cleanup, Context, interleave, recording
    finally:
        sys.path.remove(ROOT)
    calls: list[tuple[str, bool]] = []

    def method(name: str):
        def one() -> float:
            calls.append((name, recording()))
            return float(len(calls))
        return one

    ctx = Context(quick=True, cleanup=Cleanup(), verbose=False)
    samples, errors = interleave(ctx, {"a": method("a"), "b": method("b")}, reps=4, warmup=1, block=3)
    assert not errors
    assert [len(v) for v in samples.values()] == [4, 4]
    timed = calls[2:]  # after the warm-up round (one call each, unrecorded)
    assert [c for c, _ in timed] == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3  # blocks; order rotates
    assert [r for _, r in timed] == [False, True, True] * 4  # the first of each block is dropped
    assert not any(r for _, r in calls[:2])


def test_every_group_measures_through_the_harness_loop():
    """One measuring loop: every group calls _harness.interleave and none has a loop of its own."""
    import ast

    gdir = os.path.join(ROOT, "benchmarks", "groups")
    for fn in sorted(os.listdir(gdir)):
        if not fn.endswith(".py") or fn.startswith("_"):
            continue
        with open(os.path.join(gdir, fn), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert "interleave" in called, f"{fn} does not measure through _harness.interleave"
        assert not defined & {"interleave", "_interleave", "_rounds"}, f"{fn} has a measuring loop of its own"
    standalone = [f for f in os.listdir(os.path.join(ROOT, "benchmarks"))
                  if f.startswith(("bench_", "gpu_")) and f.endswith(".py")]
    assert not standalone, f"standalone benchmark scripts: {standalone}"
