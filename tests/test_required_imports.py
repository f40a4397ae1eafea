"""LOWBIT_REQUIRE_TVM (set by .ci/run): a TVM that cannot be imported fails the run instead of skipping its tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

# Runs pytest (collection only: tests/conftest.py's check runs before it) with `tvm` replaced in sys.modules:
# None makes `import tvm` fail as a broken install would; an empty module makes it succeed.
RUN_PYTEST = """
import sys, types
sys.modules["tvm"] = None if sys.argv[1] == "broken" else types.ModuleType("tvm")
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", sys.argv[2]]))
"""


def collect(tvm: str, require: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_REQUIRE_TVM"}
    if require is not None:
        env["LOWBIT_REQUIRE_TVM"] = require
    return subprocess.run([sys.executable, "-c", RUN_PYTEST, tvm, str(Path(__file__))], cwd=TESTS.parent, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_broken_tvm_fails_the_run_when_required() -> None:
    proc = collect("broken", require="1")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "LOWBIT_REQUIRE_TVM is set, but `import tvm` fails" in proc.stderr


@pytest.mark.parametrize(("tvm", "require"), [("broken", None), ("broken", "0"), ("importable", "1")])
def test_the_run_goes_on_when_tvm_is_not_required_or_imports(tvm: str, require: str | None) -> None:
    proc = collect(tvm, require)
    assert proc.returncode == pytest.ExitCode.OK, proc.stdout + proc.stderr
    assert "test_a_broken_tvm_fails_the_run_when_required" in proc.stdout  # collection went ahead
