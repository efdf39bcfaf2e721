"""``hicache-bench e2e``: what the host tier saves on a multi-turn chat workload.

The workload follows SGLang's ``benchmark/hicache/bench_multiturn.py``:
``clients`` conversations of ``rounds`` rounds; each request is the client's
whole history plus ``request_length`` new tokens and yields ``output_length``
tokens, which join the history; a sender pops a ready request (a client whose
previous answer is done) after each Poisson (or uniform) gap, with at most
``max_parallel`` requests in flight. As in LMCache's multi-round QA, every
conversation may start with a system prompt shared by all clients and a
history of its own.

The server is simulated around real device work: requests are prefilled one
at a time in arrival order, and each prefill really runs on the device
(:class:`~.forward.StandInForward`: per-layer GEMMs, KV writes, attention over
the cached context). Its time is measured with CUDA events on a GPU; without
one it comes from a fixed cost model (:class:`CostModel`), so CPU noise cannot
change what a run reports and one seed gives one answer. Decoding is not run
per request: each answer takes ``output_length - 1`` decode steps, off the
server's critical path, a step costing more the more requests decode at once.

The device pool is too small to keep every history. Caches compared on the
same workload and seed, at each concurrency level:

* ``without HiCache`` (:class:`DeviceCache`): the device pool alone, a
  page-granular LRU prefix cache; an evicted history is recomputed;
* ``with HiCache`` (:class:`~.tier.HiCacheTier`): the manager's host tier
  behind the same interface; evicted pages come back by layer-wise loads that
  overlap the forward pass;
* ``with HiCache + storage`` (with ``storage="nixl"``): a third tier below the
  host pool; every page backed up to host is also written to files through
  NIXL, and a history the host pool lost is fetched back from them.

Only whole pages are cached (SGLang's paged radix cache does the same). Pages
are named by SGLang's chained SHA-256 page keys over the requests' token ids
(synthetic: a function of client and position, like the KV content).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Hashable, Protocol, Sequence

import torch

from ..buffers import KVBuffer
from ..nvtx_ranges import nvtx_range
from ..storage.keys import page_keys
from .forward import StandInForward
from .presets import TINY, ModelPreset
from .timing import Clock, machine_info, median, percentile, pinned_threads
from .tier import HiCacheTier, Match

__all__ = ["Cache", "CostModel", "DeviceCache", "E2EConfig", "Workload", "run", "simulate",
           "summarize", "RUN_NAMES"]

WITHOUT, WITH, WITH_STORAGE = "without HiCache", "with HiCache", "with HiCache + storage"
RUN_NAMES = (WITHOUT, WITH, WITH_STORAGE)
# token ids of the shared system prompt come from this "client"
SHARED_CLIENT = 999_983


class Cache(Protocol):
    """What the engine needs from a KV cache (see :mod:`.tier`)."""

    name: str

    def match(self, page_ids: Sequence[Hashable]) -> Match: ...
    def acquire(self, page_ids: Sequence[Hashable], on_device: int, on_host: int): ...
    def release(self, page_ids: Sequence[Hashable], keep: int) -> None: ...
    def poll(self) -> None: ...
    def counters(self) -> dict: ...
    def close(self) -> None: ...


class DeviceCache:
    """Without HiCache: the device pool alone, an LRU cache of whole pages.

    The baseline a host tier is measured against: what is evicted from the
    device is gone, and a later request recomputes it.
    """

    name = "without HiCache"

    def __init__(self, device_pool: KVBuffer):
        self.page_size = device_pool.layout.page_size
        self.device = device_pool.device
        self.free = list(range(device_pool.layout.num_slots // self.page_size))[::-1]
        self.pages: OrderedDict[Hashable, int] = OrderedDict()   # least recent first
        self.pins: dict[Hashable, int] = {}

    def describe(self) -> str:
        return "no host tier: a history evicted from the device is recomputed"

    def match(self, page_ids):
        n = 0
        while n < len(page_ids) and page_ids[n] in self.pages:
            n += 1
        return Match(n, 0)

    def acquire(self, page_ids, on_device, on_host):
        if on_host:
            raise ValueError("on_host: a device-only cache has no host pages to load")
        ids = list(page_ids)
        for i in ids[:on_device]:        # pinned first, so making room cannot take them
            self.pins[i] = self.pins.get(i, 0) + 1
        for i in ids[on_device:]:
            if i in self.pages:          # past a gap: recomputed
                self.free.append(self.pages.pop(i))
        self._make_room(len(ids) - on_device)
        for i in ids[on_device:]:
            self.pages[i] = self.free.pop()
            self.pins[i] = self.pins.get(i, 0) + 1
        pages = torch.tensor([self.pages[i] for i in ids], dtype=torch.int64)
        slots = (pages[:, None] * self.page_size + torch.arange(self.page_size)).reshape(-1)
        return slots.to(self.device), None

    def release(self, page_ids, keep):
        ids = list(page_ids)
        for i in ids:
            self.pins[i] -= 1
            if not self.pins[i]:
                del self.pins[i]
        for i in ids[keep:]:
            self.free.append(self.pages.pop(i))
        for i in reversed(ids[:keep]):   # the head of a history stays the most recent
            self.pages.move_to_end(i)

    def _make_room(self, n: int) -> None:
        if len(self.free) >= n:
            return
        for i in [i for i in self.pages if i not in self.pins]:
            self.free.append(self.pages.pop(i))
            if len(self.free) >= n:
                return
        # reached only if every unpinned page is gone and it is still not enough
        raise RuntimeError(f"device pool: {n} pages wanted, {len(self.free)} free and the rest pinned")

    def poll(self) -> None:
        pass

    def counters(self) -> dict:
        return dict(pages=len(self.pages), device_free=len(self.free))

    def close(self) -> None:
        pass


# -- the workload --------------------------------------------------------------------

@dataclass
class Workload:
    """Multi-turn conversations, as SGLang's bench_multiturn and LMCache's
    multi-round QA describe them.

    Every sequence is ``shared_prefix`` tokens common to all clients, then
    ``user_history`` tokens of the client's own, then per round
    ``request_length`` new tokens and ``output_length`` answer tokens.
    ``request_rate``: requests/s (``inf``: each as soon as a slot is free;
    None: 70% of the full-recompute capacity).
    """

    clients: int = 32
    rounds: int = 4
    request_length: int = 512
    output_length: int = 64
    request_rate: float | None = None
    max_parallel: int | None = None      # None: every client
    ready_policy: str = "random"         # which ready client sends next: random or fifo
    distribution: str = "poisson"        # gaps between sends: poisson or uniform
    shared_prefix: int = 0               # system prompt tokens shared by every client
    user_history: int = 0                # tokens of each client's own history before round 0
    seed: int = 0

    @property
    def requests(self) -> int:
        return self.clients * self.rounds

    @property
    def prefix(self) -> int:
        return self.shared_prefix + self.user_history

    def history(self, round_: int) -> int:
        """Tokens of context before round ``round_``'s new tokens."""
        return self.prefix + round_ * (self.request_length + self.output_length)

    @property
    def longest(self) -> int:
        """Tokens of the longest sequence (the last round, answer included)."""
        return self.history(self.rounds)

    @property
    def distinct_tokens(self) -> int:
        """Tokens of every final history together, the shared prefix counted once."""
        return self.shared_prefix + self.clients * (self.longest - self.shared_prefix)


@dataclass(frozen=True)
class CostModel:
    """Service times without a GPU: fixed costs, so a run is a function of its seed.

    A prefill of ``n`` new tokens over a context of ``c`` costs, per layer,
    the larger of its compute (weight GEMMs ``2 n sum(in*out)`` plus attention
    ``4 n c q_heads head_dim`` FLOPs at ``flops_per_s``) and its layer-wise
    load (``loaded`` tokens' KV at ``link_bytes_per_s``), plus
    ``layer_overhead_s``; the first layer's load is not hidden. A decode step
    of ``b`` requests costs the same compute for ``b`` tokens. A fetch from
    storage costs ``storage_latency_s`` plus its bytes at ``storage_bytes_per_s``.
    """

    flops_per_s: float = 20e9
    link_bytes_per_s: float = 5e9
    storage_bytes_per_s: float = 1e9
    storage_latency_s: float = 100e-6
    layer_overhead_s: float = 20e-6
    request_overhead_s: float = 200e-6

    @staticmethod
    def _flops(preset: ModelPreset, n: int, context: int) -> float:
        gemm = 2.0 * n * sum(i * o for i, o in preset.gemm_shapes())
        return gemm + 4.0 * n * context * preset.q_heads_per_rank * preset.head_dim

    def prefill_s(self, preset: ModelPreset, computed: int, context: int, loaded: int) -> float:
        compute = self._flops(preset, computed, context) / self.flops_per_s
        load = loaded * preset.token_layer_bytes / self.link_bytes_per_s
        return (self.request_overhead_s + load
                + preset.layers * (self.layer_overhead_s + max(compute, load)))

    def decode_step_s(self, preset: ModelPreset, batch: int, context: int) -> float:
        compute = self._flops(preset, batch, context) / self.flops_per_s
        return preset.layers * (self.layer_overhead_s + compute)

    def fetch_s(self, nbytes: int) -> float:
        return self.storage_latency_s + nbytes / self.storage_bytes_per_s if nbytes else 0.0


def simulate(w: Workload, rate: float, serve: Callable[[int, int], float],
             decode_step_s: Callable[[int], float],
             on_request: Callable[[], None] | None = None) -> list[dict]:
    """Run the workload in simulated time; ``serve(client, round)`` does the real
    work and returns its service time in seconds.

    One server prefills requests in arrival order. An answer's first token
    comes at the end of its prefill, then a token per decode step of
    ``decode_step_s(b)`` seconds, ``b`` being the requests decoding when its
    decode starts; only when the answer is done is the client's next round ready.
    """
    if not rate > 0:
        raise ValueError(f"request_rate: expected a positive rate, got {rate}")
    if w.ready_policy not in ("random", "fifo"):
        raise ValueError(f"ready_policy: expected random or fifo, got {w.ready_policy!r}")
    if w.distribution not in ("poisson", "uniform"):
        raise ValueError(f"distribution: expected poisson or uniform, got {w.distribution!r}")
    gaps = random.Random(w.seed)
    picks = random.Random(w.seed + 1)
    limit = w.max_parallel or w.clients

    def gap() -> float:
        if math.isinf(rate):
            return 0.0
        if w.distribution == "poisson":
            return gaps.expovariate(rate)
        return gaps.uniform(0.0, 2.0 / rate)

    ready = [(c, 0) for c in range(w.clients)]
    done_heap: list[tuple[float, int, int, int]] = []
    t = server_free = 0.0
    in_flight = 0
    records: list[dict] = []
    while len(records) < w.requests:
        while done_heap and done_heap[0][0] <= t:
            _, _, c, r = heapq.heappop(done_heap)
            in_flight -= 1
            if r + 1 < w.rounds:
                ready.append((c, r + 1))
        if not ready or in_flight >= limit:
            t = max(t, done_heap[0][0])   # the sender waits for the next answer
            continue
        index = picks.randrange(len(ready)) if w.ready_policy == "random" else 0
        c, r = ready.pop(index)
        start = max(t, server_free)
        service = serve(c, r)
        server_free = start + service
        batch = 1 + sum(1 for d in done_heap if d[0] > server_free)
        itl = decode_step_s(batch) if w.output_length > 1 else 0.0
        done = server_free + (w.output_length - 1) * itl
        heapq.heappush(done_heap, (done, len(records), c, r))
        in_flight += 1
        records.append(dict(client=c, round=r, arrival=t, start=start, service=service,
                            ttft=server_free - t, itl=itl, batch=batch, done=done,
                            latency=done - t))
        if on_request is not None:
            on_request()
        t += gap()
    return records


def _stats(prefix: str, values_ms: list[float]) -> dict:
    mean = sum(values_ms) / len(values_ms) if values_ms else float("nan")
    return {f"mean_{prefix}_ms": mean, f"median_{prefix}_ms": percentile(values_ms, 50),
            f"p90_{prefix}_ms": percentile(values_ms, 90), f"p99_{prefix}_ms": percentile(values_ms, 99)}


def summarize(records: list[dict], counts: dict, w: Workload) -> dict:
    """SGLang bench_serving's figures (same key names) and the cache's: hit rates
    per tier, prefill tokens computed and avoided."""
    duration = max(r["done"] for r in records) if records else float("nan")
    history = counts["history_tokens"]
    device, host, storage = (counts["device_hit_tokens"], counts["host_hit_tokens"],
                             counts["storage_hit_tokens"])
    n_in, n_out = counts["input_tokens"], len(records) * w.output_length

    def rate(tokens):
        return 100.0 * tokens / history if history else 0.0

    def per_s(x):
        return x / duration if duration else float("nan")

    itl_ms = [r["itl"] * 1e3 for r in records if w.output_length > 1]
    failures = counts["checks"] - counts["checks_ok"]
    out = dict(
        completed=len(records) - failures,
        failed=failures,
        duration=duration,
        total_input_tokens=n_in,
        total_output_tokens=n_out,
        request_throughput=per_s(len(records)),
        input_throughput=per_s(n_in),
        output_throughput=per_s(n_out),
        total_throughput=per_s(n_in + n_out),
        concurrency=per_s(sum(r["latency"] for r in records)),
        **_stats("ttft", [r["ttft"] * 1e3 for r in records]),
        **_stats("itl", itl_ms),
        **_stats("e2e_latency", [r["latency"] * 1e3 for r in records]),
        history_tokens=history,
        device_hit_tokens=device,
        host_hit_tokens=host,
        storage_hit_tokens=storage,
        device_hit_rate_pct=rate(device),
        host_hit_rate_pct=rate(host),
        storage_hit_rate_pct=rate(storage),
        cache_hit_rate_pct=rate(device + host + storage),
        prefill_tokens_computed=counts["computed_tokens"],
        prefill_tokens_avoided=device + host + storage,
        host_tokens_loaded=host + storage,
        storage_tokens_fetched=storage,
        storage_wait_ms=counts["storage_wait_s"] * 1e3,
        service_median_ms=median([r["service"] * 1e3 for r in records]),
        loads_verified=f"{counts['checks_ok']}/{counts['checks']}" if counts["checks"] else "off",
        verify_failures=failures,
    )
    return out


# -- the engine ----------------------------------------------------------------------

def token_ids(client: int, length: int, shared: int = 0) -> list[int]:
    """The synthetic prompt of ``client``: token ids as a function of (client, position),
    the first ``shared`` positions the same for every client, like the KV content,
    so equal page keys always mean equal KV."""
    return [((SHARED_CLIENT if pos < shared else client) * 1_000_003 + pos * 7919) % 2**32
            for pos in range(length)]


class Engine:
    """Serves one request on the device: match, acquire, prefill, release.

    ``cost``: a :class:`CostModel` gives the service time (None: measured on
    the device's clock)."""

    def __init__(self, w: Workload, cache, forward: StandInForward, clock: Clock, *,
                 page_size: int, verify: bool, seed: int, cost: CostModel | None = None):
        self.w, self.cache, self.fwd, self.clock = w, cache, forward, clock
        self.P = page_size
        self.verify = verify
        self.cost = cost
        self.rng = torch.Generator().manual_seed(seed)
        self.counts = dict(history_tokens=0, device_hit_tokens=0, host_hit_tokens=0,
                           storage_hit_tokens=0, storage_wait_s=0.0, computed_tokens=0,
                           input_tokens=0, checks=0, checks_ok=0)
        self.wall = dict(storage_wait_s=0.0)
        self._keys: dict[int, list[str]] = {}

    def page_ids(self, client: int, pages: int) -> list[str]:
        """The first ``pages`` page keys of ``client``'s sequence (the last page of a
        request may be partial: its key is that of the page once full)."""
        keys = self._keys.get(client)
        if keys is None:
            P = self.P
            longest = -(-self.w.longest // P) * P
            keys = self._keys[client] = page_keys(token_ids(client, longest, self.w.shared_prefix), P)
        return keys[:pages]

    def serve(self, client: int, round_: int) -> float:
        w, P = self.w, self.P
        history = w.history(round_)
        prompt = history + w.request_length
        total = prompt + w.output_length
        page_ids = self.page_ids(client, -(-total // P))
        with nvtx_range(f"bench.e2e.request client={client} round={round_} tokens={prompt}"):
            match = self.cache.match(page_ids[: history // P])
            on_device, on_host = match.device, match.host
            reused = (on_device + on_host) * P
            start, end = self.clock.event(), self.clock.event()
            start.record()
            slots, handle = self.cache.acquire(page_ids, on_device, on_host)
            with nvtx_range(f"bench.e2e.prefill n={prompt - reused} context={prompt}"):
                self.fwd.prefill(client=client, slots=slots, first=reused, end=prompt,
                                 handle=handle)
            end.record()
            for layer in range(self.fwd.preset.layers):   # the answer's KV, written by decoding
                self.fwd.write_kv(client, slots, prompt, total, layer)
            end.synchronize()
            if self.cost is None:
                # waiting for storage held this (one-at-a-time) server: it counts as service
                wait_s = match.wait_s
                service_s = start.elapsed_time(end) / 1e3 + wait_s
            else:
                g = self.fwd.preset
                wait_s = self.cost.fetch_s(match.storage * P * g.token_layer_bytes * g.layers)
                service_s = wait_s + self.cost.prefill_s(g, prompt - reused, prompt, on_host * P)
            if self.verify and reused:
                self._check(client, slots, on_device * P, reused)
            self.cache.release(page_ids, keep=total // P)
        c = self.counts
        c["history_tokens"] += history
        c["device_hit_tokens"] += on_device * P
        c["host_hit_tokens"] += (on_host - match.storage) * P
        c["storage_hit_tokens"] += match.storage * P
        c["storage_wait_s"] += wait_s
        c["computed_tokens"] += prompt - reused
        c["input_tokens"] += prompt
        self.wall["storage_wait_s"] += match.wait_s
        return service_s

    def _check(self, client: int, slots: torch.Tensor, device_end: int, reused: int) -> None:
        """Sample cached positions (device hits and loaded ones) and compare bytes."""
        k = 8
        picks = []
        for lo, hi in ((0, device_end), (device_end, reused)):
            if hi > lo:
                picks.append(lo + torch.randperm(hi - lo, generator=self.rng)[:k])
        self.clock.sync()   # loads and backups in flight must land before we read
        ok = self.fwd.check(client, slots, torch.cat(picks))
        self.counts["checks"] += 1
        self.counts["checks_ok"] += int(ok)


# -- a whole run ---------------------------------------------------------------------

@dataclass
class E2EConfig:
    """Everything an e2e run needs; the CLI builds it from flags.

    ``concurrency``: the levels to run (each sets ``workload.max_parallel``);
    empty: one level at ``workload.max_parallel``. ``modeled``: service times
    from ``cost`` instead of the device clock (what runs without a GPU do).
    """

    preset: ModelPreset
    workload: Workload = field(default_factory=Workload)
    concurrency: tuple[int, ...] = ()
    page_size: int = 64
    device_fraction: float = 0.3     # device pool / all final histories together
    device_tokens: int | None = None
    host_ratio: float = 4.0          # host pool / device pool (SGLang's --hicache-ratio; default 2)
    host_layout: str = "layer_first"
    write_policy: str = "write_through"
    backend: str = "auto"
    sm_budget: int | None = None
    storage: str = "none"            # "nixl": a storage tier below the host pool
    storage_dir: str | None = None   # None: a temporary directory, removed after the run
    prefetch_policy: str = "wait_complete"
    kv_events: str | None = None     # a ZMQ endpoint: the tier's KV events, as SGLang publishes them
    verify: bool = True
    modeled: bool = False
    cost: CostModel = field(default_factory=CostModel)
    compute_rows: int | None = None  # cap on the rows the stand-in GEMMs and attention compute
    notes: list[str] = field(default_factory=list)

    def levels(self) -> tuple[int | None, ...]:
        return tuple(self.concurrency) or (self.workload.max_parallel,)

    def run_names(self) -> tuple[str, ...]:
        return (WITHOUT, WITH) + ((WITH_STORAGE,) if self.storage != "none" else ())


def pool_tokens(cfg: E2EConfig) -> int:
    """Device pool size in tokens: whole pages, at least one longest sequence plus a page."""
    w, P = cfg.workload, cfg.page_size
    need = (-(-w.longest // P) + 1) * P
    if cfg.device_tokens is not None:
        tokens = -(-cfg.device_tokens // P) * P
        if tokens < need:
            raise ValueError(f"--device-tokens: {cfg.device_tokens} cannot hold one sequence of "
                             f"{w.longest} tokens in {P}-token pages (need >= {need})")
        return tokens
    if not 0 < cfg.device_fraction <= 1:
        raise ValueError(f"--device-fraction: expected a fraction in (0, 1], got {cfg.device_fraction}")
    return max(need, int(cfg.device_fraction * w.distinct_tokens) // P * P)


def _device_pool(preset: ModelPreset, tokens: int, page_size: int, device) -> KVBuffer:
    rows = (tokens, preset.kv_heads_per_rank, preset.head_dim)
    k = [torch.zeros(rows, dtype=preset.dtype, device=device) for _ in range(preset.layers)]
    v = None if preset.mla else [torch.zeros(rows, dtype=preset.dtype, device=device)
                                 for _ in range(preset.layers)]
    return KVBuffer.from_layers(k, v, page_size=page_size)


def _split_counters(counters: dict) -> tuple[dict, dict]:
    """(counts, wall-clock figures): seconds measured by the storage tier vary run to run."""
    wall = {k: v for k, v in counters.items() if k.endswith("_s") or "seconds" in k}
    return {k: v for k, v in counters.items() if k not in wall}, wall


def _ratio(base: dict, tier: dict) -> dict:
    keys = ("median_ttft_ms", "p90_ttft_ms", "mean_ttft_ms", "median_e2e_latency_ms",
            "request_throughput", "input_throughput", "output_throughput", "prefill_tokens_computed")
    return {k: tier[k] / base[k] for k in keys
            if isinstance(base.get(k), (int, float)) and base[k] and not math.isnan(base[k])}


def verdict(ratio: dict) -> tuple[bool, str]:
    """(worse, one line) for a with/without ratio: worse when the median TTFT is
    more than 5% higher or the throughput more than 5% lower."""
    ttft, thr = ratio.get("median_ttft_ms"), ratio.get("request_throughput")
    if ttft is None or thr is None:
        return False, "no comparison (a run has no requests)"
    worse = ttft > 1.05 or thr < 0.95
    better = ttft < 0.95 or thr > 1.05
    text = f"median TTFT x{ttft:.2f}, request throughput x{thr:.2f}"
    return worse, text + ("" if worse else ": better" if better else ": about the same")


def run(cfg: E2EConfig, clock: Clock, *, progress=None, tier_factory=None) -> dict:
    """Every level and run (without, with the host tier, with storage) as one
    document; a Ctrl-C stops it and returns what finished, with ``interrupted``.

    ``tier_factory(device_pool)`` builds the tier's cache (default: :class:`HiCacheTier`).
    On a CPU torch runs on one thread (small ops on busy cores are many times
    slower with more).
    """
    with pinned_threads(None if clock.gpu else 1):
        return _run(cfg, clock, progress=progress, tier_factory=tier_factory)


def _run(cfg: E2EConfig, clock: Clock, *, progress, tier_factory) -> dict:
    started = time.perf_counter()
    w = cfg.workload
    preset = cfg.preset
    if cfg.page_size < 1:
        raise ValueError(f"--page-size: expected a positive int, got {cfg.page_size}")
    tokens = pool_tokens(cfg)
    pool = _device_pool(preset, tokens, cfg.page_size, clock.device)
    compute = torch.bfloat16 if clock.gpu else torch.float32
    fwd = StandInForward(preset, pool, max_tokens=w.longest, compute_dtype=compute, seed=w.seed,
                         shared_prefix=w.shared_prefix, max_rows=cfg.compute_rows)
    mid = min(w.history(w.rounds // 2) + w.request_length, w.longest)
    levels = cfg.levels()
    widest = max([lv or w.clients for lv in levels])
    cost = cfg.cost if cfg.modeled else None
    if cost is not None:
        decode_1 = cost.decode_step_s(preset, 1, mid)
        decode_n = cost.decode_step_s(preset, widest, mid)
        full_s = cost.prefill_s(preset, mid, mid, 0)
    else:
        # one decode step alone and with every request of the widest level, and a
        # full recompute (which sets the default rate)
        slots = torch.arange(mid, device=clock.device)
        decode_1 = median(clock.time_ms(lambda: fwd.decode_step(mid), warmup=1, reps=3)) / 1e3
        decode_n = median(clock.time_ms(lambda: fwd.decode_step(mid, batch=widest),
                                        warmup=1, reps=3)) / 1e3
        full_s = median(clock.time_ms(
            lambda: fwd.prefill(client=0, slots=slots, first=0, end=mid), warmup=1, reps=3)) / 1e3

    def decode_step_s(batch: int) -> float:
        if widest <= 1:
            return decode_1
        return decode_1 + (decode_n - decode_1) * (min(batch, widest) - 1) / (widest - 1)

    notes, tiers = list(cfg.notes), {}
    why_not = None if tier_factory is not None else HiCacheTier.unavailable()
    if why_not is not None:
        notes.append(f"with HiCache: not run: {why_not}")
    names = [n for n in cfg.run_names() if n == WITHOUT or why_not is None]
    out_levels, wall_levels = [], []
    interrupted = False
    try:
        for level in levels:
            lw = replace(w, max_parallel=level)
            rate = w.request_rate if w.request_rate else (
                math.inf if cfg.concurrency else 0.7 / full_s)
            entry = dict(concurrency=level or w.clients, request_rate=rate, runs={}, complete=False)
            wall_entry = dict(concurrency=level or w.clients, runs={})
            out_levels.append(entry)
            wall_levels.append(wall_entry)
            for name in names:
                cache, storage = _make_cache(name, cfg, clock, pool, level, tier_factory)
                try:
                    text = cache.describe()
                    if storage is not None and cfg.storage_dir is None:   # a new one each run
                        text = text.replace(storage["directory"], "a temporary directory")
                    tiers[name] = text
                    engine = Engine(lw, cache, fwd, clock, page_size=cfg.page_size,
                                    verify=cfg.verify, seed=w.seed, cost=cost)
                    task = (progress.add_task(f"e2e c={entry['concurrency']} {name}", total=w.requests)
                            if progress is not None else None)
                    tick = (lambda: progress.advance(task)) if progress is not None else None
                    t0 = time.perf_counter()
                    with nvtx_range(f"bench.e2e.run {name} concurrency={entry['concurrency']}"):
                        records = simulate(lw, rate, engine.serve, decode_step_s, on_request=tick)
                    clock.sync()
                    counts, wall = _split_counters(cache.counters())
                    entry["runs"][name] = dict(summarize(records, engine.counts, lw), cache=counts)
                    wall_entry["runs"][name] = dict(wall, wall_s=time.perf_counter() - t0,
                                                    storage_wait_s=engine.wall["storage_wait_s"])
                finally:
                    cache.close()
                    if storage is not None and cfg.storage_dir is None:
                        shutil.rmtree(storage["directory"], ignore_errors=True)
            runs = entry["runs"]
            for name in names[1:]:
                entry.setdefault("ratio", {})[name] = _ratio(runs[WITHOUT], runs[name])
                worse, text = verdict(entry["ratio"][name])
                entry.setdefault("verdict", {})[name] = dict(worse=worse, text=text)
            entry["complete"] = True
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted (Ctrl-C): only the runs that finished are reported")
    return dict(
        benchmark="e2e",
        cpu_only=not clock.gpu,
        time="modeled" if cost is not None else "measured",
        interrupted=interrupted,
        machine=machine_info(clock),
        model=dict(name=preset.name, layers=preset.layers, kv_heads_per_rank=preset.kv_heads_per_rank,
                   head_dim=preset.head_dim, mla=preset.mla, tp=preset.tp,
                   dtype=str(preset.dtype).removeprefix("torch."),
                   gemms_per_layer=[list(s) for s in preset.gemm_shapes()],
                   compute_dtype=str(compute).removeprefix("torch."), source=preset.source),
        workload=dict(clients=w.clients, rounds=w.rounds, request_length=w.request_length,
                      output_length=w.output_length, shared_prefix=w.shared_prefix,
                      user_history=w.user_history, request_rate=w.request_rate,
                      distribution=w.distribution, ready_policy=w.ready_policy, seed=w.seed,
                      concurrency=[lv or w.clients for lv in levels], requests=w.requests),
        pools=dict(page_size=cfg.page_size, device_tokens=tokens,
                   all_histories_tokens=w.distinct_tokens, host_ratio=cfg.host_ratio,
                   host_layout=cfg.host_layout, write_policy=cfg.write_policy,
                   backend=cfg.backend, sm_budget=cfg.sm_budget, storage=cfg.storage,
                   storage_dir=cfg.storage_dir if cfg.storage != "none" else None,
                   prefetch_policy=cfg.prefetch_policy if cfg.storage != "none" else None),
        timing=dict(decode_step_ms=decode_1 * 1e3, decode_step_widest_ms=decode_n * 1e3,
                    decode_batch_widest=widest, full_recompute_ms=full_s * 1e3,
                    full_recompute_tokens=mid,
                    cost_model=asdict(cost) if cost is not None else None),
        caches=tiers,
        notes=notes,
        levels=out_levels,
        wall=dict(seconds=time.perf_counter() - started, levels=wall_levels),
    )


def _make_cache(name: str, cfg: E2EConfig, clock: Clock, pool: KVBuffer, level, tier_factory):
    """The cache of one run, and its storage configuration (or None)."""
    if name == WITHOUT:
        return DeviceCache(pool), None
    storage = storage_config(cfg, clock, level) if name == WITH_STORAGE else None
    if tier_factory is not None:
        return tier_factory(pool), storage
    observe = {}
    if cfg.kv_events is not None:
        from ..observers import KVEventPublisher
        observe["observers"] = [KVEventPublisher(cfg.kv_events, topic="kv-events")]
    return HiCacheTier(pool, host_ratio=cfg.host_ratio, host_layout=cfg.host_layout,
                       write_policy=cfg.write_policy, backend=cfg.backend, sm_budget=cfg.sm_budget,
                       storage=storage, settle=cfg.modeled, **observe), storage


def storage_config(cfg: E2EConfig, clock: Clock, level: int | None = None) -> dict | None:
    """The storage tier's configuration for ``cfg.storage`` (None: no storage tier).

    Without ``storage_dir`` the pages go to a fresh temporary directory (removed
    after the run). The namespace names what fixes the KV content besides the
    page keys and the layout (preset, seed, device, shared prefix) and the
    concurrency level, so a kept directory is found again by the same run and
    never serves another run's bytes."""
    if cfg.storage == "none":
        return None
    if cfg.storage != "nixl":
        raise ValueError(f"--storage: expected none or nixl, got {cfg.storage!r}")
    w = cfg.workload
    content = repr((cfg.preset, w.seed, clock.device.type, w.shared_prefix, level)).encode()
    directory = cfg.storage_dir or tempfile.mkdtemp(prefix="hicache-bench-storage-")
    return dict(directory=directory, namespace="e2e-" + hashlib.sha256(content).hexdigest()[:16],
                prefetch_policy=cfg.prefetch_policy)


def quick_config(preset: ModelPreset, gpu: bool) -> E2EConfig:
    """A short run: seconds on a GPU; on a CPU, the tiny stand-in model in modeled time."""
    if gpu:
        return E2EConfig(preset=preset, workload=Workload(clients=16, rounds=4,
                                                          request_length=512, output_length=64),
                         page_size=64)
    return cpu_config(preset, Workload(clients=6, rounds=3, request_length=48, output_length=16),
                      page_size=16)


def cpu_config(preset: ModelPreset, workload: Workload, page_size: int) -> E2EConfig:
    """The CPU version of a run: the tiny stand-in model, service times modeled."""
    notes = [] if preset is TINY else [f"CPU: the {preset.name} forward pass replaced by the tiny "
                                       "stand-in (layers, heads and GEMMs cut down)"]
    notes.append("CPU: times come from a fixed cost model (deterministic), not a clock; the "
                 "device work still runs and its bytes are checked")
    return E2EConfig(preset=TINY, workload=workload, page_size=page_size, modeled=True,
                     compute_rows=32, notes=notes)


def estimate_seconds(cfg: E2EConfig, gpu: bool) -> list[tuple[str, int, float]]:
    """Rough wall time of each (level, run): ``(label, requests, seconds)``."""
    w = cfg.workload
    g = cfg.preset
    # seconds per request and per token-layer of real work (measured on a busy
    # 2-core machine and a GPU's bf16 rate), and what the tiers add
    fixed, per_token_layer = (0.005, 0.0) if gpu else (0.02, 5e-6)
    extra = {WITHOUT: 1.0, WITH: 1.5, WITH_STORAGE: 2.5}
    out = []
    for level in cfg.levels():
        for name in cfg.run_names():
            per = 0.0
            for r in range(w.rounds):
                prompt = w.history(r) + w.request_length
                per += fixed + prompt * g.layers * per_token_layer
                if gpu:
                    per += 2.0 * prompt * g.layers * sum(i * o for i, o in g.gemm_shapes()) / 2e14
            out.append((f"concurrency {level or w.clients}, {name}", w.requests,
                        per * w.clients * extra[name]))
    return out
