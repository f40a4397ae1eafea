"""Checks that refuse what fails: every backend must give the reference executor's integers, bit for bit.

The checks compare the integer outputs under the final dequantize (`QuantizedGraph.int_outputs`), not
the float outputs: float32 maps distinct int32 values above 2^24 to one float. They run on at least
CHECK_INPUTS inputs: held-out data, random data like it, and saturating inputs far outside its range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..ir import QuantizedGraph
from ..metrics import first_difference
from ..quantizer.reference import ModelData, run_reference_batches
from ..quantizer.reference import sample_rows as _rows
from ..quantizer.reference import samples_in as _count

CHECK_INPUTS = 64
MIN_RANDOM = 16  # random inputs in every check, half of them saturating: held-out data never saturates
# A text model's checks read at most this many held-out sentences: each is a full seq_len forward pass (about 0.3 s
# in model.int.onnx for MiniLM at 128), and 100 sentences of varied lengths already cover every op's cases.
TEXT_CHECK_HELDOUT = 100
SATURATION = 1e3  # saturating inputs are this many times the largest magnitude in the data
EVAL_BATCH = 32

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class CheckInputs:
    """The inputs the backends are checked on, and what they are (for the report).

    `data` is one array (an image model's) or arrays by input name (a text model's token ids and mask).
    The last `saturating` inputs are the extreme ones: saturating images, or full-length token sequences.
    """

    data: np.ndarray | dict[str, np.ndarray]
    heldout: int
    random: int
    saturating: int
    extreme: str = "saturating"

    @property
    def x(self) -> np.ndarray:
        """The single input array of an image model."""
        if isinstance(self.data, dict):
            raise TypeError(f"check inputs of {', '.join(self.data)}: use .data")
        return self.data

    def __len__(self) -> int:
        return len(next(iter(self.data.values())) if isinstance(self.data, dict) else self.data)

    def describe(self) -> str:
        return (f"{len(self)} inputs ({self.heldout} held-out, {self.random} random, "
                f"{self.saturating} {self.extreme})")

    def to_json(self) -> dict[str, int]:
        return {"total": len(self), "heldout": self.heldout, "random": self.random,
                self.extreme.replace("-", "_"): self.saturating}


def check_inputs(shape: tuple[int, ...], data: np.ndarray | None = None, seed: int = 0,
                 total: int = CHECK_INPUTS) -> CheckInputs:
    """All of the held-out `data`, then random inputs of `shape` (batch ignored): MIN_RANDOM, or up to `total`.

    Random inputs follow the data's mean and spread (standard normal without data); saturating
    ones are ±SATURATION times the data's largest magnitude, so every input value clips.
    """
    rng = np.random.default_rng(seed)
    sample_shape = tuple(shape[1:])
    heldout = np.empty((0, *sample_shape), np.float32) if data is None else data
    n_random = max(MIN_RANDOM, total - len(heldout))
    mean, std = (0.0, 1.0) if data is None or not data.size else (float(data.mean()), float(data.std()) or 1.0)
    n_saturating = n_random // 2
    normal = rng.standard_normal((n_random - n_saturating, *sample_shape)) * std + mean
    big = SATURATION * (1.0 if data is None or not data.size else max(float(np.abs(data).max()), 1.0))
    signs = rng.choice(np.array([-1.0, 1.0]), size=(n_saturating, *sample_shape))
    saturating = signs * big * rng.uniform(0.5, 1.0, size=signs.shape)
    x = np.concatenate([heldout, normal, saturating]).astype(np.float32)
    return CheckInputs(x, len(heldout), len(normal), n_saturating)


def text_check_inputs(heldout: dict[str, np.ndarray] | None, vocab_size: int, seq_len: int, seed: int = 0,
                      total: int = CHECK_INPUTS) -> CheckInputs:
    """A text model's check inputs: the held-out token ids and masks (if any, at most TEXT_CHECK_HELDOUT), then
    random ones (MIN_RANDOM, or up to `total`): half of random lengths, half full-length, which give the longest
    sums in attention and pooling.

    Random ids are any of the model's `vocab_size` ids; each mask keeps a prefix of at least one token, as the
    tokenizer's do.
    """
    empty = np.empty((0, seq_len), np.int64)
    ids, mask = ((empty, empty) if heldout is None else
                 (heldout["input_ids"][:TEXT_CHECK_HELDOUT], heldout["attention_mask"][:TEXT_CHECK_HELDOUT]))
    rng = np.random.default_rng(seed)
    n_random = max(MIN_RANDOM, total - len(ids))
    n_full = n_random // 2
    random_ids = rng.integers(0, vocab_size, size=(n_random, seq_len), dtype=np.int64)
    lengths = np.concatenate([rng.integers(1, seq_len + 1, size=n_random - n_full), np.full(n_full, seq_len)])
    random_mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    data = {"input_ids": np.concatenate([ids, random_ids]).astype(np.int64),
            "attention_mask": np.concatenate([mask, random_mask]).astype(np.int64)}
    return CheckInputs(data, len(ids), n_random - n_full, n_full, "full-length")


def reference_integers(qgraph: QuantizedGraph, data: ModelData, batch: int = EVAL_BATCH,
                       first: Outputs | None = None) -> Outputs:
    """The reference executor's integer outputs (before the final dequantize), `batch` samples at a time.

    `data`: one array, or arrays by input name (a text model's). `first`: the outputs of data's first samples,
    already computed (the held-out ones the evaluation ran): only the rest is run."""
    done = 0 if first is None else _count(first)
    if done == _count(data):
        return dict(first or {})
    rest = run_reference_batches(qgraph, _rows(data, done, _count(data)), batch)[1]
    return rest if first is None else {name: np.concatenate([first[name], rest[name]]) for name in rest}


def compare(backend: str, got: Outputs, want: Outputs, inputs: CheckInputs) -> dict[str, Any]:
    """The record of one backend's check: bit-exact or not, and if not, where it first differs."""
    difference = first_difference(got, want)
    return {"samples": len(inputs), "inputs": inputs.to_json(), "bit_exact": difference is None,
            "first_difference": None if difference is None else difference.describe(backend, "the reference")}


def failure_message(what: str, record: dict[str, Any], inputs: CheckInputs) -> str:
    return (f"{what} does not match the reference executor bit for bit on {inputs.describe()}: "
            f"{record['first_difference']}")


def onnx_integers(path: Path, qgraph: QuantizedGraph, data: np.ndarray | dict[str, np.ndarray],
                  batch: int = EVAL_BATCH) -> Outputs:
    """`model.int.onnx`'s integer outputs in ONNX Runtime (`data`: one array, or arrays by input name)."""
    session = ort_session(path)
    named = data if isinstance(data, dict) else {session.get_inputs()[0].name: data}
    names = qgraph.int_outputs
    parts = [session.run(names, _rows(named, i, i + batch)) for i in range(0, _count(data), batch)]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}


def ort_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session, quiet about unused initializers and the like."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def tvm_available() -> bool:
    try:
        import tvm  # noqa: F401
    except ImportError:
        return False
    return True


def compile_and_check(qgraph: QuantizedGraph, directory: Path, target: str, inputs: CheckInputs,
                      log: Callable[[str], None], want: Outputs | None = None, tune_trials: int | None = None,
                      tuning_cache: Path | None = None, rpc: Any = None) -> dict[str, Any]:
    """Compile into `directory/tvm` and compare the runtime's integer outputs with the reference's on `inputs`.

    `want` may hold the reference's integer outputs on `inputs` when the caller has them already.
    The result says whether they are bit-exact; refusing a mismatch is the caller's decision.
    With `rpc` (a `codegen.tvm.remote.RpcTarget`), the model runs and is timed on a device under its key.
    """
    from ..codegen.tvm import compile_to
    from ..runtime import load
    from ..runtime.loader import TVM_DIR

    meta = compile_to(qgraph, directory, target, log, tune_trials, tuning_cache, rpc)
    if want is None:
        want = reference_integers(qgraph, inputs.data)
    where: dict[str, Any] = {}
    if rpc is None:
        model = load(directory, verify=False)
        if isinstance(inputs.data, dict):  # a text model: timed on full-length sequences of token 1
            got = model.run_integers(**inputs.data)
            latency = model.benchmark(repeats=50, warmup=20)["median_ms"]
        else:
            got = model.run_integers(inputs.x)
            latency = model.benchmark(inputs.x[:1], repeats=50, warmup=20)["median_ms"]
    else:
        from ..codegen.tvm.remote import device_session
        from ..codegen.tvm.remote_model import RemoteModel

        def run_and_time(device: Any) -> tuple[Outputs, float]:  # the remote model ends with the call
            remote = RemoteModel(directory / TVM_DIR, meta, device)
            return remote.run_integers(inputs.x), remote.benchmark(repeats=50)["median_ms"]

        with device_session(rpc) as device:
            log(f"checking and timing on device {device.name} ({rpc.describe()})")
            got, latency = run_and_time(device)
            where = {"rpc": {**rpc.to_json(), "device": device.name}}
    tuning = meta["tuning"] and {k: v for k, v in meta["tuning"].items() if k != "layers"}
    return {"target": meta["target_string"], "kernels": meta["kernels"], "compile_seconds": meta["compile_seconds"],
            "tuning": tuning, **compare("TVM", got, want, inputs), "latency_ms": latency, **where}
