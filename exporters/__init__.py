"""The ONNX side: torch -> ONNX, ONNX transforms, partitioning, the package writer."""

from edgec.exporters.build import ExportResult, export

__all__ = ["ExportResult", "export"]
