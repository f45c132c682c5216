"""shmarray.dask on a real cluster: a scheduler process, two worker processes on this host, and,
as root, a worker in its own mount namespace with its own /dev/shm (a second simulated host).

The cluster is started once for the module (about 10 s); every test bounds its waits.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("distributed")

from distributed import Client  # noqa: E402

import shmarray  # noqa: E402
import shmarray.dask  # noqa: E402
from conftest import new_key  # noqa: E402

import _dask_tasks as tasks  # noqa: E402

TESTS = Path(__file__).parent
TIMEOUT = 30


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True)
    return probe.returncode == 0


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.file = tmp / "scheduler.json"
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                    "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = open(tmp / "cluster.log", "wb")

    def _start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.tmp)
        self.procs.append(p)
        return p

    def scheduler(self) -> None:
        self._start([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                     "--port", "0", "--no-dashboard", "--scheduler-file", str(self.file)])
        deadline = time.monotonic() + TIMEOUT
        while not self.file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the scheduler did not start")
            time.sleep(0.1)

    def worker(self, name: str, own_dev_shm: bool = False, *extra: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(self.file),
                "--name", name, "--nthreads", "1", "--no-nanny", "--no-dashboard", "--memory-limit", "4GiB",
                "--local-directory", str(self.tmp / name), *extra]
        if own_dev_shm:
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                    "mount -t tmpfs -o size=256m tmpfs /dev/shm && exec \"$@\"", "sh", *argv]
        return self._start(argv)

    def close(self) -> None:
        # Workers first: a worker whose scheduler went away keeps trying to reconnect.
        for group in (self.procs[1:], self.procs[:1]):
            for p in group:
                p.terminate()
            for p in group:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:  # pragma: no cover
                    p.kill()
                    p.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dask")
    c = Cluster(tmp)
    try:
        c.scheduler()
        c.worker("local-0")
        c.worker("local-1")
        client = Client(scheduler_file=str(c.file), timeout=TIMEOUT)
        client.wait_for_workers(2, timeout=TIMEOUT)
        shmarray.dask.register(client)
        shmarray.dask.register(client)  # idempotent
        remote = None
        if _can_unshare():
            # Joins after register: the plugin reaches it at registration.
            c.worker("remote", own_dev_shm=True)
            client.wait_for_workers(3, timeout=TIMEOUT)
        workers = {info["name"]: addr for addr, info in client.scheduler_info()["workers"].items()}
        remote = workers.get("remote")
        yield {"client": client, "local": [workers["local-0"], workers["local-1"]], "remote": remote,
               "cluster": c}
        client.close()
    except BaseException:
        print((tmp / "cluster.log").read_text()[-5000:])
        raise
    finally:
        c.close()


@pytest.fixture
def client(cluster: dict[str, Any]) -> Client:
    return cluster["client"]


def _remote(cluster: dict[str, Any]) -> str:
    if cluster["remote"] is None:
        pytest.skip("needs root and unshare -m for a worker with its own /dev/shm")
    return str(cluster["remote"])


def _gone(key: str, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            shmarray.Segment(key).attach(shmarray.AccessMode.ReadOnly).detach()  # any payload kind
        except shmarray.NotFoundError:
            return True
        time.sleep(0.05)
    return False


# -- one host: by reference --------------------------------------------------------


def test_task_argument_goes_by_reference_and_writes_are_seen(client: Client, cluster: dict[str, Any],
                                                              key: str) -> None:
    a = shmarray.share(key, np.arange(100_000.0))
    w0, w1 = cluster["local"]
    assert client.submit(tasks.kind_and_sum, a, workers=[w0]).result(TIMEOUT) == ("SharedArray",
                                                                                   float(a.sum()))
    assert client.submit(tasks.write_first, a, 7.5, workers=[w1]).result(TIMEOUT) == "SharedArray"
    assert a[0] == 7.5
    # A view travels as a view of the same memory.
    assert client.submit(tasks.write_first, a[10:20], -1.0, workers=[w0]).result(TIMEOUT) == "SharedArray"
    assert a[10] == -1.0


@pytest.mark.parametrize("direct", [True, False])
def test_scatter_goes_by_reference(client: Client, cluster: dict[str, Any], key: str, direct: bool) -> None:
    a = shmarray.share(key, np.zeros(1000))
    w0 = cluster["local"][0]
    f = client.scatter(a, direct=direct, workers=[w0])
    assert client.submit(tasks.write_first, f, 3.0, workers=[w0]).result(TIMEOUT) == "SharedArray"
    assert a[0] == 3.0
    del f


def test_results_and_worker_to_worker_go_by_reference(client: Client, cluster: dict[str, Any],
                                                      key: str) -> None:
    w0, w1 = cluster["local"]
    made = client.submit(tasks.share_ones, key, 1000, workers=[w0])
    moved = client.submit(tasks.write_first, made, 5.0, workers=[w1])
    assert moved.result(TIMEOUT) == "SharedArray"
    got = made.result(TIMEOUT)
    assert isinstance(got, shmarray.SharedArray) and got.key == key
    assert got[0] == 5.0  # written by the other worker, in the first worker's segment
    assert client.run(tasks.attached_keys, key, workers=[w1])[w1] != []
    through_scheduler = client.gather(made, direct=False)
    assert isinstance(through_scheduler, shmarray.SharedArray) and through_scheduler[0] == 5.0
    del got, through_scheduler


def test_a_result_segment_lives_while_dask_holds_the_key(client: Client, cluster: dict[str, Any],
                                                         key: str) -> None:
    made = client.submit(tasks.share_ones, key, 1000, workers=[cluster["local"][0]])
    made.result(TIMEOUT)
    time.sleep(0.2)
    shmarray.attach(key).close()  # still there: the worker holds it as the task's result
    made.release()
    del made
    assert _gone(key), "the segment outlived the released future"


def test_sizeof_is_the_reference(client: Client, cluster: dict[str, Any], key: str) -> None:
    w0 = cluster["local"][0]
    a = shmarray.share(key, np.zeros(4 << 20))  # 32 MiB
    f = client.scatter(a, workers=[w0])
    sizes = client.run(tasks.sizeof_of_data, workers=[w0])[w0]
    assert sizes[str(f.key)] < 200
    nbytes = client.run_on_scheduler(lambda dask_scheduler, k=f.key: dask_scheduler.tasks[k].nbytes)
    assert nbytes < 200
    del f


def test_the_scheduler_attaches_nothing(client: Client, cluster: dict[str, Any], key: str) -> None:
    a = shmarray.share(key, np.arange(1000.0))
    local = cluster["local"]
    futures = [client.submit(tasks.kind_and_sum, a, pure=False, workers=local) for _ in range(4)]
    futures.append(client.submit(tasks.kind_and_sum, client.scatter(a, direct=False, workers=local),
                                 workers=local))
    assert all(f.result(TIMEOUT)[0] == "SharedArray" for f in futures)
    assert client.run_on_scheduler(tasks.mapped_segments, key) == []
    assert client.run_on_scheduler(tasks.attached_keys, key) == []
    del futures


def test_spilling_writes_the_bytes(client: Client, cluster: dict[str, Any], key: str) -> None:
    w0 = cluster["local"][0]
    kind, total, on_disk = client.run(tasks.spill_and_read, key, workers=[w0])[w0]
    assert "spill-me" in on_disk
    # The worker dropped its SharedArray when it spilled: only the bytes on disk kept the values.
    assert (kind, total) == ("ndarray", float(np.arange(1000.0).sum()))
    assert _gone(key)


def test_tables_travel_as_handles(client: Client, cluster: dict[str, Any], key: str) -> None:
    import pyarrow as pa

    w0, w1 = cluster["local"]
    t = shmarray.share_table(key, pa.table({"x": np.arange(100)}))
    handle = shmarray.table_handle(t)
    assert len(pickle.dumps(handle)) < 200
    assert client.submit(tasks.table_facts, handle, workers=[w0]).result(TIMEOUT) == (
        "TableHandle", False, 100, 4950)
    made = client.submit(tasks.share_table, key + "w", 10, workers=[w0])
    assert client.submit(tasks.table_facts, made, workers=[w1]).result(TIMEOUT) == ("TableHandle", False, 10, 45)
    del made  # the worker lets the table go once the scheduler forgets the key
    assert _gone(key + "w"), "the table outlived the released future"


def test_dask_array_from_and_to_shared(client: Client, cluster: dict[str, Any], make_key: Any) -> None:
    a = shmarray.share(make_key(), np.arange(40_000.0).reshape(200, 200))
    x = shmarray.dask.from_shared(a, chunks=50)
    assert x.numblocks == (4, 4)
    chunk = x.dask[(x.name, 1, 2)]
    chunk = getattr(chunk, "value", chunk)  # a DataNode in dask's task spec
    assert isinstance(chunk, shmarray.SharedArray) and len(pickle.dumps(chunk)) < 200
    assert float(x.sum().compute()) == float(a.sum())
    out = shmarray.dask.to_shared(x * 2 + 1, make_key(), workers=cluster["local"])
    assert isinstance(out, shmarray.SharedArray)
    np.testing.assert_array_equal(out, a * 2 + 1)
    if cluster["remote"] is not None:  # chunks written on another host: an error, never zeros
        k = make_key()
        with pytest.raises(shmarray.ShmError, match="another host"):
            shmarray.dask.to_shared(x, k, workers=[cluster["remote"]])
        assert _gone(k, 5)
    with pytest.raises(TypeError):
        shmarray.dask.from_shared(np.zeros(3))  # type: ignore[arg-type]


def test_register_with_an_asynchronous_client(cluster: dict[str, Any], key: str) -> None:
    import asyncio

    a = shmarray.share(key, np.arange(10.0))

    async def main() -> Any:
        async with Client(scheduler_file=str(cluster["cluster"].file), asynchronous=True) as c:
            await shmarray.dask.register(c)  # again: idempotent
            return await c.submit(tasks.kind_and_sum, a, workers=cluster["local"])

    assert asyncio.run(main()) == ("SharedArray", 45.0)


def test_workers_that_join_later(client: Client, cluster: dict[str, Any], key: str) -> None:
    a = shmarray.share(key, np.arange(10.0))
    before = len(client.scheduler_info()["workers"])
    late = cluster["cluster"].worker("late")
    client.wait_for_workers(before + 1, timeout=TIMEOUT)
    addr = next(w for w, i in client.scheduler_info()["workers"].items() if i["name"] == "late")
    # At once: the right values (bytes, until the scheduler has heard this worker's host) ...
    kind, total = client.submit(tasks.kind_and_sum, a, workers=[addr], pure=False).result(TIMEOUT)
    assert total == 45.0 and kind in ("SharedArray", "ndarray")
    # ... and references soon after.
    deadline = time.monotonic() + TIMEOUT
    while client.submit(tasks.kind_and_sum, a, workers=[addr], pure=False).result(TIMEOUT)[0] != "SharedArray":
        assert time.monotonic() < deadline, "a late worker never got references"
        time.sleep(0.1)
    # With --preload shmarray.dask, its first connection says its host: references from the first task.
    preloaded = cluster["cluster"].worker("late-preload", False, "--preload", "shmarray.dask")
    client.wait_for_workers(before + 2, timeout=TIMEOUT)
    addr2 = next(w for w, i in client.scheduler_info()["workers"].items() if i["name"] == "late-preload")
    assert client.submit(tasks.kind_and_sum, a, workers=[addr2], pure=False).result(TIMEOUT) == (
        "SharedArray", 45.0)
    for p in (late, preloaded):
        p.terminate()
        p.wait(TIMEOUT)


# -- another host: by value -------------------------------------------------------


def test_another_host_gets_values(client: Client, cluster: dict[str, Any], key: str) -> None:
    remote = _remote(cluster)
    w0 = cluster["local"][0]
    assert client.run(tasks.host, workers=[remote])[remote] != tasks.host()
    remote_pid = client.run(tasks.pid, workers=[remote])[remote]
    a = shmarray.share(key, np.arange(10_000.0))
    want = float(a.sum())
    assert client.submit(tasks.kind_and_sum, a, workers=[remote]).result(TIMEOUT) == ("ndarray", want)
    for direct in (True, False):
        f = client.scatter(a, direct=direct, workers=[remote])
        assert client.submit(tasks.kind_and_sum, f, workers=[remote]).result(TIMEOUT) == ("ndarray", want)
        del f
    # Worker to worker, both ways, and a result from there.
    here = client.submit(tasks.share_ones, key + "h", 100, workers=[w0])
    assert client.submit(tasks.kind_and_sum, here, workers=[remote]).result(TIMEOUT) == ("ndarray", 100.0)
    there = client.submit(tasks.share_ones, key + "t", 100, workers=[remote])
    assert client.submit(tasks.kind_and_sum, there, workers=[w0]).result(TIMEOUT) == ("ndarray", 100.0)
    got = there.result(TIMEOUT)
    assert type(got) is np.ndarray and got.sum() == 100.0
    # A key that exists on both hosts is never the wrong one.
    same = client.submit(tasks.share_ones, key, 5, workers=[remote]).result(TIMEOUT)
    assert type(same) is np.ndarray and same.sum() == 5.0
    assert client.submit(tasks.kind_and_sum, a, workers=[remote]).result(TIMEOUT) == ("ndarray", want)
    assert client.run(tasks.pid, workers=[remote])[remote] == remote_pid
    del here, there
    assert _gone(key + "h")


def test_tables_to_another_host_go_by_value(client: Client, cluster: dict[str, Any], key: str) -> None:
    import pyarrow as pa

    remote = _remote(cluster)
    t = shmarray.share_table(key, pa.table({"x": np.arange(100)}))
    handle = shmarray.table_handle(key)
    assert shmarray.attach_table(handle).equals(t)
    assert client.submit(tasks.table_facts, handle, workers=[remote]).result(TIMEOUT) == (
        "TableHandle", True, 100, 4950)


def test_a_reference_nobody_can_read_fails_the_task_not_the_worker(client: Client, cluster: dict[str, Any],
                                                                   key: str) -> None:
    w0 = cluster["local"][0]
    pid = client.run(tasks.pid, workers=[w0])[w0]
    a = shmarray.share(key, np.arange(10.0))
    forged = tasks.Forged(a, host=12345)  # a reference made on a host that no process here is on
    with pytest.raises(shmarray.ShmError, match="nobody on the way could read its bytes"):
        client.submit(tasks.kind_and_sum, forged, workers=[w0]).result(TIMEOUT)
    assert client.run(tasks.pid, workers=[w0])[w0] == pid
    assert client.submit(tasks.kind_and_sum, a, workers=[w0]).result(TIMEOUT) == ("SharedArray", 45.0)


def test_nothing_is_left_in_dev_shm(client: Client, cluster: dict[str, Any]) -> None:
    k = new_key()
    made = client.submit(tasks.share_ones, k, 10, workers=[cluster["local"][1]])
    assert client.submit(tasks.kind_and_sum, made, workers=cluster["local"]).result(TIMEOUT) == (
        "SharedArray", 10.0)
    del made
    assert _gone(k)


# -- without register: by reference, or a loud error naming register -----------------------


def _unregistered(*args: str) -> dict[str, Any]:
    """Run tests/_dask_unregistered.py in a fresh process (this one has run register for good)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(TESTS / "_dask_unregistered.py"), *args], env=env, cwd=TESTS,
                         capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-5000:]
    return dict(json.loads(lines[-1][len("RESULT "):]))


@pytest.mark.timeout(150)
def test_without_register_writes_are_seen_on_one_host(key: str) -> None:
    got = _unregistered(key, "one-host")  # a LocalCluster of spawned worker processes
    assert got["start-method"] == "spawn"
    for way in ("submit", "scatter-direct", "scatter", "map"):
        assert got[way] == [["ok", "SharedArray"], 11.0], (way, got[way])  # the task's write, at the creator
    assert got["map-view"] == 12.0
    # The same contents twice run twice: the token of a SharedArray never repeats.
    assert got["same-contents-again"] == [["SharedArray", "SharedArray"], 1.0]
    # A task's result is the worker's segment: another worker's write and the client's are seen.
    assert got["result"] == ["SharedArray", 11.0, 13.0, "SharedArray"]
    assert all(size < 200 for size in got["sizeof"].values()), got["sizeof"]


@pytest.mark.timeout(150)
def test_without_register_another_host_fails_loudly(tmp_path: Path, key: str) -> None:
    if not _can_unshare():
        pytest.skip("needs root and unshare -m for a worker with its own /dev/shm")
    c = Cluster(tmp_path)
    try:
        c.scheduler()
        c.worker("local-0")
        c.worker("remote", own_dev_shm=True)
        got = _unregistered(key, "hosts", str(c.file))
    except BaseException:
        print((tmp_path / "cluster.log").read_text()[-5000:])
        raise
    finally:
        c.close()
    hint = "shmarray.dask.register(client)"
    # Never a copy that the task writes into: the task fails, naming register, and the creator is unchanged.
    for way in ("submit", "scatter-direct", "scatter", "map"):
        (outcome, *error), seen = got[way]
        assert outcome == "error" and error[0] == "ShmError" and hint in error[1], (way, got[way])
        assert seen == 0.0
    for case in ("read", "result-to-worker", "result-to-client"):
        assert got[case][:2] == ["error", "ShmError"] and hint in got[case][2], (case, got[case])
    # No worker died: the one on this host still works by reference.
    assert got["local-after"] == ["ok", "SharedArray"] and got["creator-after"] == 5.0


@pytest.mark.parametrize("order", ["import shmarray, distributed", "import distributed, shmarray"])
def test_the_hooks_are_installed_whichever_is_imported_first(order: str) -> None:
    code = f"""{order}
import sys
from dask.sizeof import sizeof
from dask.tokenize import normalize_token
serialize = sys.modules["distributed.protocol.serialize"]
print(serialize.dask_serialize.dispatch(shmarray.SharedArray).__module__,
      serialize.dask_deserialize.dispatch(shmarray.SharedArray).__module__,
      sizeof.dispatch(shmarray.SharedArray).__module__, normalize_token.dispatch(shmarray.SharedArray).__module__,
      serialize.dask_serialize.dispatch(shmarray.QtArray).__module__,  # Qt's arrays go by value, on purpose
      "shmarray.dask" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["shmarray._daskhook"] * 4 + ["distributed.protocol.numpy", "False"], out.stderr
