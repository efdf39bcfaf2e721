"""A peer-host tier: pages kept in another host's memory, moved by NIXL's UCX plugin.

A :class:`PeerPageServer` owns a pool of page slots in its memory and an index
``key -> (slot, CRC-32)``, with LRU eviction. A :class:`PeerPageStore` (a
:class:`~.store.PageStore`, so :class:`~.tier.StorageTier` drives it like the
file store) asks the server over NIXL notifications which slots to use, then
moves the bytes itself with one UCX transfer per batch: host-pool runs to or
from the server's slots, no staging copy on either side.

The same guarantees as the file store hold: a page enters the index only after
its transfer completed (``commit``), a slot being read is pinned against
eviction until the reader releases it, every read is checked against the CRC
the writer recorded, and a slow or vanished server makes misses, never errors.

Control messages (JSON, one per notification; replies carry the request id)::

    hello  {md}          -> {base, page_bytes, tag}   client's metadata, so the server can reply
    exists {keys}        -> {n}                       length of the stored prefix
    lookup {keys}        -> {pages: [[slot, crc]...]} stored prefix, pinned
    release {slots}      -> {}                        unpin after a read
    alloc  {keys}        -> {slots}                   slots to write (as many as fit, a prefix)
    commit {pages: [[key, slot, crc]...]} -> {}       the writes completed
    abort  {slots}       -> {}                        the writes failed
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from ..buffers import KVBuffer
from .nixl_store import TransferFailed, host_regions, import_nixl, run_transfer
from .pages import PageGeometry, check_keys, check_pages, layout_tag, page_bytes, read_back_ok
from .store import StorageUnavailable, count_io, io_counters

__all__ = ["PeerPageServer", "PeerPageStore"]

log = logging.getLogger(__name__)

_IDLE_SLEEP_S = 200e-6          # server loop pause when no message waits
_PENDING_WRITE_S = 60.0         # an allocated slot never committed is reclaimed after this


def _ucx_agent(name: str, **config):
    nixl = import_nixl()
    sync = nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_RW
    agent = nixl.nixl_agent(name, nixl.nixl_agent_config(backends=["UCX"], sync_mode=sync, **config))
    if "UCX" not in agent.backends:
        raise StorageUnavailable("NIXL's UCX plugin did not start")
    return agent


class PeerPageServer:
    """Keeps pages of one layout for peers, in this process's memory.

    Args:
        layout: the :class:`KVLayout` of the clients' host pools.
        capacity_pages: page slots in the pool.
        pin_memory: pin the pool (needs a CUDA driver; RDMA NICs want it).
        listen_port: also run NIXL's metadata listener on this port, for
            clients on other hosts (``PeerPageStore(..., server=(name, ip, port))``).

    Example:
        >>> server = PeerPageServer(layout, capacity_pages=4096)
        >>> store = PeerPageStore(host, server.metadata())   # on loopback
    """

    def __init__(self, layout, *, capacity_pages: int, name: str | None = None,
                 pin_memory: bool = False, listen_port: int | None = None):
        if not isinstance(capacity_pages, int) or capacity_pages <= 0:
            raise ValueError(f"capacity_pages: expected a positive int, got {capacity_pages!r}")
        self.tag = layout_tag(layout)
        self.page_bytes = page_bytes(layout)
        self.capacity = capacity_pages
        self.pool = torch.empty(capacity_pages * self.page_bytes, dtype=torch.uint8, pin_memory=pin_memory)
        config = {} if listen_port is None else {"enable_listen_thread": True, "listen_port": listen_port}
        self.name = name or f"hicache-peer-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.agent = _ucx_agent(self.name, **config)
        self._reg = self.agent.register_memory(self.pool, backends=["UCX"])
        self._free = list(range(capacity_pages - 1, -1, -1))
        self._index: OrderedDict[str, tuple[int, int]] = OrderedDict()  # LRU first
        self._pins: dict[int, int] = {}
        self._doomed: set[int] = set()  # dropped while pinned: freed at the last release
        self._pending: dict[int, float] = {}  # slot -> deadline for its commit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="hicache-peer-server", daemon=True)
        self._thread.start()

    def metadata(self) -> bytes:
        """This server's NIXL metadata, for :class:`PeerPageStore` on loopback
        or passed out of band."""
        return self.agent.get_agent_metadata()

    def stored_pages(self) -> int:
        return len(self._index)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        try:
            self.agent.deregister_memory(self._reg, backends=["UCX"])
        except Exception as e:
            log.debug("peer server: deregister failed: %s", e)
        self.agent = None  # the last reference: NIXL stops the agent and its listener

    # -- the serving thread: the only one touching the index ----------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                notifs = self.agent.get_new_notifs()
            except Exception:
                log.exception("peer server: reading notifications failed")
                notifs = {}
            if not notifs:
                self._reclaim_pending()
                time.sleep(_IDLE_SLEEP_S)
                continue
            for peer, messages in notifs.items():
                for raw in messages:
                    self._answer(peer, raw)

    def _answer(self, peer: str, raw: bytes) -> None:
        msg = None
        try:
            msg = json.loads(raw)
            handler = getattr(self, "_op_" + msg["op"])
            reply = handler(msg)
            reply["id"] = msg["id"]
        except Exception as e:
            log.warning("peer server: bad request from %s: %s", peer, e)
            reply = {"id": msg.get("id") if isinstance(msg, dict) else None, "error": str(e)}
        try:
            self.agent.send_notif(peer, json.dumps(reply).encode())
        except Exception as e:
            log.warning("peer server: cannot answer %s: %s", peer, e)

    def _op_hello(self, msg: dict) -> dict:
        self.agent.add_remote_agent(base64.b64decode(msg["md"]))
        return {"base": self.pool.data_ptr(), "page_bytes": self.page_bytes, "tag": self.tag}

    def _op_exists(self, msg: dict) -> dict:
        return {"n": self._prefix(msg["keys"])}

    def _op_lookup(self, msg: dict) -> dict:
        pages = []
        for key in msg["keys"][:self._prefix(msg["keys"])]:
            slot, crc = self._index[key]
            self._index.move_to_end(key)
            self._pins[slot] = self._pins.get(slot, 0) + 1
            pages.append([slot, crc])
        return {"pages": pages}

    def _op_release(self, msg: dict) -> dict:
        for slot in msg["slots"]:
            left = self._pins.get(slot, 0) - 1
            if left > 0:
                self._pins[slot] = left
            elif self._pins.pop(slot, None) is not None and slot in self._doomed:
                self._doomed.discard(slot)
                self._free.append(slot)
        return {}

    def _op_alloc(self, msg: dict) -> dict:
        slots = []
        for _ in msg["keys"]:
            slot = self._take_slot()
            if slot is None:
                break  # full of pinned or pending pages: the rest are not stored
            self._pending[slot] = time.monotonic() + _PENDING_WRITE_S
            slots.append(slot)
        return {"slots": slots}

    def _op_commit(self, msg: dict) -> dict:
        for key, slot, crc in msg["pages"]:
            if self._pending.pop(slot, None) is None:
                continue  # reclaimed meanwhile: the bytes may be someone else's now
            old = self._index.pop(key, None)
            if old is not None:
                self._drop_slot(old[0])
            self._index[key] = (slot, crc)
        return {}

    def _op_abort(self, msg: dict) -> dict:
        for slot in msg["slots"]:
            if self._pending.pop(slot, None) is not None:
                self._free.append(slot)
        return {}

    def _op_forget(self, msg: dict) -> dict:
        """A reader found a page's bytes damaged: drop it."""
        entry = self._index.get(msg["key"])
        if entry is not None and entry[0] == msg["slot"]:
            del self._index[msg["key"]]
            self._drop_slot(entry[0])
        return {}

    def _prefix(self, keys: list[str]) -> int:
        for i, key in enumerate(keys):
            if key not in self._index:
                return i
        return len(keys)

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for key, (slot, _) in self._index.items():  # least recently used first
            if slot not in self._pins:
                del self._index[key]
                return slot
        return None

    def _drop_slot(self, slot: int) -> None:
        if slot in self._pins:  # a reader still copies out of it: free it at its release
            self._doomed.add(slot)
        else:
            self._free.append(slot)

    def _reclaim_pending(self) -> None:
        now = time.monotonic()
        for slot, deadline in list(self._pending.items()):
            if deadline < now:
                del self._pending[slot]
                self._free.append(slot)


class PeerPageStore:
    """A :class:`PageStore` whose pages live in a :class:`PeerPageServer`.

    Args:
        host: this process's host pool (CPU :class:`KVBuffer`), registered once.
        server: the server's metadata (bytes, e.g. ``server.metadata()``), or
            ``(name, ip, port)`` of a server started with ``listen_port``.
        timeout_s: how long to wait for the server's answer; past it the
            request is a miss (or an unstored page).

    Raises:
        StorageUnavailable: the server does not answer or serves another layout.
    """

    def __init__(self, host: KVBuffer, server, *, timeout_s: float = 5.0, name: str | None = None,
                 listen_port: int = 0):
        if not isinstance(host, KVBuffer) or host.device.type != "cpu":
            raise ValueError("host: expected a KVBuffer in CPU memory (the host pool)")
        self.geometry = PageGeometry(host)
        self.page_size = self.geometry.page_size
        self.page_bytes = self.geometry.page_bytes
        self.timeout_s = timeout_s
        # NIXL answers a metadata fetch over the asker's own listener.
        listen = {} if isinstance(server, (bytes, bytearray)) else {
            "enable_listen_thread": True, "listen_port": listen_port}
        self.agent = _ucx_agent(name or f"hicache-peer-client-{os.getpid()}-{uuid.uuid4().hex[:8]}", **listen)
        self._reg = self.agent.register_memory(host_regions(host), "DRAM", backends=["UCX"])
        self._rpc_lock = threading.Lock()
        self._next_id = 0
        self._stats = io_counters()
        self.server_name = self._connect(server)
        hello = self._rpc("hello", md=base64.b64encode(self.agent.get_agent_metadata()).decode())
        if hello is None:
            raise StorageUnavailable(f"peer {self.server_name!r} did not answer within {timeout_s} s")
        if hello["tag"] != self.geometry.tag or hello["page_bytes"] != self.page_bytes:
            raise StorageUnavailable(f"peer {self.server_name!r} keeps {hello['tag']} pages, "
                                     f"this pool is {self.geometry.tag}")
        self._remote_base = hello["base"]

    def _connect(self, server) -> str:
        try:
            if isinstance(server, (bytes, bytearray)):
                name = self.agent.add_remote_agent(bytes(server))
                return name.decode() if isinstance(name, bytes) else name
            name, ip, port = server
            self.agent.fetch_remote_metadata(name, ip, port)
            self.agent.send_local_metadata(ip, port)
            deadline = time.monotonic() + self.timeout_s
            while not self.agent.check_remote_metadata(name):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no metadata from {name} at {ip}:{port}")
                time.sleep(0.01)
            return name
        except Exception as e:
            raise StorageUnavailable(f"cannot reach the peer page server: {e}") from None

    # -- the PageStore interface -------------------------------------------------
    def check_pages(self, keys: Sequence[str], host_indices) -> tuple[list[str], np.ndarray]:
        """Keys as a list and host page indices ``[n]``; ValueError names a bad argument."""
        return check_pages(keys, host_indices, self.geometry)

    def batch_exists(self, keys: Sequence[str]) -> int:
        keys = check_keys(keys)
        reply = self._rpc("exists", keys=keys) if keys else {"n": 0}
        return 0 if reply is None else int(reply["n"])

    def batch_get(self, keys: Sequence[str], host_indices) -> list[bool]:
        keys, pages = self.check_pages(keys, host_indices)
        ok = [False] * len(keys)
        if not keys:
            return ok
        start = time.perf_counter()
        reply = self._rpc("lookup", keys=keys)
        found = [] if reply is None else reply["pages"]
        if not found:
            return ok
        slots = [slot for slot, _ in found]
        try:
            self._move("READ", pages[:len(found)], slots)
            ok[:len(found)] = read_back_ok(self.geometry, pages, [crc for _, crc in found])
            if not all(ok[:len(found)]):
                bad = ok.index(False)
                self._stats.add(corrupt_pages=1)
                log.warning("peer: page %s in slot %d of %s is corrupt (checksum mismatch); "
                            "treated as a miss", keys[bad], slots[bad], self.server_name)
                self._rpc("forget", key=keys[bad], slot=slots[bad])
        except TransferFailed as e:
            self._stats.add(read_errors=1)
            log.error("peer: reading %d pages from %s failed (%s); they are misses",
                      len(found), self.server_name, e)
        finally:
            self._rpc("release", slots=slots)
        valid = sum(ok)
        count_io(self._stats, "read", valid, self.page_bytes, start)
        return ok

    def batch_set(self, keys: Sequence[str], host_indices) -> list[bool]:
        keys, pages = self.check_pages(keys, host_indices)
        ok = [False] * len(keys)
        if not keys:
            return ok
        start = time.perf_counter()
        reply = self._rpc("alloc", keys=keys)
        slots = [] if reply is None else reply["slots"]
        if not slots:
            self._stats.add(write_errors=len(keys))
            return ok
        n = len(slots)
        crcs = [self.geometry.checksum(p) for p in pages[:n]]
        try:
            self._move("WRITE", pages[:n], slots)
        except TransferFailed as e:
            self._stats.add(write_errors=n)
            log.error("peer: writing %d pages to %s failed: %s", n, self.server_name, e)
            self._rpc("abort", slots=slots)
            return ok
        if self._rpc("commit", pages=[[k, s, c] for k, s, c in zip(keys, slots, crcs)]) is None:
            self._stats.add(write_errors=n)
            return ok  # the server reclaims slots never committed
        ok[:n] = [True] * n
        count_io(self._stats, "written", n, self.page_bytes, start)
        return ok

    def status(self) -> str:
        return (f"NIXL UCX peer store on {self.server_name}, {self.page_bytes} B/page in "
                f"{self.geometry.runs_per_page} runs")

    def io_stats(self) -> dict:
        return self._stats.snapshot()

    def close(self) -> None:
        if getattr(self, "_reg", None) is None:
            return
        reg, self._reg = self._reg, None
        try:
            self.agent.remove_remote_agent(self.server_name)
        except Exception:
            pass
        try:
            self.agent.deregister_memory(reg, backends=["UCX"])
        except Exception as e:
            log.debug("peer: deregister failed: %s", e)
        self.agent = None  # requests after close fail softly (logged misses)

    # -- helpers -------------------------------------------------------------------
    def _move(self, op: str, pages: np.ndarray, slots: list[int]) -> None:
        geo = self.geometry
        addr, size = geo.page_runs(pages)
        remote_addr = (self._remote_base + np.asarray(slots, dtype=np.int64)[:, None] * self.page_bytes
                       + geo.file_offsets[None, :]).ravel()
        local = np.stack([addr, size, np.zeros_like(addr)], axis=1).astype(np.uint64)
        remote = np.stack([remote_addr, size, np.zeros_like(addr)], axis=1).astype(np.uint64)
        agent = self.agent
        run_transfer(agent, op, "UCX", agent.get_xfer_descs(local, "DRAM"),
                     agent.get_xfer_descs(remote, "DRAM"), self.server_name)

    def _rpc(self, op: str, **fields) -> dict | None:
        """One request, one answer; None (logged) when the server is silent or fails."""
        with self._rpc_lock:
            self._next_id += 1
            rid = self._next_id
            try:
                self.agent.send_notif(self.server_name, json.dumps({"op": op, "id": rid, **fields}).encode())
                deadline = time.monotonic() + self.timeout_s
                while time.monotonic() < deadline:
                    for raw in self.agent.get_new_notifs().get(self.server_name, []):
                        reply = json.loads(raw)
                        if reply.get("id") == rid:  # older ids: answers that came too late
                            if "error" in reply:
                                raise RuntimeError(reply["error"])
                            return reply
                    time.sleep(_IDLE_SLEEP_S)
                raise TimeoutError(f"no answer within {self.timeout_s} s")
            except Exception as e:
                log.error("peer: %s request to %s failed: %s", op, self.server_name, e)
                return None

