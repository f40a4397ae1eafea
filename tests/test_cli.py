"""Tests for `lowbit quantize`: the artifact directory, every supported model format, and bad inputs.

One real zoo:small_cnn run is shared by the tests (module fixture). The other
successful runs use a handful of calibration samples and minmax ranges to stay fast.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner, Result
from safetensors.torch import save_file
from torch import nn

from lowbit.cli.main import lowbit
from lowbit.codegen.onnx import u8s8_exact_here
from lowbit.errors import LowbitError
from lowbit.ir import QuantizedGraph
from lowbit.models import get_zoo_entry, small_cnn
from lowbit.pipeline.artifact import verify_manifest
from lowbit.pipeline.data import Inputs, check_disjoint, load_array_file, load_inputs, split_heldout, validate_inputs

EXPECTED_FILES = {"manifest.json", "model.onnx", "model.int.onnx", "ir/ir.json", "ir/ir.safetensors", "report.json",
                  "report.md"}
if importlib.util.find_spec("tvm") is not None:  # quantize compiles by default when TVM is installed
    EXPECTED_FILES |= {"tvm/model.so", "tvm/params.npz", "tvm/tvm.json"}
FAST = ["--calib-method", "minmax"]


def invoke(*args: object) -> Result:
    return CliRunner().invoke(lowbit, ["quantize", *map(str, args)])


def files_in(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def temp_leftovers(out: Path) -> list[str]:
    """Temporary (new or old) directories left next to DIR."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def assert_nothing_written(out: Path) -> None:
    """No DIR and no temporary directory left next to where it would have been."""
    assert not out.exists()
    assert temp_leftovers(out) == []


def assert_user_error(result: Result, *needles: str) -> str:
    """Exit code 2, `error: ...` on stderr naming every needle, and no traceback."""
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr, result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in {result.stderr!r}"
    return result.stderr


@pytest.fixture(scope="module")
def calib_npy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five small_cnn inputs: four for calibration, one split off as held-out."""
    path = tmp_path_factory.mktemp("data") / "calib.npy"
    np.save(path, get_zoo_entry("small_cnn").calibration(0)[:5])
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    out = tmp_path_factory.mktemp("zoo") / "small_cnn"
    result = invoke("zoo:small_cnn", "-o", out)
    assert result.exit_code == 0, result.output
    return out, result


# -- a successful run ------------------------------------------------------------------------------------------------

def test_zoo_run_writes_a_complete_verified_artifact(artifact: tuple[Path, Result]) -> None:
    out, result = artifact
    assert files_in(out) == EXPECTED_FILES
    assert verify_manifest(out) == []
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp dirs beside the artifact

    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == EXPECTED_FILES - {"manifest.json"}
    assert {"lowbit", "torch", "onnx", "onnxruntime", "numpy"} <= set(manifest["versions"])
    assert manifest["model"]["spec"] == "zoo:small_cnn"
    assert manifest["config"]["bits"] == 8 and manifest["config"]["seed"] == 0
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 3, 32, 32],
                                   "quantization": manifest["inputs"][0]["quantization"]}]
    assert manifest["outputs"][0]["shape"] == ["N", 10] and manifest["outputs"][0]["dtype"] == "float32"
    assert set(manifest["bit_plan"].values()) == {8} and len(manifest["bit_plan"]) == 9

    report = json.loads((out / "report.json").read_text())
    fidelity = report["fidelity"]
    assert {"top1_agreement", "mean_kl", "sqnr_db"} <= set(fidelity)
    assert fidelity["samples"] == 64 and report["calibration"]["samples"] == 64
    assert fidelity["top1_agreement"] >= 0.8 and fidelity["sqnr_db"] > 10 and fidelity["mean_kl"] >= 0
    # Agreement with its bootstrap interval; small_cnn's noise inputs come from no photos: resampled as independent.
    top1, confident = fidelity["agreement"]["top1"], fidelity["agreement"]["confident"]
    assert top1["agree"] == round(64 * fidelity["top1_agreement"]) and top1["samples"] == 64
    assert top1["low"] <= fidelity["top1_agreement"] <= top1["high"] and top1["high"] - top1["low"] > 0.01
    assert top1["photos"] is None and report["heldout"]["photos"] is None
    assert confident["gap"] == 1.0 and 0 < confident["samples"] < 64 and confident["agree"] <= confident["samples"]
    markdown = (out / "report.md").read_text()
    low, high = 100 * top1["low"], 100 * top1["high"]
    assert (f"| top-1 agreement FP32 vs quantized | {100 * fidelity['top1_agreement']:.1f}% [{low:.1f}, {high:.1f}] "
            f"({top1['agree']}/64 samples, grouping unknown) |") in markdown
    assert "| … on confident inputs (FP32 gap > 1.0) |" in markdown
    # Every backend gives the reference's integers on held-out, random and saturating inputs.
    int_check = report["onnxruntime"]["model.int.onnx"]
    assert int_check["bit_exact"] and int_check["first_difference"] is None
    assert int_check["inputs"] == {"total": 80, "heldout": 64, "random": 8, "saturating": 8}
    if "tvm/model.so" in EXPECTED_FILES:
        assert report["tvm"]["bit_exact"] and report["tvm"]["inputs"] == int_check["inputs"]
    assert report["integer_only"] and report["mismatches"] == []
    assert report["onnx_weights"] == {"requested": "auto",
                                      "stored": "int8" if u8s8_exact_here() else "saturation-safe"}
    assert len(report["layers"]) == 9 and all(row["bits"] == 8 for row in report["layers"])
    assert report["size"]["quantized_bytes"] < report["size"]["fp32_bytes"]
    assert {"load", "capture", "quantize", "export"} <= set(report["timings"]["stages"])

    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# lowbit quantization report: small_cnn")
    assert "top-1 agreement FP32 vs quantized" in markdown and "| `fc2` | linear |" in markdown
    assert "bit-exact vs the reference on 80 inputs (64 held-out, 8 random, 8 saturating)" in markdown
    assert "allow-mismatch" not in markdown

    # The ONNX models declare a float32 input with a symbolic batch dimension.
    model = onnx.load(str(out / "model.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N"
    for stage in ("load:", "capture:", "quantize:", "export:", "evaluate:"):
        assert stage in result.stderr


def test_labelled_scores_carry_intervals(artifact: tuple[Path, Result]) -> None:
    from lowbit.models.loading import load_program
    from lowbit.pipeline.report import labelled_scores, reference_outputs
    from lowbit.quantizer.capture import capture

    out, _ = artifact
    qgraph = QuantizedGraph.load(out / "ir")
    graph = capture(load_program("zoo:small_cnn", None), "small_cnn")
    x = get_zoo_entry("small_cnn").heldout(0)[:24]
    # Labels that INT8 always gets right: FP32's accuracy is then its agreement with INT8, and INT8 - FP32 >= 0.
    labels = reference_outputs(qgraph, x)[qgraph.outputs[0]].argmax(1)
    labels[:3] = (labels[:3] + 1) % 10  # ... except three that both miss
    scores = labelled_scores(graph, qgraph, x, labels, "test")
    assert scores["top1_int8"] == pytest.approx(21 / 24)
    for model in ("fp32", "int8"):
        low, high = scores[f"top1_{model}_interval"]
        assert low <= scores[f"top1_{model}"] <= high
    difference = scores["int8_minus_fp32"]
    assert difference["value"] == pytest.approx(scores["top1_int8"] - scores["top1_fp32"])
    assert 0 <= difference["low"] <= difference["value"] <= difference["high"]


def test_existing_output_needs_force(artifact: tuple[Path, Result]) -> None:
    out, _ = artifact
    before = {name: (out / name).read_bytes() for name in EXPECTED_FILES}
    assert_user_error(invoke("zoo:small_cnn", "-o", out), str(out), "--force")
    assert {name: (out / name).read_bytes() for name in EXPECTED_FILES} == before


def test_unseen_pt2_cnn_quantizes(tmp_path: Path) -> None:
    class Novel(nn.Module):
        """A CNN lowbit has never seen: conv/bn/relu, maxpool, residual add, concat, flatten, linear."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.side = nn.Conv2d(8, 4, 1)
            self.head = nn.Linear(12 * 6 * 6, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
            x = F.relu(x + self.bn2(self.conv2(x)))
            x = torch.cat([x, F.relu(self.side(x))], dim=1)
            return self.head(torch.flatten(F.max_pool2d(x, 2), 1))

    torch.manual_seed(0)
    model = Novel().eval()
    program = torch.export.export(model, (torch.randn(1, 3, 24, 24),))
    torch.export.save(program, tmp_path / "novel.pt2")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((6, 3, 24, 24)).astype(np.float32))

    out = tmp_path / "out"
    result = invoke(tmp_path / "novel.pt2", "--calib", tmp_path / "calib.npy", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    assert files_in(out) == EXPECTED_FILES and verify_manifest(out) == []
    report = json.loads((out / "report.json").read_text())
    assert report["heldout"]["samples"] == 1 and "split off" in report["heldout"]["source"]
    assert report["calibration"]["samples"] == 5
    assert report["onnxruntime"]["model.int.onnx"]["bit_exact"]
    assert [row["op"] for row in report["layers"]] == ["conv", "conv", "conv", "linear"]


def test_state_dict_with_factory_is_deterministic_and_force_replaces(tmp_path: Path, calib_npy: Path) -> None:
    weights = tmp_path / "small_cnn.safetensors"
    save_file(small_cnn().state_dict(), str(weights))
    out = tmp_path / "out"
    args = [weights, "--factory", "lowbit.models:small_cnn", "--calib", calib_npy, "-o", out, "--seed", 3, *FAST]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    int_model = (out / "model.int.onnx").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["sha256"] and manifest["model"]["factory"] == "lowbit.models:small_cnn"

    again = invoke(*args, "--force")
    assert again.exit_code == 0, again.output
    assert (out / "model.int.onnx").read_bytes() == int_model  # same seed, same bytes
    assert verify_manifest(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "small_cnn.safetensors"]  # no temp/old dirs


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_model(tmp_path: Path, calib_npy: Path) -> None:
    torch.jit.script(small_cnn()).save(str(tmp_path / "small_cnn.ts"))
    out = tmp_path / "out"
    result = invoke(tmp_path / "small_cnn.ts", "--calib", calib_npy, "-o", out, "--onnx-weights", "safe", *FAST)
    assert result.exit_code == 0, result.output
    assert files_in(out) == EXPECTED_FILES and verify_manifest(out) == []
    report = json.loads((out / "report.json").read_text())
    assert report["onnx_weights"] == {"requested": "safe", "stored": "saturation-safe"}
    weights = [t for t in onnx.load(str(out / "model.onnx")).graph.initializer if t.name.endswith("/weight")]
    assert any(t.data_type == onnx.TensorProto.UINT8 for t in weights)


# -- bad inputs: exit 2, a message naming the problem, and nothing written -------------------------------------------

def test_truncated_pt_checkpoint(tmp_path: Path, calib_npy: Path) -> None:
    path = tmp_path / "small_cnn.pt"
    torch.save(small_cnn().state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "out"
    result = invoke(path, "--factory", "lowbit.models:small_cnn", "--calib", calib_npy, "-o", out)
    assert_user_error(result, str(path))
    assert_nothing_written(out)


def test_corrupt_safetensors_checkpoint(tmp_path: Path, calib_npy: Path) -> None:
    path = tmp_path / "small_cnn.safetensors"
    save_file(small_cnn().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:100])
    out = tmp_path / "out"
    result = invoke(path, "--factory", "lowbit.models:small_cnn", "--calib", calib_npy, "-o", out)
    assert_user_error(result, str(path), "safetensors")
    assert_nothing_written(out)


class Payload:
    """Unpickling this creates a marker file: proof that a checkpoint's pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path, calib_npy: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"stem.0.weight": torch.zeros(1), "extra": Payload(marker)}, path)
    out = tmp_path / "out"
    result = invoke(path, "--factory", "lowbit.models:small_cnn", "--calib", calib_npy, "-o", out)
    assert_user_error(result, str(path), "refused")
    assert not marker.exists()
    assert_nothing_written(out)


def test_non_tensor_state_dict_is_refused(tmp_path: Path, calib_npy: Path) -> None:
    path = tmp_path / "odd.pt"
    torch.save(collections.OrderedDict(weight="not a tensor", shape=[1, 2]), path)
    out = tmp_path / "out"
    result = invoke(path, "--factory", "lowbit.models:small_cnn", "--calib", calib_npy, "-o", out)
    assert_user_error(result, str(path), "state dict")
    assert_nothing_written(out)


def test_unsupported_ops_are_all_listed(tmp_path: Path) -> None:
    class Unsupported(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            x = x * torch.sigmoid(x)
            return self.up(x)

    path = tmp_path / "unsupported.pt2"
    torch.export.save(torch.export.export(Unsupported().eval(), (torch.randn(1, 3, 8, 8),)), path)
    np.save(tmp_path / "calib.npy", np.zeros((2, 3, 8, 8), np.float32))
    out = tmp_path / "out"
    message = assert_user_error(invoke(path, "--calib", tmp_path / "calib.npy", "-o", out),
                                "sigmoid", "mul", "conv_transpose")
    assert "up" in message  # where in the model: the ConvTranspose2d module
    assert_nothing_written(out)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_calibration_data(tmp_path: Path, bad: float) -> None:
    x = get_zoo_entry("small_cnn").calibration(0)[:4]
    x[2, 1, 5, 5] = bad
    path = tmp_path / "calib.npy"
    np.save(path, x)
    out = tmp_path / "out"
    assert_user_error(invoke("zoo:small_cnn", "--calib", path, "-o", out), str(path), "NaN/Inf")
    assert_nothing_written(out)


def test_empty_calibration_data(tmp_path: Path) -> None:
    path = tmp_path / "calib.npy"
    np.save(path, np.zeros((0, 3, 32, 32), np.float32))
    out = tmp_path / "out"
    assert_user_error(invoke("zoo:small_cnn", "--calib", path, "-o", out), str(path), "empty")
    assert_nothing_written(out)


def test_wrong_input_shape(tmp_path: Path) -> None:
    path = tmp_path / "calib.npy"
    np.save(path, np.zeros((4, 3, 16, 16), np.float32))
    out = tmp_path / "out"
    assert_user_error(invoke("zoo:small_cnn", "--calib", path, "-o", out), str(path), "(4, 3, 16, 16)", "32")
    assert_nothing_written(out)


def test_non_zoo_model_needs_calibration_data(tmp_path: Path) -> None:
    out = tmp_path / "out"
    model = tmp_path / "model.pt2"
    model.write_bytes(b"not read: the missing data is found first")
    assert_user_error(invoke(model, "-o", out), "--calib")
    assert_nothing_written(out)


def test_missing_model_file_is_named_before_missing_data(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stderr = assert_user_error(invoke(tmp_path / "nosuch.pt2", "-o", out), "nosuch.pt2", "no such file")
    assert "calibration" not in stderr
    assert_nothing_written(out)


# -- failures while writing: no partial DIR, and an existing DIR survives -------------------------------------------

@pytest.fixture
def fast_run(monkeypatch: pytest.MonkeyPatch, artifact: tuple[Path, Result], calib_npy: Path,
             tmp_path: Path) -> list[object]:
    """Arguments for a quick zoo:small_cnn run: quantize reuses the shared run's IR, and the data is tiny.

    These tests are about what happens after quantization.
    """
    ir_dir = artifact[0] / "ir"
    monkeypatch.setattr("lowbit.quantizer.quantize.quantize", lambda *args, **kwargs: QuantizedGraph.load(ir_dir))
    eval_npy = tmp_path / "eval.npy"
    np.save(eval_npy, get_zoo_entry("small_cnn").heldout(0)[:2])
    return ["zoo:small_cnn", "--calib", calib_npy, "--eval", eval_npy, "--target", "none"]


def test_interrupt_during_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                fast_run: list[object]) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("lowbit.codegen.onnx.export_integer", interrupted)
    out = tmp_path / "out"
    result = invoke(*fast_run, "-o", out)
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    assert_nothing_written(out)


def test_failure_while_writing_report_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     fast_run: list[object]) -> None:
    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("lowbit.pipeline.report.write_reports", broken)
    out = tmp_path / "out"
    assert_user_error(invoke(*fast_run, "-o", out), str(out), "cannot write", "disk full")
    assert_nothing_written(out)


def test_failed_force_keeps_the_old_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             artifact: tuple[Path, Result], fast_run: list[object]) -> None:
    out = tmp_path / "out"
    shutil.copytree(artifact[0], out)
    before = {name: (out / name).read_bytes() for name in EXPECTED_FILES}

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("lowbit.pipeline.report.write_reports", interrupted)
    result = invoke(*fast_run, "-o", out, "--force")
    assert result.exit_code == 130, result.output
    assert {name: (out / name).read_bytes() for name in EXPECTED_FILES} == before
    assert files_in(out) == EXPECTED_FILES
    assert temp_leftovers(out) == []


# -- checks that refuse: a backend that differs from the reference, or a float inside model.int.onnx -------------

def _off_by_one(outputs: dict[str, np.ndarray], sample: int = 40, element: int = 3) -> dict[str, np.ndarray]:
    """The same integer outputs with one element of the first one changed by one (sample 40 is a saturating input)."""
    changed = {name: a.copy() for name, a in outputs.items()}
    first = changed[next(iter(changed))]
    first[sample, element] += 1
    return changed


def _assert_names_the_difference(stderr: str, backend: str) -> None:
    """The error names the backend, the output, the sample, the element and both integer values."""
    for needle in (backend, "fc2", "sample 40, element [3]", "nothing was written", "--allow-mismatch",
                   "64 inputs (2 held-out, 31 random, 31 saturating)"):
        assert needle in stderr, f"{needle!r} not in {stderr!r}"


def test_onnxruntime_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         fast_run: list[object]) -> None:
    from lowbit.pipeline import checks

    real = checks.onnx_integers
    monkeypatch.setattr(checks, "onnx_integers", lambda *args: _off_by_one(real(*args)))
    out = tmp_path / "out"
    stderr = assert_user_error(invoke(*fast_run, "-o", out), "model.int.onnx in ONNX Runtime")
    _assert_names_the_difference(stderr, "ONNX Runtime gives")
    assert_nothing_written(out)


def test_allow_mismatch_keeps_the_artifact_and_says_so_at_the_top(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 fast_run: list[object]) -> None:
    from lowbit.pipeline import checks

    real = checks.onnx_integers
    monkeypatch.setattr(checks, "onnx_integers", lambda *args: _off_by_one(real(*args)))
    out = tmp_path / "out"
    result = invoke(*fast_run, "-o", out, "--allow-mismatch")
    assert result.exit_code == 0, result.output
    assert verify_manifest(out) == []
    report = json.loads((out / "report.json").read_text())
    assert not report["onnxruntime"]["model.int.onnx"]["bit_exact"]
    assert len(report["mismatches"]) == 1 and "sample 40, element [3]" in report["mismatches"][0]
    head = (out / "report.md").read_text().splitlines()[:5]
    assert head[0].startswith("# lowbit quantization report") and "--allow-mismatch" in head[2], head


def test_float_tensor_in_the_integer_model_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      fast_run: list[object]) -> None:
    from lowbit.codegen import onnx as onnx_export

    real = onnx_export.export_integer

    def leaky(qgraph: QuantizedGraph, path: Path) -> None:
        """The real export plus a float16 copy of the integer logits as an extra graph output."""
        real(qgraph, path)
        model = onnx.load(str(path))
        name = qgraph.int_outputs[0]
        model.graph.node.append(onnx.helper.make_node("Cast", [name], ["leak"], to=onnx.TensorProto.FLOAT16))
        model.graph.output.append(onnx.helper.make_tensor_value_info("leak", onnx.TensorProto.FLOAT16, None))
        onnx.save(model, str(path))

    monkeypatch.setattr(onnx_export, "export_integer", leaky)
    out = tmp_path / "out"
    assert_user_error(invoke(*fast_run, "-o", out), "model.int.onnx has float tensors inside: leak",
                      "nothing was written")
    assert_nothing_written(out)


@pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="needs apache-tvm")
def test_tvm_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_run: list[object]) -> None:
    from lowbit.runtime.loader import CompiledModel

    real = CompiledModel.run_integers
    monkeypatch.setattr(CompiledModel, "run_integers", lambda self, x: _off_by_one(real(self, x)))
    out = tmp_path / "out"
    args = [*fast_run[:-2], "-o", out]  # compile for this CPU: drop --target none
    stderr = assert_user_error(invoke(*args), "the TVM-compiled model")
    _assert_names_the_difference(stderr, "TVM gives")
    assert_nothing_written(out)


# -- the library API: the same pipeline without the command line -----------------------------------------------

def test_library_quantize_and_save_without_click(tmp_path: Path, calib_npy: Path) -> None:
    import lowbit
    from lowbit.pipeline import Progress
    from lowbit.quantizer.config import QuantConfig

    lines: list[str] = []
    calib = np.load(calib_npy)
    artifact = lowbit.quantize("zoo:small_cnn", calib[:4], QuantConfig(calib_method="minmax"), heldout=calib[4:],
                               progress=Progress(write=lines.append))
    report = artifact.save(tmp_path / "out", target=None, progress=Progress(write=lines.append))
    assert files_in(tmp_path / "out") == EXPECTED_FILES - {"tvm/model.so", "tvm/params.npz", "tvm/tvm.json"}
    assert report["onnxruntime"]["model.int.onnx"]["bit_exact"] and report["calibration"]["samples"] == 4
    assert any("quantize:" in line for line in lines) and any("done:" in line for line in lines)
    # The pipeline needs no click; the runtime needs neither torch nor click.
    code = ("import sys, lowbit.runtime; assert not {'torch', 'click'} & set(sys.modules); "
            "import lowbit.pipeline; assert 'click' not in sys.modules, 'the pipeline imported click'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- data loading helpers --------------------------------------------------------------------------------------------

def test_array_files(tmp_path: Path) -> None:
    x = np.ones((2, 3, 4, 4), np.float32)
    np.savez(tmp_path / "one.npz", anything=x)
    np.savez(tmp_path / "named.npz", x=x, labels=np.arange(2))
    np.savez(tmp_path / "ambiguous.npz", a=x, b=x)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert np.array_equal(load_array_file(tmp_path / "one.npz"), x)
    assert np.array_equal(load_array_file(tmp_path / "named.npz"), x)
    with pytest.raises(LowbitError, match="exactly one array"):
        load_array_file(tmp_path / "ambiguous.npz")
    with pytest.raises(LowbitError, match="pickled data is refused"):
        load_array_file(tmp_path / "objects.npy")
    with pytest.raises(LowbitError, match="dtype int64"):
        validate_inputs(np.zeros((2, 3, 4, 4), np.int64), "ints.npy")
    with pytest.raises(LowbitError, match="4 dimensions"):
        validate_inputs(np.zeros((3, 4, 4), np.float32), "flat.npy")
    with pytest.raises(LowbitError, match="without knowing the model's input shape"):
        load_inputs(tmp_path, None, "calibration")


def test_image_folder_samples_are_their_own_photos_and_arrays_say_nothing(tmp_path: Path) -> None:
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 30), (60 * i, 10, 10)).save(tmp_path / f"{i}.png")
    folder = load_inputs(tmp_path, get_zoo_entry("small_cnn").preprocess, "calibration")
    assert folder.photos.tolist() == [0, 1, 2] and folder.describe_photos() == "3 photos"
    np.save(tmp_path / "x.npy", folder.x)
    array = load_inputs(tmp_path / "x.npy", None, "calibration")
    assert array.photos is None and "treated as independent" in array.describe_photos()


def test_heldout_split_and_overlap() -> None:
    data = Inputs(np.arange(10 * 3, dtype=np.float32).reshape(10, 3, 1, 1), "d.npy")
    calib, held = split_heldout(data)
    assert (len(calib), len(held)) == (8, 2)
    assert calib.photos is None and held.photos is None  # an array does not say which photo a sample is from
    calib, held = split_heldout(Inputs(data.x, "folder", np.arange(10)))
    assert calib.photos.tolist() == list(range(8)) and held.photos.tolist() == [8, 9]
    with pytest.raises(ValueError, match="photo ids for 10 samples"):
        Inputs(data.x, "bad", np.arange(3))
    check_disjoint(calib, held)
    with pytest.raises(LowbitError, match="also appear in the calibration data"):
        check_disjoint(data, held)
    with pytest.raises(LowbitError, match="--eval"):
        split_heldout(Inputs(data.x[:1], "one.npy"))


def test_quantize_console_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("quantize")
    out = tmp_path / "out"
    proc = subprocess.run([str(script), "zoo:no_such_model", "-o", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: unknown zoo model") and "Traceback" not in proc.stderr
    assert_nothing_written(out)
