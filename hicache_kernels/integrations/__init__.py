"""Integrations: other systems' interfaces adapted onto this package's public ones.

- :mod:`.sglang_plugin`: an SGLang plugin (entry point ``sglang.srt.plugins``)
  that routes SGLang's ``sgl_kernel.kvcacheio`` calls through
  :mod:`hicache_kernels.sglang`.
- :mod:`.sglang_storage`: an SGLang HiCache storage backend
  (``--hicache-storage-backend dynamic``) on the NIXL storage tier.

Nothing here is imported by ``import hicache_kernels``; each module imports
SGLang only when SGLang itself loads it.
"""
