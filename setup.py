"""hicache-kernels: paged KV-cache transfers between a GPU pool and a pinned host pool.

When nvcc is found, the CUDA library (csrc/, built with CMake by csrc/build.py)
is built into the package as ``hicache_kernels/libhicache_cuda.so``; without
nvcc, or with ``HICACHE_SKIP_NATIVE=1``, the package installs without it and
the reference and Triton backends still work.

The manager's compiled load path (csrc/manager/fastload.c) and the prepared
launches' per-call checks (csrc/ops/prepared.c), plain C extensions, are built
with the host compiler; if that fails the same work runs in Python.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _native():
    spec = importlib.util.spec_from_file_location("hicache_native_build", ROOT / "csrc" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CUDA_LIB = "hicache_kernels.libhicache_cuda"
FASTLOAD = "hicache_kernels.manager._fastload"
PREPARED = "hicache_kernels._prepared"


class BuildNative(build_ext):
    """Builds the CUDA library with CMake, and the C extension the usual way."""

    def run(self):
        reason = _native().skip_reason()
        if reason:
            print(f"hicache-kernels: not building the CUDA library ({reason}); the reference "
                  "and Triton backends still work", file=sys.stderr)
            self.extensions = [e for e in self.extensions if e.name != CUDA_LIB]
        super().run()

    def get_ext_filename(self, fullname):
        if fullname == CUDA_LIB:
            return os.path.join("hicache_kernels", _native().LIB_NAME)
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if ext.name in (FASTLOAD, PREPARED):
            try:
                super().build_extension(ext)
            except Exception as exc:   # no C compiler: Python does the same work
                what = ("the manager's compiled load path; the manager uses its numpy path"
                        if ext.name == FASTLOAD else
                        "the prepared launches' compiled checks; they run in Python")
                print(f"hicache-kernels: not building {what} ({exc})", file=sys.stderr)
            return
        native = _native()
        out = Path(self.get_ext_fullpath(ext.name)).parent
        native.build(out, Path(self.build_temp).resolve() / "native", jobs=os.cpu_count())


setup(
    name="hicache-kernels",
    version="0.1.0",
    description="Triton and CUDA kernels that move paged KV cache between GPU memory and a "
                "pinned host pool (SGLang HiCache layouts), with a manager and a benchmark.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hicache_kernels", "hicache_kernels.*"]),
    ext_modules=[Extension(CUDA_LIB, sources=[]),
                 Extension(FASTLOAD, sources=["csrc/manager/fastload.c"],
                           extra_compile_args=["-O2", "-std=c11"]),
                 Extension(PREPARED, sources=["csrc/ops/prepared.c"],
                           extra_compile_args=["-O2", "-std=c11"])],
    cmdclass={"build_ext": BuildNative},
    install_requires=[
        "torch>=2.4",
        # Every Triton release in this range (the ones PyTorch 2.8-2.14 pin) is checked:
        # .ci/triton_matrix.sh compiles the Triton kernel under each (.ci/triton-versions).
        "triton>=3.4,<3.10",
        "numpy",      # the Triton interpreter needs it
        "nvtx>=0.2",  # NVTX ranges; a no-op without a GPU
        "rich>=13",   # hicache-bench: tables and progress bars (the main job, so not an extra)
        "matplotlib>=3.7",  # hicache-bench: the GB/s plot
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4",
                 "pyzmq>=25", "msgspec>=0.18", "prometheus_client>=0.20"],
        "bench": ["rich>=13", "matplotlib>=3.7"],
        # NIXL for the storage tier. `nixl` installs its CUDA 12 and CUDA 13 builds and
        # picks one at import time by the CUDA version torch reports; the -cu12 and
        # -cu13 extras install one build only.
        "storage": ["nixl>=0.7"],
        "storage-cu12": ["nixl-cu12>=0.7"],
        "storage-cu13": ["nixl-cu13>=0.7"],
        # KV events over ZMQ (SGLang's msgpack format) and Prometheus metrics: hicache_kernels.observers
        "observe": ["pyzmq>=25", "msgspec>=0.18", "prometheus_client>=0.20"],
        # The plugin and storage backend need nothing more than SGLang itself
        # (tested with 0.5.23); the storage backend also needs the storage extra.
        "sglang": ["sglang>=0.5.23"],
    },
    entry_points={
        "console_scripts": ["hicache-bench=hicache_kernels.bench.cli:main"],
        # SGLang's load_plugins() runs this in every SGLang process.
        "sglang.srt.plugins": ["hicache_kernels=hicache_kernels.integrations.sglang_plugin:register"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
