"""A stand-in for torchvision, for the tests that import the real SGLang on CPU.

SGLang and transformers import torchvision at module level (image processors),
but PyPI has no torchvision build for this CPU torch. The tests put this
folder on the path when no torchvision is installed (tests/sglang_env.py).
The modules they import exist; any name in them is a placeholder that raises
when called, so no image code can run on it unnoticed.
"""

import sys
import types

__version__ = "0.0.0"


class _Unavailable:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: torchvision is a test stand-in here")

    def __repr__(self) -> str:
        return f"<torchvision stand-in {self._name}>"


def _placeholders(module_name: str):
    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{module_name}.{attr}")
    return __getattr__


__getattr__ = _placeholders(__name__)

for _name in ("io", "transforms", "transforms.functional", "transforms.v2",
              "transforms.v2.functional"):
    _full = f"{__name__}.{_name}"
    _module = types.ModuleType(_full)
    _module.__getattr__ = _placeholders(_full)
    _module.__path__ = []  # a package, so its submodules import
    sys.modules[_full] = _module
    _parent, _, _leaf = _full.rpartition(".")
    setattr(sys.modules[_parent], _leaf, _module)
