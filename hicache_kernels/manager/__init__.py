"""The HiCache manager: host pool, page table, streams, write policies, layer-wise loads.

Files, one concern each: :mod:`.host_pool` (pinned mmap host tier),
:mod:`.pages` (page allocator and page table), :mod:`.device` (CUDA streams or
a CPU emulation), :mod:`.policy` (write policies and eviction order),
:mod:`.storage` (the lower-tier hook), :mod:`.observer` (what observers are told),
:mod:`.tp` (tensor-parallel agreement), :mod:`.manager` (:class:`HiCacheManager`).
"""

from .device import CudaDevice, Device, EmulatedDevice
from .host_pool import HostPool, host_pool_slots
from .manager import Ack, Eviction, HiCacheConfig, HiCacheManager, LoadHandle, PageState
from .observer import ManagerObserver
from .pages import OutOfPages, PageAllocator, PageTable
from .policy import WritePolicy
from .storage import InMemoryStorage, Storage, StorageOp

__all__ = [
    "Ack", "CudaDevice", "Device", "EmulatedDevice", "Eviction", "HiCacheConfig",
    "HiCacheManager", "HostPool", "InMemoryStorage", "LoadHandle", "ManagerObserver", "OutOfPages",
    "PageAllocator", "PageState", "PageTable", "Storage", "StorageOp", "WritePolicy",
    "host_pool_slots",
]
