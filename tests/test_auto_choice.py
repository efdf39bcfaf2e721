"""How backend="auto" chooses between kernels and copy engines, and the
thresholds it goes by (defaults, the cache file, calibration), on the CPU."""

from __future__ import annotations

import json
import types

import pytest
import torch

from hicache_kernels import KVBuffer, KVLayout, Transfer
from hicache_kernels.backends import auto, copy_engine, thresholds
from hicache_kernels.backends.thresholds import Thresholds, calibrate, choose_min_run_bytes

KIB = 1024


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HICACHE_CACHE_DIR", str(tmp_path))
    thresholds._CURRENT.clear()
    yield tmp_path
    thresholds._CURRENT.clear()


def _plan(src_kind, dst_kind, *, page_size=64, layers=2, head_num=8, head_dim=128, src_slots=1024,
          dst_slots=1024, layer=0):
    def buf(kind, slots):
        return KVBuffer.allocate(KVLayout(kind, num_layers=layers, num_slots=slots, head_num=head_num,
                                          head_dim=head_dim, dtype=torch.bfloat16, page_size=page_size))
    return Transfer(buf(src_kind, src_slots), buf(dst_kind, dst_slots), layers=layer,
                    backend="reference").plan


def test_longest_run_by_layout_pair():
    item = 8 * 128 * 2
    assert auto.longest_run_bytes(_plan("layer_first", "layer_first")) == auto.UNBOUNDED
    assert auto.longest_run_bytes(_plan("page_first_direct", "layer_first")) == 64 * item
    assert auto.longest_run_bytes(_plan("page_first", "layer_first")) == item
    assert auto.longest_run_bytes(_plan("page_head", "layer_first")) == 256  # one head
    assert auto.longest_run_bytes(_plan("page_first_direct", "layer_first", layers=1)) == auto.UNBOUNDED


def _fake_backend(name, ok=True):
    calls = []
    module = types.SimpleNamespace(
        name=name, available=lambda: (ok, "fake" if ok else f"{name} is off"),
        run=lambda plan, s, d, **kw: calls.append((s.clone(), d.clone(), kw)))
    module.calls = calls
    return module


def _getter(**modules):
    return lambda name: modules[name]


def test_choice_per_plan(monkeypatch):
    cuda, triton, ref = _fake_backend("cuda"), _fake_backend("triton"), _fake_backend("reference")
    get = _getter(cuda=cuda, triton=triton, reference=ref)
    monkeypatch.setattr(copy_engine, "available", lambda: (True, "fake"))
    # runs can be long: decided per call
    chosen, why = auto.choose_on_gpu(_plan("page_first_direct", "layer_first"), get)
    assert isinstance(chosen, auto.AutoDispatch) and chosen.kernel is cuda and "per call" in why
    # runs are single items: the kernel, with the reason
    chosen, why = auto.choose_on_gpu(_plan("page_first", "layer_first"), get)
    assert chosen is cuda and "at most 2048 bytes" in why
    # no copy engines: the kernel
    monkeypatch.setattr(copy_engine, "available", lambda: (False, "no library"))
    assert auto.choose_on_gpu(_plan("layer_first", "layer_first"), get)[0] is cuda
    # no CUDA kernel: Triton, saying why
    get = _getter(cuda=_fake_backend("cuda", ok=False), triton=triton, reference=ref)
    chosen, why = auto.choose_on_gpu(_plan("layer_first", "layer_first"), get)
    assert chosen is triton and "cuda unavailable: cuda is off" in why


def test_calibrated_threshold_changes_the_choice(monkeypatch):
    get = _getter(cuda=_fake_backend("cuda"), triton=_fake_backend("triton"),
                  reference=_fake_backend("reference"))
    monkeypatch.setattr(copy_engine, "available", lambda: (True, "fake"))
    plan = _plan("page_first_direct", "layer_first")  # runs of at most 64 x 2 KiB = 128 KiB
    assert isinstance(auto.choose_on_gpu(plan, get)[0], auto.AutoDispatch)
    thresholds.save(Thresholds(copy_engine_min_run_bytes=256 * KIB), plan.device)
    assert auto.choose_on_gpu(plan, get)[0].name == "cuda"


def test_dispatch_per_call(monkeypatch):
    kernel = _fake_backend("cuda")
    issued = []
    monkeypatch.setattr(copy_engine, "issue", lambda plan, runs, stream=None: issued.append(runs))
    plan = _plan("page_first_direct", "layer_first", page_size=64)
    dispatch = auto.AutoDispatch(kernel, min_run_bytes=64 * KIB)
    pages = torch.tensor([3, 0, 7])
    whole_pages = (pages[:, None] * 64 + torch.arange(64)).reshape(-1)
    dispatch.run(plan, whole_pages, torch.arange(192))
    assert dispatch.last_choice == "copy_engine" and len(issued[0]) == 3 and not kernel.calls
    scattered = torch.randperm(1024)[:192]
    dispatch.run(plan, scattered, torch.arange(192), sm_budget=3)
    assert dispatch.last_choice == "cuda" and len(issued) == 1
    s, d, kw = kernel.calls[0]
    assert torch.equal(s, scattered) and kw["sm_budget"] == 3
    # (indices already on the GPU always go to the kernel: tests/test_cuda_gpu.py)


def test_defaults_and_cache_file(cache_dir):
    default = thresholds.current("NVIDIA H200")
    assert default == Thresholds() and default.copy_engine_min_run_bytes == 128 * KIB
    path = thresholds.save(default.replace(copy_engine_streams=2, source="test"), "NVIDIA H200",
                           measured={"131072": [50.0, 52.0]})
    assert path == cache_dir / "thresholds.json"
    thresholds._CURRENT.clear()
    loaded = thresholds.current("NVIDIA H200")
    assert loaded.copy_engine_streams == 2 and loaded.source == "test"
    assert json.loads(path.read_text())["NVIDIA H200"]["measured"] == {"131072": [50.0, 52.0]}
    assert thresholds.current("NVIDIA H100 80GB HBM3") == Thresholds()  # other GPUs keep defaults


def test_unreadable_cache_file_is_a_clear_error(cache_dir):
    (cache_dir / "thresholds.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="thresholds.json: unreadable thresholds"):
        thresholds.current("NVIDIA H200")


def test_choose_min_run_bytes():
    measured = {16 * KIB: (20.0, 50.0), 64 * KIB: (40.0, 50.0), 128 * KIB: (48.0, 50.0),
                512 * KIB: (53.0, 50.0)}
    assert choose_min_run_bytes(measured, ratio=0.95) == 128 * KIB
    assert choose_min_run_bytes(measured, ratio=0.8) == 64 * KIB
    # copy engines must keep up at every larger size too
    assert choose_min_run_bytes({**measured, 2048 * KIB: (30.0, 50.0)}) == 1 << 62


def test_calibrate_with_a_measurement(cache_dir):
    speed = {"copy_engine": {16 * KIB: 10, 64 * KIB: 30, 256 * KIB: 49},
             "cuda": {16 * KIB: 50, 64 * KIB: 50, 256 * KIB: 50}}
    result = calibrate("NVIDIA H200", run_sizes=(16 * KIB, 64 * KIB, 256 * KIB), kernel="cuda",
                       measure=lambda size, backend: speed[backend][size])
    assert result.copy_engine_min_run_bytes == 256 * KIB and "calibrated against cuda" in result.source
    thresholds._CURRENT.clear()
    assert thresholds.current("NVIDIA H200").copy_engine_min_run_bytes == 256 * KIB


def test_calibrate_needs_a_gpu_or_a_measurement():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="calibrate: needs a CUDA device"):
        calibrate(kernel="cuda")
