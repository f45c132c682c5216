"""``python -m benchmarks``: measure shmarray against its peers, write tables and plots.

    python -m benchmarks                 # the full run (about 15-25 minutes on 2 cores)
    python -m benchmarks --quick         # a smoke run, under a minute
    python -m benchmarks --only lock,attach --out /tmp/bench
    python -m benchmarks --only gpu      # opt-in: host-to-device and worker-to-GPU (CUDA; a CPU check without)

Every figure comes from one loop, ``_harness.interleave``: methods in
rotating order, each round a block of calls per method with the first
dropped, after unrecorded warm-up rounds. There are no standalone scripts
(the data-loader pipeline, once bench_ring.py, is the ``ring`` group).

Exit status: 0 when every group ran, every shmarray row measured and /dev/shm
was left as found; 1 otherwise (the files are written in every case).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
from typing import Any

GROUPS = ("lock", "wake", "attach", "share", "create", "writes", "progress", "arrow", "pool", "handoff",
          "reference", "cluster", "dirs", "ring", "watch")
OPT_IN = ("gpu",)  # run only when named with --only
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure shmarray against the tools users would pick instead; "
        "write results.md, results.json and one PNG per group.",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run (fewer sizes and repeats), under 60 s")
    p.add_argument("--only", action="append", metavar="GROUP",
                   help=f"run only these groups (repeatable or comma-separated): {', '.join(GROUPS)}; "
                   f"opt-in, only when named: {', '.join(OPT_IN)}")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="where results go (default: benchmarks/results/)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    chosen: list[str] = []
    for item in args.only or []:
        for g in item.split(","):
            g = g.strip()
            if not g:
                continue
            if g not in GROUPS + OPT_IN:
                p.error(f"unknown group {g!r}; choose from {', '.join(GROUPS + OPT_IN)}")
            if g not in chosen:
                chosen.append(g)
    args.groups = [g for g in GROUPS + OPT_IN if g in chosen] if chosen else list(GROUPS)
    return args


def _on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM into the same path as Ctrl-C, so the cleanup in finally runs.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen groups; returns the exit status."""
    args = _parse(argv)
    from . import _report
    from ._env import describe, render
    from ._harness import Cleanup, Context, GroupResult

    signal.signal(signal.SIGTERM, _on_sigterm)
    env = describe(args.quick, args.groups)
    print(render(env), flush=True)
    cleanup = Cleanup()
    ctx = Context(quick=args.quick, cleanup=cleanup, verbose=not args.quiet)
    results: list[GroupResult] = []
    failed: list[str] = []
    interrupted = False
    t_all = time.perf_counter()
    try:
        for name in args.groups:
            ctx.log(f"[{name}]")
            t0 = time.perf_counter()
            try:
                mod = importlib.import_module(f"benchmarks.groups.{name}")
                res = mod.run(ctx)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one broken group must not lose the others
                import traceback

                traceback.print_exc()
                res = GroupResult(name, "failed")
                res.notes.append(f"The group failed: {type(e).__name__}: {e}")
                failed.append(f"{name}: {type(e).__name__}: {e}")
            finally:
                removed = cleanup.sweep()
                if removed:
                    ctx.log(f"  swept {len(removed)} leftover /dev/shm entries: {removed}")
            res.seconds = time.perf_counter() - t0
            for r in res.rows:
                if r.role == "shmarray" and not r.samples:
                    failed.append(f"{name}: {r.method} ({r.variant or r.size}): {r.error or 'no samples'}")
            results.append(res)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: cleaning up; partial results follow", file=sys.stderr)
    finally:
        cleanup.sweep()
    left = cleanup.leftovers()
    if left:
        failed.append(f"/dev/shm still holds entries of this run: {left}")
    env["conditions"]["loadavg_end"] = list(os.getloadavg())
    env["conditions"]["seconds"] = round(time.perf_counter() - t_all, 1)
    if interrupted:
        env["conditions"]["interrupted"] = True
    written = _report.write_all(args.out, env, results)
    print()
    print(_report.markdown(env, results), flush=True)
    print("wrote: " + ", ".join(written))
    for f in failed:
        print(f"FAILED: {f}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
