"""The ``hicache-bench`` command."""

from __future__ import annotations

import argparse
import sys

import torch

from .. import __version__, backends


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hicache-bench",
        description="Benchmark and check hicache-kernels on this machine.",
    )
    parser.parse_args(argv)
    from .selfcheck import run_selfcheck

    print(f"hicache-kernels {__version__}, torch {torch.__version__}, "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    for name, (ok, why) in backends.status().items():
        print(f"  backend {name:12s} {'yes' if ok else 'no ':3s}  {why}")
    rows = run_selfcheck()
    bad = [r for r in rows if not r["bytes_equal"]]
    for r in rows:
        print(f"  {r['layout']:18s} {r['attn']}  {r['backend']:10s} "
              f"{'bytes equal' if r['bytes_equal'] else 'MISMATCH':11s} {r['seconds'] * 1e3:8.1f} ms")
    print("self-check:", "FAILED" if bad else "all layouts round-trip bit-exactly")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
