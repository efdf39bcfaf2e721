"""The CUDA library on a machine without a GPU: it builds with the local nvcc,
loads through ctypes with its whole C surface, refuses stale or foreign builds,
and asking for a CUDA backend gives a clear Python error, never a crash.

The kernels' logic itself is checked here by running the very device
functions on the CPU (csrc/tests/emulate_kernels.cpp) and by reading the PTX
nvcc emits for them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile

import pytest
import torch

from conftest import HAS_GPU, poison_, random_bytes_
from native_build import ROOT, build_module

from hicache_kernels import KVBuffer, KVLayout, transfer
from hicache_kernels.backends import _native

build = build_module()
SYMBOLS = ["hck_abi_version", "hck_struct_sizes", "hck_last_error", "hck_build_info",
           "hck_device_count", "hck_probe", "hck_batch_refusal", "hck_copy_items", "hck_copy_prepared",
           "hck_memcpy_runs"]


def _reload_library():
    _native.library.cache_clear()
    _native.device_info.cache_clear()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The package's library; built now (into a temporary folder) when the
    package has none, as a fresh clone without `pip install` would."""
    if _native.library_path().is_file():
        lib, why = _native.library()
        assert lib is not None, why
        yield lib
        return
    reason = build.skip_reason()
    if reason:
        pytest.skip(f"the CUDA library cannot be built here: {reason}")
    out = tmp_path_factory.mktemp("native")
    path = build.build(out, out / "build", quiet=True)
    old = os.environ.get("HICACHE_CUDA_LIB")
    os.environ["HICACHE_CUDA_LIB"] = str(path)
    _reload_library()
    lib, why = _native.library()
    assert lib is not None, why
    yield lib
    if old is None:
        os.environ.pop("HICACHE_CUDA_LIB", None)
    else:
        os.environ["HICACHE_CUDA_LIB"] = old
    _reload_library()


def test_library_loads_with_its_c_surface(library):
    for symbol in SYMBOLS:
        assert hasattr(library, symbol), symbol
    assert library.hck_abi_version() == _native.ABI_VERSION
    info = _native.build_info(library)
    assert info["source"] == build.source_hash(), "the library was built from other sources"
    assert re.fullmatch(r"\d+\.\d+", info["cuda"])
    if not (os.environ.get("CMAKE_CUDA_ARCHITECTURES") or os.environ.get("TORCH_CUDA_ARCH_LIST")):
        archs = info["archs"].split(",")  # the default list, from nvcc's own arch list
        assert {"80-real", "90a-real", "80-virtual"} <= set(archs), archs
        nvcc_archs = subprocess.run([build.find_nvcc(), "--list-gpu-arch"], capture_output=True,
                                    text=True).stdout
        for number in ("100", "120"):
            assert (f"{number}-real" in archs) == (f"compute_{number}" in nvcc_archs), archs


def test_library_exports_only_its_c_surface(library):
    """The static CUDA runtime stays private: no cuda* symbol may clash with torch's."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm is not installed")
    out = subprocess.run([nm, "-D", "--defined-only", str(library._name)], capture_output=True,
                         text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.split()[-2:-1] == ["T"]}
    assert exported == set(SYMBOLS), exported ^ set(SYMBOLS)
    ldd = subprocess.run(["ldd", str(library._name)], capture_output=True, text=True).stdout
    assert "libcudart" not in ldd, "the CUDA runtime must be linked statically"


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU behaviour")
def test_no_driver_is_reported_not_crashed(library):
    import ctypes
    count = ctypes.c_int(-1)
    rc = library.hck_device_count(ctypes.byref(count))
    assert rc != 0 and count.value == 0
    assert "counting CUDA devices" in _native.last_error()
    info, why = _native.device_info(0)
    built = _native.build_info(library)
    assert info is None and why.startswith(f"libhicache_cuda built with CUDA {built['cuda']} for sm_")
    assert why.endswith("but there is no CUDA device here (torch.cuda.is_available() is False)")


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU behaviour")
@pytest.mark.parametrize("backend", ["cuda", "cuda_bulk", "copy_engine"])
def test_cuda_backends_without_gpu_raise_a_clear_error(library, backend, gen):
    lay = KVLayout("layer_first", num_layers=2, num_slots=16, head_num=2, head_dim=8,
                   dtype=torch.bfloat16)
    src, dst = KVBuffer.allocate(lay), KVBuffer.allocate(lay)
    random_bytes_(src.k, gen)
    poison_(dst.k)
    before = dst.k.clone()
    with pytest.raises(RuntimeError, match=rf"backend: '{backend}' is not available here: .*no CUDA device"):
        transfer(src, dst, torch.arange(4), torch.arange(4), backend=backend)
    assert torch.equal(dst.k.view(torch.uint8), before.view(torch.uint8))


def test_missing_library_says_how_to_build_it(monkeypatch):
    monkeypatch.setenv("HICACHE_CUDA_LIB", "/nonexistent/libhicache_cuda.so")
    _reload_library()
    try:
        lib, why = _native.library()
        assert lib is None and "is not built" in why and "csrc/build.py" in why
        from hicache_kernels.backends import cuda
        assert cuda.available() == (False, why)
    finally:
        monkeypatch.undo()
        _reload_library()


def test_stale_library_is_refused(library, monkeypatch):
    monkeypatch.setattr(_native, "_source_digest", lambda: "0123456789abcdef")
    _reload_library()
    try:
        lib, why = _native.library()
        assert lib is None and "built from other sources" in why
    finally:
        monkeypatch.undo()
        _reload_library()


def test_native_build_is_skipped_with_a_reason(monkeypatch):
    monkeypatch.setenv("HICACHE_SKIP_NATIVE", "1")
    assert build.skip_reason() == "HICACHE_SKIP_NATIVE is set"
    monkeypatch.delenv("HICACHE_SKIP_NATIVE")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(build, "DEFAULT_NVCC", "/nonexistent/nvcc")
    assert build.skip_reason().startswith("no nvcc found")


def test_package_installs_without_nvcc(tmp_path):
    """With the native build skipped, the wheel holds no CUDA library and the package
    still imports and runs the reference backend."""
    env = dict(os.environ, HICACHE_SKIP_NATIVE="1")
    source = tmp_path / "source"  # a clean copy: no build folders or libraries from earlier builds
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.so", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    # an isolated build, as CI's `pip install -e .` does (it needs the same build requirements)
    built = subprocess.run([os.sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q",
                            "-w", str(tmp_path)], env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(tmp_path.glob("hicache_kernels-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "hicache_kernels/ops.py" in names
    assert not [n for n in names if "libhicache_cuda" in n], names
    # the manager's compiled load path and the prepared launches' checks are plain C:
    # built without nvcc too
    assert [n for n in names if n.startswith("hicache_kernels/manager/_fastload")], names
    assert [n for n in names if n.startswith("hicache_kernels/_prepared")], names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import torch, hicache_kernels as h; from hicache_kernels import backends; "
            "lay = h.KVLayout('page_first', num_layers=1, num_slots=4, head_num=1, head_dim=4, "
            "dtype=torch.float16); a = h.KVBuffer.allocate(lay); a.k.fill_(1); a.v.fill_(2); "
            "b = h.KVBuffer.allocate(lay); b.k.zero_(); b.v.zero_(); "
            "h.transfer(a, b, torch.arange(4), torch.arange(4), backend='reference'); "
            "assert bool((b.v == 2).all()); ok, why = backends.get('cuda').available(); "
            "assert not ok and 'is not built' in why, why; print('ok')")
    clean_env = {k: v for k, v in os.environ.items() if k != "HICACHE_CUDA_LIB"}  # set by `library`
    out = subprocess.run([os.sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(clean_env, PYTHONPATH=str(site)))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_kernel_logic_emulated_on_the_cpu(tmp_path):
    """csrc/tests/emulate_kernels.cpp: the kernels' own work split, address math
    and bulk pipeline run for every block/warp/thread on the CPU, against a
    reference that addresses each layout from its shape; see that file."""
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "emulate"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-I", str(ROOT / "csrc" / "include"),
                    str(ROOT / "csrc" / "tests" / "emulate_kernels.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe), "400"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:] + out.stdout[-1000:]
    m = re.search(r"emulated (\d+) transfers \((\d+) through the bulk pipeline\); 0 failed", out.stdout)
    assert m and int(m.group(1)) >= 300 and int(m.group(2)) >= 30, out.stdout


def _ptx(arch: str, tmp_path) -> str:
    nvcc = build.find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc")
    out = tmp_path / f"kernels_{arch}.ptx"
    subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-ptx", "-I", str(ROOT / "csrc" / "include"),
                    str(ROOT / "csrc" / "src" / "kernels.cu"), "-o", str(out)], check=True,
                   capture_output=True)
    return out.read_text()


def _entry(ptx: str, pattern: str) -> str:
    """One kernel's PTX: from its .entry to the next kernel's (or the end)."""
    m = re.search(r"\.entry [^(]*" + pattern + r"[^(]*\(.*?(?=\n(?:\.visible |\.weak )?\.(?:entry|func)\b|\Z)",
                  ptx, re.S)
    assert m, f"no kernel matching {pattern}"
    return m.group(0)


DATA_LOAD = r"ld\.global\.L1::no_allocate\.v4\.u32"
DATA_STORE = r"st\.global\.cg\.v4\.u32"


def test_register_kernel_loads_its_indices_then_eight_16_byte_units(tmp_path):
    """In PTX, the widest kernel loads every index of a tile (two bases, a source
    and a destination slot per unit) before its first data load, then issues its 8
    16-byte loads and 8 stores with no branch among them (the out-of-line path
    for slots of 2^32 and beyond has its own 8 and 8)."""
    ptx = _ptx("compute_90a", tmp_path)
    body = _entry(ptx, r"copy_registers_kernelILi16ELb0E")
    ops = re.findall(rf"ld\.global\.nc\.[su]64|{DATA_LOAD}|{DATA_STORE}|\bbra(?:\.uni)?\b|\bcall\b", body)
    first = next(i for i, op in enumerate(ops) if op.startswith("ld.global.L1"))
    assert ops[:first].count("ld.global.nc.s64") + ops[:first].count("ld.global.nc.u64") == 18, ops[:first]
    fast = ops[first:first + 16]
    assert fast == ["ld.global.L1::no_allocate.v4.u32"] * 8 + ["st.global.cg.v4.u32"] * 8, fast
    assert ops.count("ld.global.L1::no_allocate.v4.u32") == 16 and ops.count("st.global.cg.v4.u32") == 16
    assert "@p ld.global.L1::no_allocate.v4.u32" in body, "data loads are predicated, not branched around"
    assert not re.search(r"\b(div|rem)\.[su](32|64)\b", body), \
        "address math by multiply and shift only (64-bit division stays out of line)"
    # the narrower fallbacks use narrower accesses
    assert "ld.global.L1::no_allocate.v2.u32" in _entry(ptx, r"copy_registers_kernelILi8ELb0E")
    assert "ld.global.L1::no_allocate.u8" in _entry(ptx, r"copy_registers_kernelILi1ELb0E")


def _cuobjdump() -> str | None:
    """cuobjdump next to nvcc, on PATH, or the one Triton's package carries."""
    nvcc = build.find_nvcc()
    found = [os.path.join(os.path.dirname(nvcc), "cuobjdump")] if nvcc else []
    found.append(shutil.which("cuobjdump") or "")
    try:
        import triton
        found.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((f for f in found if f and os.access(f, os.X_OK)), None)


def _sass_function(lib, name: str) -> tuple[str, str]:
    """``(SASS, resource usage)`` of one kernel in the library's sm_90a code."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's package) to read the machine code")
    listed = subprocess.run([tool, "-lelf", str(lib._name)], capture_output=True, text=True).stdout
    if "sm_90a" not in listed:
        pytest.skip(f"the library holds no sm_90a code ({listed.split()})")
    sass = subprocess.run([tool, "-sass", "-arch", "sm_90a", str(lib._name)], capture_output=True,
                          text=True, check=True).stdout
    usage = subprocess.run([tool, "-res-usage", "-arch", "sm_90a", str(lib._name)], capture_output=True,
                           text=True, check=True).stdout
    m = re.search(r"Function : \S*" + name + r"\S*\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S)
    u = re.search(r"Function \S*" + name + r"\S*:\n(.*?)\n", usage)
    assert m and u, f"no {name} in the sm_90a code"
    return m.group(1), u.group(1)


def test_register_kernel_machine_code_issues_its_loads_back_to_back(library):
    """In the sm_90a machine code: the tile's 18 index loads come first, then the
    8 16-byte data loads with no branch, call or index load among them, all before
    the first store; and a block stays small (at most 80 registers a thread, no
    stack), so 256-thread blocks take at most a third of an SM's registers."""
    sass, usage = _sass_function(library, r"copy_registers_kernelILi16ELb0E")
    ops = re.findall(r"\b(LDG\.E\.64\.CONSTANT|LDG\.E\.NA\.128|STG\.E\.128\S*|BRA|CALL\.\S+|BSSY|BSYNC)\b", sass)
    first = ops.index("LDG.E.NA.128")
    assert ops[:first].count("LDG.E.64.CONSTANT") == 18, ops[:first]
    eighth = [i for i, op in enumerate(ops) if op == "LDG.E.NA.128"][7]
    between = ops[first:eighth + 1]
    assert between == ["LDG.E.NA.128"] * 8, f"the 8 loads are not back to back: {between}"
    assert not any(op.startswith("STG") for op in ops[:eighth]), "a store before the 8th load"
    regs, stack = (int(re.search(rf"{k}:(\d+)", usage).group(1)) for k in ("REG", "STACK"))
    assert regs <= 80 and stack == 0, usage


def test_bulk_kernel_is_bulk_copies_on_sm90_only(tmp_path):
    body = _entry(_ptx("compute_90a", tmp_path), r"copy_bulk_kernel")
    for instruction in ("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes",
                        "cp.async.bulk.global.shared::cta.bulk_group", "cp.async.bulk.wait_group.read 1",
                        "mbarrier.try_wait.parity", "mbarrier.arrive.expect_tx"):
        assert instruction in body, instruction
    old = _entry(_ptx("compute_80", tmp_path), r"copy_bulk_kernel")
    assert "cp.async.bulk" not in old and "ret;" in old
