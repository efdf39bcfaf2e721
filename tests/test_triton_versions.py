"""The Triton versions the package claims are the ones CI compiles the kernel under."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = [line for line in (ROOT / ".ci" / "triton-versions").read_text().splitlines()
            if line and not line.startswith("#")]


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def test_setup_requires_exactly_the_checked_range():
    low, high = re.search(r'"triton>=([\d.]+),<([\d.]+)"', (ROOT / "setup.py").read_text()).groups()
    minors = sorted({_minor(v) for v in VERSIONS})
    assert _minor(low) == minors[0] and low == min(VERSIONS, key=_minor).rsplit(".", 1)[0]
    assert _minor(high) == (minors[-1][0], minors[-1][1] + 1)
    assert minors == [(3, m) for m in range(minors[0][1], minors[-1][1] + 1)], "a minor is missing"


def test_readme_names_every_checked_version():
    row = next(line for line in (ROOT / "README.md").read_text().splitlines()
               if line.startswith("| Triton |"))
    assert ", ".join(VERSIONS) in row, row


def test_the_main_environment_runs_a_checked_version():
    pin = re.search(r"^triton==([\d.]+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert pin in VERSIONS
