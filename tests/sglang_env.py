"""The real SGLang in tests: import it on CPU, and run child processes with it.

`make install` installs SGLang from requirements-sglang-test.txt, without its
GPU dependencies. torchvision, which SGLang imports at module level, has no
build on PyPI for this CPU torch: when none is installed, the stand-in in
tests/stubs goes on the path, here and in every child process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
STUBS = os.path.join(TESTS, "stubs")
NEEDS_STUBS = importlib.util.find_spec("torchvision") is None
if NEEDS_STUBS and STUBS not in sys.path:
    sys.path.insert(0, STUBS)
if importlib.util.find_spec("sglang") is None:
    raise ImportError("sglang is not installed; `make install` installs the tests' SGLang "
                      "(requirements-sglang-test.txt)")


def child_env(paths=(), **variables) -> dict:
    """This process's environment, with the repository, ``paths`` and (when
    needed) the torchvision stand-in on PYTHONPATH, and ``variables`` set."""
    env = dict(os.environ)
    path = [ROOT, *paths] + ([STUBS] if NEEDS_STUBS else [])
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update({k: str(v) for k, v in variables.items()})
    return env


def run_child(script: str, *, paths=(), timeout: float = 300, **variables) -> tuple[dict, str]:
    """Run ``script`` in a new Python process; its last output line as JSON,
    and its log (stderr)."""
    out = subprocess.run([sys.executable, "-c", script], env=child_env(paths, **variables),
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, f"child process failed:\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def make_pools(kind: str, layout: str, *, page_size: int = 4, layers: int = 3,
               device_slots: int = 64, dtype=None):
    """SGLang's own device pool and host pool on CPU tensors: ``kind`` "mha"
    (2 heads of 16) or "mla" (kv_dim 48), host ``layout`` as SGLang names it."""
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    dtype = dtype or torch.bfloat16
    geometry = dict(start_layer=0, end_layer=layers)
    if kind == "mha":
        device = MHATokenToKVPool(device_slots, page_size, dtype, 2, 16, layers, "cpu", False, **geometry)
        host_cls, extra = MHATokenToKVPoolHost, {}
    else:
        device = MLATokenToKVPool(device_slots, page_size, dtype, 32, 16, layers, "cpu", False, **geometry)
        host_cls, extra = MLATokenToKVPoolHost, {"target_layer_num": layers}
    info = device.get_device_pool_infos()[0].buffer_info
    host = host_cls(info, 2.0, 0, page_size, layout, pin_memory=False,
                    device_capacity_tokens=device.size, **geometry, **extra)
    return device, host


def device_planes(device) -> list[list]:
    """A device pool's per-layer tensors ``[slots, heads, dim]``, K then V (MLA: one plane)."""
    if hasattr(device, "k_buffer"):
        return [list(device.k_buffer), list(device.v_buffer)]
    return [list(device.kv_buffer)]


def host_rows(host, plane: int, layer: int, slots, kv_buffer=None) -> tuple:
    """``(tensor, index)``: ``tensor[index]`` is host slots ``slots`` of one
    layer of one plane, ``[n, heads, dim]``, of ``kv_buffer`` (default: the
    host pool's), from the shapes SGLang's host pool allocates
    (``tensor[index] = rows`` writes them)."""
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    kv = host.kv_buffer if kv_buffer is None else kv_buffer
    buf = kv[plane] if isinstance(host, MHATokenToKVPoolHost) else kv
    P = host.page_size
    if host.layout == "layer_first":        # [L, N, H, D]
        return buf, (layer, slots)
    if host.layout == "page_first":         # [N, L, H, D]
        return buf, (slots, layer)
    if host.layout == "page_first_direct":  # [N/P, L, P, H, D]
        return buf, (slots // P, layer, slots % P)
    if host.layout == "page_head":          # [N/P, H, P, L, D]
        return buf, (slots // P, slice(None), slots % P, layer)
    raise ValueError(f"layout: {host.layout}")
