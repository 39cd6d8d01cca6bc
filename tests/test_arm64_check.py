"""The cross-check behind scripts/arm64-check, without qemu: a package against itself passes,
against a perturbed copy of its outputs fails; tolerances per kind, the table, JSON, exit codes.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from edgec import crosscheck
from edgec.emulated import torch_in

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "arm64-check"


def _script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("arm64_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("arm64_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class PerturbedSide:
    """Runs the package here, then moves every raw output by ``delta`` (one element, or all)."""

    def __init__(self, delta: float, everywhere: bool = False):
        self.name = "perturbed"
        self.delta, self.everywhere = delta, everywhere
        self._side = crosscheck.LocalSide("perturbed")

    def run(self, package_dir: Path, probe: Path, out: Path, command: str = "run") -> None:
        self._side.run(package_dir, probe, out, command)
        with np.load(out) as data:
            arrays = {k: data[k] for k in data.files}
        for key in [k for k in arrays if k.startswith("raw:")]:
            value = arrays[key].copy()
            if self.everywhere:
                value += np.float32(self.delta) * np.sign(
                    np.random.default_rng(0).standard_normal(value.shape)
                ).astype(np.float32)
            else:
                value.flat[0] += np.float32(self.delta)
            arrays[key] = value
        np.savez(out, **arrays)


class BrokenSide:
    name = "broken"

    def run(self, package_dir: Path, probe: Path, out: Path, command: str = "run") -> None:
        raise crosscheck.SideError("broken: onnxruntime is not installed there")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    from edgec.models.data import digits

    return digits("test")[0][:16]


def test_package_against_itself_is_identical(
    digits_package: Path, tmp_path: Path, images: np.ndarray
) -> None:
    report = crosscheck.check_package(
        digits_package,
        tmp_path,
        crosscheck.LocalSide(),
        crosscheck.LocalSide("there"),
        images=images,
    )
    assert report.passed, report.failures
    assert report.kind == "float"
    rows = {r["output"]: r for r in report.rows}
    assert set(rows) == {"raw:logits", "post"}
    assert rows["raw:logits"]["max_abs_diff"] == 0.0
    assert rows["raw:logits"]["shape"] == [16, 10]
    assert rows["post"]["top1_agreement_%"] == 100.0
    assert report.stages == ["model@local"]
    assert crosscheck.exit_code([report]) == 0
    assert "within tolerance" in crosscheck.format_report(report)


@pytest.mark.parametrize(("delta", "passes"), [(5e-5, True), (2e-4, False)])
def test_float_tolerance_is_max_abs_1e4(
    digits_package: Path, tmp_path: Path, images: np.ndarray, delta: float, passes: bool
) -> None:
    report = crosscheck.check_package(
        digits_package, tmp_path, crosscheck.LocalSide(), PerturbedSide(delta), images=images
    )
    assert report.passed is passes
    row = next(r for r in report.rows if r["output"] == "raw:logits")
    assert row["max_abs_diff"] == pytest.approx(delta, rel=0.05)
    if not passes:
        assert report.failures == [
            f"raw:logits: max abs difference {row['max_abs_diff']:.3g} > 0.0001"
        ]
        assert crosscheck.exit_code([report]) == 1
        text = crosscheck.format_report(report)
        assert "FAIL raw:logits: max abs difference" in text and "NOT within tolerance" in text


def _write(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _outputs(path: Path, hidden: np.ndarray, post: np.ndarray, machine: str) -> Path:
    meta = json.dumps({"machine": machine, "onnxruntime": "1.x", "stages": ["s0@a", "s1@b"]})
    return _write(path, **{"raw:h": hidden, "post": post, "meta": np.array(meta)})


def _rotated(rows: np.ndarray, cosine: float) -> np.ndarray:
    """Each row turned to exactly ``cosine`` against itself (in the plane of a fixed direction)."""
    rng = np.random.default_rng(1)
    out = []
    for row in rows.astype(np.float64):
        unit = row / np.linalg.norm(row)
        other = rng.standard_normal(row.shape)
        other -= other @ unit * unit
        other /= np.linalg.norm(other)
        turned = cosine * unit + np.sqrt(1 - cosine**2) * other
        out.append(turned * np.linalg.norm(row))
    return np.asarray(out, dtype=np.float32)


@pytest.mark.parametrize(("cosine", "passes"), [(0.999, True), (0.99, False)])
def test_int8_tolerance_is_a_cosine_floor(tmp_path: Path, cosine: float, passes: bool) -> None:
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int64)
    probe = _write(tmp_path / "probe.npz", **{"feed:attention_mask": mask})
    hidden = rng.standard_normal((2, 4, 8)).astype(np.float32)
    post = rng.standard_normal((3, 8)).astype(np.float32)
    here = _outputs(tmp_path / "here.npz", hidden, post, "x86_64")
    # the raw states move only at padded positions, which pooling over the mask ignores
    moved = hidden.copy()
    moved[:, 3] += 10.0
    there = _outputs(tmp_path / "there.npz", moved, _rotated(post, cosine), "aarch64")
    report = crosscheck.compare_package("p", "int8", probe, here, there)
    rows = {r["output"]: r for r in report.rows}
    assert rows["raw:h"]["min_cosine"] == pytest.approx(1.0)
    assert rows["raw:h"]["max_abs_diff"] == pytest.approx(10.0)  # no max abs limit for int8
    assert rows["post"]["min_cosine"] == pytest.approx(cosine, abs=1e-6)
    assert report.passed is passes
    if not passes:
        assert report.failures == [f"post: min cosine {rows['post']['min_cosine']:.6f} < 0.995"]
    assert report.stages == ["s0@a", "s1@b"] and report.there["machine"] == "aarch64"
    data = report.to_json()
    assert json.loads(json.dumps(data))["passed"] is passes
    assert data["tolerance"]["min_cosine"] == 0.995 and data["tolerance"]["reason"]


def test_missing_or_reshaped_outputs_and_nonfinite_fail(tmp_path: Path) -> None:
    probe = _write(tmp_path / "probe.npz", dummy=np.zeros(1))
    post = np.ones((2, 3), np.float32)
    here = _outputs(tmp_path / "here.npz", np.ones((2, 3, 4), np.float32), post, "x86_64")
    there = _outputs(tmp_path / "there.npz", np.ones((2, 3, 5), np.float32), post, "aarch64")
    report = crosscheck.compare_package("p", "float", probe, here, there)
    assert report.failures == ["raw:h: shape [2, 3, 5] there, [2, 3, 4] here"]
    nan = post.copy()
    nan[0, 0] = np.nan
    there = _outputs(tmp_path / "there.npz", np.ones((2, 3, 4), np.float32), nan, "aarch64")
    report = crosscheck.compare_package("p", "float", probe, here, there)
    assert not report.passed and "post: 1 non-finite values there" in report.failures


def test_a_side_that_cannot_run_is_an_error_with_its_own_exit_code(
    digits_package: Path, tmp_path: Path, images: np.ndarray
) -> None:
    report = crosscheck.check_package(
        digits_package, tmp_path, crosscheck.LocalSide(), BrokenSide(), images=images
    )
    assert report.error == "broken: onnxruntime is not installed there"
    assert crosscheck.exit_code([report]) == crosscheck.SideError.exit_code == 9
    assert "error: broken" in crosscheck.format_report(report)


def _rehash(package: Path) -> None:
    manifest = json.loads((package / "manifest.json").read_text())
    for stage in manifest["stages"]:
        digest = hashlib.sha256((package / stage["file"]).read_bytes()).hexdigest()
        stage["sha256"] = manifest["files"][stage["file"]] = digest
    (package / "manifest.json").write_text(json.dumps(manifest, indent=2))


def test_a_graph_with_int8_activations_gets_the_cosine_floor(
    digits_package: Path, tmp_path: Path, images: np.ndarray
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    package = tmp_path / "int8.pkg"
    shutil.copytree(digits_package, package)
    quantize_dynamic(package / "model.onnx", package / "q.onnx", weight_type=QuantType.QInt8)
    (package / "q.onnx").replace(package / "model.onnx")
    _rehash(package)
    kind, evidence = crosscheck.package_kind(package)
    assert kind == "int8" and "DynamicQuantizeLinear" in evidence
    assert crosscheck.package_kind(digits_package) == ("float", [])
    report = crosscheck.check_package(
        package,
        tmp_path / "work",
        crosscheck.LocalSide(),
        PerturbedSide(1e-3, everywhere=True),
        images=images,
    )
    # 1e-3 on every logit is far outside the float limit, well inside the int8 cosine floor
    assert report.kind == "int8" and report.passed, report.failures


def test_script_against_a_local_side_json_and_exit_codes(
    digits_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _script()
    argv = [str(digits_package), "--against", "local", "--work", str(tmp_path), "--images", "8"]
    assert script.main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is True and result["against"] == "local"
    (package,) = result["packages"]
    assert package["kind"] == "float" and package["tolerance"]["max_abs"] == 1e-4
    assert {o["output"] for o in package["outputs"]} == {"raw:logits", "post"}
    assert script.main(argv) == 0
    assert "within tolerance" in capsys.readouterr().out
    assert script.main([str(tmp_path), "--against", "local"]) == 5  # not a package
    assert "is not a package" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([])


def test_torch_in_a_device_install_is_found() -> None:
    freeze = ["numpy==2.4.6", "onnxruntime==1.32.0", "tokenizers==0.23.3"]
    assert torch_in(freeze) == []
    assert torch_in([*freeze, "torch==2.13.0", "nvidia-cublas-cu12==12.1"]) == [
        "torch",
        "nvidia-cublas-cu12",
    ]


class NodePerturbedSide:
    """Runs the node probe here, then changes the outputs of one operator type's first node."""

    name = "perturbed"

    def __init__(self, op: str):
        self.op = op

    def run(self, package_dir: Path, probe: Path, out: Path, command: str = "run") -> None:
        crosscheck.LocalSide().run(package_dir, probe, out, command)
        with np.load(probe) as data:
            nodes = json.loads(str(data["nodes"]))
        target = next(n for n in nodes if n["op"] == self.op)
        with np.load(out) as data:
            arrays = {k: data[k] for k in data.files}
        arrays[f"node:{target['outputs'][0]}"] = arrays[f"node:{target['outputs'][0]}"] + 0.5
        np.savez(out, **arrays)


def test_per_node_comparison_finds_the_operator_that_differs(
    digits_package: Path, tmp_path: Path, images: np.ndarray
) -> None:
    same = crosscheck.diagnose(
        digits_package, tmp_path / "same", crosscheck.LocalSide(), crosscheck.LocalSide(), images
    )
    assert same["chained"]["origins"] == [] and same["chained"]["nodes"] > 10
    assert same["replay"]["worst"] == [] and same["replay"]["nodes"] == same["chained"]["nodes"]
    assert "every node's outputs identical" in crosscheck.format_divergence(same)
    moved = crosscheck.diagnose(
        digits_package,
        tmp_path / "moved",
        crosscheck.LocalSide(),
        NodePerturbedSide("Softmax"),
        images,
    )
    (origin,) = moved["chained"]["origins"]
    assert origin["op"] == "Softmax" and origin["max_abs"] == pytest.approx(0.5)
    assert moved["chained"]["per_op"]["Softmax"]["origins"] == 1
    # on the same inputs, only the perturbed node differs: nothing downstream inherits it
    (worst,) = moved["replay"]["worst"]
    assert worst["op"] == "Softmax" and worst["max_abs"] == pytest.approx(0.5)
    assert [op for op, s in moved["replay"]["per_op"].items() if s["differ"]] == ["Softmax"]
    text = crosscheck.format_divergence(moved)
    assert "first part at" in text and "replay" in text


@pytest.mark.parametrize(("batch", "passes"), [(0.985, True), (0.999, False), (None, False)])
def test_int8_floor_yields_to_the_packages_own_batch_variation(
    tmp_path: Path, batch: float | None, passes: bool
) -> None:
    """0.99 against x86 misses the 0.995 floor, unless x86 itself moves the output further
    (0.985) when the batch changes; a batch variation smaller than the floor does not tighten it."""
    rng = np.random.default_rng(0)
    probe = _write(tmp_path / "probe.npz", dummy=np.zeros(1))
    hidden = rng.standard_normal((2, 4, 8)).astype(np.float32)
    post = rng.standard_normal((3, 8)).astype(np.float32)
    here = _outputs(tmp_path / "here.npz", hidden, post, "x86_64")
    there = _outputs(tmp_path / "there.npz", hidden, _rotated(post, 0.99), "aarch64")
    variation = None if batch is None else {"post": batch}
    report = crosscheck.compare_package("p", "int8", probe, here, there, batch_min_cosine=variation)
    assert report.passed is passes
    row = next(r for r in report.rows if r["output"] == "post")
    assert row["floor"] == min(0.995, batch or 1.0)
