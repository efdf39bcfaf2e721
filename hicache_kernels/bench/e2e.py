"""``hicache-bench e2e``: what the host tier saves on a multi-turn chat workload.

The workload follows SGLang's ``benchmark/hicache/bench_multiturn.py``:
``clients`` conversations of ``rounds`` rounds; each request is the client's
whole history plus ``request_length`` new tokens and yields ``output_length``
tokens, which join the history; a sender pops a ready request (a client whose
previous answer is done) after each Poisson-distributed gap, with at most
``max_parallel`` requests in flight.

The server is simulated in virtual time around real device work: requests are
prefilled one at a time in arrival order, and each prefill really runs on the
device (:class:`~.forward.StandInForward`: per-layer GEMMs, KV writes,
attention over the cached context), timed with CUDA events. Decoding is not
run per request: each answer takes ``output_length`` x one measured decode
step, off the server's critical path (continuous batching hides it).

The device pool is too small to keep every history. Two caches are compared
on the same workload and seed:

* ``without HiCache`` (:class:`DeviceCache`): the device pool alone, a
  page-granular LRU prefix cache; an evicted history is recomputed;
* ``with HiCache`` (:class:`~.tier.HiCacheTier`): the manager's host tier
  behind the same interface; evicted pages come back by layer-wise loads that
  overlap the forward pass. With ``--storage nixl`` a third tier sits below
  the host pool: every page backed up to host is also written to files
  through NIXL, and a history the host pool lost is fetched back from them.

Only whole pages are cached (SGLang's paged radix cache does the same). Pages
are named by SGLang's chained SHA-256 page keys over the requests' token ids
(synthetic: a function of client and position, like the KV content).
"""

from __future__ import annotations

import hashlib
import heapq
import random
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Protocol, Sequence

import torch

from ..buffers import KVBuffer
from ..nvtx_ranges import nvtx_range
from ..storage.keys import page_keys
from .forward import StandInForward
from .presets import TINY, ModelPreset
from .timing import Clock, machine_info, median, percentile
from .tier import HiCacheTier, Match

__all__ = ["Cache", "DeviceCache", "E2EConfig", "Workload", "run", "simulate", "summarize"]


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
    """Multi-turn conversations, as SGLang's bench_multiturn describes them."""

    clients: int = 32
    rounds: int = 4
    request_length: int = 512
    output_length: int = 64
    request_rate: float | None = None    # requests/s; None: 70% of full-recompute capacity
    max_parallel: int | None = None      # None: every client
    ready_policy: str = "random"         # which ready client sends next: random or fifo
    seed: int = 0

    @property
    def requests(self) -> int:
        return self.clients * self.rounds

    def history(self, round_: int) -> int:
        """Tokens of context before round ``round_``'s new tokens."""
        return round_ * (self.request_length + self.output_length)

    @property
    def longest(self) -> int:
        """Tokens of the longest sequence (the last round, answer included)."""
        return self.rounds * (self.request_length + self.output_length)


def simulate(w: Workload, rate: float, serve: Callable[[int, int], float], decode_s: float,
             on_request: Callable[[], None] | None = None) -> list[dict]:
    """Run the workload in virtual time; ``serve(client, round)`` does the real work
    and returns its service time in seconds.

    One server prefills requests in arrival order; an answer completes
    ``decode_s`` after its prefill, and only then is the client's next round ready.
    """
    if rate <= 0:
        raise ValueError(f"request_rate: expected a positive rate, got {rate}")
    if w.ready_policy not in ("random", "fifo"):
        raise ValueError(f"ready_policy: expected random or fifo, got {w.ready_policy!r}")
    gaps = random.Random(w.seed)
    picks = random.Random(w.seed + 1)
    limit = w.max_parallel or w.clients
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
        done = server_free + decode_s
        heapq.heappush(done_heap, (done, len(records), c, r))
        in_flight += 1
        records.append(dict(client=c, round=r, arrival=t, start=start, service=service,
                            ttft=server_free - t, done=done))
        if on_request is not None:
            on_request()
        t += gaps.expovariate(rate)
    return records


def summarize(records: list[dict], counts: dict) -> dict:
    """Hit rates, prefill tokens computed and avoided, TTFT percentiles, throughput."""
    ttft_ms = [r["ttft"] * 1e3 for r in records]
    makespan = max(r["done"] for r in records) if records else float("nan")
    history = counts["history_tokens"]
    device, host, storage = (counts["device_hit_tokens"], counts["host_hit_tokens"],
                             counts["storage_hit_tokens"])

    def rate(tokens):
        return 100.0 * tokens / history if history else 0.0

    return dict(
        requests=len(records),
        history_tokens=history,
        device_hit_tokens=device,
        host_hit_tokens=host,
        storage_hit_tokens=storage,
        device_hit_rate_pct=rate(device),
        host_hit_rate_pct=rate(host),
        storage_hit_rate_pct=rate(storage),
        prefill_tokens_computed=counts["computed_tokens"],
        prefill_tokens_avoided=device + host + storage,
        host_tokens_loaded=host + storage,
        storage_tokens_fetched=storage,
        storage_wait_ms=counts["storage_wait_s"] * 1e3,
        ttft_p50_ms=percentile(ttft_ms, 50),
        ttft_p90_ms=percentile(ttft_ms, 90),
        ttft_mean_ms=sum(ttft_ms) / len(ttft_ms) if ttft_ms else float("nan"),
        service_median_ms=median([r["service"] * 1e3 for r in records]),
        makespan_s=makespan,
        throughput_rps=len(records) / makespan if makespan else float("nan"),
        input_tokens_per_s=counts["input_tokens"] / makespan if makespan else float("nan"),
        loads_verified=f"{counts['checks_ok']}/{counts['checks']}" if counts["checks"] else "off",
        verify_failures=counts["checks"] - counts["checks_ok"],
    )


# -- the engine ----------------------------------------------------------------------

def token_ids(client: int, length: int) -> list[int]:
    """The synthetic prompt of ``client``: token ids as a function of (client, position),
    like the KV content, so equal page keys always mean equal KV."""
    return [(client * 1_000_003 + pos * 7919) % 2**32 for pos in range(length)]


class Engine:
    """Serves one request on the device: match, acquire, prefill, release."""

    def __init__(self, w: Workload, cache, forward: StandInForward, clock: Clock, *,
                 page_size: int, verify: bool, seed: int):
        self.w, self.cache, self.fwd, self.clock = w, cache, forward, clock
        self.P = page_size
        self.verify = verify
        self.rng = torch.Generator().manual_seed(seed)
        self.counts = dict(history_tokens=0, device_hit_tokens=0, host_hit_tokens=0,
                           storage_hit_tokens=0, storage_wait_s=0.0, computed_tokens=0,
                           input_tokens=0, checks=0, checks_ok=0)
        self._keys: dict[int, list[str]] = {}

    def page_ids(self, client: int, pages: int) -> list[str]:
        """The first ``pages`` page keys of ``client``'s sequence (the last page of a
        request may be partial: its key is that of the page once full)."""
        keys = self._keys.get(client)
        if keys is None:
            P = self.P
            longest = -(-self.w.longest // P) * P
            keys = self._keys[client] = page_keys(token_ids(client, longest), P)
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
            # waiting for storage held this (one-at-a-time) server: it counts as service
            service_s = start.elapsed_time(end) / 1e3 + match.wait_s
            if self.verify and reused:
                self._check(client, slots, on_device * P, reused)
            self.cache.release(page_ids, keep=total // P)
        c = self.counts
        c["history_tokens"] += history
        c["device_hit_tokens"] += on_device * P
        c["host_hit_tokens"] += (on_host - match.storage) * P
        c["storage_hit_tokens"] += match.storage * P
        c["storage_wait_s"] += match.wait_s
        c["computed_tokens"] += prompt - reused
        c["input_tokens"] += prompt
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
    """Everything an e2e run needs; the CLI builds it from flags."""

    preset: ModelPreset
    workload: Workload = field(default_factory=Workload)
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
    notes: list[str] = field(default_factory=list)


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
    all_histories = w.clients * w.longest
    return max(need, int(cfg.device_fraction * all_histories) // P * P)


def _device_pool(preset: ModelPreset, tokens: int, page_size: int, device) -> KVBuffer:
    rows = (tokens, preset.kv_heads_per_rank, preset.head_dim)
    k = [torch.zeros(rows, dtype=preset.dtype, device=device) for _ in range(preset.layers)]
    v = None if preset.mla else [torch.zeros(rows, dtype=preset.dtype, device=device)
                                 for _ in range(preset.layers)]
    return KVBuffer.from_layers(k, v, page_size=page_size)


def run(cfg: E2EConfig, clock: Clock, *, progress=None, tier_factory=None) -> dict:
    """Both runs (without, then with the host tier) and their ratio, as one document.

    ``tier_factory(device_pool)`` builds the tier's cache (default: :class:`HiCacheTier`).
    """
    w = cfg.workload
    preset = cfg.preset
    if cfg.page_size < 1:
        raise ValueError(f"--page-size: expected a positive int, got {cfg.page_size}")
    tokens = pool_tokens(cfg)
    pool = _device_pool(preset, tokens, cfg.page_size, clock.device)
    compute = torch.bfloat16 if clock.gpu else torch.float32
    fwd = StandInForward(preset, pool, max_tokens=w.longest, compute_dtype=compute, seed=w.seed)

    # one decode step, and the full-recompute capacity that sets the default rate
    mid = w.history(w.rounds // 2) + w.request_length
    slots = torch.arange(mid, device=clock.device)
    decode_ms = median(clock.time_ms(lambda: fwd.decode_step(mid), warmup=1, reps=3))
    full_ms = median(clock.time_ms(
        lambda: fwd.prefill(client=0, slots=slots, first=0, end=mid), warmup=1, reps=3))
    rate = w.request_rate if w.request_rate else 0.7e3 / full_ms
    decode_s = w.output_length * decode_ms / 1e3

    runs, notes, tiers = {}, list(cfg.notes), {}
    why_not = None if tier_factory is not None else HiCacheTier.unavailable()
    plans = [("without HiCache", lambda: DeviceCache(pool))]
    storage = storage_config(cfg, clock)
    if why_not is None:
        observe = {}
        if cfg.kv_events is not None:
            from ..observers import KVEventPublisher
            observe["observers"] = [KVEventPublisher(cfg.kv_events, topic="kv-events")]
        factory = tier_factory or (lambda p: HiCacheTier(
            p, host_ratio=cfg.host_ratio, host_layout=cfg.host_layout,
            write_policy=cfg.write_policy, backend=cfg.backend, sm_budget=cfg.sm_budget,
            storage=storage, **observe))
        plans.append(("with HiCache", lambda: factory(pool)))
    else:
        notes.append(f"with HiCache: not run: {why_not}")
    try:
        for name, make in plans:
            cache = make()
            tiers[name] = cache.describe()
            engine = Engine(w, cache, fwd, clock, page_size=cfg.page_size, verify=cfg.verify,
                            seed=w.seed)
            task = progress.add_task(f"e2e {name}", total=w.requests) if progress is not None else None
            tick = (lambda: progress.advance(task)) if progress is not None else None
            try:
                with nvtx_range(f"bench.e2e.run {name}"):
                    records = simulate(w, rate, engine.serve, decode_s, on_request=tick)
                clock.sync()
                runs[name] = dict(summarize(records, engine.counts), cache=cache.counters())
            finally:
                cache.close()
    finally:
        if storage is not None and cfg.storage_dir is None:
            shutil.rmtree(storage["directory"], ignore_errors=True)
    doc = dict(
        benchmark="e2e",
        cpu_only=not clock.gpu,
        machine=machine_info(clock),
        model=dict(name=preset.name, layers=preset.layers, kv_heads_per_rank=preset.kv_heads_per_rank,
                   head_dim=preset.head_dim, mla=preset.mla, tp=preset.tp,
                   dtype=str(preset.dtype).removeprefix("torch."),
                   gemms_per_layer=[list(s) for s in preset.gemm_shapes()],
                   compute_dtype=str(compute).removeprefix("torch."), source=preset.source),
        workload=dict(clients=w.clients, rounds=w.rounds, request_length=w.request_length,
                      output_length=w.output_length, request_rate=rate,
                      request_rate_auto=not w.request_rate, max_parallel=w.max_parallel or w.clients,
                      ready_policy=w.ready_policy, seed=w.seed),
        pools=dict(page_size=cfg.page_size, device_tokens=tokens,
                   all_histories_tokens=w.clients * w.longest, host_ratio=cfg.host_ratio,
                   host_layout=cfg.host_layout, write_policy=cfg.write_policy,
                   backend=cfg.backend, sm_budget=cfg.sm_budget, storage=cfg.storage,
                   storage_dir=cfg.storage_dir if storage is not None else None,
                   prefetch_policy=cfg.prefetch_policy if storage is not None else None),
        timing=dict(decode_step_ms=decode_ms, full_recompute_ms=full_ms, full_recompute_tokens=mid),
        caches=tiers,
        notes=notes,
        runs=runs,
    )
    if len(runs) == 2:
        base, tier = runs["without HiCache"], runs["with HiCache"]
        doc["ratio"] = {k: tier[k] / base[k] for k in
                        ("ttft_p50_ms", "ttft_p90_ms", "throughput_rps", "input_tokens_per_s",
                         "prefill_tokens_computed")
                        if isinstance(base.get(k), (int, float)) and base[k]}
    return doc


def storage_config(cfg: E2EConfig, clock: Clock) -> dict | None:
    """The storage tier's configuration for ``cfg.storage`` (None: no storage tier).

    Without ``storage_dir`` the pages go to a fresh temporary directory (removed
    after the run). The namespace names what fixes the KV content besides the
    page keys and the layout (preset, seed, device), so a kept directory is
    found again by the same run and never serves another run's bytes."""
    if cfg.storage == "none":
        return None
    if cfg.storage != "nixl":
        raise ValueError(f"--storage: expected none or nixl, got {cfg.storage!r}")
    content = repr((cfg.preset, cfg.workload.seed, clock.device.type)).encode()
    directory = cfg.storage_dir or tempfile.mkdtemp(prefix="hicache-bench-storage-")
    return dict(directory=directory, namespace="e2e-" + hashlib.sha256(content).hexdigest()[:16],
                prefetch_policy=cfg.prefetch_policy)


def quick_config(preset: ModelPreset, gpu: bool) -> E2EConfig:
    """A short run: seconds on a GPU; on a CPU, the tiny stand-in model."""
    if gpu:
        return E2EConfig(preset=preset, workload=Workload(clients=16, rounds=4,
                                                          request_length=512, output_length=64),
                         page_size=64)
    notes = [] if preset is TINY else [f"CPU: the {preset.name} forward pass replaced by the tiny "
                                       "stand-in (layers, heads and GEMMs cut down)"]
    return E2EConfig(preset=TINY, workload=Workload(clients=6, rounds=3, request_length=48,
                                                    output_length=16),
                     page_size=16, notes=notes)
