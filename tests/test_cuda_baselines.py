"""SGLang's JIT transfer kernels as peers in ``hicache-bench kernels``, on the CPU.

SGLang builds those kernels at run time for the GPU, so here they run through a
fake of ``sglang.kernels.ops.kvcache.hicache`` that does what each kernel does
(rows ``dst[idx_dst[i]] = src[idx_src[i]]`` of one layer, or of every layer
through pointer tables and row strides) with the arguments our wrapper builds;
the bench's own byte check then proves the arguments address the right rows.
The real module is imported the way the wrapper does it (without SGLang's
package ``__init__``) from a stand-in package on disk.
"""

from __future__ import annotations

import ctypes
import inspect
import io
import sys
import types
from dataclasses import replace

import pytest
import torch
from rich.console import Console

from hicache_kernels.bench import baselines, kernels, movers, report
from hicache_kernels.bench.presets import PRESETS
from hicache_kernels.bench.timing import Clock


class FakeJit:
    """One JIT-built module: records how it was built and launched, and copies."""

    def __init__(self, calls: list, kind: str, **params):
        self.calls, self.kind, self.params = calls, kind, params
        calls.append(("build", kind, params))

    def fits_device(self, device) -> bool:
        return True

    def _rows(self, dst, idx_dst, src, idx_src):
        assert dst.dim() == 2 and src.dim() == 2 and dst.shape[1] == src.shape[1]
        assert idx_dst.dtype == idx_src.dtype == torch.int64
        if self.kind == "registers":
            assert dst.shape[1] * dst.element_size() == self.params["element_size"]
        dst[idx_dst] = src[idx_src]

    def launch_one(self, k_dst, v_dst, idx_dst, k_src, v_src, idx_src):
        self.calls.append(("launch_one", self.kind))
        self._rows(k_dst, idx_dst, k_src, idx_src)
        self._rows(v_dst, idx_dst, v_src, idx_src)

    def launch_one_mla(self, dst, idx_dst, src, idx_src):
        self.calls.append(("launch_one_mla", self.kind))
        self._rows(dst, idx_dst, src, idx_src)

    def _all(self, tables, idx_dst, idx_src, src_stride, dst_stride, element_size):
        for dst_table, src_table in tables:
            assert dst_table.dtype == src_table.dtype == torch.uint64
            for dst_base, src_base in zip(dst_table.view(torch.int64).tolist(),
                                          src_table.view(torch.int64).tolist()):
                for d, s in zip(idx_dst.tolist(), idx_src.tolist()):
                    ctypes.memmove(dst_base + d * dst_stride, src_base + s * src_stride, element_size)

    def launch_all(self, k_ptr_dst, v_ptr_dst, idx_dst, k_ptr_src, v_ptr_src, idx_src, src_stride,
                   dst_stride, *element_size):
        self.calls.append(("launch_all", self.kind, src_stride, dst_stride, *element_size))
        size = element_size[0] if self.kind == "tma" else self.params["element_size"]
        self._all([(k_ptr_dst, k_ptr_src), (v_ptr_dst, v_ptr_src)], idx_dst, idx_src, src_stride,
                  dst_stride, size)

    def launch_all_mla(self, ptr_dst, idx_dst, ptr_src, idx_src, src_stride, dst_stride, *element_size):
        self.calls.append(("launch_all_mla", self.kind, src_stride, dst_stride, *element_size))
        size = element_size[0] if self.kind == "tma" else self.params["element_size"]
        self._all([(ptr_dst, ptr_src)], idx_dst, idx_src, src_stride, dst_stride, size)


def fake_sglang(calls: list) -> types.ModuleType:
    """What the wrapper uses of sglang.kernels.ops.kvcache.hicache 0.5.23."""
    m = types.ModuleType("fake_hicache")
    m.DEFAULT_BLOCK_QUOTA, m.TMA_BLOCK_QUOTA = 2, 4
    m._default_unroll = lambda size: 4 if size <= 512 else 2 if size <= 1024 else 1
    m._tiles_across_lanes = lambda size, unroll: size % 128 == 0

    def rows_per_chunk(size):
        rows = 1
        while rows * 2 <= 32768 // size and rows * 2 <= 128:
            rows *= 2
        return rows

    m.hicache_tma_rows_per_chunk = rows_per_chunk
    m._jit_hicache_module = lambda **kw: FakeJit(calls, "registers", **kw)
    m._jit_hicache_tma_module = lambda **kw: FakeJit(calls, "tma", **kw)

    def staged(k_ptr_src, v_ptr_src, src_indices, dst_indices, staging_k, staging_v, dst_k, dst_v, *,
               page_size, block_quota, mla=False):
        calls.append(("staged", page_size, block_quota, dst_indices.device.type, tuple(staging_k.shape)))
        assert src_indices.numel() % page_size == 0 and staging_k.shape[0] % page_size == 0
        row = dst_k.shape[2] * dst_k.element_size()
        for table, dst in ((k_ptr_src, dst_k), (v_ptr_src, dst_v)):
            for layer, base in enumerate(table.view(torch.int64).tolist()):
                for s, d in zip(src_indices.tolist(), dst_indices.tolist()):
                    ctypes.memmove(dst[d, layer].data_ptr(), base + s * row, row)

    m.transfer_hicache_all_layer_staged_lf_pf = staged
    m.transfer_hicache_all_layer_mla_staged_lf_pf = (
        lambda ptr, s, d, staging, dst, **kw: staged(ptr, ptr, s, d, staging, staging, dst, dst, **kw))
    return m


@pytest.fixture
def peers(monkeypatch):
    """The peers on the CPU through the fake module; yields the record of calls."""
    calls: list = []
    monkeypatch.setattr(baselines, "load_module", lambda: (fake_sglang(calls), ""))
    monkeypatch.setattr(baselines, "status", lambda name: (True, "fake"))
    return calls


def pools_for(preset_name: str, layers: int = 3) -> movers.Pools:
    preset = replace(PRESETS[preset_name], layers=layers)
    return movers.Pools(preset, Clock("cpu"), slots=512, seed=3)


@pytest.mark.parametrize("preset", ["llama-3.1-8b", "deepseek-v3"])
@pytest.mark.parametrize("name, op, layout", [
    ("sglang-jit", "load", "layer_first"), ("sglang-jit", "load", "page_first"),
    ("sglang-jit", "backup", "layer_first"), ("sglang-jit", "backup", "page_first"),
    ("sglang-jit-tma", "load", "layer_first"), ("sglang-jit-tma", "backup", "page_first"),
    ("sglang-jit-staged", "backup", "page_first")])
def test_each_peer_moves_the_right_bytes(peers, preset, name, op, layout):
    pools = pools_for(preset)
    m = baselines.mover(pools, op, layout, 16, 128, name, None, load_layer=1)
    assert isinstance(m, movers.Mover), m
    movers.poison(m, seed=5)
    assert not movers.verify(m, seed=5), "poisoned destinations: the check must see a difference"
    m.fn()
    assert movers.verify(m, seed=5), f"{name} {op} {layout}: bytes differ"
    quota = 4 if name == "sglang-jit-tma" else 2
    assert m.blocks == str(quota), "each peer at SGLang's own block count"
    g = pools.preset
    builds = [c for c in peers if c[0] == "build"]
    if name == "sglang-jit":
        assert builds == [("build", "registers",
                           dict(element_size=g.item_bytes, unroll=1 if g.item_bytes > 1024 else 2,
                                block_quota=2))]
    elif name == "sglang-jit-tma":
        assert builds == [("build", "tma", dict(block_quota=4))]
    launched = [c for c in peers if c[0] != "build"]
    if op == "backup" and name != "sglang-jit-staged":
        host_row = g.item_bytes * (g.layers if layout == "page_first" else 1)
        (call,) = launched
        assert call[2:4] == (g.item_bytes, host_row), "source (device) and destination (host) row strides"
        assert call[4:] == ((g.item_bytes,) if name == "sglang-jit-tma" else ())
    if name == "sglang-jit-staged":
        (call,) = launched
        assert call[:4] == ("staged", 16, 2, "cpu"), "host indices on the CPU, as SGLang keeps them"
        assert call[4] == (baselines.STAGED_PAGES * 16, g.layers, g.item_bytes // 2)


def test_budgets_become_block_quotas(peers):
    pools = pools_for("llama-3.1-8b")
    m = baselines.mover(pools, "load", "layer_first", 16, 64, "sglang-jit", 7, load_layer=0)
    assert m.blocks == "7" and peers[0] == ("build", "registers", dict(element_size=2048, unroll=1,
                                                                         block_quota=7))


def test_what_the_peers_do_not_take_says_why(peers):
    pools = pools_for("llama-3.1-8b")
    assert "not page_head" in baselines.mover(pools, "load", "page_head", 16, 64, "sglang-jit", None,
                                              load_layer=0)
    assert "load and backup only" in baselines.mover(pools, "both", "layer_first", 16, 64, "sglang-jit",
                                                     None, load_layer=0)
    assert "page_first" in baselines.mover(pools, "load", "layer_first", 16, 64, "sglang-jit-staged",
                                           None, load_layer=0)
    tiles = baselines.mover(pools, "load", "layer_first", 1, 64, "sglang-jit-tma", None, load_layer=0)
    assert "1-token pages do not tile its 16-row chunks" in tiles


def test_a_cpu_table_says_not_available_and_why(monkeypatch):
    """Without sglang (or without a GPU) every peer is one row saying why."""
    baselines.load_module.cache_clear()
    monkeypatch.setattr(baselines, "load_module", lambda: (None, "sglang is not installed"))
    preset = replace(PRESETS["llama-3.1-8b"], layers=2)
    cfg = kernels.KernelConfig(preset=preset, tokens=64, page_sizes=(16,), layouts=("layer_first",),
                               backends=("reference",), ops=("load",), warmup=0, reps=1)
    result = kernels.run(cfg, Clock("cpu"))
    peers = [r for r in result["rows"] if r["kind"] == "peer"]
    assert [r["backend"] for r in peers] == list(baselines.NAMES)
    assert all(r["note"] == "not available: sglang is not installed" for r in peers)
    out = io.StringIO()
    wide = {"wide": True} if "wide" in inspect.signature(report.kernels_table).parameters else {}
    Console(file=out, width=250).print(report.kernels_table(result, **wide))  # with its notes
    text = out.getvalue()
    for name in baselines.NAMES:
        assert name in text
    assert text.count("not available: sglang is not installed") == len(baselines.NAMES)


def test_status_on_this_machine_says_why_not():
    baselines.load_module.cache_clear()
    try:
        for name in baselines.NAMES:
            ok, why = baselines.status(name)
            if not torch.cuda.is_available():
                assert not ok and why
    finally:
        baselines.load_module.cache_clear()


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """A package named sglang whose __init__ cannot run (as SGLang's needs its server
    stack), with the one module the wrapper imports."""
    root = tmp_path / "sglang"
    (root / "kernels" / "ops" / "kvcache").mkdir(parents=True)
    (root / "__init__.py").write_text("raise RuntimeError('the server stack is not installed')\n")
    for sub in ("kernels", "kernels/ops", "kernels/ops/kvcache"):
        (root / sub / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {n: m for n, m in sys.modules.items() if n == "sglang" or n.startswith("sglang.")}
    for n in saved:
        del sys.modules[n]
    baselines.load_module.cache_clear()
    yield root / "kernels" / "ops" / "kvcache" / "hicache.py"
    for n in [n for n in sys.modules if n == "sglang" or n.startswith("sglang.")]:
        del sys.modules[n]
    sys.modules.update(saved)
    baselines.load_module.cache_clear()


def test_the_module_imports_without_sglangs_package_init(standin):
    standin.write_text("DEFAULT_BLOCK_QUOTA = 2\n")
    module, why = baselines.load_module()
    assert why == "" and module.DEFAULT_BLOCK_QUOTA == 2


def test_a_module_that_does_not_import_leaves_nothing_behind(standin):
    standin.write_text("import a_package_that_is_not_here\n")
    module, why = baselines.load_module()
    assert module is None
    assert "do not import" in why and "a_package_that_is_not_here" in why
    assert not [n for n in sys.modules if n == "sglang" or n.startswith("sglang.")]


def test_the_real_module_has_what_the_wrapper_calls():
    """Where sglang is installed: the names and keywords the wrapper uses exist."""
    try:
        import sglang_env  # noqa: F401  (the tests' SGLang: torchvision stand-in on the path)
    except ImportError as e:   # the GPU machine has SGLang only when its wheels are carried
        pytest.skip(str(e))
    baselines.load_module.cache_clear()
    module, why = baselines.load_module()
    baselines.load_module.cache_clear()
    if module is None:
        pytest.skip(f"sglang's JIT kernels are not importable here: {why}")
    assert module.DEFAULT_BLOCK_QUOTA == 2 and module.TMA_BLOCK_QUOTA == 4
    assert set(inspect.signature(module._jit_hicache_module).parameters) == {"element_size", "unroll",
                                                                               "block_quota"}
    assert set(inspect.signature(module._jit_hicache_tma_module).parameters) == {"block_quota"}
    assert set(inspect.signature(module._jit_hicache_staged_module).parameters) == {
        "element_size", "unroll", "block_quota"}
    for fn in (module.transfer_hicache_all_layer_staged_lf_pf,
               module.transfer_hicache_all_layer_mla_staged_lf_pf):
        assert {"page_size", "block_quota"} <= set(inspect.signature(fn).parameters)
    assert module._tiles_across_lanes(2048, module._default_unroll(2048))
    assert module.hicache_tma_rows_per_chunk(2048) == 16
