"""Shared test setup.

Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter;
TRITON_INTERPRET must be set before triton decorates any kernel, so it is set
here, before the package is imported.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", max_examples=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Every dtype a KV cache uses; all are moved as raw bytes.
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.int8]

POISON = 0xA5


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


def random_bytes_(t: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``t`` in place with random bytes (never zeros-only data), on any device."""
    b = t.view(torch.uint8)
    src = torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=gen)
    b.copy_(src)
    return t


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with a fixed byte so unwritten bytes are visible."""
    t.view(torch.uint8).fill_(POISON)
    return t


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).cpu()


def assert_bytes_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    a, e = as_bytes(actual), as_bytes(expected)
    assert a.shape == e.shape, f"{what}: shapes {a.shape} vs {e.shape}"
    if not torch.equal(a, e):
        diff = (a != e).nonzero()
        raise AssertionError(f"{what}: {diff.shape[0]} bytes differ, first at {diff[0].tolist()}")


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
