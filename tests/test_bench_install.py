"""What a person installing the package reads: the CUDA library's status, the
Makefile's reinstall rule, the storage extra."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import setuptools
import torch

from hicache_kernels import backends
from hicache_kernels.backends import _native

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_library():
    _native.library.cache_clear()
    _native.device_info.cache_clear()
    yield
    _native.library.cache_clear()
    _native.device_info.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU wording")
def test_status_without_a_gpu_says_the_library_is_built_and_for_what(fresh_library):
    lib, why = _native.library()
    if lib is None:
        pytest.skip(f"the CUDA library is not built here: {why}")
    archs = _native.build_info(lib)["archs"]
    for name in ("cuda", "copy_engine", "cuda_bulk"):
        ok, text = backends.status()[name]
        assert not ok
        assert text.startswith("libhicache_cuda built with CUDA ") and "no CUDA device" in text
        first = archs.split(",")[0].split("-")[0]
        assert f"sm_{first}" in text, (archs, text)


def test_skip_native_advice_blames_no_compiler_and_no_missing_folder(monkeypatch, tmp_path,
                                                                     fresh_library):
    monkeypatch.setenv("HICACHE_CUDA_LIB", str(tmp_path / "libhicache_cuda.so"))
    monkeypatch.setenv("HICACHE_SKIP_NATIVE", "1")
    lib, why = _native.library()
    assert lib is None and "HICACHE_SKIP_NATIVE" in why
    assert "nvcc" not in why and "csrc" not in why, why


def test_an_installed_package_is_not_sent_to_csrc(monkeypatch, tmp_path, fresh_library):
    monkeypatch.delenv("HICACHE_SKIP_NATIVE", raising=False)
    monkeypatch.delenv("HICACHE_CUDA_LIB", raising=False)
    site = tmp_path / "site-packages" / "hicache_kernels"
    site.mkdir(parents=True)
    monkeypatch.setattr(_native, "_PACKAGE", site)      # no csrc/ next to it, as when installed
    lib, why = _native.library()
    assert lib is None and "not built into this installation" in why
    assert "csrc" not in why and "HICACHE_SKIP_NATIVE" in why and "nvcc" in why


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_reinstalls_when_csrc_changes(tmp_path):
    for name in ("Makefile", "setup.py", "pyproject.toml", "constraints.txt", "CMakeLists.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "csrc" / "src").mkdir(parents=True)
    source = tmp_path / "csrc" / "src" / "kernel.cu"
    source.write_text("// a kernel\n")
    stamp = tmp_path / ".venv" / ".installed"
    stamp.parent.mkdir()
    stamp.touch()

    def up_to_date() -> bool:
        return subprocess.run(["make", "-q", ".venv/.installed"], cwd=tmp_path).returncode == 0

    old = stamp.stat().st_mtime - 100
    for path in tmp_path.rglob("*"):
        if path.is_file() and path != stamp:
            os.utime(path, (old, old))
    assert up_to_date()
    os.utime(source, None)                               # a CUDA source changed
    assert not up_to_date()


def test_storage_extra_is_not_tied_to_one_cuda_version(monkeypatch):
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="not_main")
    extras = seen["extras_require"]
    assert extras["storage"] == ["nixl>=0.7"]
    assert extras["storage-cu12"] == ["nixl-cu12>=0.7"] and extras["storage-cu13"] == ["nixl-cu13>=0.7"]
