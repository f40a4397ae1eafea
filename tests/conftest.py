"""Test-session checks shared by every test file.

Some tests skip when an optional package is missing (`pytest.importorskip("tvm")`). That
is right on a machine without it, but in CI, where the package is installed, a skip would
hide a broken install: the suite would pass having tested nothing of that backend. So CI
sets LOWBIT_REQUIRE_<NAME>=1, and then a failing import stops the run with an error
before any test is collected.
"""

from __future__ import annotations

import importlib
import os

import pytest

# Optional module -> the environment variable that makes it required.
REQUIRED_WHEN_SET = {"tvm": "LOWBIT_REQUIRE_TVM"}


def pytest_configure(config: pytest.Config) -> None:
    for module, variable in REQUIRED_WHEN_SET.items():
        if os.environ.get(variable, "") not in ("", "0"):
            try:
                importlib.import_module(module)
            except Exception as e:  # ImportError, or whatever a broken native library raises while loading
                raise pytest.UsageError(
                    f"{variable} is set, but `import {module}` fails ({type(e).__name__}: {e}); the tests that "
                    f"need {module} would be skipped, hiding a broken install. Fix the install, or unset {variable}."
                ) from e
