"""Prometheus metrics of a HiCache manager: tier occupancy, hits, transfers, evictions.

:class:`ManagerMetrics` is a manager observer and a Prometheus collector. On the
manager's thread it only adds to a few integers; everything is turned into
samples when Prometheus scrapes (``collect()``), so an idle endpoint costs nothing.

==========================================  ======  ==================================================
metric                                      type    meaning
==========================================  ======  ==================================================
``hicache_pages{tier}``                     gauge   pages holding a copy on ``device``/``host``
``hicache_capacity_pages{tier}``            gauge   pages the pool holds
``hicache_bytes{tier}``                     gauge   bytes of those pages (``hicache_pages`` x page bytes)
``hicache_in_flight{kind}``                 gauge   ``load``/``backup``/``storage`` ops not yet polled
``hicache_hit_pages_total{tier}``           counter ``device``: pages ``hit()`` named that were on the
                                                    device; ``host``: pages loaded from host;
                                                    ``storage``: pages a prefetch found in storage
``hicache_stored_pages_total{tier}``        counter pages that got a copy on a tier
``hicache_evicted_pages_total{tier}``       counter pages evicted from ``device``/``host``
``hicache_ops_started_total{kind}``         counter ``load``, ``backup``, ``prefetch``, ``store``
``hicache_ops_finished_total{kind}``        counter the same, once ``poll()`` saw them finish
``hicache_moved_pages_total{direction}``    counter pages moved by finished ops (failed ones not)
``hicache_moved_bytes_total{direction}``    counter their bytes
``hicache_transfer_seconds_total{direction}`` counter from start until the manager saw the op finish
``hicache_storage_failed_pages_total{kind}`` counter pages a ``prefetch``/``store`` could not move
``hicache_storage_corrupt_pages_total``     counter stored pages that failed their checks (storage's count)
``hicache_storage_missing_pages_total``     counter pages looked up in storage that it did not hold
==========================================  ======  ==================================================

Directions: ``host_to_device`` (loads), ``device_to_host`` (backups),
``storage_to_host`` (prefetches), ``host_to_storage`` (stores). Transfer seconds
run from the call that started an op until the manager retired it (a ``poll()``
or another call that collects): an upper bound of the copy's own time. The two
storage totals come from the storage tier's ``stats()`` (``corrupt_pages``;
``lookup_pages - lookup_hit_pages``) and are absent for a storage without them.

Serve them with :meth:`ManagerMetrics.serve` (an HTTP endpoint on a port), or
pass ``registry=`` to add them to a registry you already expose.

Example:
    >>> metrics = ManagerMetrics()
    >>> mgr = HiCacheManager(pool, observers=[metrics])      # doctest: +SKIP
    >>> port = metrics.serve(9400)                            # doctest: +SKIP
"""

from __future__ import annotations

import time
from typing import Mapping

from ..manager.observer import ManagerObserver

__all__ = ["ManagerMetrics", "DIRECTIONS"]

DIRECTIONS = {"load": "host_to_device", "backup": "device_to_host",
              "prefetch": "storage_to_host", "store": "host_to_storage"}
_KINDS = tuple(DIRECTIONS)
_POOL_TIERS = ("device", "host")
_TIERS = ("device", "host", "storage")


class ManagerMetrics(ManagerObserver):
    """Count what one manager does, for Prometheus.

    Args:
        registry: the ``prometheus_client`` registry to register in (None: a new
            one, :attr:`registry`; one manager's metrics per registry, since the
            names repeat).
        labels: constant labels added to every sample (e.g. ``{"tp_rank": "0"}``).

    Counters are plain ints updated on the manager's thread; a scrape (another
    thread) reads them and the manager's pool counts, which are single ints.
    """

    def __init__(self, registry=None, *, labels: Mapping[str, str] | None = None):
        from prometheus_client import CollectorRegistry

        labels = dict(labels or {})
        for k, v in labels.items():
            if not isinstance(k, str) or not k.isidentifier() or not isinstance(v, str):
                raise ValueError(f"labels: expected str label names and values, got {k!r}: {v!r}")
        self._labels = labels
        self.registry = registry if registry is not None else CollectorRegistry()
        self._manager = None
        self._page_bytes = 0
        self._starts: dict[int, float] = {}
        self.hit_pages = dict.fromkeys(_TIERS, 0)
        self.stored_pages = dict.fromkeys(_TIERS, 0)
        self.evicted_pages = dict.fromkeys(_POOL_TIERS, 0)
        self.started_ops = dict.fromkeys(_KINDS, 0)
        self.finished_ops = dict.fromkeys(_KINDS, 0)
        self.moved_pages = dict.fromkeys(_KINDS, 0)
        self.transfer_seconds = dict.fromkeys(_KINDS, 0.0)
        self.failed_pages = {"prefetch": 0, "store": 0}
        self._server = None
        self.registry.register(self)

    # -- the observer -----------------------------------------------------------------
    def attach(self, manager) -> None:
        if self._manager is not None:
            raise RuntimeError("ManagerMetrics: already observing a manager; make one per manager")
        lay = manager.device_pool.layout   # a page's bytes, the same on every tier
        self._page_bytes = manager.page_size * lay.item_bytes * lay.num_planes_per_layer * lay.num_layers
        self._manager = manager

    def stored(self, tier, page_ids) -> None:
        self.stored_pages[tier] += len(page_ids)

    def evicted(self, eviction) -> None:
        self.evicted_pages[eviction.tier] += len(eviction.page_ids)

    def hit(self, tier, num_pages) -> None:
        self.hit_pages[tier] += num_pages

    def started(self, kind, op_id, page_ids) -> None:
        self.started_ops[kind] += 1
        self._starts[op_id] = time.perf_counter()
        if kind == "load":
            self.hit_pages["host"] += len(page_ids)
        elif kind == "prefetch":
            self.hit_pages["storage"] += len(page_ids)

    def finished(self, ack) -> None:
        kind = ack.kind
        self.finished_ops[kind] += 1
        self.moved_pages[kind] += len(ack.page_ids) - len(ack.failed)
        if kind in self.failed_pages:
            self.failed_pages[kind] += len(ack.failed)
        start = self._starts.pop(ack.op_id, None)
        if start is not None:
            self.transfer_seconds[kind] += time.perf_counter() - start

    # -- serving ----------------------------------------------------------------------
    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve :attr:`registry` over HTTP (``/metrics``) on a daemon thread;
        returns the port (``port=0``: a free one). :meth:`stop` ends it."""
        from prometheus_client import start_http_server

        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"port: expected an int in [0, 65535], got {port!r}")
        if self._server is not None:
            raise RuntimeError(f"serve: already serving on port {self._server.server_port}")
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return server.server_port

    def stop(self) -> None:
        """Stop the HTTP endpoint :meth:`serve` started (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- the collector ----------------------------------------------------------------
    def describe(self):
        return self._families(live=False)

    def collect(self):
        return self._families(live=True)

    def _families(self, *, live: bool) -> list:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        names = list(self._labels)
        const = list(self._labels.values())

        def family(cls, name, doc, label, values):
            f = cls(name, doc, labels=names + ([label] if label else []))
            for key, value in values:
                f.add_metric(const + ([key] if label else []), value)
            return f

        mgr = self._manager if live else None
        try:
            pools = [] if mgr is None else [("device", mgr.device_pages), ("host", mgr.host_pages)]
            stats = {} if mgr is None else mgr.stats()
        except AttributeError:   # scraped while the manager is still being built
            pools, stats = [], {}
        pb = self._page_bytes
        out = [
            family(GaugeMetricFamily, "hicache_pages", "Pages holding a copy on a tier.", "tier",
                   [(t, a.used_count) for t, a in pools]),
            family(GaugeMetricFamily, "hicache_capacity_pages", "Pages a tier's pool holds.", "tier",
                   [(t, a.num_pages) for t, a in pools]),
            family(GaugeMetricFamily, "hicache_bytes", "Bytes of the pages holding a copy on a tier.",
                   "tier", [(t, a.used_count * pb) for t, a in pools]),
            family(GaugeMetricFamily, "hicache_in_flight", "Transfers not yet polled.", "kind",
                   [(k, stats[f"{k}s_in_flight" if k != "storage" else "storage_in_flight"])
                    for k in ("load", "backup", "storage") if stats]),
            family(CounterMetricFamily, "hicache_hit_pages", "Pages hit on a tier.", "tier",
                   self.hit_pages.items()),
            family(CounterMetricFamily, "hicache_stored_pages", "Pages that got a copy on a tier.",
                   "tier", self.stored_pages.items()),
            family(CounterMetricFamily, "hicache_evicted_pages", "Pages evicted from a tier.", "tier",
                   self.evicted_pages.items()),
            family(CounterMetricFamily, "hicache_ops_started", "Transfers started.", "kind",
                   self.started_ops.items()),
            family(CounterMetricFamily, "hicache_ops_finished", "Transfers finished.", "kind",
                   self.finished_ops.items()),
            family(CounterMetricFamily, "hicache_moved_pages", "Pages moved by finished transfers.",
                   "direction", [(DIRECTIONS[k], v) for k, v in self.moved_pages.items()]),
            family(CounterMetricFamily, "hicache_moved_bytes", "Bytes moved by finished transfers.",
                   "direction", [(DIRECTIONS[k], v * pb) for k, v in self.moved_pages.items()]),
            family(CounterMetricFamily, "hicache_transfer_seconds",
                   "Seconds from a transfer's start until the manager saw it finish.", "direction",
                   [(DIRECTIONS[k], v) for k, v in self.transfer_seconds.items()]),
            family(CounterMetricFamily, "hicache_storage_failed_pages",
                   "Pages a storage op could not move.", "kind", self.failed_pages.items()),
        ]
        if not live or "storage_corrupt_pages" in stats:
            out.append(family(CounterMetricFamily, "hicache_storage_corrupt_pages",
                              "Stored pages that failed their checks.", None,
                              [(None, stats.get("storage_corrupt_pages", 0))]))
        if not live or "storage_lookup_pages" in stats:
            missing = stats.get("storage_lookup_pages", 0) - stats.get("storage_lookup_hit_pages", 0)
            out.append(family(CounterMetricFamily, "hicache_storage_missing_pages",
                              "Pages looked up in storage that it did not hold.", None,
                              [(None, missing)]))
        return out
