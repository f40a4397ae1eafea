"""Bad input and interruptions, as a user meets them.

Bad input: exit 2, `error: ...` naming the file, no traceback, nothing written.
Ctrl-C: exit 130, no traceback, any old output exactly as it was and no partial new one.
Every run uses zoo:small_cnn with a few samples; nothing here needs TVM.
"""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from lowbit.cli.main import lowbit
from lowbit.errors import LowbitError
from lowbit.ir import QuantizedGraph
from lowbit.models import get_zoo_entry, small_cnn
from lowbit.pipeline.artifact import verify_manifest
from lowbit.pipeline.report import write_reports
from lowbit.quantizer.config import BitPlan
from lowbit.sensitivity.artifact import Sensitivity

FAST = ["--target", "none", "--calib-method", "minmax"]
# Per command: what it needs (search: a budget) and what keeps it quick.
COMMANDS = {"quantize": FAST, "sensitivity": ["--samples", "4", "--check-configs", "0"], "search": ["--size", "0.8x"]}


def invoke(*args: object) -> Result:
    return CliRunner().invoke(lowbit, [str(a) for a in args])


def assert_user_error(result: Result, *needles: str) -> None:
    """Exit 2, `error: ...` naming every needle, and no traceback."""
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr, result.stderr
    assert "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in {result.stderr!r}"


def assert_interrupted(result: Result) -> None:
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr and "Traceback" not in result.output, result.output


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every entry under `directory` (temporary ones included): file -> bytes, folder -> None."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Four calibration and two held-out small_cnn inputs, as .npy files."""
    directory = tmp_path_factory.mktemp("data")
    entry = get_zoo_entry("small_cnn")
    np.save(directory / "calib.npy", entry.calibration(0)[:4])
    np.save(directory / "eval.npy", entry.heldout(0)[:2])
    return directory / "calib.npy", directory / "eval.npy"


def data_args(data: tuple[Path, Path]) -> list[object]:
    return ["--calib", data[0], "--eval", data[1]]


# -- bad --eval data -------------------------------------------------------------------------------------------------

def write_bad_eval(path: Path, kind: str) -> str:
    """Writes held-out data with one problem; returns what the error message must say about it."""
    x = get_zoo_entry("small_cnn").heldout(0)[:2]
    if kind == "wrong shape":
        np.save(path, np.zeros((2, 3, 16, 16), np.float32))
        return "(2, 3, 16, 16)"
    if kind == "NaN":
        x[1, 2, 3, 4] = np.nan
        np.save(path, x)
        return "NaN/Inf"
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        return "cannot read the array"
    np.save(path, x)  # truncated
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "corrupt or truncated"


@pytest.mark.parametrize("kind", ["wrong shape", "NaN", "random bytes", "truncated"])
@pytest.mark.parametrize("command", COMMANDS)
def test_bad_eval_data(tmp_path: Path, data: tuple[Path, Path], command: str, kind: str) -> None:
    path = tmp_path / "eval.npy"
    says = write_bad_eval(path, kind)
    out = tmp_path / "out"
    result = invoke(command, "zoo:small_cnn", "--calib", data[0], "--eval", path, "-o", out, *COMMANDS[command])
    assert_user_error(result, str(path), says)
    assert snapshot(tmp_path) == {"eval.npy": path.read_bytes()}  # no output, no temporary directory


# -- corrupt model files ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """small_cnn saved as a torch.export program and as TorchScript: the bytes of each."""
    directory = tmp_path_factory.mktemp("models")
    model = small_cnn().eval()
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, 32, 32),)), directory / "m.pt2")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        scripted = torch.jit.script(model)
    scripted.save(str(directory / "m.ts"))
    return {"pt2": (directory / "m.pt2").read_bytes(), "torchscript": (directory / "m.ts").read_bytes()}


@pytest.mark.parametrize(("saved", "name", "corruption", "says"), [
    ("pt2", "model.pt2", "random bytes", "cannot load the torch.export program (corrupt or truncated?)"),
    ("pt2", "model.pt2", "truncated", "cannot load the torch.export program (corrupt or truncated?)"),
    ("torchscript", "model.ts", "random bytes", "a TorchScript file is a zip archive; this file is not one"),
    ("torchscript", "model.ts", "truncated", "cannot be opened as TorchScript (corrupt or truncated?)"),
    # TorchScript is often saved as .pt, which is also a state-dict suffix: corrupt, not "pickled objects".
    ("torchscript", "model.pt", "random bytes", "cannot read the checkpoint (corrupt or truncated?)"),
    ("torchscript", "model.pt", "truncated", "cannot read the checkpoint (corrupt or truncated?)"),
])
def test_corrupt_model_file(tmp_path: Path, data: tuple[Path, Path], model_files: dict[str, bytes], saved: str,
                            name: str, corruption: str, says: str) -> None:
    good = model_files[saved]
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(len(good)) if corruption == "random bytes"
                     else good[: len(good) // 2])
    out = tmp_path / "out"
    result = invoke("quantize", path, *data_args(data), "-o", out, *FAST)
    assert_user_error(result, str(path), says)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [name]


# -- an output path that is a file -----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_output_path_that_is_a_file(tmp_path: Path, data: tuple[Path, Path], command: str) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not yours")
    for force in ([], ["--force"]):  # --force replaces a directory, never a file
        result = invoke(command, "zoo:small_cnn", *data_args(data), "-o", taken, *force, *COMMANDS[command])
        assert_user_error(result, str(taken), "is not a directory")
    # A file where a parent folder of the output would go: refused before any work, not after it.
    result = invoke(command, "zoo:small_cnn", *data_args(data), "-o", taken / "out", *COMMANDS[command])
    assert_user_error(result, str(taken / "out"), f"as {taken} is a file")
    assert "capture:" not in result.stderr
    assert taken.read_text() == "not yours" and [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_compile_refuses_a_file_as_the_artifact(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not yours")
    result = invoke("compile", taken)
    assert result.exit_code == 2 and "is a file" in result.output and "Traceback" not in result.output
    assert taken.read_text() == "not yours"


# -- an artifact to compile, and runs that reuse its IR --------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, data: tuple[Path, Path]) -> Path:
    """A small_cnn artifact without a compiled model (--target none)."""
    out = tmp_path_factory.mktemp("artifact") / "small_cnn"
    result = invoke("quantize", "zoo:small_cnn", *data_args(data), "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def reuse_ir(monkeypatch: pytest.MonkeyPatch, artifact: Path) -> None:
    """`quantize` returns the shared artifact's IR: these tests are about what happens after quantization."""
    monkeypatch.setattr("lowbit.quantizer.quantize.quantize", lambda *args, **kwargs: QuantizedGraph.load(
        artifact / "ir"))


def test_a_failed_report_write_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                data: tuple[Path, Path], reuse_ir: None) -> None:
    from lowbit.pipeline import report

    atomic_file = report.atomic_file

    def disk_full(path: Path, *args: object, **kwargs: object):
        if path.name == "report.md":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return atomic_file(path, *args, **kwargs)

    monkeypatch.setattr(report, "atomic_file", disk_full)
    out = tmp_path / "out"
    result = invoke("quantize", "zoo:small_cnn", *data_args(data), "-o", out, *FAST)
    assert_user_error(result, "report.md: cannot write the report", os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_write_reports_names_the_file_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    with pytest.raises(LowbitError, match=r"a_file/report\.json: cannot write the report"):
        write_reports(tmp_path / "a_file", {"notes": []})


# -- an interrupted `lowbit compile` ---------------------------------------------------------------------------------

def fake_compile(marker: str):
    """Stands in for compile_and_check: writes a tvm/ (its file says `marker`) and reports it bit-exact."""

    def compile_and_check(qgraph: QuantizedGraph, directory: Path, target: str, *args: object,
                          **kwargs: object) -> dict[str, object]:
        (directory / "tvm").mkdir()
        (directory / "tvm" / "model.so").write_text(marker)
        return {"target": target, "bit_exact": True, "latency_ms": 1.0, "marker": marker}

    return compile_and_check


@pytest.fixture
def compiled(tmp_path: Path, artifact: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the artifact, "compiled" once (TVM replaced by `fake_compile`)."""
    monkeypatch.setattr("lowbit.pipeline.checks.tvm_available", lambda: True)
    directory = tmp_path / "artifact"
    shutil.copytree(artifact, directory)
    monkeypatch.setattr("lowbit.pipeline.checks.compile_and_check", fake_compile("old"))
    result = invoke("compile", directory)
    assert result.exit_code == 0, result.output
    assert (directory / "tvm" / "model.so").read_text() == "old" and verify_manifest(directory) == []
    return directory


def interrupted_compile(marker: str):
    """compile_and_check that is interrupted halfway through writing its tvm/."""

    def compile_and_check(qgraph: QuantizedGraph, directory: Path, *args: object, **kwargs: object) -> None:
        (directory / "tvm").mkdir()
        (directory / "tvm" / "model.so").write_text(marker)
        raise KeyboardInterrupt

    return compile_and_check


@pytest.mark.parametrize("when", ["while compiling", "while updating the manifest"])
def test_interrupted_compile_keeps_the_old_compiled_model(compiled: Path, monkeypatch: pytest.MonkeyPatch,
                                                          when: str) -> None:
    before = snapshot(compiled)
    if when == "while compiling":
        monkeypatch.setattr("lowbit.pipeline.checks.compile_and_check", interrupted_compile("new"))
    else:  # the new tvm/ is already in place when the manifest is re-hashed
        monkeypatch.setattr("lowbit.pipeline.checks.compile_and_check", fake_compile("new"))
        monkeypatch.setattr("lowbit.pipeline.artifact.file_hashes", interrupt)
    assert_interrupted(invoke("compile", compiled, "--force"))
    monkeypatch.undo()  # verify_manifest hashes with the real file_hashes
    assert snapshot(compiled) == before  # old tvm/ and manifest as they were, no temporary files
    assert verify_manifest(compiled) == []


def test_interrupted_first_compile_leaves_the_artifact_as_it_was(tmp_path: Path, artifact: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lowbit.pipeline.checks.tvm_available", lambda: True)
    directory = tmp_path / "artifact"
    shutil.copytree(artifact, directory)
    before = snapshot(directory)
    monkeypatch.setattr("lowbit.pipeline.checks.compile_and_check", fake_compile("new"))
    monkeypatch.setattr("lowbit.pipeline.artifact.file_hashes", interrupt)
    assert_interrupted(invoke("compile", directory))
    monkeypatch.undo()
    assert snapshot(directory) == before and verify_manifest(directory) == []


# -- an interrupted `lowbit sensitivity` or `lowbit search` ----------------------------------------------------------

@pytest.fixture(scope="module")
def sensitivity(tmp_path_factory: pytest.TempPathFactory, data: tuple[Path, Path]) -> Path:
    """One real `lowbit sensitivity` output, cheap settings."""
    out = tmp_path_factory.mktemp("sensitivity") / "sens"
    result = invoke("sensitivity", "zoo:small_cnn", *data_args(data), "-o", out, "--samples", 4,
                    "--max-trace-seconds", 1, "--check-configs", 0)
    assert result.exit_code == 0, result.output
    return out


def then_interrupt(method):
    """`method` does its work (writes its files), then Ctrl-C arrives."""

    def wrapper(*args: object, **kwargs: object) -> None:
        method(*args, **kwargs)
        raise KeyboardInterrupt

    return wrapper


@pytest.mark.parametrize("old_output", [False, True])
@pytest.mark.parametrize("when", ["while computing", "while writing"])
def test_interrupted_sensitivity_leaves_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          data: tuple[Path, Path], sensitivity: Path, when: str,
                                                          old_output: bool) -> None:
    out = tmp_path / "sens"
    if old_output:
        shutil.copytree(sensitivity, out)
    before = snapshot(tmp_path)
    if when == "while computing":
        monkeypatch.setattr("lowbit.sensitivity.analyze.compute_sensitivity", interrupt)
    else:  # the measurement is reused; the interrupt comes once sensitivity.json/.safetensors are written
        monkeypatch.setattr("lowbit.sensitivity.analyze.compute_sensitivity",
                            lambda *args, **kwargs: Sensitivity.load(sensitivity))
        monkeypatch.setattr(Sensitivity, "save", then_interrupt(Sensitivity.save))
    result = invoke("sensitivity", "zoo:small_cnn", *data_args(data), "-o", out, "--force",
                    *COMMANDS["sensitivity"])
    assert_interrupted(result)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("old_output", [False, True])
@pytest.mark.parametrize("when", ["while measuring plans", "while writing"])
def test_interrupted_search_leaves_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     data: tuple[Path, Path], sensitivity: Path, when: str,
                                                     old_output: bool) -> None:
    out = tmp_path / "search"
    if old_output:
        out.mkdir()
        (out / "plan.json").write_text("an earlier search's plan")
    before = snapshot(tmp_path)
    if when == "while measuring plans":
        monkeypatch.setattr("lowbit.search.search.PlanEvaluator.measure", interrupt)
    else:  # once plan.json is written
        monkeypatch.setattr(BitPlan, "save", then_interrupt(BitPlan.save))
    result = invoke("search", "zoo:small_cnn", *data_args(data), "-o", out, "--force", "--sensitivity", sensitivity,
                    "--frontier-points", 0, *COMMANDS["search"])
    assert_interrupted(result)
    assert snapshot(tmp_path) == before
