"""The L3 page store against the real NIXL package (POSIX plugin, no GPU needed):
keys, configuration, round trips, restart, corruption, truncation, and
directories that are missing, read-only or full."""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import struct

import numpy as np
import pytest
import torch

from hicache_kernels import KVBuffer
from hicache_kernels.layouts import layer_view
from hicache_kernels.storage import StorageConfig, StorageTier, StorageUnavailable, hash_page, page_keys
from hicache_kernels.storage.nixl_store import NixlFileStore, import_nixl
from hicache_kernels.storage.pages import HEADER_BYTES, PageGeometry
from storage_helpers import (POISON, keys_for, make_layout, make_unwritable, page_slots,
                             poisoned_host, random_host, run_helper, slot_bytes, undo_unwritable)

import_nixl()  # these tests need NIXL: an ImportError here fails them, never skips

KINDS = ["layer_first", "page_first", "page_first_direct", "page_head"]


def open_store(host, directory, **config) -> NixlFileStore:
    return NixlFileStore(host, {"directory": str(directory), **config})


def assert_pages_equal(src, src_first_page, dst, dst_first_page, n_pages):
    p = src.layout.page_size
    for i in range(n_pages * p):
        a = slot_bytes(src, src_first_page * p + i)
        b = slot_bytes(dst, dst_first_page * p + i)
        if not torch.equal(a, b):
            bad = (a != b).nonzero()[0].item()
            raise AssertionError(f"slot {i} of the copied pages differs at byte {bad}")


def assert_poisoned(host, first_page, n_pages):
    p = host.layout.page_size
    for s in range(first_page * p, (first_page + n_pages) * p):
        assert bool((slot_bytes(host, s) == POISON).all()), f"slot {s} was written"


# -- keys ------------------------------------------------------------------------

def test_page_keys_match_sglang_sha256_chain():
    # Computed outside Python: printf '\x01\x00\x00\x00...' | sha256sum, then the
    # second page hashed after the first key's 32 raw bytes.
    page0 = "cf97adeedb59e05bfd73a2b4c2a8885708c4f4f70c84c64b27120e72ab733b72"
    page1 = "d5b8be2bfebaa79f5be11f530268463eb0c5c79ddeddfd5daf9a87236849a075"
    tokens = [1, 2, 3, 4, 5, 0xFFFFFFFF, 0, 7, 9]          # 2 full pages + 1 token
    assert page_keys(tokens, 4) == [page0, page1]
    assert page_keys(torch.tensor(tokens), 4) == [page0, page1]
    assert hash_page([5, 0xFFFFFFFF, 0, 7], prior_key=page0) == page1
    assert page_keys(tokens[4:], 4, prior_key=page0) == [page1]
    # the same chain, built here with hashlib and struct only
    raw0 = struct.pack("<4I", 1, 2, 3, 4)
    assert hashlib.sha256(raw0).hexdigest() == page0
    assert hashlib.sha256(bytes.fromhex(page0) + struct.pack("<4I", 5, 0xFFFFFFFF, 0, 7)).hexdigest() == page1
    # EAGLE bigram tokens hash their elements in order
    assert hash_page([(1, 2), (3, 4)]) == page0


def test_page_keys_reject_bad_input():
    with pytest.raises(ValueError, match="page_size"):
        page_keys([1, 2], 0)
    with pytest.raises(ValueError, match="token_ids"):
        page_keys([1, 2**32], 2)
    with pytest.raises(ValueError, match="token_ids"):
        page_keys([-1, 2], 2)
    key = page_keys([1, 2], 2)[0]
    for bad in (key[:62], key + "00", "abc", "", key.upper(), 12345, b"\x00" * 32):
        with pytest.raises(ValueError, match="prior_key: expected None or 64 lowercase hex digits"):
            page_keys([1, 2], 2, prior_key=bad)
        with pytest.raises(ValueError, match="prior_key: expected None or 64 lowercase hex digits"):
            hash_page([1, 2], prior_key=bad)


# -- configuration -------------------------------------------------------------

def test_config_precedence_dict_over_env_over_file(tmp_path):
    path = tmp_path / "storage.toml"
    path.write_text('directory = "/from/file"\nbatch_pages = 8\nprefetch_policy = "timeout"\n')
    env = {"HICACHE_STORAGE_CONFIG": str(path), "HICACHE_STORAGE_BATCH_PAGES": "16",
           "HICACHE_STORAGE_FSYNC": "true", "HICACHE_STORAGE_PLUGIN_PARAMS": '{"use_uring": "true"}'}
    cfg = StorageConfig.load({"prefetch_policy": "wait_complete"}, env=env)
    assert cfg.directory == "/from/file" and cfg.batch_pages == 16 and cfg.fsync is True
    assert cfg.prefetch_policy == "wait_complete" and cfg.plugin_params == {"use_uring": "true"}
    json_path = tmp_path / "storage.json"
    json_path.write_text(json.dumps({"plugin": "posix", "namespace": "llama-tp0"}))
    cfg = StorageConfig.load(path=json_path, env={})
    assert cfg.plugin == "POSIX" and cfg.namespace == "llama-tp0"
    assert cfg.timeout_for(2048) == pytest.approx(2.0 + 0.1 * 2)
    assert StorageConfig(prefetch_timeout_max=3.0).timeout_for(10**6) == 3.0


@pytest.mark.parametrize("config, match", [
    ({"directroy": "/x"}, "unknown key"),
    ({"prefetch_policy": "eager"}, "prefetch_policy"),
    ({"plugin": "NFS"}, "plugin"),
    ({"batch_pages": 0}, "batch_pages"),
    ({"namespace": "a/b"}, "namespace"),
])
def test_config_rejects_bad_values(config, match):
    with pytest.raises(ValueError, match=match):
        StorageConfig.load(config, env={})


def test_config_rejects_bad_env():
    with pytest.raises(ValueError, match="HICACHE_STORAGE_BATCH_PAGES"):
        StorageConfig.load(env={"HICACHE_STORAGE_BATCH_PAGES": "many"})


# -- geometry ------------------------------------------------------------------

@pytest.mark.parametrize("kind, mla", [(k, False) for k in KINDS] + [(k, True) for k in KINDS[:3]])
def test_page_runs_cover_exactly_the_page(kind, mla):
    layout = make_layout(kind, mla=mla, dtype=torch.float16)
    host = random_host(layout)
    geo = PageGeometry(host)
    page = 3
    # Mark every byte of the page through torch indexing, then walk the runs.
    for t in host.tensors():
        t.view(torch.uint8).zero_()
    p = layout.page_size
    for s in range(page * p, (page + 1) * p):
        for plane in host.planes():
            for layer in range(layout.num_layers):
                view = layer_view(plane, layout, layer)   # [pages, P or 1, H, head_bytes]
                view[s // view.shape[1], s % view.shape[1]].fill_(1)
    addr, size = geo.page_runs(np.array([page]))
    assert int(size.sum()) == geo.page_bytes
    for a, n in zip(addr.tolist(), size.tolist()):
        assert set((ctypes.c_char * n).from_address(a).raw) == {1}, "a run leaves the page"
    assert len(set(addr.tolist())) == len(addr), "runs overlap"


# -- round trips -----------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32])
def test_round_trip_is_bit_exact(tmp_path, kind, dtype):
    layout = make_layout(kind, dtype=dtype)
    src = random_host(layout, seed=1)
    keys = keys_for(3, layout.page_size)
    writer = open_store(src, tmp_path)
    assert writer.batch_set(keys, page_slots(1, 3, layout.page_size)) == [True] * 3
    assert writer.batch_exists(keys) == 3
    # A second pool of the same layout whose V lies before K in memory: the file
    # bytes must not depend on where a pool's planes are.
    dst = poisoned_host(layout, split_kv=True)
    reader = open_store(dst, tmp_path)
    assert reader.batch_get(keys, page_slots(2, 3, layout.page_size)) == [True] * 3
    assert_pages_equal(src, 1, dst, 2, 3)
    assert_poisoned(dst, 0, 2)
    assert_poisoned(dst, 5, 1)
    stats = reader.io_stats()
    assert stats["pages_read"] == 3 and stats["bytes_read"] == 3 * reader.page_bytes


@pytest.mark.parametrize("kind", ["layer_first", "page_first_direct"])
def test_round_trip_mla_fp8_odd_sizes(tmp_path, kind):
    layout = make_layout(kind, mla=True, dtype=torch.float8_e5m2, layers=5, page_size=3, head_dim=36)
    src = random_host(layout, seed=2)
    keys = keys_for(6, 3)
    store = open_store(src, tmp_path, fsync=True)
    order = [5, 0, 3, 1, 4, 2]          # pages scattered in the pool, in any order
    slots = torch.cat([page_slots(p, 1, 3) for p in order])
    assert store.batch_set(keys, slots) == [True] * 6
    dst = poisoned_host(layout)
    assert open_store(dst, tmp_path).batch_get(keys, slots.flip(0).view(-1, 3).flip(1).reshape(-1)) == [True] * 6
    for i, p in enumerate(order):
        assert_pages_equal(src, p, dst, order[::-1][i], 1)


@pytest.mark.gpu
def test_round_trip_pinned_host_pool(tmp_path):
    """The manager's host pool is pinned (page-locked through CUDA)."""
    layout = make_layout("page_first")
    src = KVBuffer.allocate(layout, pin_memory=True)
    for t in src.tensors():
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8))
    dst = KVBuffer.allocate(layout, pin_memory=True)
    for t in dst.tensors():
        t.view(torch.uint8).fill_(POISON)
    assert src.is_pinned() and dst.is_pinned()
    keys = keys_for(3, 4)
    assert open_store(src, tmp_path).batch_set(keys, page_slots(0, 3, 4)) == [True] * 3
    assert open_store(dst, tmp_path).batch_get(keys, page_slots(3, 3, 4)) == [True] * 3
    assert_pages_equal(src, 0, dst, 3, 3)


def test_layouts_and_namespaces_do_not_share_pages(tmp_path):
    a = random_host(make_layout("page_first"))
    b = poisoned_host(make_layout("page_head"))
    keys = keys_for(2, 4)
    assert open_store(a, tmp_path).batch_set(keys, page_slots(0, 2, 4)) == [True, True]
    assert open_store(b, tmp_path).batch_exists(keys) == 0
    assert open_store(a, tmp_path, namespace="other-model").batch_exists(keys) == 0
    assert open_store(a, tmp_path).batch_exists(keys) == 2


def test_hit_prefix_stops_at_the_first_missing_page(tmp_path):
    layout = make_layout()
    src = random_host(layout)
    keys = keys_for(4, 4)
    store = open_store(src, tmp_path)
    assert store.batch_set([keys[0], keys[1], keys[3]], torch.cat(
        [page_slots(0, 2, 4), page_slots(3, 1, 4)])) == [True] * 3
    assert store.batch_exists(keys) == 2
    dst = poisoned_host(layout)
    assert open_store(dst, tmp_path).batch_get(keys, page_slots(0, 4, 4)) == [True, True, False, False]
    assert_poisoned(dst, 2, 2)


def test_restart_reads_pages_written_by_another_process(tmp_path):
    layout = make_layout("page_first_direct", dtype=torch.float8_e4m3fn)
    expected = tmp_path / "expected.pt"
    result = run_helper("write", kind="page_first_direct", dtype="float8_e4m3fn", directory=str(tmp_path),
                        pages=3, first_page=2, seed=99, key_seed=5, expected=str(expected))
    assert result["ok"] == [True] * 3
    dst = poisoned_host(layout)
    keys = keys_for(3, 4, seed=5)
    store = open_store(dst, tmp_path)
    assert store.batch_exists(keys) == 3
    assert store.batch_get(keys, page_slots(0, 3, 4)) == [True] * 3
    want = torch.load(expected)
    got = torch.stack([slot_bytes(dst, s) for s in range(12)])
    assert torch.equal(got, want), "bytes differ from what the writing process had"


# -- nothing half-done is trusted ----------------------------------------------------

def _written(tmp_path, n=3, kind="page_first"):
    layout = make_layout(kind)
    src = random_host(layout, seed=3)
    keys = keys_for(n, 4)
    store = open_store(src, tmp_path)
    assert store.batch_set(keys, page_slots(0, n, 4)) == [True] * n
    return layout, src, keys, store


def _flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("where", ["payload_start", "payload_end", "header_key", "header_crc"])
def test_corrupted_page_is_a_logged_miss_and_removed(tmp_path, caplog, where):
    layout, src, keys, store = _written(tmp_path)
    path = store.page_path(keys[1])
    offset = {"payload_start": HEADER_BYTES, "payload_end": HEADER_BYTES + store.page_bytes - 1,
              "header_key": 40, "header_crc": 24}[where]
    _flip_byte(path, offset)
    dst = poisoned_host(layout)
    reader = open_store(dst, tmp_path)
    with caplog.at_level(logging.WARNING, logger="hicache_kernels.storage"):
        assert reader.batch_get(keys, page_slots(3, 3, 4)) == [True, False, False]
    assert "corrupt" in caplog.text and path in caplog.text
    assert reader.io_stats()["corrupt_pages"] == 1
    assert_pages_equal(src, 0, dst, 3, 1)
    assert not os.path.exists(path), "a corrupt page must not be offered again"
    assert reader.batch_exists(keys) == 1


@pytest.mark.parametrize("size", ["empty", "header_only", "one_byte_short"])
def test_truncated_page_is_a_miss(tmp_path, size):
    layout, src, keys, store = _written(tmp_path)
    path = store.page_path(keys[0])
    new_size = {"empty": 0, "header_only": HEADER_BYTES, "one_byte_short": store.file_bytes - 1}[size]
    os.truncate(path, new_size)
    assert store.batch_exists(keys) == 0
    dst = poisoned_host(layout)
    assert open_store(dst, tmp_path).batch_get(keys, page_slots(0, 3, 4)) == [False] * 3
    assert_poisoned(dst, 0, 3)


@pytest.mark.parametrize("change", ["one_byte_short", "bytes_appended", "another_layouts_file"])
def test_a_page_file_of_the_wrong_size_is_a_logged_miss_and_removed(tmp_path, caplog, change):
    """The lookup (what a prefetch asks first) sees the size: the page is a miss,
    logged, counted and removed, as for any other corrupt page."""
    layout, src, keys, store = _written(tmp_path)
    path = store.page_path(keys[1])
    if change == "one_byte_short":
        os.truncate(path, store.file_bytes - 1)
    elif change == "bytes_appended":
        with open(path, "ab") as f:
            f.write(b"\0" * 8)
    else:   # the same key written by a pool of another layout, copied into this one's place
        other = open_store(random_host(make_layout("page_first", layers=2)), tmp_path / "other")
        assert other.batch_set(keys[1:2], page_slots(0, 1, 4)) == [True]
        assert other.file_bytes != store.file_bytes
        shutil.copy(other.page_path(keys[1]), path)
    with caplog.at_level(logging.WARNING, logger="hicache_kernels.storage"):
        assert store.batch_exists(keys) == 1
    assert "corrupt" in caplog.text and path in caplog.text
    assert store.io_stats()["corrupt_pages"] == 1
    assert not os.path.exists(path), "a page file of the wrong size must not be offered again"
    assert store.batch_exists(keys) == 1 and store.io_stats()["corrupt_pages"] == 1


def test_page_renamed_to_another_key_is_a_miss(tmp_path):
    layout, src, keys, store = _written(tmp_path)
    other = keys_for(1, 4, seed=11)[0]
    os.makedirs(os.path.dirname(store.page_path(other)), exist_ok=True)
    shutil.copy(store.page_path(keys[0]), store.page_path(other))
    assert open_store(poisoned_host(layout), tmp_path).batch_get([other], page_slots(0, 1, 4)) == [False]


def test_temporary_files_are_never_pages(tmp_path):
    layout, src, keys, store = _written(tmp_path, n=1)
    final = store.page_path(keys[0])
    tmp = os.path.join(os.path.dirname(final), f".{keys[0][:16]}.1.deadbeef.tmp")
    os.rename(final, tmp)             # complete bytes, but never committed
    assert store.batch_exists(keys) == 0
    assert open_store(poisoned_host(layout), tmp_path).batch_get(keys, page_slots(0, 1, 4)) == [False]


def test_failed_transfer_leaves_no_page_and_no_temp(tmp_path, monkeypatch):
    layout = make_layout()
    store = open_store(random_host(layout), tmp_path)
    keys = keys_for(2, 4)
    from hicache_kernels.storage import nixl_store

    def broken(*args, **kwargs):
        raise nixl_store.TransferFailed("injected")

    monkeypatch.setattr(store, "_transfer", broken)
    assert store.batch_set(keys, page_slots(0, 2, 4)) == [False, False]
    assert store.batch_exists(keys) == 0
    assert not [f for _, _, files in os.walk(tmp_path) for f in files], "files left behind"
    assert store.io_stats()["write_errors"] == 2
    # a failed read: nothing is claimed valid
    good = open_store(random_host(layout), tmp_path)
    assert good.batch_set(keys, page_slots(0, 2, 4)) == [True, True]
    reader = open_store(poisoned_host(layout), tmp_path)
    monkeypatch.setattr(reader, "_transfer", broken)
    assert reader.batch_get(keys, page_slots(0, 2, 4)) == [False, False]


def test_a_short_read_from_nixl_fails_the_batch(tmp_path):
    """Truncation after the size check (a writer racing the reader): NIXL's
    POSIX plugin reports the short read, and no page is valid."""
    layout, src, keys, store = _written(tmp_path, n=2)
    reader = open_store(poisoned_host(layout), tmp_path)
    real_open = reader._open_valid_page

    def open_then_truncate(key):
        opened = real_open(key)
        if opened is not None and key == keys[1]:
            os.truncate(reader.page_path(key), HEADER_BYTES + 10)
        return opened

    reader._open_valid_page = open_then_truncate
    assert reader.batch_get(keys, page_slots(0, 2, 4)) == [False, False]
    assert reader.io_stats()["read_errors"] == 1


# -- directories that do not cooperate ---------------------------------------------

def test_missing_directory_is_reported_and_the_tier_serves_without_storage(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    directory = blocker / "kv"              # cannot exist, whoever we run as
    layout = make_layout()
    host = random_host(layout)
    with pytest.raises(StorageUnavailable, match="cannot be created"):
        open_store(host, directory)
    with caplog.at_level(logging.ERROR, logger="hicache_kernels.storage"):
        tier = StorageTier({"directory": str(directory)})
        tier.attach(host)
    assert not tier.enabled and str(directory) in tier.status() and str(directory) in caplog.text
    keys = keys_for(2, 4)
    assert tier.batch_exists(keys) == 0
    assert tier.batch_set(keys, [0, 1]).poll() == [False, False]
    fetch = tier.batch_get(keys, [2, 3])
    assert fetch.can_terminate() and fetch.terminate() == 0
    tier.detach()


def test_read_only_directory_serves_reads_and_refuses_writes(tmp_path, caplog):
    layout, src, keys, store = _written(tmp_path, n=2)
    root = store.root
    how = make_unwritable(root)
    try:
        with caplog.at_level(logging.ERROR, logger="hicache_kernels.storage"):
            ro = open_store(poisoned_host(layout), tmp_path)
        assert not ro.writable and "read-only" in ro.status() and root in caplog.text
        assert ro.batch_get(keys, page_slots(0, 2, 4)) == [True, True]
        more = keys_for(2, 4, seed=12)
        assert ro.batch_set(more, page_slots(2, 2, 4)) == [False, False]
        # a store that started writable and then lost the directory: disables writes
        assert store.batch_set(more, page_slots(2, 2, 4)) == [False, False]
        assert not store.writable
        assert store.batch_exists(more) == 0
    finally:
        undo_unwritable(root, how)


@pytest.mark.parametrize("fills_up_in", ["header", "payload"])
def test_full_directory_keeps_earlier_pages_and_leaves_no_partial_page(tmp_path, fills_up_in):
    layout, src, keys, store = _written(tmp_path, n=2)
    # The child process may only write files this long (RLIMIT_FSIZE binds root too).
    limit = HEADER_BYTES // 2 if fills_up_in == "header" else HEADER_BYTES + store.page_bytes // 2
    result = run_helper("full", kind="page_first", dtype="bfloat16", directory=str(tmp_path),
                        pages=3, first_page=0, seed=4, key_seed=21, file_limit=limit)
    assert result["ok"] == [False] * 3
    assert result["stats"]["write_errors"] >= 1
    new_keys = keys_for(3, 4, seed=21)
    assert store.batch_exists(new_keys) == 0
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".tmp")]
    assert not leftovers, f"partial pages left behind: {leftovers}"
    assert open_store(poisoned_host(layout), tmp_path).batch_get(keys, page_slots(0, 2, 4)) == [True, True]


# -- bad input -------------------------------------------------------------------

def test_bad_arguments_raise_and_write_nothing(tmp_path):
    layout = make_layout()
    store = open_store(random_host(layout), tmp_path)
    keys = keys_for(2, 4)
    with pytest.raises(ValueError, match="host_indices: expected 2 pages"):
        store.batch_set(keys, page_slots(0, 1, 4))
    with pytest.raises(ValueError, match="consecutive slots starting at a multiple of 4"):
        store.batch_set(keys, torch.arange(1, 9))
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 24\)"):
        store.batch_set(keys, page_slots(5, 2, 4))
    with pytest.raises(ValueError, match="keys: expected lowercase hex"):
        store.batch_set(["../../etc/passwd", keys[1]], page_slots(0, 2, 4))
    with pytest.raises(ValueError, match="keys: expected lowercase hex"):
        store.batch_exists(["../" + keys[0][:8]])
    with pytest.raises(ValueError, match="host_indices: expected a 1-D integer tensor"):
        store.batch_get(keys, page_slots(0, 2, 4).float())
    with pytest.raises(ValueError, match="host: expected a KVBuffer in CPU memory"):
        NixlFileStore(KVBuffer.allocate(layout, device="meta"), {"directory": str(tmp_path)})
    with pytest.raises(TypeError, match="host: expected a KVBuffer"):
        NixlFileStore(layout, {"directory": str(tmp_path)})
    assert not [f for _, _, files in os.walk(tmp_path) for f in files]


def test_a_closed_store_answers_misses(tmp_path):
    layout, src, keys, store = _written(tmp_path, n=2)
    store.close()
    store.close()
    assert store.batch_get(keys, page_slots(3, 2, 4)) == [False, False]
    assert store.batch_set(keys_for(1, 4, seed=5), page_slots(0, 1, 4)) == [False]
