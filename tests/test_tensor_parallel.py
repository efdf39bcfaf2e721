"""Tensor parallel: ranks of one model agree on the storage pages they use.

Two and four CPU processes over gloo (this file, run as a script, is one rank),
each with its own manager over one shared NIXL storage directory. Every rank
stores the same six pages (its own bytes: a rank's shard), then one rank's page
file is damaged (a flipped byte; with four ranks also a deleted file on another
rank), every page is dropped, and every rank prefetches them again: all ranks
must fetch, keep and load the same shorter prefix, each its own bytes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from hicache_kernels import KVBuffer, KVLayout  # noqa: E402
from hicache_kernels.manager import HiCacheManager, PageState  # noqa: E402
from hicache_kernels.manager.tp import rank_key  # noqa: E402
from hicache_kernels.storage import hash_page, page_keys  # noqa: E402

P = 4
PAGES = 6
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(tp_size: int, directory, damage: dict, *, mla_too: bool = False) -> list[dict]:
    """Start ``tp_size`` ranks; their results (the last output line of each, JSON)."""
    args = dict(port=_free_port(), size=tp_size, directory=str(directory), damage=damage,
                mla_too=mla_too)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps({**args, "rank": r})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(tp_size)]
    results = []
    try:
        for r, proc in enumerate(procs):
            out, err = proc.communicate(timeout=TIMEOUT_S)
            assert proc.returncode == 0, f"rank {r} failed:\n{out}\n{err}"
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.mark.parametrize("tp_size, damage, prefix", [
    (2, {"1": {"corrupt": 2}}, 2),                            # checked when read: agreed in check_prefetch
    (4, {"2": {"delete": 4}, "3": {"corrupt": 1}}, 1),         # and missing at lookup: agreed in prefetch
])
def test_every_rank_uses_the_same_shorter_prefix(tmp_path, tp_size, damage, prefix):
    results = run_ranks(tp_size, tmp_path, damage, mla_too=tp_size == 2)
    fetched = 4 if tp_size == 4 else PAGES      # the deleted file shortens every rank's lookup
    for rank, res in enumerate(results):
        assert res["stored"] == [["backup", PAGES, 0], ["store", PAGES, 0]]
        assert res["own_files"] == PAGES and res["plain_files"] == 0, "keys carry the rank"
        assert res["fetching"] == fetched, f"rank {rank} fetched {res['fetching']} pages"
        assert res["states"] == ["HOST"] * prefix + ["ABSENT"] * (PAGES - prefix), f"rank {rank}"
        assert res["ack_failed"] == fetched - prefix
        assert res["loaded_own_bytes"], f"rank {rank} loaded bytes that are not its own"
    if tp_size == 2:   # MLA: one plain file per page, written by rank 0, read by every rank
        for rank, res in enumerate(results):
            mla = res["mla"]
            assert mla["stored"] == ([["backup", PAGES, 0], ["store", PAGES, 0]] if rank == 0
                                     else [["backup", PAGES, 0]])
            assert mla["plain_files"] == PAGES and mla["fetching"] == PAGES
            assert mla["states"] == ["HOST"] * PAGES and mla["loaded_rank0_bytes"]


def test_rank_keys():
    key = page_keys(list(range(P)), P)[0]
    assert rank_key(key, 1, 4) == hash_page([1, 4], prior_key=key)      # the chain, continued
    assert len({rank_key(key, r, 4) for r in range(4)} | {key}) == 5
    assert rank_key(("page", 1), 1, 4) == (("page", 1), 1, 4)


def _pool(mla: bool = False) -> KVBuffer:
    lay = KVLayout("layer_first", num_layers=2, num_slots=2 * PAGES * P, head_num=1 if mla else 2,
                   head_dim=8, dtype=torch.bfloat16, page_size=P, mla=mla)
    return KVBuffer.allocate(lay)


@pytest.mark.parametrize("options, match", [
    (dict(tp_size=2), "tp_group: tp_size=2 needs torch.distributed"),
    (dict(tp_size=2, tp_rank=2), r"tp_rank: expected 0 <= tp_rank < tp_size=2, got 2"),
    (dict(tp_size=0), "tp_size: expected an int >= 1, got 0"),
    (dict(tp_rank=-1), "tp_rank: expected an int >= 0, got -1"),
])
def test_bad_tensor_parallel_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        HiCacheManager(_pool(), backend="reference", host_reserve_gb=0, **options)


# -- one rank (this file run as a script) ------------------------------------------------

def _rank_main(args: dict) -> dict:
    import time

    import torch.distributed as dist
    from storage_helpers import pool_bytes, write_device_pages

    from hicache_kernels.storage import StorageTier
    from hicache_kernels.storage.pages import HEADER_BYTES

    rank, size = args["rank"], args["size"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args['port']}", rank=rank,
                            world_size=size)
    keys = page_keys(list(range(PAGES * P)), P)            # the same pages on every rank

    def scenario(mla: bool, damage: dict) -> dict:
        tier = StorageTier({"directory": args["directory"], "prefetch_policy": "wait_complete",
                            "batch_pages": 2})
        mgr = HiCacheManager(_pool(mla), storage=tier, backend="reference", host_reserve_gb=0,
                             host_layout="page_first", tp_rank=rank, tp_size=size)
        data = write_device_pages(mgr, keys, seed=100 + rank)   # this rank's shard of each page
        mgr.hit(keys)
        mgr.synchronize(storage=True)
        out = {"stored": [[a.kind, len(a.page_ids), len(a.failed)] for a in mgr.poll()]}
        dist.barrier()                                     # every rank has stored
        exists = os.path.exists
        own = [tier.store.page_path(k if mla else rank_key(k, rank, size)) for k in keys]
        out["own_files"] = sum(map(exists, own))
        out["plain_files"] = sum(exists(tier.store.page_path(k)) for k in keys)
        dist.barrier()                                     # every rank has looked
        for what, page in damage.items():
            if what == "delete":
                os.unlink(own[page])
            else:
                with open(own[page], "r+b") as f:          # one flipped payload byte
                    f.seek(HEADER_BYTES + 11)
                    byte = f.read(1)
                    f.seek(HEADER_BYTES + 11)
                    f.write(bytes([byte[0] ^ 0x40]))
        dist.barrier()
        mgr.free(keys)
        fetching = mgr.prefetch(keys)                      # a collective
        out["fetching"] = len(fetching)
        deadline = time.monotonic() + 60
        while not mgr.check_prefetch(fetching):            # a collective, every step
            assert time.monotonic() < deadline, "prefetch never became ready"
            time.sleep(0.002)
        acks = [a for a in mgr.poll() if a.kind == "prefetch"]
        out["ack_failed"] = sum(len(a.failed) for a in acks)
        states = mgr.lookup(keys)
        out["states"] = [s.name or "ABSENT" for s in states]
        valid = [k for k, s in zip(keys, states) if s == PageState.HOST]
        if valid:
            handle = mgr.load(valid)
            handle.synchronize()
            mgr.poll()
            got = pool_bytes(mgr.device_pool, handle.device_indices)
            want = data[:, :len(valid) * P]
            if mla:   # what rank 0 wrote, whichever rank reads it
                gen = torch.Generator().manual_seed(100)
                want = torch.randint(0, 256, data.shape, dtype=torch.uint8, generator=gen)[:, :len(valid) * P]
            out["loaded_rank0_bytes" if mla else "loaded_own_bytes"] = bool(torch.equal(got, want))
        mgr.close()
        dist.barrier()
        return out

    result = scenario(False, args["damage"].get(str(rank), {}))
    if args["mla_too"]:
        import shutil
        if rank == 0:
            shutil.rmtree(args["directory"])
        dist.barrier()
        result["mla"] = scenario(True, {})
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(_rank_main(json.loads(sys.argv[1]))))
