"""Observers of the HiCache manager: KV events and Prometheus metrics. Off unless passed.

Both adapt the manager's observer calls (:mod:`hicache_kernels.manager.observer`)
onto other systems' interfaces and never reach below the manager's public API:

- :class:`KVEventPublisher` (:mod:`.kv_events`): each tier change as SGLang's KV
  events (``BlockStored``/``BlockRemoved`` with ``medium``, ``AllBlocksCleared``)
  on a ZMQ PUB socket, for Dynamo's KV router; needs ``pyzmq`` and ``msgspec``.
- :class:`ManagerMetrics` (:mod:`.metrics`): Prometheus counters and gauges,
  served over HTTP or added to your registry; needs ``prometheus_client``.

``pip install 'hicache-kernels[observe]'`` installs the three.

Example:
    >>> from hicache_kernels.observers import KVEventPublisher, ManagerMetrics
    >>> events, metrics = KVEventPublisher("tcp://*:5557"), ManagerMetrics()   # doctest: +SKIP
    >>> mgr = HiCacheManager(pool, observers=[events, metrics])                # doctest: +SKIP
    >>> metrics.serve(9400)                                                     # doctest: +SKIP
"""

from ..manager.observer import ManagerObserver

__all__ = ["ManagerObserver", "KVEventPublisher", "ManagerMetrics", "block_hash"]


def __getattr__(name):
    # pyzmq, msgspec and prometheus_client load only when used
    if name in ("KVEventPublisher", "block_hash"):
        from . import kv_events
        return getattr(kv_events, name)
    if name == "ManagerMetrics":
        from .metrics import ManagerMetrics
        return ManagerMetrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
