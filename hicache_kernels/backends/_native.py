"""The CUDA library (``libhicache_cuda.so``, built from ``csrc/``) through ctypes.

Shared by the ``cuda`` and ``copy_engine`` backends. The library has a plain C
surface (``csrc/src/capi.cpp``, structs in ``csrc/include/hicache/abi.h``,
mirrored here), so no build is tied to one PyTorch ABI. It is found at
``HICACHE_CUDA_LIB`` if set, else next to this package's ``__init__.py``.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["LIB_NAME", "library", "library_path", "device_info", "check", "CopyDesc", "MemcpyDesc",
           "Side", "KERNEL_REGISTERS", "KERNEL_BULK", "DeviceInfo", "build_info", "bind_copy"]

LIB_NAME = "libhicache_cuda.so"
ABI_VERSION = 3
KERNEL_REGISTERS = 0
KERNEL_BULK = 1
_PACKAGE = Path(__file__).resolve().parent.parent


class Side(ctypes.Structure):
    _fields_ = [("bases", ctypes.c_void_p), ("indices", ctypes.c_void_p),
                ("page_size", ctypes.c_int64), ("page_stride", ctypes.c_int64),
                ("slot_stride", ctypes.c_int64), ("chunk_stride", ctypes.c_int64)]


class CopyDesc(ctypes.Structure):
    _fields_ = [("src", Side), ("dst", Side), ("n_items", ctypes.c_int64),
                ("n_planes", ctypes.c_int64), ("n_chunks", ctypes.c_int64),
                ("chunk_bytes", ctypes.c_int64), ("alignment", ctypes.c_int64),
                ("bases_known", ctypes.c_int32), ("kernel", ctypes.c_int32),
                ("max_blocks", ctypes.c_int32), ("warps_per_block", ctypes.c_int32),
                ("device", ctypes.c_int32), ("stage_bytes", ctypes.c_int32),
                ("stages", ctypes.c_int32), ("smem_cap", ctypes.c_int32),
                ("stream", ctypes.c_void_p)]


class MemcpyDesc(ctypes.Structure):
    _fields_ = [("dsts", ctypes.c_void_p), ("srcs", ctypes.c_void_p), ("sizes", ctypes.c_void_p),
                ("count", ctypes.c_int64), ("max_per_call", ctypes.c_int64),
                ("bytes_per_stream", ctypes.c_int64), ("max_streams", ctypes.c_int32),
                ("device", ctypes.c_int32), ("force_per_run", ctypes.c_int32),
                ("prefer_overlap", ctypes.c_int32), ("stream", ctypes.c_void_p),
                ("used_streams", ctypes.c_int32), ("used_batch", ctypes.c_int32)]


def library_path() -> Path:
    override = os.environ.get("HICACHE_CUDA_LIB")
    return Path(override) if override else _PACKAGE / LIB_NAME


def _source_digest() -> str | None:
    """csrc/'s digest in a source checkout (None in an installed wheel)."""
    build_py = _PACKAGE.parent / "csrc" / "build.py"
    if not build_py.is_file():
        return None
    spec = importlib.util.spec_from_file_location("hicache_native_build", build_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_hash()


@functools.lru_cache(maxsize=None)
def library() -> tuple[ctypes.CDLL | None, str]:
    """``(lib, "")``, or ``(None, why it cannot be used)``."""
    path = library_path()
    if not path.is_file():
        return None, _missing_reason(path)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"the CUDA library at {path} does not load: {exc}"
    lib.hck_abi_version.restype = ctypes.c_int
    if lib.hck_abi_version() != ABI_VERSION:
        return None, (f"the CUDA library at {path} has ABI version {lib.hck_abi_version()}, "
                      f"this package expects {ABI_VERSION}: rebuild it")
    sizes = [ctypes.c_int64() for _ in range(3)]
    lib.hck_struct_sizes(*[ctypes.byref(s) for s in sizes])
    want = (ctypes.sizeof(Side), ctypes.sizeof(CopyDesc), ctypes.sizeof(MemcpyDesc))
    if tuple(s.value for s in sizes) != want:
        return None, f"the CUDA library at {path} was built from other headers (struct sizes differ): rebuild it"
    bind_copy(lib)
    for name in ("hck_memcpy_runs", "hck_probe", "hck_device_count", "hck_batch_refusal"):
        getattr(lib, name).restype = ctypes.c_int
    lib.hck_memcpy_runs.argtypes = [ctypes.POINTER(MemcpyDesc)]
    lib.hck_probe.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int32)]
    lib.hck_device_count.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.hck_batch_refusal.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int64]
    digest = _source_digest()
    built_from = build_info(lib).get("source")
    if digest is not None and built_from not in (None, "unknown", digest):
        return None, (f"the CUDA library at {path} was built from other sources than csrc/ "
                      f"({built_from} vs {digest}): rebuild it (pip install -e . or python csrc/build.py)")
    return lib, ""


def bind_copy(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the copy functions' C signatures on ``lib`` (this library, or a build
    of the same surface for the host: tests' twin)."""
    for name in ("hck_last_error", "hck_build_info"):
        getattr(lib, name).restype = ctypes.c_char_p
    lib.hck_copy_items.restype = ctypes.c_int
    lib.hck_copy_items.argtypes = [ctypes.POINTER(CopyDesc)]
    # descs, n_descs, src_indices, dst_indices, n_items, stream, events (pointers as ints)
    lib.hck_copy_prepared.restype = ctypes.c_int
    lib.hck_copy_prepared.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                      ctypes.c_void_p]
    return lib


def _missing_reason(path: Path) -> str:
    """Why the library is absent, and what to do, for this installation."""
    if os.environ.get("HICACHE_SKIP_NATIVE", "0") not in ("", "0"):
        return (f"the CUDA library is not built ({path} is missing): HICACHE_SKIP_NATIVE is set, "
                "which skips building it; reinstall without it to build it")
    if (_PACKAGE.parent / "csrc" / "build.py").is_file():   # a source checkout
        return (f"the CUDA library is not built ({path} is missing): run python csrc/build.py, "
                "or reinstall, with CUDA 12+ nvcc and cmake found")
    return ("the CUDA library is not built into this installation: it is built at install time "
            "unless HICACHE_SKIP_NATIVE=1 is set or no CUDA 12+ nvcc and cmake are found; "
            "reinstall from source to build it")


def describe_build(info: dict[str, str]) -> str:
    """``built (CUDA 13.0; sm_80, sm_90a, PTX compute_80)`` from :func:`build_info`."""
    archs = []
    for part in info.get("archs", "?").split(","):
        arch, _, kind = part.partition("-")
        archs.append(f"PTX compute_{arch}" if kind == "virtual" else f"sm_{arch}")
    return f"libhicache_cuda built with CUDA {info.get('cuda', '?')} for {', '.join(archs)}"


def _no_device(lib: ctypes.CDLL) -> str:
    return (f"{describe_build(build_info(lib))}, but there is no CUDA device here "
            "(torch.cuda.is_available() is False)")


def build_info(lib: ctypes.CDLL | None = None) -> dict[str, str]:
    """``{"cuda": "13.0", "archs": "80-real,...", "source": digest}`` of the library."""
    lib = lib or library()[0]
    if lib is None:
        return {}
    text = lib.hck_build_info().decode()
    return dict(part.split("=", 1) for part in text.split(";") if "=" in part)


def last_error(lib: ctypes.CDLL | None = None) -> str:
    lib = lib or library()[0]
    return lib.hck_last_error().decode(errors="replace") if lib is not None else ""


def check(rc: int, what: str, lib: ctypes.CDLL | None = None) -> None:
    """Raise a RuntimeError naming ``what`` when a call into ``lib`` (default: this
    library) failed."""
    if rc != 0:
        raise RuntimeError(f"{what}: {last_error(lib) or f'error code {rc}'}")


@dataclass(frozen=True)
class DeviceInfo:
    capability: tuple[int, int]
    multiprocessors: int
    has_register_kernel: bool
    has_bulk_kernel: bool
    batch_api: int  # cudaMemcpyBatchAsync's API version: 13000, 12080, or 0 (missing)
    copy_engines: int


@functools.lru_cache(maxsize=None)
def device_info(index: int) -> tuple[DeviceInfo | None, str]:
    """What the library can do on CUDA device ``index``, or why nothing."""
    lib, why = library()
    if lib is None:
        return None, why
    if not torch.cuda.is_available():
        return None, _no_device(lib)
    count = ctypes.c_int()
    if lib.hck_device_count(ctypes.byref(count)) != 0:
        return None, f"the CUDA library sees no device: {last_error()}"
    info = (ctypes.c_int32 * 7)()
    if lib.hck_probe(index, info) != 0:
        return None, f"probing cuda:{index} failed: {last_error()}"
    return DeviceInfo((info[0], info[1]), info[2], bool(info[3]), bool(info[4]), info[5], info[6]), ""


def current_device_info() -> tuple[int, DeviceInfo | None, str]:
    """``(index, info, "")`` for the current CUDA device, or ``(index, None, why not)``."""
    lib, why = library()
    if lib is None:
        return -1, None, why
    if not torch.cuda.is_available():
        return -1, None, _no_device(lib)
    index = torch.cuda.current_device()
    info, why = device_info(index)
    return index, info, why


def batch_refusal(index: int) -> str:
    """Why the copy engine stopped using cudaMemcpyBatchAsync on a device ("" if it has not)."""
    lib = library()[0]
    if lib is None:
        return ""
    buf = ctypes.create_string_buffer(512)
    lib.hck_batch_refusal(index, buf, len(buf))
    return buf.value.decode(errors="replace")
