"""The SGLang plugin against the real SGLang: found through importlib.metadata
entry points by SGLang's own load_plugins(), and SGLang's own host pools then
moving bytes through it, every layout and io backend, checked byte by byte."""

from __future__ import annotations

import importlib.metadata
import textwrap

import pytest
import torch

import sglang_env  # noqa: F401  (SGLang importable on CPU; must precede sglang imports)
from conftest import POISON, assert_bytes_equal, random_bytes_
from sglang_env import TESTS, device_planes, host_rows, make_pools, run_child

import hicache_kernels.sglang as dropin
from hicache_kernels.integrations import sglang_plugin

PLUGIN_VARS = ("HICACHE_SGLANG_PLUGIN", "HICACHE_SGLANG_ROUTE_JIT", "SGLANG_PLUGINS")

# (pool, io backend, host layout): what SGLang's MHA and MLA host pools offer.
CASES = [
    ("mha", "kernel", "layer_first"),
    ("mha", "kernel", "page_first"),
    ("mha", "kernel", "page_head"),
    ("mha", "direct", "layer_first"),
    ("mha", "direct", "page_first_direct"),
    ("mla", "kernel", "layer_first"),
    ("mla", "kernel", "page_first"),
    ("mla", "direct", "layer_first"),
    ("mla", "direct", "page_first_direct"),
]


@pytest.fixture(scope="module")
def routed():
    """SGLang's plugin loader, run in this process as every SGLang process runs
    it, with the plugin's defaults."""
    from sglang.srt.plugins import load_plugins

    with pytest.MonkeyPatch.context() as env:
        for var in PLUGIN_VARS:
            env.delenv(var, raising=False)
        load_plugins()
        yield


def test_entry_point_is_what_sglang_looks_up():
    (ep,) = [e for e in importlib.metadata.entry_points(group=sglang_plugin.ENTRY_POINT_GROUP)
             if e.name == sglang_plugin.ENTRY_POINT_NAME]
    assert ep.dist.name == "hicache-kernels"
    assert ep.load() is sglang_plugin.register


def test_load_plugins_binds_every_function_in_sglang_host_pools(routed):
    import sglang.srt.mem_cache.pool_host.mha as mha
    import sglang.srt.mem_cache.pool_host.mla as mla

    for name in ("transfer_kv_per_layer", "transfer_kv_per_layer_pf_lf", "transfer_kv_per_layer_ph_lf",
                 "transfer_kv_all_layer", "transfer_kv_all_layer_lf_pf", "transfer_kv_all_layer_lf_ph",
                 "transfer_kv_direct", "transfer_kv_per_layer_direct_pf_lf",
                 "transfer_kv_all_layer_direct_lf_pf"):
        assert getattr(mha, name) is getattr(dropin, name), name
    for name in ("transfer_kv_per_layer_mla", "transfer_kv_per_layer_mla_pf_lf",
                 "transfer_kv_all_layer_mla", "transfer_kv_all_layer_mla_lf_pf"):
        assert getattr(mla, name) is getattr(dropin, name), name
    # Without HICACHE_SGLANG_ROUTE_JIT, SGLang's JIT checks are its own.
    from sglang.kernels.ops.kvcache import hicache

    assert mha.can_use_hicache_jit_kernel is hicache.can_use_hicache_jit_kernel
    assert not hasattr(hicache.can_use_hicache_jit_kernel, "__wrapped__")


@pytest.mark.parametrize("kind,io_backend,layout", CASES)
def test_sglang_host_pool_moves_bytes_exactly(routed, kind, io_backend, layout):
    gen = torch.Generator().manual_seed(hash((kind, io_backend, layout)) % 2**31)
    device, host = make_pools(kind, layout)
    P = host.page_size
    planes = device_planes(device)
    for layer_tensors in planes:
        for t in layer_tensors:
            random_bytes_(t, gen)
    host.kv_buffer.view(torch.uint8).fill_(POISON)

    # Three whole pages each side, scattered, as SGLang's allocators hand them out.
    host_pages = torch.randperm(host.page_num - 1, generator=gen)[:3] + 1
    device_pages = torch.randperm(device.size // P, generator=gen)[:3] + 1
    host_idx = (host_pages[:, None] * P + torch.arange(P)).reshape(-1)
    device_idx = (device_pages[:, None] * P + torch.arange(P)).reshape(-1)

    expected = host.kv_buffer.clone()
    host.backup_from_device_all_layer(device, host_idx, device_idx, io_backend)
    for p, layer_tensors in enumerate(planes):
        for layer, t in enumerate(layer_tensors):
            buf, index = host_rows(host, p, layer, host_idx, expected)
            buf[index] = t[device_idx]
    assert_bytes_equal(host.kv_buffer, expected, f"{kind} {io_backend} {layout} backup")

    for layer_tensors in planes:
        for t in layer_tensors:
            t.view(torch.uint8).fill_(POISON)
    for layer in range(len(planes[0])):
        host.load_to_device_per_layer(device, host_idx, device_idx, layer, io_backend)
    for p, layer_tensors in enumerate(planes):
        for layer, t in enumerate(layer_tensors):
            want = torch.full_like(t.view(torch.uint8), POISON).view(t.dtype)
            buf, index = host_rows(host, p, layer, host_idx)
            want[device_idx] = buf[index]
            assert_bytes_equal(t, want, f"{kind} {io_backend} {layout} load plane {p} layer {layer}")


def test_bad_switch_raises_naming_it_before_changing_anything(routed, monkeypatch):
    monkeypatch.setenv("HICACHE_SGLANG_ROUTE_JIT", "maybe")
    with pytest.raises(ValueError, match="HICACHE_SGLANG_ROUTE_JIT: expected 1 or 0"):
        sglang_plugin.register()
    monkeypatch.delenv("HICACHE_SGLANG_ROUTE_JIT")
    monkeypatch.setenv("HICACHE_BACKEND", "warp-drive")
    with pytest.raises(ValueError, match="HICACHE_BACKEND: backend: expected 'auto' or one of"):
        sglang_plugin.register()


def test_register_without_sglang_does_nothing():
    script = textwrap.dedent("""
        import json, logging, sys
        sys.modules["sglang"] = None       # a process without SGLang
        logging.basicConfig(level=logging.DEBUG)
        from hicache_kernels.integrations import sglang_plugin
        sglang_plugin.register()
        print(json.dumps({"sglang": sorted(m for m in sys.modules if m.startswith("sglang."))}))
    """)
    out, log = run_child(script)
    assert out == {"sglang": []}
    assert "hicache-kernels" not in log


_OFF = textwrap.dedent("""
    import json, logging, torch
    logging.basicConfig(level=logging.INFO)
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang_env import make_pools
    device, host = make_pools("mha", "page_first")
    idx = torch.arange(4, 8)
    try:
        host.load_to_device_per_layer(device, idx, idx, 0, "kernel")
        error = None
    except NameError as e:
        error = str(e)
    print(json.dumps({"error": error}))
""")


def test_off_switch_leaves_sglang_alone():
    out, log = run_child(_OFF, paths=[TESTS], HICACHE_SGLANG_PLUGIN="0")
    # SGLang without sgl_kernel and without the plugin: its host pools cannot move a byte.
    assert out["error"] == "name 'transfer_kv_per_layer_pf_lf' is not defined"
    assert "SGLang plugin off (HICACHE_SGLANG_PLUGIN=0)" in log


# sgl_kernel (CUDA only) stands in as a module whose functions refuse to run;
# `pool_module` imports from it the way SGLang's host pools do on a GPU.
_STAND_IN = textwrap.dedent("""
    def _refuse(name):
        def call(*args, **kwargs):
            raise RuntimeError(f"sgl_kernel stand-in {name} was called")
        call.__name__ = name
        return call
    for _name in NAMES:
        globals()[_name] = _refuse(_name)
""")

_HOOKED = textwrap.dedent("""
    import json, logging, torch
    logging.basicConfig(level=logging.INFO)
    import sgl_kernel.kvcacheio as kvcacheio
    import pool_module                        # imported before the plugins load
    originals = dict(vars(kvcacheio))
    from sglang.srt.plugins import load_plugins
    load_plugins()
    import hicache_kernels.sglang as dropin
    import sglang.srt.mem_cache.pool_host.mha as mha
    import sglang.srt.mem_cache.pool_host.mla as mla
    from sglang.kernels.ops.kvcache import hicache

    fn = pool_module.transfer_kv_per_layer    # SGLang's HookRegistry rebound the import
    src_k, src_v = torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    dst_k, dst_v = torch.zeros(16, 2, 8), torch.zeros(16, 2, 8)
    fn(src_k=src_k, dst_k=dst_k, src_v=src_v, dst_v=dst_v, src_indices=torch.arange(4, 8),
       dst_indices=torch.arange(8, 12), item_size=64)
    print(json.dumps({
        "rebound": sorted(n for n in dropin.__all__ if n in originals
                          and getattr(kvcacheio, n).__wrapped__ is originals[n]),
        "importer_rebound": fn is kvcacheio.transfer_kv_per_layer,
        "moved": bool(torch.equal(dst_k[8:12], src_k[4:8]) and torch.equal(dst_v[8:12], src_v[4:8])
                      and not dst_k[:8].any() and not dst_k[12:].any()),
        "jit": [f(element_size=256, page_size=64) if "hicache" in n else f(element_size=256)
                for n in ("can_use_hicache_jit_kernel", "can_use_write_back_jit_kernel")
                for f in (getattr(mha, n), getattr(mla, n), getattr(hicache, n))],
        "jit_hooked": all(hasattr(getattr(m, n), "__wrapped__") for m in (mha, hicache)
                          for n in ("can_use_hicache_jit_kernel", "can_use_write_back_jit_kernel")),
    }))
""")


def test_replace_hooks_rebind_kvcacheio_imports_and_jit_switch(tmp_path):
    """Where sgl_kernel imports (a GPU machine), the plugin goes through SGLang's
    HookRegistry: REPLACE hooks on sgl_kernel.kvcacheio, which SGLang rebinds in
    every module that imported them; HICACHE_SGLANG_ROUTE_JIT=1 makes SGLang's
    JIT checks answer False."""
    package = tmp_path / "sgl_kernel"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "kvcacheio.py").write_text(f"NAMES = {dropin.__all__!r}\n" + _STAND_IN)
    (tmp_path / "pool_module.py").write_text("from sgl_kernel.kvcacheio import transfer_kv_per_layer\n")
    out, log = run_child(_HOOKED, paths=[str(tmp_path)], HICACHE_SGLANG_ROUTE_JIT="1")
    assert out["rebound"] == sorted(dropin.__all__)
    assert out["importer_rebound"] and out["moved"]
    assert out["jit"] == [False] * 6 and out["jit_hooked"]
    assert f"{len(dropin.__all__)} REPLACE hooks on sgl_kernel.kvcacheio" in log
    assert "JIT transfer kernels routed here too (HICACHE_SGLANG_ROUTE_JIT=1)" in log
