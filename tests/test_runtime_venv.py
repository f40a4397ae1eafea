"""The runtime in a fresh venv that holds only apache-tvm and numpy (slow: creates a venv and pip-installs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

pytest.importorskip("tvm", reason="needs apache-tvm to compile the artifact")

from lowbit.cli.main import lowbit  # noqa: E402
from lowbit.models.small_cnn import smooth_noise  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNTIME_FILES = ["lowbit/__init__.py", "lowbit/errors.py", "lowbit/runtime/__init__.py", "lowbit/runtime/loader.py"]
SCRIPT = """
import sys
import numpy as np
from lowbit.runtime import load
y = load(sys.argv[1]).run(np.load(sys.argv[2]))
np.save(sys.argv[3], y)
heavy = sorted(m for m in ("torch", "onnx", "onnxruntime", "safetensors", "click") if m in sys.modules)
assert not heavy, f"the runtime imported {heavy}"
"""


def _tvm_requirements() -> list[str]:
    text = (REPO / "pyproject.toml").read_text()
    line = next(x for x in text.splitlines() if x.startswith("tvm = ["))
    parts = [part.strip().strip('"') for part in line.split("[", 1)[1].rstrip("]").split(",")]
    return [p for p in parts if p.startswith("apache-tvm")]  # not the tuning-only extras


@pytest.mark.slow
def test_runtime_runs_with_only_tvm_and_numpy(tmp_path: Path) -> None:
    artifact = tmp_path / "sc"
    result = CliRunner().invoke(lowbit, ["quantize", "zoo:small_cnn", "-o", str(artifact)])
    assert result.exit_code == 0, result.output
    x = smooth_noise(4, 21)
    np.save(tmp_path / "x.npy", x)
    session = ort.InferenceSession(str(artifact / "model.int.onnx"), providers=["CPUExecutionProvider"])
    want = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])

    # Only the runtime's own files, so an import of any other lowbit module would fail too.
    package = tmp_path / "pkg"
    for name in RUNTIME_FILES:
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, package / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", *_tvm_requirements(), "numpy"], check=True)
    env = {**os.environ, "PYTHONPATH": str(package)}
    subprocess.run([python, "-c", SCRIPT, str(artifact), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                   check=True, env=env, cwd=tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)
