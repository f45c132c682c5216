"""Every notebook in notebooks/ runs top to bottom on a fresh kernel of this environment and cleans up.

Each notebook is one test: nbclient executes it on a kernelspec whose argv
is this ``sys.executable`` (tests/_notebooks.py), and a cell that raises
fails the test with that cell's traceback. Before the run a persistent
segment is planted under the notebook's key prefix, as an interrupted
earlier run would leave it; after the run nothing under the prefix may be
left in /dev/shm. No timing is asserted.
"""

from __future__ import annotations

import gc
import os
import secrets
from pathlib import Path
from typing import Iterator

import pytest

import shmarray

from _notebooks import KEY_PREFIXES, NOTEBOOKS, exclusive, execute, notebook_paths, prepare_environment

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The private kernelspec and IPython folder, selected through the environment for this module."""
    env = prepare_environment(tmp_path_factory.mktemp("jupyter"))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def notebooks_to_myself() -> Iterator[None]:
    """Take turns with other runs on this machine (each run's keys are its own; this spares the CPU)."""
    with exclusive():
        yield


def _entries(prefix: str) -> list[str | None]:
    return [e.key for e in shmarray.ls(f"{prefix}*")]


def test_every_notebook_is_listed():
    names = [p.name for p in notebook_paths()]
    assert names == sorted(KEY_PREFIXES), "add the new notebook to KEY_PREFIXES in tests/_notebooks.py"


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.name)
def test_committed_notebook_is_stripped(path: Path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; run `python tests/_notebooks.py --strip`"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.name)
def test_notebook_runs_and_cleans_up(path: Path, kernel_env, notebooks_to_myself, monkeypatch):
    # Keys of this run only (the kernel inherits the environment): a user's own copy of the
    # notebook, or another test run, uses other names and is never touched.
    prefix = f"t-{os.getpid()}-{secrets.token_hex(6)}-{KEY_PREFIXES[path.name]}"
    monkeypatch.setenv("SHMARRAY_NOTEBOOK_PREFIX", prefix)
    leftover = f"{prefix}leftover-of-an-interrupted-run"
    shmarray.Segment(leftover).create(4096, persistent=True).detach()
    # What a user's own copy of the notebook has open (the default prefix): left alone.
    users = f"{KEY_PREFIXES[path.name]}users-own-{os.getpid()}-{secrets.token_hex(6)}"
    shmarray.Segment(users).create(4096, persistent=True).detach()
    try:
        try:
            nb, seconds = execute(path, timeout=180)
        except nbclient.exceptions.CellExecutionError as e:
            pytest.fail(f"{path.name}: a cell raised:\n{e}", pytrace=False)
        gc.collect()
        assert _entries(prefix) == [], f"{path.name} left segments behind"
        assert shmarray.segment_info(users).persistent, "the notebook removed a segment that is not its own"
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors
        print(f"{path.name}: {seconds:.1f} s")
    finally:
        for key in _entries(prefix):
            shmarray.unlink(key)  # only after a failure: the notebook removes its own
        shmarray.unlink(users)


def test_notebooks_folder_has_its_readme():
    text = (NOTEBOOKS / "README.md").read_text()
    for path in notebook_paths():
        assert path.name in text, f"notebooks/README.md does not mention {path.name}"
