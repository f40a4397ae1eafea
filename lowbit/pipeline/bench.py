"""`lowbit bench`: latency of the compiled model against the artifact's ONNX models in ONNX Runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.loader import median_ms, time_calls_ms


def bench(directory: Path, against: tuple[str, ...], repeats: int, rounds: int, threads: int) -> dict[str, Any]:
    """Median latency at batch 1 of the compiled model and of the ONNX models, interleaved; min over rounds."""
    from ..runtime import load
    from ..runtime.loader import example_input
    from .checks import ort_session

    model = load(directory)
    rng = np.random.default_rng(0)
    # Every input by name: an image model's one float input, or a text model's token ids and mask.
    feed = {spec["name"]: example_input(spec, rng) for spec in model.inputs}
    runners: dict[str, Callable[[], Any]] = {"tvm": lambda: model.run(**feed)}
    if "onnxruntime" in against:
        for file in ("model.onnx", "model.int.onnx"):
            session = ort_session(directory / file, threads)
            runners[f"onnxruntime:{file}"] = lambda s=session: s.run(None, feed)
    for fn in runners.values():  # warm-up
        time_calls_ms(fn, repeats=0, warmup=10)
    best = {name: float("inf") for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            best[name] = min(best[name], median_ms(fn, repeats))
    return {
        "directory": str(directory), "target": model.target, "batch": model.inputs[0]["shape"][0],
        "threads": threads, "repeats": repeats, "rounds": rounds, "latency_ms": best,
        "ratios": {f"tvm / {name}": best["tvm"] / best[name] for name in best if name != "tvm"},
    }
