"""hicache-kernels: move paged KV cache between a GPU pool and a pinned host pool.

Layers, bottom to top: :mod:`.layouts` (the one address formula),
:mod:`.backends` (reference, triton, cuda, copy_engine), :mod:`.ops` (the
checked public API), and the front doors :mod:`.sglang` (a drop-in for
``sgl_kernel.kvcacheio``) and the ``hicache-bench`` CLI.
"""

from .buffers import KVBuffer
from .layouts import KVLayout, LayoutKind, PlaneAddressing
from .ops import Transfer, backup_all_layers, load_layer, transfer

__version__ = "0.1.0"

__all__ = [
    "KVBuffer",
    "KVLayout",
    "LayoutKind",
    "PlaneAddressing",
    "Transfer",
    "backup_all_layers",
    "load_layer",
    "transfer",
    "__version__",
]
