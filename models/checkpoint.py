"""The compressed checkpoint: safetensors weights plus one JSON, no pickle.

```
ckpt/
  checkpoint.json     format_version, the model spec, the Hugging Face config and class, the
                      per-layer shapes (heads, FFN neurons), the recipe, what each step did,
                      the report
  model.safetensors   the compressed torch weights (dense; shared weights hold their centroids)
  assets/…            the spec's assets (tokenizer)
```

``load_checkpoint`` rebuilds the architecture from the config, reshapes each block to its kept
heads and neurons, then loads the weights strictly: layers may keep different head counts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from edgec.models.spec import ModelSpec, write_asset
from edgec.runtimes.manifest import (
    ClassificationPostprocessing,
    EmbeddingPostprocessing,
    ImagePreprocessing,
    TensorInfo,
    TextPreprocessing,
)
from torch import nn

from edgec.errors import RecipeError, SourceError
from edgec.schema import check_json, check_unicode, shown

CHECKPOINT_FILE = "checkpoint.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FORMAT_VERSION = 1
SUPPORTED_CHECKPOINT_VERSIONS = (1,)

_PRE: dict[str, type] = {"text": TextPreprocessing, "image": ImagePreprocessing}
_POST: dict[str, type] = {
    "embedding": EmbeddingPostprocessing,
    "classification": ClassificationPostprocessing,
}


# --- checkpoint.json's schema: these dataclasses' annotations (``edgec.schema.check_json``) ---


@dataclass(frozen=True)
class SpecRecord:
    """The model spec as ``checkpoint.json`` holds it (``ModelSpec`` with asset paths relative
    to the checkpoint, processing as JSON objects checked by their ``kind``)."""

    name: str
    family: str
    task: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    preprocessing: dict[str, Any] | None = None
    postprocessing: dict[str, Any] | None = None
    assets: tuple[str, ...] = ()
    source: str = ""
    vocab_size: int | None = None


@dataclass(frozen=True)
class Shapes:
    """What pruning kept: heads and FFN neurons per layer."""

    heads: tuple[int, ...]
    ffn: tuple[int, ...]


@dataclass(frozen=True)
class Storage:
    """How weights are stored: bits of each shared weight, the Linears and embedding tables on
    the int8 grid, the Linears SmoothQuant scaled."""

    shared_bits: dict[str, int] = field(default_factory=dict)
    int8: tuple[str, ...] = ()
    int8_tables: tuple[str, ...] = ()
    smoothed: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckpointRecord:
    """``checkpoint.json``. Keys beyond these fields (what a newer edgec records of its steps)
    are kept and ignored; every field here is checked."""

    format_version: int
    kind: Literal["edgec-checkpoint"]
    spec: SpecRecord
    model_class: str
    config: dict[str, Any]
    shapes: Shapes
    weights: str = "model.safetensors"
    recipe: dict[str, Any] | None = None
    steps: tuple[dict[str, Any], ...] = ()
    report: dict[str, Any] = field(default_factory=dict)
    storage: Storage = field(default_factory=Storage)
    extra: dict[str, Any] = field(default_factory=dict)

    __json_extra__ = "extra"


def _inside(relative: Any, where: str) -> None:
    """Refuse a file name that leaves the checkpoint's folder (absolute, ``..``, backslashes)."""
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or "\\" in relative or ".." in parts:
        raise SourceError(f"{where} must be a path inside the checkpoint, got {shown(relative)}")


def check_checkpoint_json(meta: Any, where: str = CHECKPOINT_FILE) -> None:
    """Refuse a ``checkpoint.json`` of the wrong form: ``SourceError`` naming the field."""
    if isinstance(meta, dict):
        version = meta.get("format_version")
        if type(version) is not int or version not in SUPPORTED_CHECKPOINT_VERSIONS:
            raise SourceError(
                f"{where} has format_version {shown(version)}; this edgec reads "
                f"{list(SUPPORTED_CHECKPOINT_VERSIONS)}"
            )
    check_unicode(meta, where, error=SourceError)
    check_json(meta, CheckpointRecord, where, error=SourceError)
    spec = meta["spec"]
    for key, registry in (("preprocessing", _PRE), ("postprocessing", _POST)):
        data = spec.get(key)
        if data is not None:
            kind = data.get("kind")
            if kind not in registry:
                raise SourceError(
                    f"{where}.spec.{key}.kind is {shown(kind)}; known: {sorted(registry)}"
                )
            check_json(data, registry[kind], f"{where}.spec.{key}", error=SourceError)
    _inside(meta.get("weights", WEIGHTS_FILE), f"{where}.weights")
    for index, relative in enumerate(spec.get("assets", ())):
        _inside(relative, f"{where}.spec.assets[{index}]")
    if meta.get("recipe") is not None:
        from edgec.compressor.recipe import recipe_from_dict

        try:
            recipe_from_dict(meta["recipe"])
        except RecipeError as exc:
            raise SourceError(f"{where}.recipe: {exc}") from None


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / CHECKPOINT_FILE).is_file()


def _spec_to_json(spec: ModelSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "family": spec.family,
        "task": spec.task,
        "inputs": [t.to_json() for t in spec.inputs],
        "outputs": [t.to_json() for t in spec.outputs],
        "preprocessing": dataclasses.asdict(spec.preprocessing) if spec.preprocessing else None,
        "postprocessing": dataclasses.asdict(spec.postprocessing) if spec.postprocessing else None,
        "assets": sorted(spec.assets),
        "source": spec.source,
        "vocab_size": spec.vocab_size,
    }


def _processing(data: dict[str, Any] | None, registry: dict[str, type]) -> Any:
    if data is None:
        return None
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return registry[data["kind"]](**fields)


def _spec_from_json(data: dict[str, Any], root: Path) -> ModelSpec:
    return ModelSpec(
        name=data["name"],
        family=data["family"],
        task=data["task"],
        inputs=tuple(TensorInfo.from_json(t) for t in data["inputs"]),
        outputs=tuple(TensorInfo.from_json(t) for t in data["outputs"]),
        preprocessing=_processing(data.get("preprocessing"), _PRE),
        postprocessing=_processing(data.get("postprocessing"), _POST),
        assets={rel: root / rel for rel in data.get("assets", [])},
        source=data.get("source", ""),
        vocab_size=data.get("vocab_size"),
    )


def save_checkpoint(path: Path, model: nn.Module, spec: ModelSpec, record: dict[str, Any]) -> Path:
    """Write ``model`` and ``spec`` with ``record`` (recipe, steps, report) to ``path``."""
    from edgec.compressor.pruning import layer_shapes
    from safetensors.torch import save_model

    path.mkdir(parents=True, exist_ok=True)
    heads, ffn = layer_shapes(model)
    save_model(model, str(path / WEIGHTS_FILE))
    for rel, source in spec.assets.items():
        write_asset(source, path / rel)
    meta = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "kind": "edgec-checkpoint",
        "spec": _spec_to_json(spec),
        "model_class": type(model).__name__,
        "config": model.config.to_dict(),  # type: ignore[union-attr,operator]
        "shapes": {"heads": heads, "ffn": ffn},
        "weights": WEIGHTS_FILE,
        **record,
    }
    (path / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's JSON, after checking it against its schema (``CheckpointRecord``)."""
    try:
        meta = json.loads((path / CHECKPOINT_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SourceError(f"cannot read checkpoint {path}: {exc}") from exc
    check_checkpoint_json(meta, str(path / CHECKPOINT_FILE))
    return meta


def load_checkpoint(path: Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the compressed model (eval mode) and its spec from a checkpoint directory."""
    import transformers
    from edgec.compressor.pruning import reshape_layers
    from edgec.compressor.smoothing import attach
    from safetensors.torch import load_model

    meta = read_checkpoint(path)
    config_data = dict(meta["config"])
    model_type = config_data.pop("model_type", None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **config_data)
    except (ValueError, KeyError) as exc:
        raise SourceError(f"checkpoint {path}: cannot rebuild config: {exc}") from exc
    config._attn_implementation = "eager"
    cls = getattr(transformers, meta["model_class"], None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise SourceError(f"checkpoint {path}: unknown model class {meta['model_class']!r}")
    model = cls(config)
    reshape_layers(model, meta["shapes"]["heads"], meta["shapes"]["ffn"])
    try:
        attach(model, meta.get("storage", {}).get("smoothed", []))
    except KeyError as exc:
        raise SourceError(f"checkpoint {path}: smoothed layer {exc} is not in the model") from exc
    try:
        load_model(model, str(path / meta.get("weights", WEIGHTS_FILE)), strict=True)
    except (OSError, RuntimeError) as exc:
        raise SourceError(f"checkpoint {path}: weights do not load: {exc}") from exc
    model.eval()
    return model, _spec_from_json(meta["spec"], path)
