"""hicache-bench: the project's main job (``python -m hicache_kernels.bench``)."""
