"""Decode speed of a SmolLM2 decoder artifact: lowbit's TVM kernels against the numpy runtime and FP32 torch.

All on `--threads` threads, batch 1, the same artifact's weights (torch and numpy compute with them dequantized to
float32; TVM reads the int4 / int8 codes). Per engine: prefill of `--prompt` random tokens (median ms of
`--repeats`, each a fresh sequence), then `--steps` decode steps after it (tokens/s, median over repeats; a step is
one token's forward pass and its logits, no sampling). ORT MatMulNBits and llama.cpp peers: the `ortdec` branch's
benchmarks/bench_smollm2_decode.py, which calls `lowbit.runtime.decoder_tvm.tvm_decode_runner` for lowbit.

    python benchmarks/bench_smollm2_tvm_decode.py DIR [--threads 2] [--prompt 128] [--steps 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("directory", help="a decoder artifact with TVM kernels (lowbit quantize zoo:smollm2_135m -o DIR)")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--prompt", type=int, default=128)
ap.add_argument("--steps", type=int, default=64)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--engines", default="tvm,torch,numpy")
args = ap.parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lowbit.pipeline.decoder import load_decoder_artifact  # noqa: E402
from lowbit.runtime.decoder import DecoderModel  # noqa: E402
from lowbit.runtime.decoder_tvm import tvm_decode_runner  # noqa: E402

torch.set_num_threads(args.threads)


class TorchRunner:
    """FP32 torch `LlamaDecoder` with its KV cache, behind prefill / step."""

    def __init__(self, directory: str) -> None:
        self.model = load_decoder_artifact(directory).model
        self.cache = None

    @torch.inference_mode()
    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.cache = self.model.new_cache()
        return self.model(torch.from_numpy(ids[None, :]), self.cache)[0, -1].numpy()

    @torch.inference_mode()
    def step(self, token: int) -> np.ndarray:
        return self.model(torch.tensor([[token]]), self.cache)[0, -1].numpy()


class NumpyRunner:
    def __init__(self, directory: str) -> None:
        self.model = DecoderModel(directory, backend="numpy")
        self.cache = None

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.cache = self.model.new_cache()
        return self.model.logits(ids, self.cache)[-1]

    def step(self, token: int) -> np.ndarray:
        return self.model.logits(np.array([token]), self.cache)[-1]


ENGINES: dict[str, Callable[[str], object]] = {"tvm": tvm_decode_runner, "torch": TorchRunner, "numpy": NumpyRunner}


def measure(runner: object, ids: np.ndarray) -> tuple[list[float], list[float], np.ndarray]:
    prefill_ms, tokens_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        logits = runner.prefill(ids)
        prefill_ms.append((time.perf_counter() - t0) * 1e3)
        first = logits
        token = int(np.argmax(logits))
        t1 = time.perf_counter()
        for _ in range(args.steps):
            token = int(np.argmax(runner.step(token)))
        tokens_s.append(args.steps / (time.perf_counter() - t1))
    return prefill_ms, tokens_s, first


def main() -> None:
    ids = np.random.default_rng(0).integers(0, 49152, args.prompt).astype(np.int64)
    rows, reference = [], None
    for name in args.engines.split(","):
        t = time.perf_counter()
        runner = ENGINES[name](args.directory)
        load_s = time.perf_counter() - t
        prefill_ms, tokens_s, logits = measure(runner, ids)
        diff = "" if reference is None else f"{np.abs(logits - reference).max():.1e}"
        reference = logits if reference is None else reference
        rows.append((name, load_s, float(np.median(prefill_ms)), float(np.median(tokens_s)), tokens_s, diff))
        del runner
    print(f"\n{args.threads} threads, prompt {args.prompt} tokens, {args.steps} decode steps, {args.repeats} repeats"
          f" (`{' '.join(sys.argv)}`)\n")
    print("| engine | load s | prefill ms (median) | decode tokens/s (median) | all repeats "
          "| max |logit diff| vs first |")
    print("|---|---:|---:|---:|---|---:|")
    for name, load_s, pre, tok, every, diff in rows:
        print(f"| {name} | {load_s:.1f} | {pre:.0f} | {tok:.1f} | {', '.join(f'{v:.1f}' for v in every)} | {diff} |")
    if "tvm" in args.engines.split(","):
        runner = tvm_decode_runner(args.directory)
        calls, call_us = runner.calls_per_token, runner.call_us()
        print(f"\nTVM kernel calls per token: {calls}; one call of the one-row RMSNorm (Python loop, FFI and the "
              f"kernel): {call_us:.2f} us, so at most {calls * call_us / 1e3:.2f} ms per token is call overhead")
    base = {name: tok for name, _, _, tok, _, _ in rows}
    if "tvm" in base:
        print("\n" + ", ".join(f"tvm / {k}: {base['tvm'] / v:.2f}x tokens/s" for k, v in base.items() if k != "tvm"))


if __name__ == "__main__":
    main()
