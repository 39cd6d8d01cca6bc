"""Low-bit weights that stay low in memory: row-packed codes and per-row codebooks.

A shared weight holds at most ``2**bits`` distinct values per row. It is stored as one index per
value, ``bits`` wide, packed little-endian per row in groups of 8 codes (``bits`` bytes each;
plus one spare byte, so a decoder may always read the byte after the one it needs), and a
codebook per row. Two places
decode it, and neither passes through anything wider than the result:

- an embedding table (read only by ``Gather``) is decoded in the ONNX graph *after* the rows are
  gathered: the device holds the packed table, and each run decodes only its tokens' rows;
- any other weight (the Linears that int8 kernels prepack) is decoded here in numpy, a block of
  rows at a time, just before the session is created, into one buffer laid out as the ONNX
  file's external data (``DECODED_LOCATION``, offsets from ``decoded_layout``); onnxruntime
  copies it in as an in-memory external data file, prepacks it and frees what it no longer
  needs, and the buffer is dropped once the session exists. The package stores only the codes.

Why not a decode subgraph that onnxruntime folds at load: folding materialises every
intermediate (int64 positions, shifted words) of every weight before it frees any, which took
the 11 MB ``balanced`` minilm package through a 2 GB peak and left 730 MB resident.

numpy only: this module runs on the device.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from edgec.errors import PackageError

CODED_DTYPES = ("int8", "float32")  # what a decoded weight computes as
_ROWS_PER_BLOCK = 256  # rows decoded at once: bounds the decode's scratch memory
# The external data "file" coded weights point at: made in memory by the runtime, never on disk.
DECODED_LOCATION = "edgec-decoded-weights.bin"
_ALIGN = 64  # bytes; each decoded tensor starts aligned


@dataclass(frozen=True)
class CodedWeight:
    """One weight stored as row-packed codes in a stage's weights file.

    ``shape`` is the ONNX tensor's; codes run along its rows, or along its columns when
    ``transpose`` (then the packed rows are the columns). ``dtype`` is what it decodes to.
    """

    name: str
    shape: tuple[int, int]
    dtype: str
    bits: int
    transpose: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in CODED_DTYPES:
            raise PackageError(
                f"coded weight {self.name!r}: dtype {self.dtype!r} is not one of {CODED_DTYPES}"
            )
        if not 1 <= self.bits <= 8:
            raise PackageError(f"coded weight {self.name!r}: bits must be 1..8, got {self.bits}")
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise PackageError(f"coded weight {self.name!r}: shape {self.shape} is not 2-D")

    @property
    def rows(self) -> int:
        return self.shape[1] if self.transpose else self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[0] if self.transpose else self.shape[1]

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the decoded tensor, as the session holds it."""
        return self.shape[0] * self.shape[1] * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "bits": self.bits,
            "transpose": self.transpose,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> CodedWeight:
        try:
            shape = tuple(int(s) for s in data["shape"])  # type: ignore[attr-defined]
            return cls(
                name=str(data["name"]),
                shape=(shape[0], shape[1]),
                dtype=str(data["dtype"]),
                bits=int(data["bits"]),  # type: ignore[call-overload]
                transpose=bool(data.get("transpose", False)),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise PackageError(f"malformed coded weight entry {data!r}: {exc}") from exc


def row_bytes(cols: int, bits: int) -> int:
    """Bytes per packed row: ``cols`` codes of ``bits`` bits in whole groups of 8 codes (each
    group is ``bits`` bytes, so a decoder can take a row group by group), plus one spare byte."""
    return -(-cols // 8) * bits + 1


def code_positions(cols: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(byte, bit offset) of each code in a packed row; a code spans at most two bytes."""
    start = np.arange(cols, dtype=np.int64) * bits
    return start // 8, start % 8


def pack_rows(indices: np.ndarray, bits: int) -> np.ndarray:
    """(R, C) codes below ``2**bits`` -> (R, ``row_bytes(C, bits)``) uint8, little-endian."""
    rows, cols = indices.shape
    if indices.size and (indices.min() < 0 or indices.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits} bits")
    byte, offset = code_positions(cols, bits)
    packed = np.zeros((rows, row_bytes(cols, bits)), dtype=np.uint16)
    shifted = indices.astype(np.uint16) << offset.astype(np.uint16)  # spans two bytes at most
    for column in range(cols):  # codes of one column never collide within a byte: add is or
        packed[:, byte[column]] |= shifted[:, column] & 0xFF
        packed[:, byte[column] + 1] |= shifted[:, column] >> 8
    return packed.astype(np.uint8)


def unpack_rows(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """The numpy inverse of ``pack_rows``: (R, row bytes) uint8 -> (R, ``cols``) codes (uint8)."""
    byte, offset = code_positions(cols, bits)
    lo = packed[:, byte].astype(np.uint16)
    lo |= packed[:, byte + 1].astype(np.uint16) << 8
    lo >>= offset.astype(np.uint16)
    lo &= (1 << bits) - 1
    return lo.astype(np.uint8)


def _decoded_blocks(
    weight: CodedWeight, packed: np.ndarray, codebook: np.ndarray
) -> Iterator[tuple[slice, np.ndarray]]:
    for start in range(0, weight.rows, _ROWS_PER_BLOCK):
        block = slice(start, min(start + _ROWS_PER_BLOCK, weight.rows))
        codes = unpack_rows(packed[block], weight.bits, weight.cols)
        yield block, np.take_along_axis(codebook[block], codes, axis=1)


def decoded_layout(weights: Sequence[CodedWeight]) -> tuple[list[int], int]:
    """(byte offset of each weight, total bytes) in the decoded buffer, in ``weights``' order:
    the offsets the exporter writes into the ONNX file's external data."""
    offsets, total = [], 0
    for weight in weights:
        offsets.append(total)
        total += -(-weight.decoded_bytes // _ALIGN) * _ALIGN
    return offsets, total


def decode(
    weight: CodedWeight, packed: np.ndarray, codebook: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """The weight as the session computes with it, decoded a block of rows at a time (into
    ``out``, an array of its shape and dtype, when given)."""
    k = 2**weight.bits
    if packed.shape != (weight.rows, row_bytes(weight.cols, weight.bits)):
        raise PackageError(
            f"coded weight {weight.name!r}: packed codes have shape {list(packed.shape)}, "
            f"expected {[weight.rows, row_bytes(weight.cols, weight.bits)]}"
        )
    if codebook.shape != (weight.rows, k):
        raise PackageError(
            f"coded weight {weight.name!r}: codebook has shape {list(codebook.shape)}, "
            f"expected {[weight.rows, k]}"
        )
    if out is None:
        out = np.empty(weight.shape, dtype=weight.dtype)
    view = out.T if weight.transpose else out  # writes land in the ONNX layout directly
    for block, values in _decoded_blocks(weight, packed, codebook):
        view[block] = values
    return out


def weights_keys(name: str) -> tuple[str, str]:
    """The weights file's keys for a coded weight's packed codes and codebook."""
    return f"{name}.codes", f"{name}.codebook"


def decode_to_buffer(
    path: Path | IO[bytes], weights: Sequence[CodedWeight]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Decode every coded weight of a stage from its weights file (``.npz``, no pickle) into
    one uint8 buffer laid out by ``decoded_layout``; also returns a view per weight."""
    name = getattr(path, "name", "weights file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise PackageError(f"cannot read weights file {name}: {exc}") from exc
    offsets, total = decoded_layout(weights)
    buffer = np.zeros(total, dtype=np.uint8)
    views: dict[str, np.ndarray] = {}
    with archive:
        for weight, offset in zip(weights, offsets, strict=True):
            codes_key, codebook_key = weights_keys(weight.name)
            if codes_key not in archive.files or codebook_key not in archive.files:
                raise PackageError(f"weights file {name} lacks coded weight {weight.name!r}")
            view = buffer[offset : offset + weight.decoded_bytes].view(weight.dtype)
            view = view.reshape(weight.shape)
            views[weight.name] = decode(weight, archive[codes_key], archive[codebook_key], view)
    return buffer, views


def load_coded_weights(
    path: Path | IO[bytes], weights: Sequence[CodedWeight]
) -> dict[str, np.ndarray]:
    """Every coded weight of a stage, decoded, by name."""
    return decode_to_buffer(path, weights)[1]
