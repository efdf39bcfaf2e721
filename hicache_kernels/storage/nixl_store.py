"""A :class:`~.store.PageStore` on files, moved by a NIXL file plugin.

One NIXL agent per store, with one file plugin (POSIX by default; GDS_MT or
GDS when asked for, or when ``auto`` finds POSIX missing). The host pool is
registered with NIXL once; every batch of pages is one NIXL transfer whose
descriptors point straight at the pages' runs in the pool and at their
offsets in the page files, so no byte is staged through another buffer.

A page is one file, ``<directory>/<namespace>/<layout tag>/<key[:2]>/<key>.kvpage``:
a 4 KiB header (:class:`~.pages.PageHeader`, with the payload's CRC-32) and
the payload. It is written under a temporary name and renamed into place
only after the whole transfer succeeded, so a reader sees a complete page or
none. A read checks the header, the file size and, after the transfer, the
CRC-32 of the bytes now in the host slots; any mismatch is a miss, logged,
and the bad file is removed.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import threading
import time
import uuid
from contextlib import ExitStack
from typing import Sequence

import numpy as np

from ..buffers import KVBuffer
from .config import FILE_PLUGINS, StorageConfig
from .pages import HEADER_BYTES, PageGeometry, PageHeader, check_keys, check_pages, read_back_ok
from .store import StorageUnavailable, count_io, io_counters

__all__ = ["NixlFileStore", "import_nixl", "run_transfer", "TransferFailed"]

log = logging.getLogger(__name__)

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_SUFFIX = ".kvpage"
_POLL_SLEEP_S = 50e-6          # between NIXL status checks; keeps a core free
_WRITE_LOG_INTERVAL_S = 10.0   # at most one write-failure log line per interval


def import_nixl():
    """The NIXL Python API module (``nixl`` meta package, else a CUDA variant wheel)."""
    errors = []
    for name in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            module = __import__(name, fromlist=["nixl_agent"])
            module.nixl_agent  # noqa: B018 - the API we need
            return module
        except Exception as e:  # missing, or a variant that cannot load on this machine
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise ImportError(
        "NIXL is not installed; `pip install 'hicache-kernels[storage]'` (nixl-cu13) "
        "or `pip install nixl`. Tried: " + "; ".join(errors)
    )


class TransferFailed(Exception):
    """A NIXL transfer did not complete; none of its pages may be trusted."""


def run_transfer(agent, op: str, plugin: str, local, remote, remote_name: str) -> None:
    """Post one NIXL transfer, poll it to the end, release it; TransferFailed
    on any error (NIXL raises its own types, or ends in state ERR)."""
    handle = None
    try:
        handle = agent.initialize_xfer(op, local, remote, remote_name, backends=[plugin])
        state = agent.transfer(handle)
        while state == "PROC":
            time.sleep(_POLL_SLEEP_S)
            state = agent.check_xfer_state(handle)
    except Exception as e:
        raise TransferFailed(f"NIXL {plugin} {op}: {type(e).__name__}: {e}") from None
    finally:
        if handle is not None:
            _quiet(handle.release)
    if state != "DONE":
        raise TransferFailed(f"NIXL {plugin} {op} ended in state {state}")


class NixlFileStore:
    """Pages of one host pool in files, through NIXL.

    Args:
        host: the host pool (a CPU :class:`KVBuffer`, pinned or mmap'd); it is
            registered with NIXL once, here, and must outlive the store.
        config: a :class:`StorageConfig`, a dict of its keys, or None (file
            and environment only; see :mod:`.config`).
        agent_name: NIXL agent name; unique per process by default.

    Raises:
        StorageUnavailable: the directory cannot be created or used, or no
            NIXL file plugin starts. A directory that exists but refuses
            writes gives a read-only store instead (``writable`` False).

    Example:
        >>> store = NixlFileStore(host, {"directory": "/mnt/nvme/kv"})
        >>> keys = page_keys(token_ids, store.page_size)
        >>> store.batch_set(keys, host_indices)         # [True, True, ...]
        >>> store.batch_exists(keys)                     # len(keys)
        >>> store.batch_get(keys, other_host_indices)    # [True, True, ...]
    """

    def __init__(self, host: KVBuffer, config: "StorageConfig | dict | None" = None, *,
                 agent_name: str | None = None):
        if not isinstance(host, KVBuffer):
            raise TypeError(f"host: expected a KVBuffer, got {type(host).__name__}")
        if host.device.type != "cpu":
            raise ValueError(f"host: expected a KVBuffer in CPU memory (the host pool), got {host.device}")
        self.config = StorageConfig.load(config)
        self.geometry = PageGeometry(host)
        self.page_size = self.geometry.page_size
        self.page_bytes = self.geometry.page_bytes
        self.file_bytes = HEADER_BYTES + self.page_bytes
        self.root = os.path.join(self.config.directory, self.config.namespace or "default", self.geometry.tag)
        self.writable, self.read_only_reason = True, ""
        self._lock = threading.Lock()
        self._stats = io_counters()
        self._last_write_log = -_WRITE_LOG_INTERVAL_S
        self._closed = False
        self._prepare_directory()
        self._nixl = import_nixl()
        self._start_agent(agent_name or f"hicache-storage-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._host = host  # NIXL holds its address: keep the pool alive as long as the store
        self._register_host(host)
        log.info("storage: %s", self.status())

    # -- setup -----------------------------------------------------------------
    def _prepare_directory(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise StorageUnavailable(
                f"storage directory {self.root!r} cannot be created: {e.strerror} (errno {e.errno})"
            ) from None
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StorageUnavailable(f"storage directory {self.root!r} is not readable")
        probe = os.path.join(self.root, f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b"\0")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            if e.errno in _FULL:
                log.error("storage: directory %r is full (%s); writes will be retried", self.root, e.strerror)
            else:
                self._disable_writes(f"cannot write in {self.root!r}: {e.strerror} (errno {e.errno})")

    def _start_agent(self, name: str) -> None:
        nixl = self._nixl
        # Prefetch and write-back threads share the agent: NIXL must lock.
        sync = nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_RW
        self.agent = nixl.nixl_agent(name, nixl.nixl_agent_config(backends=[], sync_mode=sync))
        available = self.agent.get_plugin_list()
        wanted = list(FILE_PLUGINS) if self.config.plugin == "auto" else [self.config.plugin]
        tried = []
        for plugin in wanted:
            if plugin not in available:
                tried.append(f"{plugin}: not installed")
                continue
            try:
                self.agent.create_backend(plugin, dict(self.config.plugin_params))
            except Exception as e:  # a plugin whose libraries or devices are missing
                tried.append(f"{plugin}: {e}")
                continue
            mems = self.agent.get_backend_mem_types(plugin)
            if "FILE_SEG" not in mems or "DRAM_SEG" not in mems:
                tried.append(f"{plugin}: moves {mems}, not DRAM<->FILE")
                continue
            self.plugin = plugin
            if tried:
                log.info("storage: using NIXL %s (%s)", plugin, "; ".join(tried))
            return
        raise StorageUnavailable("no NIXL file plugin could start: " + "; ".join(tried))

    def _register_host(self, host: KVBuffer) -> None:
        self._host_reg = self.agent.register_memory(host_regions(host), "DRAM", backends=[self.plugin])

    # -- the PageStore interface -----------------------------------------------
    def batch_exists(self, keys: Sequence[str]) -> int:
        keys = check_keys(keys)
        for i, key in enumerate(keys):
            try:
                st = os.stat(self.page_path(key))
            except OSError:
                return i
            if st.st_size != self.file_bytes:
                self._corrupt(key, st, f"{st.st_size} bytes on disk, expected {self.file_bytes}")
                return i
        return len(keys)

    def batch_get(self, keys: Sequence[str], host_indices) -> list[bool]:
        keys, pages = self.check_pages(keys, host_indices)
        ok = [False] * len(keys)
        if not keys:
            return ok
        start = time.perf_counter()
        with ExitStack() as stack:
            found: list[tuple[int, PageHeader]] = []
            for key in keys:
                opened = self._open_valid_page(key)
                if opened is None:
                    break  # a miss ends the hit prefix
                stack.callback(os.close, opened[0])
                found.append(opened)
            if not found:
                return ok
            try:
                self._transfer("READ", pages[:len(found)], [fd for fd, _ in found])
            except TransferFailed as e:
                self._stats.add(read_errors=1)
                log.error("storage: reading %d pages from %s failed (%s); they are misses",
                          len(found), self.root, e)
                return ok
            ok[:len(found)] = read_back_ok(self.geometry, pages, [h.payload_crc for _, h in found])
            if not all(ok[:len(found)]):
                bad = ok.index(False)
                self._corrupt(keys[bad], _quiet_fstat(found[bad][0]), "payload checksum mismatch")
        valid = sum(ok)
        count_io(self._stats, "read", valid, self.page_bytes, start)
        return ok

    def batch_set(self, keys: Sequence[str], host_indices) -> list[bool]:
        keys, pages = self.check_pages(keys, host_indices)
        ok = [False] * len(keys)
        if not keys or not self.writable:
            return ok
        start = time.perf_counter()
        temps: list[tuple[int, int, str]] = []  # (index, open fd or -1, temporary path)
        try:
            for i, key in enumerate(keys):
                opened = self._create_temp(key, pages[i])
                if opened is None:
                    break  # full or read-only: the rest would fail alike
                temps.append((i, *opened))
            if not temps:
                return ok
            try:
                self._transfer("WRITE", pages[[i for i, _, _ in temps]], [fd for _, fd, _ in temps])
                if self.config.fsync:
                    for _, fd, _ in temps:
                        os.fsync(fd)
            except (TransferFailed, OSError) as e:
                self._write_failed(e, len(temps))
                return ok
            closing, temps = temps, [(i, -1, tmp) for i, _, tmp in temps]
            for _, fd, _ in closing:
                os.close(fd)
            for i, _, tmp in temps:
                try:
                    os.replace(tmp, self.page_path(keys[i]))  # the commit point
                    ok[i] = True
                except OSError as e:
                    self._write_failed(e, 1)
            if self.config.fsync:  # make the renames themselves durable
                for folder in {os.path.dirname(tmp) for i, _, tmp in temps if ok[i]}:
                    _quiet(_fsync_dir, folder)
        finally:
            for i, fd, tmp in temps:  # whatever was not committed disappears
                if fd >= 0:
                    _quiet(os.close, fd)
                if not ok[i]:
                    _quiet(os.unlink, tmp)
        written = sum(ok)
        count_io(self._stats, "written", written, self.page_bytes, start)
        return ok

    def status(self) -> str:
        mode = "read-write" if self.writable else f"read-only ({self.read_only_reason})"
        return (f"NIXL {self.plugin} store at {self.root}, {mode}, "
                f"{self.page_bytes} B/page in {self.geometry.runs_per_page} runs")

    def io_stats(self) -> dict:
        return self._stats.snapshot()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _quiet(self.agent.deregister_memory, self._host_reg, backends=[self.plugin])
        self.agent = None  # NIXL stops the agent; later transfers fail softly (logged misses)

    def __del__(self):
        if getattr(self, "_host_reg", None) is not None:
            self.close()

    # -- files -----------------------------------------------------------------
    def clear(self) -> int:
        """Remove every page of this store (its namespace and layout), and no other
        file: another process's temporary files, other namespaces and layouts stay.
        Returns how many pages were removed. A write finishing meanwhile may land
        after it: clear when no write is in flight."""
        removed = 0
        for path in glob.glob(os.path.join(glob.escape(self.root), "*", "*" + _SUFFIX)):
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:   # another rank of an MLA model cleared it first
                pass
        log.info("storage: cleared %d pages from %s", removed, self.root)
        return removed

    def page_path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key + _SUFFIX)

    def check_pages(self, keys: Sequence[str], host_indices) -> tuple[list[str], np.ndarray]:
        """Keys as a list and host page indices ``[n]``; ValueError names a bad argument."""
        return check_pages(keys, host_indices, self.geometry)

    def _open_valid_page(self, key: str) -> tuple[int, PageHeader] | None:
        """An fd and the header of a complete, well-formed page file, or None (a miss)."""
        path = self.page_path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._stats.add(read_errors=1)
            log.error("storage: cannot open %s: %s", path, e.strerror)
            return None
        try:
            header = PageHeader.unpack(os.pread(fd, HEADER_BYTES, 0))
            size = os.fstat(fd).st_size
            if header.key != key or header.layout != self.geometry.tag:
                raise ValueError(f"holds page {header.key[:12]}.. of {header.layout}")
            if header.payload_bytes != self.page_bytes or size != self.file_bytes:
                raise ValueError(f"{size} bytes on disk, expected {self.file_bytes}")
        except (ValueError, UnicodeDecodeError, OSError) as e:
            self._corrupt(key, _quiet_fstat(fd), str(e))
            os.close(fd)
            return None
        return fd, header

    def _create_temp(self, key: str, page: int) -> tuple[int, str] | None:
        path = self.page_path(key)
        tmp = f"{os.path.dirname(path)}/.{key[:16]}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        header = PageHeader(key, self.geometry.tag, self.page_bytes, self.geometry.checksum(page)).pack()
        fd = -1
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            if os.pwrite(fd, header, 0) != len(header):
                raise OSError(errno.ENOSPC, "short header write")
            return fd, tmp
        except OSError as e:
            if fd >= 0:
                _quiet(os.close, fd)
                _quiet(os.unlink, tmp)
            self._write_failed(e, 1)
            return None

    def _corrupt(self, key: str, bad: os.stat_result | None, why: str) -> None:
        """Count, log and remove the bad page file (``bad``: its stat, or None if unknown)."""
        path = self.page_path(key)
        self._stats.add(corrupt_pages=1)
        log.warning("storage: page %s is corrupt (%s); treated as a miss and removed", path, why)
        try:  # remove it unless a writer has already replaced it with a good copy
            now = os.stat(path)
            if bad is not None and (now.st_dev, now.st_ino) == (bad.st_dev, bad.st_ino):
                os.unlink(path)
        except OSError:
            pass

    def _write_failed(self, error: BaseException, pages: int) -> None:
        self._stats.add(write_errors=pages)
        code = getattr(error, "errno", None)
        if code in _READ_ONLY:
            self._disable_writes(f"{error.strerror} (errno {code})")
            return
        full = code in _FULL or (code is None and self._looks_full())
        now = time.monotonic()
        with self._lock:  # a failing disk fails every write: log a few, count all
            quiet = now - self._last_write_log < _WRITE_LOG_INTERVAL_S
            if not quiet:
                self._last_write_log = now
        if not quiet:
            what = "is full" if full else f"failed to take {pages} page(s)"
            log.error("storage: %s %s (%s); pages stay in the tiers above (write_errors counts them)",
                      self.root, what, error)

    def _looks_full(self) -> bool:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < self.file_bytes

    def _disable_writes(self, reason: str) -> None:
        if self.writable:
            self.writable, self.read_only_reason = False, reason
            log.error("storage: %s refuses writes (%s); serving reads only", self.root, reason)

    # -- NIXL ------------------------------------------------------------------
    def _transfer(self, op: str, pages: np.ndarray, fds: list[int]) -> None:
        """Move whole pages between the host pool and page files, one request."""
        addr, size = self.geometry.page_runs(pages)
        runs = self.geometry.runs_per_page
        offsets = np.tile(self.geometry.file_offsets + HEADER_BYTES, len(fds))
        fd_col = np.repeat(np.asarray(fds, dtype=np.int64), runs)
        host = np.stack([addr, size, np.zeros_like(addr)], axis=1).astype(np.uint64)
        files = np.stack([offsets, size, fd_col], axis=1).astype(np.uint64)
        agent = self.agent
        file_reg = None
        try:
            file_reg = agent.register_memory(
                [(0, self.file_bytes, fd, "") for fd in fds], "FILE", backends=[self.plugin])
        except Exception as e:
            raise TransferFailed(f"NIXL {self.plugin}: registering page files: {e}") from None
        try:
            run_transfer(agent, op, self.plugin, agent.get_xfer_descs(host, "DRAM"),
                         agent.get_xfer_descs(files, "FILE"), agent.name)
        finally:
            _quiet(agent.deregister_memory, file_reg, backends=[self.plugin])



def host_regions(host: KVBuffer) -> list[tuple[int, int, int, str]]:
    """NIXL DRAM registration tuples covering a host pool; K and V of one
    allocation (SGLang's ``[2, ...]`` tensor) become one region."""
    spans = sorted({(t.data_ptr(), t.numel() * t.element_size()) for t in host.tensors()})
    merged: list[list[int]] = []
    for start, size in spans:
        if merged and start <= merged[-1][0] + merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], start + size - merged[-1][0])
        else:
            merged.append([start, size])
    return [(start, size, 0, "") for start, size in merged]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _quiet_fstat(fd: int) -> os.stat_result | None:
    try:
        return os.fstat(fd)
    except OSError:
        return None


def _quiet(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # cleanup must not hide the error being handled
        log.debug("storage: cleanup %s failed: %s", getattr(fn, "__name__", fn), e)
