"""Dask without ``shmarray.dask.register``, as a new user would run it; tests/test_dask.py runs it in a
fresh process (its own ``register`` changes the test process for good).

``python _dask_unregistered.py KEY one-host``: a LocalCluster of spawned worker processes.
``python _dask_unregistered.py KEY hosts SCHEDULER_FILE``: a cluster whose workers are named
``local-0`` (this host) and ``remote`` (its own /dev/shm: another host).
Prints one JSON object: what each transfer gave and what the creator saw.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import dask
import numpy as np
from distributed import Client, LocalCluster

import shmarray

import _dask_tasks as tasks

TIMEOUT = 30


def _outcome(run: Callable[[], Any]) -> list[Any]:
    """["ok", result] or ["error", type, message]: what the user sees."""
    try:
        return ["ok", run()]
    except Exception as e:  # noqa: BLE001 - reported to the test
        return ["error", type(e).__name__, str(e)]


def _writes(client: Client, key: str, workers: list[str] | None) -> dict[str, Any]:
    """Each way of giving a SharedArray to a task: [what the task got, what the creator then sees]."""
    ways: dict[str, Callable[[Any], Any]] = {
        "submit": lambda a: client.submit(tasks.write_first, a, 11.0, workers=workers),
        "scatter-direct": lambda a: client.submit(
            tasks.write_first, client.scatter(a, direct=True, workers=workers), 11.0, workers=workers),
        "scatter": lambda a: client.submit(
            tasks.write_first, client.scatter(a, direct=False, workers=workers), 11.0, workers=workers),
        "map": lambda a: client.map(tasks.write_first, [a, a[5:]], [11.0, 12.0], workers=workers)[0],
    }
    out: dict[str, Any] = {}
    for name, way in ways.items():
        a = shmarray.share(f"{key}-{name}", np.zeros(10))
        got = _outcome(lambda a=a, way=way: way(a).result(TIMEOUT))  # type: ignore[misc]
        out[name] = [got, float(a[0])]
    return out


def one_host(key: str) -> dict[str, Any]:
    dask.config.set({"distributed.worker.multiprocessing-method": "spawn"})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      worker_dashboard_address=None) as cluster, Client(cluster) as client:
        w0, w1 = list(client.scheduler_info()["workers"])
        out = _writes(client, key, None)
        out["map-view"] = None
        a = shmarray.share(f"{key}-view", np.zeros(10))
        client.map(tasks.write_first, [a[5:]], [12.0])[0].result(TIMEOUT)
        out["map-view"] = float(a[5])
        # The same contents twice: two tasks, never the first one's result (the token never repeats).
        twice = [client.submit(tasks.write_first, a, v).result(TIMEOUT) for v in (1.0, 1.0)]
        a[0] = 0.0
        client.submit(tasks.write_first, a, 1.0).result(TIMEOUT)
        out["same-contents-again"] = [twice, float(a[0])]
        del a
        # A task's result: made by one worker, written by a task on the other, seen by the client.
        made = client.submit(tasks.share_ones, f"{key}-result", 10, workers=[w0])
        wrote = client.submit(tasks.write_first, made, 11.0, workers=[w1])
        wrote.result(TIMEOUT)
        got = made.result(TIMEOUT)
        got[1] = 13.0  # and the client's write is seen by the workers
        out["result"] = [type(got).__name__, float(got[0]),
                         client.submit(tasks.read_at, made, 1, workers=[w1]).result(TIMEOUT),
                         type(client.gather(made, direct=False)).__name__]
        out["sizeof"] = client.run(tasks.sizeof_of_data, workers=[w0])[w0]
        out["start-method"] = client.run(tasks.start_method, workers=[w0])[w0]
        del got, made, wrote
    return out


def hosts(key: str, scheduler_file: str) -> dict[str, Any]:
    with Client(scheduler_file=scheduler_file, timeout=TIMEOUT) as client:
        client.wait_for_workers(2, timeout=TIMEOUT)
        names = {info["name"]: addr for addr, info in client.scheduler_info()["workers"].items()}
        local, remote = names["local-0"], names["remote"]
        out = _writes(client, key, [remote])
        a = shmarray.share(f"{key}-read", np.arange(10.0))
        out["read"] = _outcome(lambda: client.submit(tasks.kind_and_sum, a, workers=[remote]).result(TIMEOUT))
        # Results made on the other host: for a worker here, and for the client.
        there = client.submit(tasks.share_ones, f"{key}-there", 10, workers=[remote])
        out["result-to-worker"] = _outcome(
            lambda: client.submit(tasks.kind_and_sum, there, workers=[local]).result(TIMEOUT))
        out["result-to-client"] = _outcome(lambda: float(np.asarray(there.result(TIMEOUT)).sum()))
        # The workers are still up, and the one here still works by reference.
        out["local-after"] = _outcome(lambda: client.submit(tasks.write_first, a, 5.0, workers=[local])
                                      .result(TIMEOUT))
        out["creator-after"] = float(a[0])
    return out


if __name__ == "__main__":
    key, mode = sys.argv[1], sys.argv[2]
    result = one_host(key) if mode == "one-host" else hosts(key, sys.argv[3])
    print("RESULT " + json.dumps(result))
