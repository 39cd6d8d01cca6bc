"""Model sources, ``ModelSpec``, architecture adapters and bundled data."""

from edgec.models.adapters import ADAPTERS, Adapter, LayerParts, adapter_for
from edgec.models.sources import BUILTIN, DEFAULT_MODEL, load_model, resolve_source
from edgec.models.spec import ModelSpec

__all__ = [
    "ADAPTERS",
    "BUILTIN",
    "DEFAULT_MODEL",
    "Adapter",
    "LayerParts",
    "ModelSpec",
    "adapter_for",
    "load_model",
    "resolve_source",
]
