"""Pin (page-lock) a segment's mapping for CUDA with ``cudaHostRegister``.

A registered host range is copied to and from the GPU by DMA at pinned
speed, with no staging copy into a separate pinned buffer. The runtime is
reached through whichever of these is installed and sees a GPU, in order:
torch (``torch.cuda.cudart()``), cupy (``cupy.cuda.runtime``), or the CUDA
runtime library itself through ctypes (``libcudart.so``). None of them is
a dependency: without a GPU, :class:`CudaUnavailableError` says what was tried.

A :class:`PinnedRegion` keeps a NumPy view of the mapping, so the mapping
cannot be unmapped while it is registered; ``release()`` unregisters it.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ._errors import SharedMemoryError, ShmError

__all__ = ["PinError", "CudaUnavailableError", "PinnedRegion", "pin_mapping", "backend_name"]

# cudaHostRegister flags (cuda_runtime_api.h).
_PORTABLE = 0x01  # pinned for every CUDA context, not only the current one
_READ_ONLY = 0x08  # needed to register a read-only mapping (CUDA >= 11.1)
_CUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")


class PinError(ShmError, RuntimeError):
    """pin() failed: CUDA refused to register the mapping."""

    code = SharedMemoryError.UnknownError


class CudaUnavailableError(PinError):
    """pin() needs CUDA: no GPU, or no runtime reachable through torch, cupy or libcudart."""


class _Runtime:
    """cudaHostRegister / cudaHostUnregister of one way to reach the CUDA runtime."""

    name = "?"

    def register(self, ptr: int, size: int, flags: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def unregister(self, ptr: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class _Torch(_Runtime):
    name = "torch"

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise OSError(f"torch {torch.__version__} sees no CUDA device")
        self._rt = torch.cuda.cudart()  # type: ignore[no-untyped-call]

    def register(self, ptr: int, size: int, flags: int) -> None:
        err = int(self._rt.cudaHostRegister(ptr, size, flags))
        if err:
            raise OSError(f"cudaHostRegister failed with cudaError {err}")

    def unregister(self, ptr: int) -> None:
        err = int(self._rt.cudaHostUnregister(ptr))
        if err:
            raise OSError(f"cudaHostUnregister failed with cudaError {err}")


class _Cupy(_Runtime):
    name = "cupy"

    def __init__(self) -> None:
        import cupy

        self._rt = cupy.cuda.runtime
        if self._rt.getDeviceCount() < 1:
            raise OSError("cupy sees no CUDA device")

    def register(self, ptr: int, size: int, flags: int) -> None:
        try:
            self._rt.hostRegister(ptr, size, flags)
        except Exception as e:  # cupy's CUDARuntimeError
            raise OSError(f"cudaHostRegister: {e}") from e

    def unregister(self, ptr: int) -> None:
        try:
            self._rt.hostUnregister(ptr)
        except Exception as e:  # cupy's CUDARuntimeError
            raise OSError(f"cudaHostUnregister: {e}") from e


class _Ctypes(_Runtime):
    name = "libcudart"

    def __init__(self) -> None:
        import ctypes.util  # here, not at import: it pulls in subprocess and shutil (benchmarks/results/notes.md)

        found = ctypes.util.find_library("cudart")
        names = ((found,) if found else ()) + _CUDART_NAMES
        lib = None
        for n in names:
            try:
                lib = ctypes.CDLL(n)
                break
            except OSError:
                continue
        if lib is None:
            raise OSError(f"no CUDA runtime library ({', '.join(_CUDART_NAMES)})")
        lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        count = ctypes.c_int(0)
        err = lib.cudaGetDeviceCount(ctypes.byref(count))
        if err or count.value < 1:
            raise OSError(f"libcudart sees no CUDA device (cudaGetDeviceCount: {self._text(lib, err)})")
        self._lib = lib

    @staticmethod
    def _text(lib: Any, err: int) -> str:
        raw = lib.cudaGetErrorString(err)
        return raw.decode(errors="replace") if raw else f"cudaError {err}"

    def register(self, ptr: int, size: int, flags: int) -> None:
        err = self._lib.cudaHostRegister(ptr, size, flags)
        if err:
            raise OSError(f"cudaHostRegister: {self._text(self._lib, err)}")

    def unregister(self, ptr: int) -> None:
        err = self._lib.cudaHostUnregister(ptr)
        if err:
            raise OSError(f"cudaHostUnregister: {self._text(self._lib, err)}")


_RUNTIMES: tuple[type[_Runtime], ...] = (_Torch, _Cupy, _Ctypes)
_found: _Runtime | None = None
_found_lock = threading.Lock()


def _runtime(key: str | None) -> _Runtime:
    """The first runtime that works (cached once found); CudaUnavailableError naming each failure."""
    global _found
    with _found_lock:
        if _found is not None:
            return _found
        why = []
        for cls in _RUNTIMES:
            try:
                _found = cls()
                return _found
            except ImportError:
                why.append(f"{cls.name}: not installed")
            except Exception as e:  # noqa: BLE001 - torch raises AssertionError, cupy its own errors
                why.append(f"{cls.name}: {e}")
        raise CudaUnavailableError(
            f"pin(): cannot register segment {key!r} with CUDA ({'; '.join(why)}); pinning needs an NVIDIA "
            "GPU and torch with CUDA, cupy, or the CUDA runtime library", key)


def backend_name() -> str | None:
    """The runtime pin() uses ('torch', 'cupy', 'libcudart'), None when CUDA is unavailable."""
    try:
        return _runtime(None).name
    except CudaUnavailableError:
        return None


class PinnedRegion:
    """One registered mapping; holds a view of it so it stays mapped until ``release()``."""

    __slots__ = ("_view", "_runtime", "ptr", "size")

    def __init__(self, view: np.ndarray[Any, Any], runtime: _Runtime) -> None:
        self._view: np.ndarray[Any, Any] | None = view
        self._runtime = runtime
        self.ptr = int(view.ctypes.data)
        self.size = int(view.nbytes)

    def release(self) -> None:
        """Unregister (once); the view is dropped afterwards, never before."""
        if self._view is None:
            return
        try:
            self._runtime.unregister(self.ptr)
        finally:
            self._view = None

    def forget(self) -> None:
        """In a forked child: the registration is the parent's; drop the view, call nothing."""
        self._view = None


def pin_mapping(mapping: Any, *, readonly: bool, key: str | None) -> PinnedRegion:
    """Register the whole of *mapping* (an mmap) with CUDA.

    Raises CudaUnavailableError without CUDA, PinError when CUDA refuses.
    """
    rt = _runtime(key)
    view = np.frombuffer(mapping, dtype=np.uint8)
    flags = _PORTABLE | (_READ_ONLY if readonly else 0)
    try:
        rt.register(int(view.ctypes.data), int(view.nbytes), flags)
    except OSError as e:
        raise PinError(f"pin(): registering segment {key!r} ({view.nbytes} bytes) with CUDA "
                                   f"through {rt.name} failed: {e}", key) from e
    return PinnedRegion(view, rt)


PinError.__module__ = "shmarray"
CudaUnavailableError.__module__ = "shmarray"
