"""Storage configuration: a small dict, a JSON/TOML file, environment variables.

Precedence, lowest to highest: defaults, the file named by
``HICACHE_STORAGE_CONFIG`` (or ``path=``), single ``HICACHE_STORAGE_*``
variables, then the dict passed in code.

=========================  ====================================  =========================
key                        environment variable                  default
=========================  ====================================  =========================
``directory``              ``HICACHE_STORAGE_DIR``               ``/tmp/hicache-storage``
``namespace``              ``HICACHE_STORAGE_NAMESPACE``         ``""``
``plugin``                 ``HICACHE_STORAGE_PLUGIN``            ``"auto"``
``plugin_params``          ``HICACHE_STORAGE_PLUGIN_PARAMS``     ``{}`` (JSON in the env)
``batch_pages``            ``HICACHE_STORAGE_BATCH_PAGES``       ``64``
``fsync``                  ``HICACHE_STORAGE_FSYNC``             ``false``
``prefetch_policy``        ``HICACHE_STORAGE_PREFETCH_POLICY``   ``"best_effort"``
``prefetch_timeout_base``  ``HICACHE_STORAGE_TIMEOUT_BASE``      ``2.0`` (seconds)
``prefetch_timeout_per_ki_token``  ``HICACHE_STORAGE_TIMEOUT_PER_KI_TOKEN``  ``0.1``
``prefetch_timeout_max``   ``HICACHE_STORAGE_TIMEOUT_MAX``       ``30.0``
``max_pending_writes``     ``HICACHE_STORAGE_MAX_PENDING_WRITES``  ``4096`` (pages)
=========================  ====================================  =========================
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["StorageConfig", "PREFETCH_POLICIES", "FILE_PLUGINS"]

PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")
# NIXL plugins that move bytes between registered memory and file descriptors.
FILE_PLUGINS = ("POSIX", "GDS_MT", "GDS")
ENV_PREFIX = "HICACHE_STORAGE_"

_ENV_NAMES = {
    "directory": "DIR",
    "namespace": "NAMESPACE",
    "plugin": "PLUGIN",
    "plugin_params": "PLUGIN_PARAMS",
    "batch_pages": "BATCH_PAGES",
    "fsync": "FSYNC",
    "prefetch_policy": "PREFETCH_POLICY",
    "prefetch_timeout_base": "TIMEOUT_BASE",
    "prefetch_timeout_per_ki_token": "TIMEOUT_PER_KI_TOKEN",
    "prefetch_timeout_max": "TIMEOUT_MAX",
    "max_pending_writes": "MAX_PENDING_WRITES",
}


@dataclass(frozen=True)
class StorageConfig:
    """Where and how pages are stored.

    Example:
        >>> cfg = StorageConfig.load({"directory": "/mnt/nvme/kv", "prefetch_policy": "timeout"})
        >>> cfg.plugin
        'auto'
    """

    # Root of the page files; one subdirectory per namespace and layout.
    directory: str = "/tmp/hicache-storage"
    # Separates caches that must not share pages (model name, TP rank...).
    namespace: str = ""
    # "auto" (POSIX for host memory; GDS_MT/GDS for device memory) or a NIXL
    # file plugin name: POSIX, GDS_MT, GDS.
    plugin: str = "auto"
    # Passed verbatim to NIXL's create_backend (e.g. {"use_uring": "true"}).
    plugin_params: Mapping[str, str] = field(default_factory=dict)
    # Pages per NIXL transfer: bigger batches amortise setup, smaller ones
    # let a best_effort prefetch stop sooner.
    batch_pages: int = 64
    # fsync each page before it becomes visible: survives power loss, costs
    # a disk flush per page. Without it a crash can lose (never corrupt:
    # checksums catch it) recent pages.
    fsync: bool = False
    prefetch_policy: str = "best_effort"
    # SGLang's linear timeout: min(max, base + per_ki_token * tokens / 1024) s.
    prefetch_timeout_base: float = 2.0
    prefetch_timeout_per_ki_token: float = 0.1
    prefetch_timeout_max: float = 30.0
    # Pages waiting for write-back before new ones are dropped (the host tier
    # still holds them); bounds memory pinned by in-flight write-backs.
    max_pending_writes: int = 4096

    def __post_init__(self) -> None:
        if not isinstance(self.directory, str) or not self.directory:
            raise ValueError(f"directory: expected a non-empty path, got {self.directory!r}")
        if not isinstance(self.namespace, str) or os.sep in self.namespace or self.namespace in (".", ".."):
            raise ValueError(f"namespace: expected a name without {os.sep!r}, got {self.namespace!r}")
        plugin = str(self.plugin).upper() if str(self.plugin).lower() != "auto" else "auto"
        if plugin != "auto" and plugin not in FILE_PLUGINS:
            raise ValueError(
                f"plugin: expected 'auto' or one of {', '.join(FILE_PLUGINS)}, got {self.plugin!r}"
            )
        object.__setattr__(self, "plugin", plugin)
        if not isinstance(self.plugin_params, Mapping):
            raise ValueError(f"plugin_params: expected a mapping of str to str, got {self.plugin_params!r}")
        object.__setattr__(self, "plugin_params", {str(k): str(v) for k, v in self.plugin_params.items()})
        for name in ("batch_pages", "max_pending_writes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.prefetch_policy not in PREFETCH_POLICIES:
            raise ValueError(
                f"prefetch_policy: expected one of {', '.join(PREFETCH_POLICIES)}, got {self.prefetch_policy!r}"
            )
        for name in ("prefetch_timeout_base", "prefetch_timeout_per_ki_token", "prefetch_timeout_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
        if not isinstance(self.fsync, bool):
            raise ValueError(f"fsync: expected a bool, got {self.fsync!r}")

    @classmethod
    def load(
        cls,
        config: "Mapping[str, Any] | StorageConfig | None" = None,
        *,
        path: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
    ) -> "StorageConfig":
        """Defaults < file (``path`` or ``$HICACHE_STORAGE_CONFIG``) < env < ``config``."""
        if isinstance(config, StorageConfig):
            return config
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = path or env.get(ENV_PREFIX + "CONFIG")
        if path:
            values.update(_read_file(os.fspath(path)))
        values.update(_from_env(env))
        if config is not None:
            if not isinstance(config, Mapping):
                raise TypeError(f"config: expected a dict or StorageConfig, got {type(config).__name__}")
            values.update(config)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ValueError(f"config: unknown key(s) {unknown}; valid keys: {valid}")
        return cls(**values)

    def timeout_for(self, num_tokens: int) -> float:
        """Seconds a ``timeout`` prefetch of ``num_tokens`` may take (SGLang's linear rule)."""
        return min(self.prefetch_timeout_max,
                   self.prefetch_timeout_base + self.prefetch_timeout_per_ki_token * num_tokens / 1024)


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"HICACHE_STORAGE_CONFIG: cannot read {path!r}: {e.strerror}") from None
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ValueError(f"HICACHE_STORAGE_CONFIG: TOML needs Python 3.11+; use JSON for {path!r}") from None
        data = tomllib.loads(raw.decode())
    else:
        data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"HICACHE_STORAGE_CONFIG: {path!r} must hold a table/object, got {type(data).__name__}")
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    types = {f.name: f.type for f in dataclasses.fields(StorageConfig)}
    out: dict[str, Any] = {}
    for name, suffix in _ENV_NAMES.items():
        var = ENV_PREFIX + suffix
        if var not in env:
            continue
        text = env[var]
        kind = types[name]
        try:
            if name == "plugin_params":
                out[name] = json.loads(text)
            elif kind == "bool":
                if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                out[name] = text.lower() in ("1", "true", "yes")
            elif kind == "int":
                out[name] = int(text)
            elif kind == "float":
                out[name] = float(text)
            else:
                out[name] = text
        except ValueError:
            raise ValueError(f"{var}: cannot parse {text!r} as {kind} for {name}") from None
    return out
