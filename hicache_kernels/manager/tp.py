"""Tensor parallel: what ranks of one model agree on before using storage pages.

Each TP rank holds its own shard of every page (its heads), so a page is usable
only if every rank has its shard. The manager's storage prefetch therefore
counts as hits the minimum over ranks (``all_reduce`` MIN), both when it looks
pages up and when a read settles: no rank loads a prefix another cannot.

Storage keys carry the rank, so ranks sharing a directory keep their shards
apart: a page key (SGLang's chained SHA-256, :func:`hicache_kernels.storage.page_keys`)
continues its hash chain with the pseudo-page ``(tp_rank, tp_size)``, which is
``hash_page([tp_rank, tp_size], prior_key=key)``; any other id becomes the tuple
``(id, tp_rank, tp_size)``. MLA pools keep the plain key: every rank holds the
same latent bytes, so rank 0 alone writes a page and every rank reads it.
"""

from __future__ import annotations

import hashlib
import time
from typing import Hashable, Sequence

import torch

__all__ = ["TensorParallel", "rank_key"]

_HEX = frozenset("0123456789abcdef")


def rank_key(page_id: Hashable, tp_rank: int, tp_size: int) -> Hashable:
    """The storage key of ``page_id``'s shard on ``tp_rank`` of ``tp_size``.

    Example:
        >>> k = "ab" * 32
        >>> rank_key(k, 0, 2) != rank_key(k, 1, 2) and len(rank_key(k, 1, 2)) == 64
        True
        >>> rank_key(("page", 3), 1, 2)
        (('page', 3), 1, 2)
    """
    if isinstance(page_id, str) and page_id and len(page_id) % 2 == 0 and set(page_id) <= _HEX:
        hasher = hashlib.sha256(bytes.fromhex(page_id))
        hasher.update(tp_rank.to_bytes(4, "little"))
        hasher.update(tp_size.to_bytes(4, "little"))
        return hasher.hexdigest()
    return (page_id, tp_rank, tp_size)


def _check_int(name: str, value, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


class TensorParallel:
    """One rank of a tensor-parallel group, as the manager uses it.

    Args:
        tp_rank, tp_size: this rank and the group size (``0 <= tp_rank < tp_size``).
        group: the ``torch.distributed`` process group of the TP ranks (None: the
            default group, which must then have exactly ``tp_size`` ranks). A gloo
            group reduces CPU tensors; an NCCL group reduces on the current CUDA device.
        mla: the pool is MLA (keys stay unsuffixed; only rank 0 writes storage).
    """

    def __init__(self, tp_rank: int, tp_size: int, group=None, *, mla: bool = False):
        self.tp_size = _check_int("tp_size", tp_size, 1)
        self.tp_rank = _check_int("tp_rank", tp_rank, 0)
        if tp_rank >= tp_size:
            raise ValueError(f"tp_rank: expected 0 <= tp_rank < tp_size={tp_size}, got {tp_rank}")
        self.mla = bool(mla)
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(f"tp_group: tp_size={tp_size} needs torch.distributed: call "
                             "torch.distributed.init_process_group first, or pass tp_group=")
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if size != tp_size:
            raise ValueError(f"tp_size: {tp_size}, but the process group has {size} ranks "
                             "(pass the TP ranks' group as tp_group=)")
        if rank != tp_rank:
            raise ValueError(f"tp_rank: {tp_rank}, but this process is rank {rank} of the process group")
        self.group = group
        self._dist = dist
        self._device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")

    @property
    def writes_storage(self) -> bool:
        """Whether this rank writes pages to storage (MLA: rank 0 only)."""
        return not self.mla or self.tp_rank == 0

    def storage_key(self, page_id: Hashable) -> Hashable:
        return page_id if self.mla else rank_key(page_id, self.tp_rank, self.tp_size)

    def storage_keys(self, page_ids: Sequence[Hashable]) -> list:
        if self.mla:
            return list(page_ids)
        rank, size = self.tp_rank, self.tp_size
        return [rank_key(i, rank, size) for i in page_ids]

    def agree_ready(self, ready: bool, num_reads: int) -> bool:
        """Whether every rank's reads of a request may stop now (a collective).
        RuntimeError, on every rank, if the ranks hold different numbers of reads."""
        low_ready, low, neg_high = self.min([bool(ready), num_reads, -num_reads])
        if low != -neg_high:
            raise RuntimeError(f"check_prefetch: the tensor-parallel ranks hold {low} to {-neg_high} "
                               "storage reads for these pages; every rank must make the same calls")
        return bool(low_ready)

    @staticmethod
    def cut(pending, valid: int) -> "_Cut":
        """``pending`` (a storage read) whose result keeps only its first ``valid`` pages."""
        return _Cut(pending, valid)

    def min(self, values: Sequence[int]) -> list[int]:
        """Element-wise minimum of ``values`` over the ranks (a collective: every
        rank calls it, in the same order, with as many values)."""
        t = torch.tensor(list(values), dtype=torch.int64, device=self._device)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN, group=self.group)
        return t.tolist()


class _Cut:
    """A storage read the ranks agreed to cut at ``valid`` pages: ``poll()`` as the
    read's, with every page from ``valid`` on reported failed."""

    __slots__ = ("pending", "valid")

    def __init__(self, pending, valid: int):
        self.pending = pending
        self.valid = valid

    def poll(self):
        result = self.pending.poll() if hasattr(self.pending, "poll") else self.pending
        if result is None:
            return None
        return [bool(ok) and i < self.valid for i, ok in enumerate(result)]

    def wait(self, timeout_s: float = 60.0) -> None:
        if hasattr(self.pending, "wait"):
            self.pending.wait()
        deadline = time.monotonic() + timeout_s
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"storage op did not finish within {timeout_s:g} s")
            time.sleep(0.001)
