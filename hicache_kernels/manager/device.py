"""Streams and events: real CUDA ones, or an emulation that runs the same manager code on CPU.

The manager only ever talks to a :class:`Device`: it makes streams and events,
records, waits, queries, and launches work on a stream. :class:`CudaDevice`
maps each call onto ``torch.cuda``. :class:`EmulatedDevice` keeps one queue of
operations per stream and runs them on the CPU, either at once
(``defer=False``: a synchronous device) or when the caller steps it
(``defer=True``), so tests can hold transfers in flight, run the streams in any
order the ordering rules allow, and see whether a missing rule corrupts data.

Example (emulated, deferred):
    >>> dev = EmulatedDevice(defer=True)
    >>> s, t = dev.stream(0), dev.stream(0)
    >>> done = dev.event()
    >>> out = []
    >>> dev.launch(s, lambda stream: out.append("copy"))
    >>> dev.record(done, s)
    >>> dev.wait(t, done)                  # t's later work runs after the copy
    >>> dev.launch(t, lambda stream: out.append("use"))
    >>> dev.query(done), out
    (False, [])
    >>> dev.run_all(); out
    ['copy', 'use']
"""

from __future__ import annotations

import ctypes
import random
from collections import deque
from collections.abc import Sequence as _SequenceABC
from typing import Any, Callable, Sequence

import torch

__all__ = ["Device", "CudaDevice", "EmulatedDevice", "EmulatedStream", "EmulatedEvent"]

# fn(stream) runs the work on ``stream`` (the manager's closures call a prepared Transfer).
Work = Callable[[Any], None]
# fn(stream, op, layer) runs one layer of the layer-wise transfer ``op`` on ``stream``.
# It may also have ``all_layers(stream, op, events) -> bool``: every layer in one call,
# with ``events`` (raw cudaEvent_t handles, one per layer) recorded after each layer;
# False when it cannot (nothing done), and the layers then run one by one.
LayerWork = Callable[[Any, Any, int], None]


class Device:
    """What the manager needs from a GPU: streams, events, and a place to launch work."""

    name = "device"
    is_cuda = False

    def stream(self, priority: int = 0):
        raise NotImplementedError

    def current_stream(self):
        raise NotImplementedError

    def event(self):
        raise NotImplementedError

    def record(self, event, stream) -> None:
        raise NotImplementedError

    def wait(self, stream, event) -> None:
        """Make later work on ``stream`` wait for the event's last record (no CPU block)."""
        raise NotImplementedError

    def query(self, event) -> bool:
        """Whether everything before the event's last record has finished (never blocks)."""
        raise NotImplementedError

    def synchronize(self, event) -> None:
        """Block the CPU until the event has completed."""
        raise NotImplementedError

    def launch(self, stream, work: Work, tag: Any = None) -> None:
        """Run ``work(stream)`` on ``stream``. ``tag`` describes it to the emulation's tests."""
        raise NotImplementedError

    def launch_layers(self, stream, work: LayerWork, op: Any, num_layers: int) -> Sequence:
        """Run ``work(stream, op, i)`` on ``stream`` for each layer ``i`` in order (one
        call for a load's per-layer loop; ``op`` is also the tag, as in :meth:`launch`).
        Returns the per-layer events: ``events[i]`` completes once layer ``i`` has.
        Hand them back with :meth:`release_layer_events` once they have completed."""
        events = [self.event() for _ in range(num_layers)]
        for layer, event in enumerate(events):
            self.launch(stream, lambda s, layer=layer: work(s, op, layer), op)
            self.record(event, stream)
        return events

    def release_layer_events(self, events: Sequence) -> None:
        """Events from :meth:`launch_layers` that have completed, for reuse."""

    def priority_range(self) -> tuple[int, int]:
        """(lowest, highest) stream priority; CUDA counts down, so highest is the smaller."""
        return (0, -1)


class CudaDevice(Device):
    """``torch.cuda`` streams and events on one GPU."""

    is_cuda = True

    def __init__(self, device: torch.device | str | int | None = None):
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None \
            else torch.device(device)
        self.name = f"cuda ({torch.cuda.get_device_name(self.device)})"
        self._layer_events: list[list] = []    # released lists, for reuse

    def stream(self, priority: int = 0):
        return torch.cuda.Stream(self.device, priority=priority)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def event(self):
        return torch.cuda.Event()

    def record(self, event, stream) -> None:
        event.record(stream)

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def query(self, event) -> bool:
        return event.query()

    def synchronize(self, event) -> None:
        event.synchronize()

    def launch(self, stream, work: Work, tag: Any = None) -> None:
        work(stream)

    def launch_layers(self, stream, work: LayerWork, op: Any, num_layers: int) -> Sequence:
        pool = self._layer_events
        events = pool.pop() if pool and len(pool[-1]) == num_layers else \
            self._new_layer_events(num_layers, stream)
        all_layers = getattr(work, "all_layers", None)
        if all_layers is None or not all_layers(stream, op, events.handles):
            for layer, event in enumerate(events):
                work(stream, op, layer)
                self.record(event, stream)
        return events

    def release_layer_events(self, events: Sequence) -> None:
        self._layer_events.append(events)

    def _new_layer_events(self, num_layers: int, stream) -> "_EventList":
        """Events for a layer-wise launch, each recorded once so that it exists
        (torch makes a CUDA event on its first record), with their raw handles."""
        events = _EventList(self.event() for _ in range(num_layers))
        for event in events:
            self.record(event, stream)
        events.handles = (ctypes.c_void_p * num_layers)(*[e.cuda_event for e in events])
        return events

    def priority_range(self) -> tuple[int, int]:
        # through an instance: static in some torch versions, a method in others
        return tuple(torch.cuda.current_stream(self.device).priority_range())


class _EventList(list):
    """A layer-wise launch's events, and their raw handles (``handles``: a ctypes
    array, what a compiled launch records)."""

    handles = None


class EmulatedStream:
    """A queue of operations that run in order, like a CUDA stream."""

    __slots__ = ("name", "priority", "ops", "issued", "completed")

    def __init__(self, name: str, priority: int = 0):
        self.name = name
        self.priority = priority
        self.ops: deque = deque()   # (work | None, args, tag, wait_target | None)
        self.issued = 0             # operations ever enqueued
        self.completed = 0          # operations finished

    def __repr__(self) -> str:
        return f"EmulatedStream({self.name!r}, pending={len(self.ops)})"


class EmulatedEvent:
    """Completes once its stream has finished everything enqueued before the record."""

    __slots__ = ("stream", "target")

    def __init__(self):
        self.stream: EmulatedStream | None = None
        self.target = 0

    def done(self) -> bool:
        return self.stream is None or self.stream.completed >= self.target


class _LayerRun:
    """One queue entry for a layer-wise launch: runs its layers one step each."""

    __slots__ = ("work", "op", "num_layers", "next_layer")

    def __init__(self, work: LayerWork, op: Any, num_layers: int):
        self.work = work
        self.op = op
        self.num_layers = num_layers
        self.next_layer = 0


class _LayerEvents(_SequenceABC):
    """The per-layer events of a :class:`_LayerRun`: layer ``i`` is done once its
    stream has completed operation ``first + i`` (made on demand, O(1) to launch)."""

    __slots__ = ("stream", "first", "num_layers")

    def __init__(self, stream: "EmulatedStream", first: int, num_layers: int):
        self.stream = stream
        self.first = first
        self.num_layers = num_layers

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, layer: int) -> "EmulatedEvent":
        if layer < 0:
            layer += self.num_layers
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer: expected 0 <= layer < {self.num_layers}, got {layer}")
        event = EmulatedEvent()
        event.stream = self.stream
        event.target = self.first + layer
        return event


class EmulatedDevice(Device):
    """A CPU stand-in for a GPU that runs the manager's code path unchanged.

    Args:
        defer: queue work until :meth:`step`, :meth:`run_all` or a
            :meth:`synchronize` needs it (tests hold transfers in flight this
            way); False runs each operation as soon as it is launched.
        seed: order in which :meth:`run_all` picks among runnable streams
            (None: round robin).
        execute: False completes operations without running their work (a
            device with free copies: benchmarks of the manager's own cost).
    """

    name = "emulated (CPU)"

    def __init__(self, *, defer: bool = False, seed: int | None = None, execute: bool = True):
        self.defer = defer
        self.execute = execute
        self.streams: list[EmulatedStream] = []
        self._rng = random.Random(seed) if seed is not None else None
        self._compute = self.stream(0, name="compute")

    # -- the Device interface ----------------------------------------------------
    def stream(self, priority: int = 0, *, name: str | None = None) -> EmulatedStream:
        s = EmulatedStream(name or f"stream{len(self.streams)}", priority)
        self.streams.append(s)
        return s

    def current_stream(self) -> EmulatedStream:
        return self._compute

    def event(self) -> EmulatedEvent:
        return EmulatedEvent()

    def record(self, event: EmulatedEvent, stream: EmulatedStream) -> None:
        event.stream = stream
        event.target = stream.issued

    def wait(self, stream: EmulatedStream, event: EmulatedEvent) -> None:
        if event.done():
            return  # already satisfied: CUDA would not delay anything either
        # Snapshot the record now: a later re-record must not change this wait.
        self._enqueue(stream, None, None, (event.stream, event.target))

    def query(self, event: EmulatedEvent) -> bool:
        return event.done()

    def synchronize(self, event: EmulatedEvent) -> None:
        while not event.done():
            if not self._step_any(prefer=event.stream):
                raise RuntimeError(
                    f"emulated device: deadlock, {event.stream.name} can never reach its event "
                    f"({self.describe()})"
                )

    def launch(self, stream: EmulatedStream, work: Work, tag: Any = None) -> None:
        self._enqueue(stream, work, tag, None)

    def launch_layers(self, stream: EmulatedStream, work: LayerWork, op: Any,
                      num_layers: int) -> _LayerEvents:
        stream.ops.append((_LayerRun(work, op, num_layers), (), op, None))
        events = _LayerEvents(stream, stream.issued + 1, num_layers)
        stream.issued += num_layers
        if not self.defer:
            self.run_all()
        return events

    # -- stepping (tests) ------------------------------------------------------------
    def runnable(self, stream: EmulatedStream) -> bool:
        if not stream.ops:
            return False
        wait_for = stream.ops[0][3]
        return wait_for is None or wait_for[0].completed >= wait_for[1]

    def step(self, stream: EmulatedStream) -> bool:
        """Run the next operation of ``stream`` if its waits allow; return whether one ran."""
        if not self.runnable(stream):
            return False
        work, args, _tag, _wait = stream.ops[0]
        if type(work) is _LayerRun:   # one layer per step; the entry leaves after its last
            layer = work.next_layer
            work.next_layer += 1
            if work.next_layer == work.num_layers:
                stream.ops.popleft()
            if self.execute:
                work.work(stream, work.op, layer)
        else:
            stream.ops.popleft()
            if work is not None and self.execute:
                work(stream, *args)
        stream.completed += 1
        return True

    def run_all(self) -> None:
        """Run every queued operation, in an order the waits allow."""
        while any(s.ops for s in self.streams):
            if not self._step_any():
                raise RuntimeError(f"emulated device: deadlock ({self.describe()})")

    def pending(self) -> list[tuple[str, Any]]:
        """(stream name, tag) of each queued launch, oldest first per stream."""
        out = []
        for s in self.streams:
            for work, _args, tag, _wait in s.ops:
                if type(work) is _LayerRun:   # one launch per layer still to run
                    out.extend([(s.name, tag)] * (work.num_layers - work.next_layer))
                elif work is not None:        # (None: a wait)
                    out.append((s.name, tag))
        return out

    def describe(self) -> str:
        return ", ".join(f"{s.name}: {len(s.ops)} queued" for s in self.streams)

    # -- internals -------------------------------------------------------------------
    def _enqueue(self, stream, work, tag, wait_for) -> None:
        stream.issued += 1
        stream.ops.append((work, (), tag, wait_for))
        if not self.defer:
            self.run_all()

    def _step_any(self, prefer: EmulatedStream | None = None) -> bool:
        if prefer is not None and self.step(prefer):
            return True
        order = list(self.streams)
        if self._rng is not None:
            self._rng.shuffle(order)
        return any(self.step(s) for s in order)
