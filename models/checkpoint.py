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
from pathlib import Path
from typing import Any

from edgec.models.spec import ModelSpec, write_asset
from edgec.runtimes.manifest import (
    ClassificationPostprocessing,
    EmbeddingPostprocessing,
    ImagePreprocessing,
    TensorInfo,
    TextPreprocessing,
)
from torch import nn

from edgec.errors import SourceError

CHECKPOINT_FILE = "checkpoint.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FORMAT_VERSION = 1
SUPPORTED_CHECKPOINT_VERSIONS = (1,)

_PRE: dict[str, type] = {"text": TextPreprocessing, "image": ImagePreprocessing}
_POST: dict[str, type] = {
    "embedding": EmbeddingPostprocessing,
    "classification": ClassificationPostprocessing,
}


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
    """The checkpoint's JSON, after checking its format version."""
    try:
        meta = json.loads((path / CHECKPOINT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read checkpoint {path}: {exc}") from exc
    version = meta.get("format_version")
    if version not in SUPPORTED_CHECKPOINT_VERSIONS:
        raise SourceError(
            f"checkpoint {path} has format_version {version!r}; this edgec reads "
            f"{SUPPORTED_CHECKPOINT_VERSIONS}"
        )
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
