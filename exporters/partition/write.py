"""Write a plan's stages: each a standalone ONNX model, described for the manifest.

Strategies say which nodes a stage holds; ``StageWriter`` turns that into files. A stage cut
from the graph is extracted with ``onnx.utils.Extractor`` and must pass ``onnx.checker``. Where
the source stage keeps weights as row-packed codes, each written stage gets its own weights
file holding the codes of just its weights (sliced ones re-packed), so a split package stays as
small in memory as the whole one.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from edgec.exporters.partition.graph import GraphProfile
from edgec.exporters.partition.plan import StagePlan
from edgec.exporters.weight_sharing import encode_shared_weights
from edgec.runtimes.lowbit import CodedWeight
from edgec.runtimes.manifest import StageInfo
from edgec.runtimes.package import sha256_file

from edgec.errors import ExportError

STAGES_DIR = "stages"
CONTRIB_DOMAIN = "com.microsoft"


def typed(model: onnx.ModelProto, graph: GraphProfile) -> onnx.ModelProto:
    """Shape-inferred copy in which every value has a type: where onnx's inference stops
    (e.g. after DequantizeLinear), the element type and rank measured by ``analyse``."""
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {
        v.name for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    for name, (elem_type, rank) in graph.tensor_types.items():
        if name not in known:
            inferred.graph.value_info.append(
                onnx.helper.make_tensor_value_info(name, elem_type, [None] * rank)
            )
    return inferred


def check_stage(proto: onnx.ModelProto, name: str) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"stage {name!r} does not form a valid ONNX model: {exc}") from exc


def extract(
    model: onnx.ModelProto, inputs: list[str], outputs: list[str], name: str
) -> onnx.ModelProto:
    """The nodes between ``inputs`` and ``outputs`` as a checked ONNX model named ``name``."""
    try:
        sub = onnx.utils.Extractor(model).extract_model(inputs, outputs)
    except (KeyError, ValueError) as exc:
        raise ExportError(f"stage {name!r} does not form a valid ONNX model: {exc}") from exc
    sub.graph.name = name
    sub.ir_version = model.ir_version
    check_stage(sub, name)
    return sub


class StageWriter:
    """Writes stages into the package folder ``root`` being built.

    ``whole_file`` is the unpartitioned model inside ``root``, ``source`` its stage entry (its
    weights file and coded weights, if any); ``graph`` the analysed model, coded weights decoded.
    ``written`` collects every file written, by path inside ``root``, with its sha256.
    """

    def __init__(
        self,
        root: Path,
        whole_file: str,
        source: StageInfo,
        graph: GraphProfile,
        examples: list[dict[str, np.ndarray]] | None = None,
    ):
        self.examples = examples or []
        self.root = root
        self.whole_file = whole_file
        self.source = source
        self.graph = graph
        self.coded = frozenset(c.name for c in source.coded)
        self.written: dict[str, str] = {}

    @cached_property
    def model(self) -> onnx.ModelProto:
        """The analysed model with a type on every value (what stages are cut from)."""
        return typed(self.graph.model, self.graph)

    def activations(self, names: list[str]) -> dict[str, np.ndarray]:
        """The values ``names`` take on the example inputs (concatenated along the batch),
        for writers that calibrate on them."""
        if not names:
            return {}
        if not self.examples:
            raise ExportError(f"no example inputs to calibrate {names} on")
        import onnxruntime as ort

        probe = onnx.ModelProto()
        probe.CopyFrom(self.model)
        known = {o.name for o in probe.graph.output}
        probe.graph.output.extend(
            v for v in self.model.graph.value_info if v.name in names and v.name not in known
        )
        session = ort.InferenceSession(
            probe.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        runs = [session.run(names, feeds) for feeds in self.examples]
        return {
            name: np.concatenate([r[i].reshape(-1, r[i].shape[-1]) for r in runs])
            for i, name in enumerate(names)
        }

    def whole(self, plan: StagePlan, **fields: Any) -> StageInfo:
        """``plan``'s stage running the whole model's file as it is."""
        files = [self.whole_file] + ([self.source.weights] if self.source.weights else [])
        for file in files:
            self.written.setdefault(file, sha256_file(self.root / file))
        return StageInfo(
            name=plan.name,
            device=plan.device,
            file=self.whole_file,
            sha256=self.written[self.whole_file],
            inputs=self.graph.inputs,
            outputs=self.graph.outputs,
            contrib_ops=self.source.contrib_ops,
            weights=self.source.weights,
            coded=self.source.coded,
            memory_bytes=plan.process_bytes or None,
            predicted_ms=round(plan.predicted_ms, 6),
            **fields,
        )

    def save(self, plan: StagePlan, proto: onnx.ModelProto, **fields: Any) -> StageInfo:
        """Write ``proto`` as ``plan``'s stage file (its coded weights re-packed beside it)."""
        (self.root / STAGES_DIR).mkdir(exist_ok=True)
        file = f"{STAGES_DIR}/{plan.name}.onnx"
        names = {init.name for init in proto.graph.initializer} & self.coded
        weights: str | None = None
        coded: tuple[CodedWeight, ...] = ()
        # a slice too thin for its codes to pay stays a plain weight of the stage file
        encoding = encode_shared_weights(proto, min_elements=1, only=names) if names else None
        if encoding is not None and encoding.coded:
            weights = f"{STAGES_DIR}/{plan.name}.weights.npz"
            with open(self.root / weights, "wb") as fh:
                np.savez(fh, **encoding.arrays)
            self.written[weights] = sha256_file(self.root / weights)
            coded = tuple(encoding.coded)
        onnx.save_model(proto, os.fspath(self.root / file))
        self.written[file] = sha256_file(self.root / file)
        io = {"inputs": tuple(plan.inputs), "outputs": tuple(plan.outputs)}
        io.update({k: fields.pop(k) for k in ("inputs", "outputs") if k in fields})
        return StageInfo(
            name=plan.name,
            device=plan.device,
            file=file,
            sha256=self.written[file],
            **io,
            contrib_ops=any(node.domain == CONTRIB_DOMAIN for node in proto.graph.node),
            weights=weights,
            coded=coded,
            memory_bytes=plan.process_bytes or None,
            predicted_ms=round(plan.predicted_ms, 6),
            **fields,
        )


def _bytes(graph: GraphProfile, name: str) -> int:
    """A crossing tensor's bytes at the planning size; for one carried as int8, its part."""
    from edgec.exporters.partition.links import QUANTIZED, SCALE

    if name in graph.tensor_bytes:
        return graph.tensor_bytes[name]
    for pattern, per_element in ((QUANTIZED, 1.0), (SCALE, 0.0)):
        suffix = pattern.format("")
        if name.endswith(suffix) and name[: -len(suffix)] in graph.tensor_bytes:
            source = name[: -len(suffix)]
            shape = graph.tensor_shapes.get(source, (1,))
            elements = graph.tensor_bytes[source] // 4
            return int(elements * per_element) or 4 * (elements // max(shape[-1], 1))
    return 0


def edges(stages: list[StageInfo], graph: GraphProfile) -> list[dict[str, Any]]:
    """What each stage receives and from where: the stage that made each input last, or the
    caller ("input"), with the bytes at the planning size."""
    made_by: dict[str, str] = {}
    found: list[dict[str, Any]] = []
    for stage in stages:
        sources: dict[str, list[str]] = {}
        for tensor in stage.inputs:
            sources.setdefault(made_by.get(tensor, "input"), []).append(tensor)
        for source, tensors in sources.items():
            found.append(
                {
                    "from": source,
                    "to": stage.name,
                    "tensors": tensors,
                    "bytes": sum(_bytes(graph, t) for t in tensors),
                }
            )
        for tensor in stage.outputs:
            made_by[tensor] = stage.name
    return found
