"""Shared by the cost benchmarks: a timer, the ``cuda`` backend launching into the CUDA
library's host twin with the driver's launch stubbed (tests/host_twin.py), and
SGLang's modules where they import (the tests' environment, with its torchvision
stand-in when torchvision is missing)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import host_twin  # noqa: E402  (tests/host_twin.py)


@pytest.fixture(scope="module")
def twin_library(tmp_path_factory):
    return host_twin.Twin(host_twin.build(tmp_path_factory.mktemp("twin")))


@pytest.fixture
def stubbed(twin_library, monkeypatch):
    """``backend="cuda"`` on CPU tensors, launching into the twin, the launch stubbed."""
    host_twin.install(monkeypatch, twin_library)
    twin_library.mode(execute=False, log=False)
    return host_twin


def import_sglang(*names: str):
    """``(modules, "")`` for SGLang's ``names``, or ``(None, why they do not import)``."""
    stubs = TESTS / "stubs"
    if importlib.util.find_spec("torchvision") is None and str(stubs) not in sys.path:
        sys.path.insert(0, str(stubs))   # SGLang imports torchvision: the tests' stand-in
    try:
        return [importlib.import_module(name) for name in names], ""
    except Exception as e:  # noqa: BLE001 - any failure to import is reported, not raised
        return None, f"{type(e).__name__}: {e}"


def median_us(call, rounds: int, iterations: int) -> float:
    """Median us per call over ``rounds`` of ``iterations`` calls (after one untimed call)."""
    call()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(iterations):
            call()
        times.append((time.perf_counter() - t) / iterations)
    return sorted(times)[rounds // 2] * 1e6
