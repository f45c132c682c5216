"""Execute the notebooks in notebooks/ as CI does: nbclient, on a kernel of this very Python.

``tests/test_notebooks.py`` runs each notebook through :func:`execute`. From a
shell::

    python tests/_notebooks.py                 # run them all, print each one's time
    python tests/_notebooks.py --out DIR       # also write the executed copies to DIR
    python tests/_notebooks.py --strip         # strip outputs from the committed files

The kernel is a kernelspec written to a private folder whose ``argv`` is
``sys.executable``: whichever ``python3`` kernels the user has installed, the
notebooks run on the environment that runs the tests, with its shmarray.
IPython's profile folder is private too, so no user startup file runs.
The committed notebooks carry no outputs (``strip``): they are run, not read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KERNEL_NAME = "shmarray-tests"
# Every key a notebook makes starts with its prefix (SHMARRAY_NOTEBOOK_PREFIX
# when set: the tests give each run its own, ``t-<pid>-<token>-`` before
# these); its first cell removes whatever an interrupted earlier run left under it.
KEY_PREFIXES = {
    "01-quickstart.ipynb": "quickstart-",
    "02-two-kernels.ipynb": "twokernels-",
    "03-pipeline.ipynb": "pipeline-",
}
# Two test runs on one machine take turns (for the CPU: their keys differ).
LOCK_PATH = Path(tempfile.gettempdir()) / "shmarray-notebooks.lock"


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Hold LOCK_PATH: one notebook run at a time on this machine (their keys are fixed names)."""
    import fcntl

    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def running_elsewhere() -> bool:
    """True while another process executes the notebooks (holds LOCK_PATH)."""
    import fcntl

    try:
        fd = os.open(LOCK_PATH, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the probe's own lock
    return False


def is_notebook_entry(name: str) -> bool:
    """True for a /dev/shm entry of a notebook's key."""
    return any(name.startswith(f"shmarray_{p}") for p in KEY_PREFIXES.values())


def notebook_paths() -> list[Path]:
    """Every notebook in notebooks/, in name order."""
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def prepare_environment(base: Path) -> dict[str, str]:
    """Write the kernelspec under *base* and return the environment variables that select it."""
    spec_dir = base / "share" / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    (base / "ipython").mkdir(exist_ok=True)
    (base / "runtime").mkdir(exist_ok=True)
    return {
        "JUPYTER_PATH": str(base / "share" / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "IPYTHONDIR": str(base / "ipython"),
        # ipykernel's debugger warns on stderr about frozen modules otherwise.
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }


def execute(path: Path, *, timeout: int = 120) -> tuple[Any, float]:
    """Run *path* top to bottom in a fresh kernel (cwd: notebooks/); (executed notebook, seconds).

    Raises nbclient's CellExecutionError when a cell raises. The kernelspec
    must be selectable (prepare_environment's variables set), and the caller
    should hold exclusive().
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name=KERNEL_NAME, timeout=timeout, startup_timeout=60,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
        record_timing=False, store_widget_state=False,
    )
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start


def strip(path: Path) -> bool:
    """Remove outputs and execution counts from *path*; True when the file changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata = {}
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after)
    return after != before


def main(argv: list[str] | None = None) -> int:
    """Run (or strip) the notebooks; see the module docs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the executed notebooks here")
    p.add_argument("--strip", action="store_true", help="strip the committed notebooks' outputs and exit")
    p.add_argument("names", nargs="*", help="notebook names (default: all)")
    args = p.parse_args(argv)
    paths = [NOTEBOOKS / n for n in args.names] or notebook_paths()
    if args.strip:
        for path in paths:
            print(f"{path.name}: {'stripped' if strip(path) else 'clean'}")
        return 0
    import nbformat

    with tempfile.TemporaryDirectory(prefix="shmarray-nb-") as tmp, exclusive():
        os.environ.update(prepare_environment(Path(tmp)))
        for path in paths:
            nb, seconds = execute(path)
            print(f"{path.name}: {seconds:.1f} s")
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, args.out / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
