"""Apply a plan: write each stage as a standalone ONNX model and describe it for the manifest.

Stages are cut with ``onnx.utils.Extractor`` (inputs and outputs named by the plan) and must
pass ``onnx.checker``. Data-parallel stages share the whole model's file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from edgec.exporters.partition.graph import GraphProfile
from edgec.exporters.partition.plan import Plan, StagePlan
from edgec.runtimes.manifest import StageInfo
from edgec.runtimes.package import sha256_file

from edgec.errors import ExportError


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


def extract_stage(model: onnx.ModelProto, stage: StagePlan) -> onnx.ModelProto:
    """The nodes between ``stage.inputs`` and ``stage.outputs`` as a checked ONNX model."""
    extractor = onnx.utils.Extractor(model)
    try:
        sub = extractor.extract_model(list(stage.inputs), list(stage.outputs))
        sub.graph.name = stage.name
        sub.ir_version = model.ir_version
        onnx.checker.check_model(sub, full_check=True)
    except (
        KeyError,
        ValueError,
        onnx.checker.ValidationError,
        onnx.shape_inference.InferenceError,
    ) as exc:
        raise ExportError(f"stage {stage.name!r} does not form a valid ONNX model: {exc}") from exc
    return sub


def write_stages(
    model: onnx.ModelProto, graph: GraphProfile, plan: Plan, root: Path, whole_file: str
) -> tuple[list[StageInfo], list[dict[str, Any]]]:
    """Write the plan's stage files under ``root``; return the stages and the edges between them.

    ``whole_file`` is the unpartitioned model's file inside ``root`` (data-parallel stages
    and single-stage plans use it as it is).
    """
    if plan.strategy == "heads":
        from edgec.exporters.partition.heads import write_heads

        return write_heads(model, graph, plan, root)
    model = typed(model, graph) if plan.strategy == "pipeline" else model
    stages: list[StageInfo] = []
    made_by: dict[str, str] = {}
    edges: list[dict[str, Any]] = []
    for plan_stage in plan.stages:
        if plan.strategy == "pipeline":
            file = f"stages/{plan_stage.name}.onnx"
            (root / "stages").mkdir(exist_ok=True)
            onnx.save_model(extract_stage(model, plan_stage), str(root / file))
            inputs, outputs = plan_stage.inputs, plan_stage.outputs
        else:
            file = whole_file
            inputs, outputs = graph.inputs, graph.outputs
        sources: dict[str, list[str]] = {}
        for tensor in inputs:
            sources.setdefault(made_by.get(tensor, "input"), []).append(tensor)
        for source, tensors in sources.items():
            edges.append(
                {
                    "from": source,
                    "to": plan_stage.name,
                    "tensors": tensors,
                    "bytes": sum(graph.tensor_bytes.get(t, 0) for t in tensors),
                }
            )
        for tensor in outputs:
            made_by[tensor] = plan_stage.name
        extra: dict[str, Any] = {
            "nodes": [plan_stage.start, plan_stage.stop],
            "predicted_ms": round(plan_stage.predicted_ms, 6),
        }
        if plan.strategy == "data":
            extra["batch_share"] = plan_stage.batch_share
        stages.append(
            StageInfo(
                name=plan_stage.name,
                device=plan_stage.device,
                file=file,
                sha256=sha256_file(root / file),
                inputs=tuple(inputs),
                outputs=tuple(outputs),
                extra=extra,
            )
        )
    return stages, edges
