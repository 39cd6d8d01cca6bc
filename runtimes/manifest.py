"""The package manifest: what ``manifest.json`` holds, as typed data.

This module is the single definition of the package format. The exporters write it, the runtime
reads it; neither builds manifest dicts by hand. It imports numpy only (the device install).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgec.runtimes.lowbit import CodedWeight

from edgec.errors import PackageError
from edgec.schema import JSON_KINDS, check_json, check_unicode, shown

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"

# A compressed file of a package (``.gz``) may inflate to the size ``Manifest.inflated`` records
# for it and no more; a manifest that records none gets DEFAULT_INFLATED_LIMIT. No recorded size
# may pass MAX_INFLATED_BYTES (the largest Hugging Face tokenizer.json files are about 30 MB).
DEFAULT_INFLATED_LIMIT = 64 << 20
MAX_INFLATED_BYTES = 256 << 20
MAX_THREADS = 1024  # a device's session threads: more is a typo, or an attempt to exhaust it
MAX_TEXT_LENGTH = 1 << 20  # tokens a text is cut at; models of today take far fewer

# ONNX element types the runtime maps to numpy; names are numpy's.
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")

Dim = int | str  # a fixed size, or a symbolic name such as "batch"


@dataclass(frozen=True)
class TensorInfo:
    """A named tensor of the model's interface or of an edge between stages."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise PackageError(
                f"tensor {self.name!r}: unknown dtype {self.dtype!r}; known: {DTYPES}"
            )
        negative = [d for d in self.shape if isinstance(d, int) and d < 0]
        if negative:
            raise PackageError(
                f"tensor {self.name!r}: shape {list(self.shape)} has negative dimensions; a "
                "dimension is a size or a symbolic name"
            )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorInfo:
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


@dataclass(frozen=True)
class TextPreprocessing:
    """Tokenize text with the package's ``tokenizer.json`` (Hugging Face tokenizers format),
    stored gzipped as ``tokenizer.json.gz`` by export; a plain one loads too."""

    tokenizer: str  # path inside the package
    max_length: int
    # The model inputs the tokenizer fills, in the package's input names.
    input_ids: str = "input_ids"
    attention_mask: str | None = "attention_mask"
    token_type_ids: str | None = None
    kind: str = "text"

    def __post_init__(self) -> None:
        if not 1 <= self.max_length <= MAX_TEXT_LENGTH:
            raise PackageError(
                f"preprocessing.max_length must be 1..{MAX_TEXT_LENGTH}, got {self.max_length}"
            )


@dataclass(frozen=True)
class ImagePreprocessing:
    """Scale images to ``[0, 1]`` by ``scale``, then normalize by ``mean`` and ``std`` per channel."""

    input: str
    channels: int
    height: int
    width: int
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str = "image"

    def __post_init__(self) -> None:
        sizes = {"channels": self.channels, "height": self.height, "width": self.width}
        small = {k: v for k, v in sizes.items() if v < 1}
        if small:
            raise PackageError(f"preprocessing: {small} must be at least 1")


@dataclass(frozen=True)
class EmbeddingPostprocessing:
    """Pool token states into one vector per input (sentence-transformers style)."""

    output: str
    pooling: str = "mean"  # mean | cls | max
    normalize: bool = True
    kind: str = "embedding"


@dataclass(frozen=True)
class ClassificationPostprocessing:
    """Softmax over ``output``; ``labels[i]`` names class i."""

    output: str
    labels: tuple[str, ...]
    kind: str = "classification"


Preprocessing = TextPreprocessing | ImagePreprocessing
Postprocessing = EmbeddingPostprocessing | ClassificationPostprocessing

_PRE = {"text": TextPreprocessing, "image": ImagePreprocessing}
_POST = {"embedding": EmbeddingPostprocessing, "classification": ClassificationPostprocessing}


def _tupled(data: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _processing_from_json(data: Any, registry: dict[str, type], what: str) -> Any:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise PackageError(f"manifest.json.{what} must be an object or null, got {shown(data)}")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in registry:
        raise PackageError(f"unknown {what} kind {shown(kind)}; known: {sorted(registry)}")
    check_json(data, registry[kind], f"manifest.json.{what}", error=PackageError)
    return registry[kind](**_tupled(data))


@dataclass(frozen=True)
class DeviceInfo:
    """Where a stage runs: onnxruntime providers and threads (0 lets onnxruntime choose)."""

    name: str
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0
    memory_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    __json_extra__ = "extra"  # the JSON object's other keys (a device profile's figures)

    def __post_init__(self) -> None:
        if not 0 <= self.threads <= MAX_THREADS:
            raise PackageError(
                f"device {self.name!r}: threads must be 0..{MAX_THREADS} (0: onnxruntime "
                f"chooses), got {self.threads}"
            )

    def to_json(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "providers": list(self.providers),
            "threads": self.threads,
            "memory_mb": self.memory_mb,
        }
        data.update(self.extra)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceInfo:
        known = {"name", "providers", "threads", "memory_mb"}
        return cls(
            name=data["name"],
            providers=tuple(data.get("providers", ("CPUExecutionProvider",))),
            threads=int(data.get("threads", 0)),
            memory_mb=data.get("memory_mb"),
            extra={k: v for k, v in data.items() if k not in known},
        )


def _span(value: Any, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise PackageError(f"{what} must be two integers [start, stop], got {value!r}")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class StageInfo:
    """One ONNX file of the package, run on one device.

    ``inputs`` name tensors that are model inputs or outputs of earlier stages; ``outputs`` name
    what it produces. ``weights`` names the stage's weights file (row-packed codes) and
    ``coded`` the weights the runtime decodes from it before creating the session;
    ``memory_bytes`` is the predicted resident memory of the stage's session above the bare
    interpreter (``edgec.runtimes.memory``), ``predicted_ms`` its predicted time at the planning
    size. What a partition strategy records: ``nodes``, the range of the source graph's nodes it
    holds (pipeline); ``batch_share``, the fraction of each batch it runs (data); ``group``
    (stages of one group run at once on the same tensors, their outputs aggregated) and
    ``units``, the heads or neurons of its block it keeps (heads).
    """

    name: str
    device: str
    file: str
    sha256: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    contrib_ops: bool = False  # uses com.microsoft operators (CPU/CUDA providers only)
    weights: str | None = None
    coded: tuple[CodedWeight, ...] = ()
    memory_bytes: int | None = None
    predicted_ms: float | None = None
    nodes: tuple[int, int] | None = None
    batch_share: float | None = None
    group: int | None = None
    units: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.coded and self.weights is None:
            raise PackageError(f"stage {self.name!r} has coded weights but no weights file")
        if self.batch_share is not None and not 0.0 <= self.batch_share <= 1.0:
            raise PackageError(
                f"stage {self.name!r}: batch_share must lie in [0, 1], got {self.batch_share}"
            )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "device": self.device,
            "file": self.file,
            "sha256": self.sha256,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "contrib_ops": self.contrib_ops,
        }
        if self.weights is not None:
            data["weights"] = self.weights
            data["coded"] = [c.to_json() for c in self.coded]
        optional = {
            "memory_bytes": self.memory_bytes,
            "predicted_ms": self.predicted_ms,
            "nodes": None if self.nodes is None else list(self.nodes),
            "batch_share": self.batch_share,
            "group": self.group,
            "units": None if self.units is None else list(self.units),
        }
        data.update({k: v for k, v in optional.items() if v is not None})
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageInfo:
        unknown = sorted(set(data) - _STAGE_KEYS)
        if unknown:
            raise PackageError(
                f"stage {data.get('name')!r} has unknown keys {unknown}; known: {sorted(_STAGE_KEYS)}"
            )
        memory, ms, share, group = (
            data.get(k) for k in ("memory_bytes", "predicted_ms", "batch_share", "group")
        )
        return cls(
            name=data["name"],
            device=data["device"],
            file=data["file"],
            sha256=data["sha256"],
            inputs=tuple(data["inputs"]),
            outputs=tuple(data["outputs"]),
            contrib_ops=bool(data.get("contrib_ops", False)),
            weights=data.get("weights"),
            coded=tuple(CodedWeight.from_json(c) for c in data.get("coded", ())),
            memory_bytes=None if memory is None else int(memory),
            predicted_ms=None if ms is None else float(ms),
            nodes=_span(data.get("nodes"), "nodes"),
            batch_share=None if share is None else float(share),
            group=None if group is None else int(group),
            units=_span(data.get("units"), "units"),
        )


_STAGE_KEYS = frozenset(
    {"name", "device", "file", "sha256", "inputs", "outputs", "contrib_ops", "weights", "coded"}
    | {"memory_bytes", "predicted_ms", "nodes", "batch_share", "group", "units"}
)


# Packages written before the manifest named its execution: how their strategies ran.
_LEGACY_EXECUTION = {"data": "batch", "heads": "groups"}


@dataclass(frozen=True)
class Manifest:
    """Everything ``manifest.json`` holds. ``files`` maps every other file to its sha256;
    every file the manifest names elsewhere (stage files, weights files, the tokenizer) must be
    among them (``edgec.runtimes.package.check_package``). ``inflated`` records what each
    compressed file inflates to, so that the loader stops a file that inflates further.

    ``strategy`` names the partition strategy that wrote the stages, ``execution`` how the
    runtime runs them (``edgec.runtimes.executor.EXECUTORS``: a chain, a batch split over
    stages, or groups of parallel stages) and ``aggregation`` how parallel results combine.
    """

    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    stages: tuple[StageInfo, ...]
    devices: tuple[DeviceInfo, ...]
    files: dict[str, str]
    preprocessing: Preprocessing | None = None
    postprocessing: Postprocessing | None = None
    edges: tuple[dict[str, Any], ...] = ()
    aggregation: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    strategy: str = "single"
    execution: str = "chain"
    report: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    format_version: int = FORMAT_VERSION
    # The bytes each compressed file of ``files`` inflates to (``.gz``; see DEFAULT_INFLATED_LIMIT)
    inflated: dict[str, int] = field(default_factory=dict)
    # Where requests enter, where results go, and the links between the stages' devices, as
    # the split was planned for (``edgec.runtimes.network.Network``); None for one device.
    network: dict[str, Any] | None = None

    def input(self, name: str) -> TensorInfo:
        for info in self.inputs:
            if info.name == name:
                return info
        raise KeyError(name)

    def device(self, name: str) -> DeviceInfo:
        for info in self.devices:
            if info.name == name:
                return info
        raise PackageError(f"stage device {name!r} is not among the manifest's devices")

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "created_by": self.created_by,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "preprocessing": asdict(self.preprocessing) if self.preprocessing else None,
            "postprocessing": asdict(self.postprocessing) if self.postprocessing else None,
            "devices": [d.to_json() for d in self.devices],
            "strategy": self.strategy,
            "execution": self.execution,
            "stages": [s.to_json() for s in self.stages],
            "edges": list(self.edges),
            "aggregation": self.aggregation,
            "files": dict(sorted(self.files.items())),
            "inflated": dict(sorted(self.inflated.items())),
            **({"network": self.network} if self.network is not None else {}),
            "report": self.report,
            "parity": self.parity,
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """The manifest of parsed ``manifest.json``; ``PackageError`` naming the field for a
        value of the wrong JSON type or out of range, an unknown key, or a missing one."""
        if not isinstance(data, dict):
            raise PackageError("manifest.json is not a JSON object")
        version = data.get("format_version")
        supported = list(SUPPORTED_FORMAT_VERSIONS)
        if type(version) is not int:  # bool is an int to Python, never to the format
            raise PackageError(
                f"manifest.json.format_version must be an integer, one of {supported}; got "
                f"{shown(version)} ({JSON_KINDS.get(type(version), 'another value')})"
            )
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise PackageError(
                f"package format_version {shown(version)} is not supported by this edgec "
                f"(supported: {supported}); upgrade edgec or re-export the package"
            )
        check_unicode(data, "manifest.json", error=PackageError)
        check_json(data, cls, "manifest.json", error=PackageError, skip=_CHECKED_APART)
        execution = data.get("execution")
        if execution is not None and not isinstance(execution, str):
            raise PackageError(f"manifest.json.execution must be a string, got {shown(execution)}")
        _check_manifest_values(data)
        try:
            return cls(
                format_version=version,
                name=data["name"],
                created_by=data.get("created_by", ""),
                inputs=tuple(TensorInfo.from_json(t) for t in data["inputs"]),
                outputs=tuple(TensorInfo.from_json(t) for t in data["outputs"]),
                preprocessing=_processing_from_json(
                    data.get("preprocessing"), _PRE, "preprocessing"
                ),
                postprocessing=_processing_from_json(
                    data.get("postprocessing"), _POST, "postprocessing"
                ),
                devices=tuple(DeviceInfo.from_json(d) for d in data["devices"]),
                strategy=data.get("strategy", "single"),
                execution=data.get("execution")
                or _LEGACY_EXECUTION.get(str(data.get("strategy")), "chain"),
                stages=tuple(StageInfo.from_json(s) for s in data["stages"]),
                edges=tuple(data.get("edges", ())),
                aggregation=data.get("aggregation", {"kind": "none"}),
                files=dict(data["files"]),
                inflated=dict(data.get("inflated", {})),
                network=data.get("network"),
                report=data.get("report", {}),
                parity=data.get("parity", {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
            # the checks above leave none of these; a last guard, never a traceback
            raise PackageError(f"manifest.json is malformed: {type(exc).__name__}: {exc}") from exc


# Manifest fields whose JSON ``from_json`` checks on its own: the version first, the processing
# by its kind, and ``execution``, which packages of an older edgec leave null.
_CHECKED_APART = frozenset({"format_version", "preprocessing", "postprocessing", "execution"})


def _check_manifest_values(data: dict[str, Any]) -> None:
    """What types alone do not say: stages exist, names are unique, sizes are in range."""
    if not data["stages"]:
        raise PackageError("manifest.json.stages is empty: a package runs at least one stage")
    for what in ("stages", "devices"):
        names = [item["name"] for item in data[what]]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise PackageError(f"manifest.json.{what}: names {repeated} occur more than once")
    for relative, size in data.get("inflated", {}).items():
        if not 0 <= size <= MAX_INFLATED_BYTES:
            raise PackageError(
                f"manifest.json.inflated[{relative!r}] must be 0..{MAX_INFLATED_BYTES} bytes, "
                f"got {size}"
            )
    kind = data.get("aggregation", {}).get("kind", "none")
    if not isinstance(kind, str):
        raise PackageError(f"manifest.json.aggregation.kind must be a string, got {shown(kind)}")
