"""The ONNX side of a compressed checkpoint: fusion, int8, weight-sharing encoding.

Applied by ``export`` after the float parity check, in this order: onnxruntime's transformer
fusion (checked against the float graph), int8 with onnxruntime's quantizer (Linears the torch
side kept in float stay float), then the packed encoding of shared weights (exact). The report
says what each transform did and how close the final graph stays to the torch checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from edgec.compressor.fidelity import compare, reduce_outputs
from edgec.exporters.fusion import fuse
from edgec.exporters.quantize import nodes_using, quantize_int8, quantize_tables
from edgec.exporters.torch_to_onnx import torch_outputs
from edgec.exporters.weight_sharing import encode_shared_weights
from edgec.models.checkpoint import is_checkpoint, read_checkpoint
from edgec.models.spec import ModelSpec
from edgec.runtimes.backends import create_session
from edgec.runtimes.lowbit import CodedWeight
from torch import nn

CALIBRATION_FILE = "calibration.npz"


@dataclass(frozen=True)
class GraphCompression:
    """What the package's manifest records: contrib operators used, the report, and the coded
    weights the runtime decodes from the stage's weights file (a path beside the ONNX file)."""

    contrib_ops: bool = False
    report: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    coded: tuple[CodedWeight, ...] = ()


def weights_file_for(onnx_path: Path) -> Path:
    """The weights file beside a stage's ONNX file: ``model.onnx`` -> ``model.weights.npz``."""
    return onnx_path.with_suffix(".weights.npz")


def _calibration(path: Path) -> list[dict[str, np.ndarray]]:
    """Batches saved by ``compress`` for static int8 (keys ``b{i}.{input}``)."""
    if not (path / CALIBRATION_FILE).is_file():
        return []
    with np.load(path / CALIBRATION_FILE, allow_pickle=False) as data:
        batches: dict[int, dict[str, np.ndarray]] = {}
        for key in data.files:
            index, name = key.split(".", 1)
            batches.setdefault(int(index[1:]), {})[name] = data[key]
    return [batches[i] for i in sorted(batches)]


def _float_weights(model: nn.Module, int8: set[str]) -> list[np.ndarray]:
    return [
        m.weight.detach().numpy()
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name not in int8
    ]


def _agreement(
    model: nn.Module, spec: ModelSpec, path: Path, coded: tuple[CodedWeight, ...]
) -> dict[str, float]:
    """The final graph against the torch checkpoint it came from, on example inputs."""
    weights = weights_file_for(path) if coded else None
    session = create_session(path, ort.SessionOptions(), ["CPUExecutionProvider"], weights, coded)
    refs, acts = [], []
    for batch, seq in [(2, 16), (4, 64)]:
        feeds = spec.example_inputs(batch=batch, sequence=seq, seed=7 + batch)
        refs.append(reduce_outputs(spec, torch_outputs(model, spec, feeds)[0], feeds))
        acts.append(reduce_outputs(spec, session.run(spec.output_names[:1], feeds)[0], feeds))
    fid = compare(np.concatenate(refs), np.concatenate(acts), spec)
    return {"cos_min": fid.cos_min, "cos_mean": fid.cos_mean, "sqnr_db": fid.sqnr_db}


def _merge_duplicate_initializers(proto: onnx.ModelProto) -> None:
    """One initializer per distinct value (e.g. the smoothing multiplier query, key and value
    share), so onnxruntime also merges the nodes reading them."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    with contextlib.redirect_stdout(io.StringIO()):
        OnnxModel(proto).remove_duplicated_initializer(cache={})


def _strip_metadata(proto: onnx.ModelProto) -> None:
    """Drop per-node debug metadata (the exporter's source traces): bytes that do not run."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def compress_graph(
    source: str | os.PathLike[str], model: nn.Module, spec: ModelSpec, onnx_path: Path
) -> GraphCompression:
    """Apply a checkpoint's ONNX transforms to ``onnx_path`` in place; nothing for other sources."""
    root = Path(os.fspath(source))
    if not is_checkpoint(root):
        return GraphCompression()
    meta = read_checkpoint(root)
    storage = meta.get("storage", {})
    int8 = set(storage.get("int8", []))
    report: dict[str, Any] = {"compression": meta.get("report", {}), "graph": {}}
    graph = report["graph"]

    fusion = fuse(onnx_path, spec)
    proto = fusion.model if fusion.model is not None else onnx.load(str(onnx_path))
    _merge_duplicate_initializers(proto)
    graph["fusion"] = {
        "note": fusion.note,
        "fused": fusion.fused,
        "max_abs_error": fusion.max_abs_error,
    }

    quant_steps = [s["quantize"] for s in meta["recipe"]["steps"] if "quantize" in s]
    if int8 and quant_steps:
        step = quant_steps[-1]
        exclude = nodes_using(proto, _float_weights(model, int8))
        proto = quantize_int8(
            proto,
            mode=step["mode"],
            per_channel=step["per_channel"],
            exclude=exclude,
            calibration=_calibration(root),
            method=step["calibration"],
        )
        graph["int8"] = {"mode": step["mode"], "float_nodes": exclude}
    tables = storage.get("int8_tables", [])
    if tables:
        modules = dict(model.named_modules())
        weights = [modules[t].weight.detach().numpy() for t in tables]
        graph["int8_tables"] = quantize_tables(proto, weights)

    weights_path = weights_file_for(onnx_path)
    sharing = encode_shared_weights(proto)
    graph["weight_sharing"] = [
        {
            "tensor": e.name,
            "shape": list(e.shape),
            "bits": e.bits,
            "bytes_before": e.bytes_before,
            "bytes_after": e.bytes_after,
            "decoded_at": e.decoded_at,
        }
        for e in sharing.encoded
    ]
    _strip_metadata(proto)
    coded = tuple(sharing.coded)
    if coded:
        with open(weights_path, "wb") as fh:
            np.savez(fh, **sharing.arrays)
    onnx.save_model(proto, str(onnx_path))  # the caller checks it as the runtime will run it
    graph["vs_checkpoint"] = _agreement(model, spec, onnx_path, coded)
    contrib = any(n.domain == "com.microsoft" for n in proto.graph.node)
    return GraphCompression(
        contrib_ops=contrib,
        report=report,
        weights=weights_path.name if coded else None,
        coded=coded,
    )
