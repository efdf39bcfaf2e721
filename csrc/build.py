"""Build ``libhicache_cuda.so`` with CMake and nvcc: used by ``setup.py``, the
tests, and by hand::

    python csrc/build.py                 # into hicache_kernels/
    python csrc/build.py --out /tmp/lib  # elsewhere

Architectures come from ``CMAKE_CUDA_ARCHITECTURES`` or ``TORCH_CUDA_ARCH_LIST``
in the environment, else CMakeLists.txt's default (see there).
``HICACHE_SKIP_NATIVE=1`` makes ``setup.py`` skip the build.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIB_NAME = "libhicache_cuda.so"
MIN_CUDA = (12, 0)


DEFAULT_NVCC = "/usr/local/cuda/bin/nvcc"


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, else PATH, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    return DEFAULT_NVCC if os.access(DEFAULT_NVCC, os.X_OK) else None


def nvcc_version(nvcc: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def skip_reason() -> str:
    """Why the native build cannot or should not run here ("" when it can)."""
    if os.environ.get("HICACHE_SKIP_NATIVE", "0") not in ("", "0"):
        return "HICACHE_SKIP_NATIVE is set"
    nvcc = find_nvcc()
    if nvcc is None:
        return "no nvcc found (set CUDA_HOME or put nvcc on PATH)"
    version = nvcc_version(nvcc)
    if version is None:
        return f"could not read the version of {nvcc}"
    if version < MIN_CUDA:
        return f"{nvcc} is CUDA {version[0]}.{version[1]}; the kernels need {MIN_CUDA[0]}.{MIN_CUDA[1]}+"
    if shutil.which("cmake") is None:
        return "no cmake found"
    return ""


def source_hash() -> str:
    """Digest of csrc/'s library sources; the library embeds the one it was built from."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "csrc").glob("*/**/*")):
        if path.is_file() and path.suffix in (".h", ".cu", ".cpp") and "tests" not in path.parts:
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    digest.update((ROOT / "CMakeLists.txt").read_bytes())
    return digest.hexdigest()[:16]


def build(out_dir: Path, build_dir: Path, *, jobs: int | None = None, quiet: bool = False) -> Path:
    """Configure and build with CMake; copy the library to ``out_dir``; return its path."""
    reason = skip_reason()
    if reason:
        raise RuntimeError(f"cannot build {LIB_NAME}: {reason}")
    nvcc = find_nvcc()
    build_dir.mkdir(parents=True, exist_ok=True)
    configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DCMAKE_CUDA_COMPILER={nvcc}",
                 "-DCMAKE_BUILD_TYPE=Release", f"-DHCK_SOURCE_HASH={source_hash()}"]
    if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja"]
    compile_ = ["cmake", "--build", str(build_dir), "--parallel", str(jobs or os.cpu_count() or 1)]
    for cmd in (configure, compile_):
        result = subprocess.run(cmd, capture_output=quiet, text=True)
        if result.returncode:
            detail = (result.stdout or "")[-4000:] + (result.stderr or "")[-4000:] if quiet else ""
            raise RuntimeError(
                f"building {LIB_NAME} failed: {' '.join(cmd)} exited with {result.returncode}\n{detail}\n"
                "(set HICACHE_SKIP_NATIVE=1 to install without the CUDA library)"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / LIB_NAME
    shutil.copy2(build_dir / LIB_NAME, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "hicache_kernels")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build" / "native")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()
    path = build(args.out, args.build_dir, jobs=args.jobs)
    print(path)


if __name__ == "__main__":
    sys.exit(main())
