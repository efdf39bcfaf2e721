"""Tier-aware KV events: the manager's page moves as SGLang's KV event stream over ZMQ.

:class:`KVEventPublisher` is a manager observer. Each change the manager makes
to a tier becomes a batch of events, published at once on a ZMQ PUB socket in
the wire format of SGLang's ``sglang.srt.disaggregation.kv_events`` (the one
Dynamo's KV router and vLLM consumers read):

- a message is three frames: the topic, an 8-byte big-endian sequence number
  (0, 1, 2, ... per publisher) and the msgpack payload;
- the payload is a ``KVEventBatch``, the array ``[ts, events, attn_dp_rank]``;
- each event is a msgpack map tagged by ``"type"``: ``BlockStored``
  (``block_hashes``, ``parent_block_hash``, ``token_ids``, ``block_size``,
  ``lora_id``, ``medium``), ``BlockRemoved`` (``block_hashes``, ``medium``) or
  ``AllBlocksCleared``.

``medium`` names the tier: ``"GPU"`` (device), ``"CPU_TIER1"`` (host pool),
``"CPU_TIER2"`` (storage), as vLLM names them and Dynamo reads them (Dynamo also
reads SGLang's ``"CPU_PINNED"``/``"DISK"``: pass ``mediums=`` to use those).
A page promoted from storage to host and then to the device shows as
``BlockStored`` on ``CPU_TIER1`` then on ``GPU``; evicting it from the device is a
``BlockRemoved`` on ``GPU`` while its host and storage copies stay advertised.
``close()`` of the manager publishes ``AllBlocksCleared``.

With ``replay_endpoint=``, a ROUTER socket serves SGLang's replay protocol: a
subscriber that missed batches (a gap in the sequence numbers) sends the first
sequence number it wants, ``[b"", seq]`` as 8 big-endian bytes from a DEALER (a REQ
adds the empty frame itself), and gets every kept batch from there as
``[b"", topic, seq, payload]``, then ``[b"", b"", -1 as 8 signed bytes, b""]``.
The last ``buffer_steps`` batches are kept, including any the PUB socket dropped.

Block hashes are the page ids as SGLang publishes its page keys: a page key (the
64 hex digits of SHA-256 that :func:`hicache_kernels.storage.page_keys` makes, what
an SGLang radix tree keeps per page) becomes the signed int64 of its first 16 hex
digits, so a page has the same block hash here and in SGLang's own events. An int id is its
own hash; any other id (a tuple, a name) has no key, and its hash is the first 8
bytes of the SHA-256 of its ``repr``, stable across processes for ids built of
strings and ints. Pass ``block_hash=`` to choose differently.

The manager sees page ids, not tokens. A router that matches requests by their
tokens (Dynamo's) needs each stored page's token ids and the page before it:
pass ``page_tokens=``, a callable ``page_id -> (token_ids, parent_page_id)``
(``parent_page_id`` None for a sequence's first page; the callable may return
None for a page it does not know). Without it ``token_ids`` is empty and each
page is its own event with no parent.

Example:
    >>> pub = KVEventPublisher("tcp://*:5557", topic="kv-events")     # doctest: +SKIP
    >>> mgr = HiCacheManager(pool, observers=[pub])                   # doctest: +SKIP
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from typing import Callable, Hashable, Mapping, Sequence

from ..manager.observer import TIERS, ManagerObserver

__all__ = ["KVEventPublisher", "block_hash", "DEFAULT_MEDIUMS", "END_OF_REPLAY"]

log = logging.getLogger("hicache_kernels.observers")

DEFAULT_MEDIUMS = {"device": "GPU", "host": "CPU_TIER1", "storage": "CPU_TIER2"}
"""Tier -> ``medium``, as vLLM names its tiers and Dynamo's router reads them."""

_I64, _U64 = 1 << 63, 1 << 64
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)
"""The sequence frame that ends a replay (SGLang's ``ZmqEventPublisher.END_SEQ``)."""


def block_hash(page_id: Hashable) -> int:
    """The event block hash (a signed int64) of a page id.

    Example:
        >>> block_hash("7f" + "00" * 31)          # a page key: its first 16 hex digits
        9151314442816847872
        >>> block_hash(12)
        12
    """
    if type(page_id) is str and len(page_id) == 64:     # a page key (the common case: fast)
        head = page_id[:16]
        if head.isalnum():                              # no sign, space or "_" that int() takes
            try:
                value = int(head, 16)
            except ValueError:
                pass
            else:
                return value - _U64 if value >= _I64 else value
    if isinstance(page_id, int) and not isinstance(page_id, bool) and -_I64 <= page_id < _I64:
        return page_id
    digest = hashlib.sha256(repr(page_id).encode("utf-8", "backslashreplace")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class KVEventPublisher(ManagerObserver):
    """Publish the manager's tier changes as SGLang KV events on a ZMQ socket.

    Args:
        endpoint: where to publish: ``tcp://*:5557`` binds (as SGLang's default),
            ``tcp://host:port`` connects (to a subscriber that binds),
            ``ipc://`` and ``inproc://`` bind; ``tcp://127.0.0.1:*`` binds a free port
            (read it back from :attr:`endpoint`).
        topic: the first frame of every message (subscribers filter on its prefix).
        bind: force binding (True) or connecting (False); None: decided as above.
        dp_rank: the ``attn_dp_rank`` of every batch.
        tiers: the tiers whose changes are published (default all three).
        mediums: tier -> ``medium`` string, overriding :data:`DEFAULT_MEDIUMS`.
        page_tokens: ``page_id -> (token_ids, parent_page_id) | None`` for ``BlockStored``.
        block_hash: ``page_id -> int`` (default :func:`block_hash`).
        hwm: ZMQ send high-water mark: messages beyond it are dropped, never waited for.
        replay_endpoint: None (no replay), or where a ROUTER socket binds to serve
            missed batches again (module docstring); ``tcp://127.0.0.1:*`` binds a
            free port (read it back from :attr:`replay_endpoint`).
        buffer_steps: how many of the latest batches replay keeps.

    Create it on the thread that runs the manager and use it from there (a ZMQ
    socket is not thread-safe). With tensor parallelism, publish from rank 0
    only: every rank holds the same pages. Publishing never raises into the
    manager: a failed send is logged once and counted in :attr:`dropped`. Replay
    runs on its own thread, with its own socket; :meth:`close` stops it.
    """

    def __init__(self, endpoint: str = "tcp://*:5557", *, topic: str = "", bind: bool | None = None,
                 dp_rank: int = 0, tiers: Sequence[str] = TIERS,
                 mediums: Mapping[str, str] | None = None,
                 page_tokens: Callable[[Hashable], tuple | None] | None = None,
                 block_hash: Callable[[Hashable], int] = block_hash, hwm: int = 100_000,
                 replay_endpoint: str | None = None, buffer_steps: int = 10_000):
        import msgspec
        import zmq

        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise ValueError(f"endpoint: expected a ZMQ endpoint like 'tcp://*:5557', got {endpoint!r}")
        if not isinstance(topic, str):
            raise ValueError(f"topic: expected a str, got {topic!r}")
        if not isinstance(dp_rank, int) or isinstance(dp_rank, bool) or dp_rank < 0:
            raise ValueError(f"dp_rank: expected an int >= 0, got {dp_rank!r}")
        tiers = tuple(tiers)
        bad = [t for t in tiers if t not in TIERS]
        if bad:
            raise ValueError(f"tiers: expected some of {list(TIERS)}, got {bad}")
        names = dict(DEFAULT_MEDIUMS)
        for tier, name in (mediums or {}).items():
            if tier not in TIERS or not isinstance(name, str) or not name:
                raise ValueError(f"mediums: expected tier -> non-empty str for tiers {list(TIERS)}, "
                                 f"got {tier!r}: {name!r}")
            names[tier] = name
        if not isinstance(hwm, int) or isinstance(hwm, bool) or hwm < 0:
            raise ValueError(f"hwm: expected an int >= 0 (0: no limit), got {hwm!r}")
        if replay_endpoint is not None and (not isinstance(replay_endpoint, str)
                                            or "://" not in replay_endpoint):
            raise ValueError(f"replay_endpoint: expected None or a ZMQ endpoint like "
                             f"'tcp://*:5558', got {replay_endpoint!r}")
        if not isinstance(buffer_steps, int) or isinstance(buffer_steps, bool) or buffer_steps < 1:
            raise ValueError(f"buffer_steps: expected an int >= 1, got {buffer_steps!r}")
        if page_tokens is not None and not callable(page_tokens):
            raise ValueError(f"page_tokens: expected a callable page_id -> (token_ids, parent), "
                             f"got {type(page_tokens).__name__}")
        self.topic = topic
        self.dp_rank = dp_rank
        self.tiers = frozenset(tiers)
        self.mediums = names
        self.page_tokens = page_tokens
        self.block_hash = block_hash
        self.block_size = 0          # the manager's page size, from attach()
        self.sequence = 0            # the next batch's sequence number
        self.dropped = 0             # batches a send failed for
        self._topic = topic.encode("utf-8")
        self._encode = msgspec.msgpack.Encoder().encode
        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        # XPUB is PUB on the wire; it also lets wait_for_subscribers see subscriptions
        self._socket = self._ctx.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)   # every subscription, repeated topics too
        self._socket.setsockopt(zmq.LINGER, 1000)
        if bind is None:   # SGLang's rule, plus: a wildcard port binds a free one
            host, _, port = endpoint.split("://", 1)[1].rpartition(":")
            bind = not endpoint.startswith("tcp://") or host in ("*", "0.0.0.0", "[::]", "::") \
                or port in ("*", "0")
        try:
            if bind:
                self._socket.bind(endpoint)
            else:
                self._socket.connect(endpoint)
        except zmq.ZMQError as e:
            self._socket.close(linger=0)
            raise ValueError(f"endpoint: cannot {'bind' if bind else 'connect'} {endpoint!r}: {e}") from None
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint
        self._warned = False
        self.replay_endpoint = None
        self._kept: collections.deque = collections.deque(maxlen=buffer_steps)
        self._kept_lock = threading.Lock()
        self._replay_stop = threading.Event()
        self._replay_thread = None
        if replay_endpoint is not None:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            try:
                router.bind(replay_endpoint)
            except zmq.ZMQError as e:
                router.close()
                self.close()
                raise ValueError(f"replay_endpoint: cannot bind {replay_endpoint!r}: {e}") from None
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay_thread = threading.Thread(target=self._serve_replay, args=(router,),
                                                   name="kv-events-replay", daemon=True)
            self._replay_thread.start()

    # -- the observer -----------------------------------------------------------------
    def attach(self, manager) -> None:
        self.block_size = manager.page_size

    def stored(self, tier: str, page_ids: Sequence) -> None:
        if tier in self.tiers and len(page_ids):
            self._publish(self._stored_events, self.mediums[tier], page_ids)

    def removed(self, tier: str, page_ids: Sequence) -> None:
        if tier in self.tiers and len(page_ids):
            self._publish(self._removed_events, self.mediums[tier], page_ids)

    def closed(self) -> None:
        """The manager closed: ``AllBlocksCleared``, then the socket closes."""
        if self._socket is not None:
            self.publish_cleared()
            self.close()

    # -- the publisher ----------------------------------------------------------------
    def publish_cleared(self) -> None:
        """Publish ``AllBlocksCleared`` (e.g. after a restart, before new events)."""
        self._publish(lambda: [{"type": "AllBlocksCleared"}])

    def wait_for_subscribers(self, count: int = 1, timeout_s: float = 10.0) -> bool:
        """Block until ``count`` subscriptions have reached the socket (ZMQ drops
        messages sent before a subscriber is connected); False on timeout."""
        zmq, seen = self._zmq, 0
        deadline = time.monotonic() + timeout_s
        while seen < count:
            left = deadline - time.monotonic()
            if left <= 0 or not self._socket.poll(int(left * 1000) + 1, zmq.POLLIN):
                return False
            if self._socket.recv()[:1] == b"\x01":   # a subscribe (0x00 is an unsubscribe)
                seen += 1
        return True

    def close(self) -> None:
        """Close the socket (queued messages get up to a second to leave) and stop
        replay. Idempotent."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._replay_thread is not None:
            self._replay_stop.set()
            self._replay_thread.join()
            self._replay_thread = None

    def _serve_replay(self, router) -> None:
        """The replay thread: answer requests until :meth:`close` (SGLang's protocol)."""
        try:
            while not self._replay_stop.is_set():
                if not router.poll(50):
                    continue
                frames = router.recv_multipart()
                if len(frames) != 3:
                    log.warning("KV events: ignored a replay request of %d frames; expected "
                                "[identity, b'', sequence]", len(frames))
                    continue
                client, _, start = frames
                start = int.from_bytes(start, "big")
                with self._kept_lock:
                    batches = [b for b in self._kept if b[0] >= start]
                for seq, payload in batches:
                    router.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"), payload))
                router.send_multipart((client, b"", b"", END_OF_REPLAY, b""))
        except Exception as e:   # a broken replay must not take the publisher down
            log.warning("KV events: replay stopped (%s: %s)", type(e).__name__, e)
        finally:
            router.close()

    def _removed_events(self, medium: str, page_ids: Sequence) -> list:
        return [{"type": "BlockRemoved", "block_hashes": list(map(self.block_hash, page_ids)),
                 "medium": medium}]

    def _stored_events(self, medium: str, page_ids: Sequence) -> list:
        """``BlockStored`` events for pages in order: consecutive pages whose parent
        is the page before them share one event, as SGLang coalesces them."""
        events: list = []
        describe, hash_of, size = self.page_tokens, self.block_hash, self.block_size
        last = None       # the open event's last page id
        for page_id in page_ids:
            info = describe(page_id) if describe is not None else None
            h = hash_of(page_id)
            if info is None:
                tokens, parent = (), None
            else:
                tokens, parent = info
                if hasattr(tokens, "tolist"):   # a tensor or numpy array: plain ints
                    tokens = tokens.tolist()
            if parent is not None and last is not None and parent == last:
                event = events[-1]
                event["block_hashes"].append(h)
                event["token_ids"].extend(tokens)
            else:
                events.append({"type": "BlockStored", "block_hashes": [h],
                               "parent_block_hash": None if parent is None else hash_of(parent),
                               "token_ids": list(tokens), "block_size": size, "lora_id": None,
                               "medium": medium})
            last = page_id if info is not None else None
        return events

    def _publish(self, make_events, *args) -> None:
        """One batch of ``make_events(*args)``; nothing here raises into the manager."""
        socket = self._socket
        if socket is None:
            return
        try:
            payload = self._encode([time.time(), make_events(*args), self.dp_rank])
            if self._replay_thread is not None:   # kept even if the send below drops it
                with self._kept_lock:
                    self._kept.append((self.sequence, payload))
            socket.send_multipart((self._topic, self.sequence.to_bytes(8, "big"), payload),
                                  flags=self._zmq.NOBLOCK)
        except Exception as e:   # never into the manager: count, log once
            self.dropped += 1
            if not self._warned:
                self._warned = True
                log.warning("KV events: a batch could not be published (%s: %s); "
                            "later failures are counted in dropped", type(e).__name__, e)
        self.sequence += 1
