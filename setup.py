"""hicache-kernels: paged KV-cache transfers between a GPU pool and a pinned host pool."""

from setuptools import find_packages, setup

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
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "numpy",      # the Triton interpreter needs it
        "nvtx>=0.2",  # NVTX ranges; a no-op without a GPU
        "rich>=13",   # hicache-bench: tables and progress bars (the main job, so not an extra)
        "matplotlib>=3.7",  # hicache-bench: the GB/s plot
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4"],
        "bench": ["rich>=13", "matplotlib>=3.7"],
        "storage": ["nixl-cu13>=0.7"],
    },
    entry_points={"console_scripts": ["hicache-bench=hicache_kernels.bench.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
