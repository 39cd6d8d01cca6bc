"""edgec: compress transformer models, export them to ONNX, split and serve them on edge devices.

The public API is imported lazily so that ``import edgec.runtimes`` on a device loads neither
torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgec.errors import (
    DeviceError,
    EdgecError,
    ExportError,
    FidelityError,
    InputError,
    PackageError,
    RecipeError,
    SignatureError,
    SourceError,
)

__version__ = "0.1.0"

# name -> (module, attribute): resolved on first access.
_LAZY = {
    "load_model": ("edgec.models", "load_model"),
    "ModelSpec": ("edgec.models", "ModelSpec"),
    "export": ("edgec.exporters", "export"),
    "compress": ("edgec.compressor", "compress"),
    "load_package": ("edgec.runtimes", "load_package"),
    "read_package": ("edgec.runtimes", "read_package"),
    "Runtime": ("edgec.runtimes", "Runtime"),
}

if TYPE_CHECKING:
    from edgec.compressor import compress
    from edgec.exporters import export
    from edgec.models import ModelSpec, load_model
    from edgec.runtimes import Runtime, load_package, read_package


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'edgec' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)


__all__ = [
    "DeviceError",
    "EdgecError",
    "ExportError",
    "FidelityError",
    "InputError",
    "ModelSpec",
    "PackageError",
    "RecipeError",
    "Runtime",
    "SignatureError",
    "SourceError",
    "__version__",
    "compress",
    "export",
    "load_model",
    "load_package",
    "read_package",
]
