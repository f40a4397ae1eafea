"""SmolLM2-135M decode speed at batch 1: tokens/s, prefill ms and peak RSS for lowbit and its peers (issue #14).

Every runner gets the same token ids: a prefill of `--prompt-tokens` tokens of the Lee news text, then
`--new-tokens` one-token steps through its KV cache fed the text's next tokens (teacher forcing, so that every
runner does the same work whatever it would have generated). Each runner is its own subprocess (so its peak RSS,
VmHWM, loading included, is its own) on `--threads` threads. Prefill: the median of `--repeats` prefills from
an empty cache; decode: the fastest of `--repeats` runs of all steps, each after a fresh prefill. Agreement: the
share of positions (the prefill's last and every step) where the runner's argmax is FP32 torch's.

Runners (`--runners` picks some):
- torch FP32: lowbit's LlamaDecoder with its KVCache, on the GGUF's dequantized weights;
- numpy runtime: `lowbit.runtime.load(ARTIFACT)` (the artifact's weights dequantized to float32 at load);
- ORT FP32: `decoder_onnx` of the FP32 model (float MatMuls), in ONNX Runtime;
- ORT MatMulNBits RTN acc0 / acc4: that FP32 model through onnxruntime's own `MatMulNBitsQuantizer` (4 bits, block
  128, asymmetric, every MatMul including the LM head; accuracy_level 0 = float32 arithmetic, 4 = int8 activations);
- lowbit ONNX acc0 / acc4: the artifact's own GPTQ weights as MatMulNBits (acc0: its checked `decoder.onnx`,
  whose int8 LM head is a float MatMul; acc4: the same export at accuracy_level 4, the LM head 8-bit MatMulNBits);
- llama.cpp: `llama-cpp-python` on the original GGUF (Q4_1 linears, Q8_0 embedding), if it is installed;
- lowbit TVM: the artifact's TVM decode kernels (int4 GEMV/GEMM, int8 LM head), `lowbit.runtime.decoder_tvm`.

Timing runs under /work/logs/TIMING-style locking (`--lock`): waits while the lock file exists, holds it while
timing. Writes the smollm2_decode section of BENCHMARKS.md.

    python benchmarks/bench_smollm2_decode.py --artifact DIR [--quick] [--runners a,b] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

HERE = Path(__file__).resolve().parent
RUNNERS = ("torch FP32", "numpy runtime", "ORT FP32", "ORT MatMulNBits RTN acc0", "ORT MatMulNBits RTN acc4",
           "lowbit ONNX acc0", "lowbit ONNX acc4", "llama.cpp", "lowbit TVM")
WEIGHTS = {
    "torch FP32": "FP32 (dequantized GGUF)",
    "numpy runtime": "artifact, dequantized to FP32 at load",
    "ORT FP32": "FP32 (dequantized GGUF)",
    "ORT MatMulNBits RTN acc0": "ORT RTN int4 g128 asym, all MatMuls (LM head too), FP32 embedding",
    "ORT MatMulNBits RTN acc4": "ORT RTN int4 g128 asym, all MatMuls (LM head too), FP32 embedding",
    "lowbit ONNX acc0": "artifact's decoder.onnx: its int4 g128 as MatMulNBits, int8 g32 LM head as float MatMul",
    "lowbit ONNX acc4": "artifact: its int4 g128 and int8 g32 LM head, all MatMulNBits",
    "llama.cpp": "original GGUF: Q4_1 linears, Q8_0 embedding",
    "lowbit TVM": "artifact: int4 g128 linears and int8 g32 LM head through lowbit's TVM kernels",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Runner(Protocol):
    def reset(self) -> None: ...
    def prefill(self, ids: np.ndarray) -> np.ndarray: ...  # logits of the last prompt token
    def step(self, token: int) -> np.ndarray: ...


# -- runners (in the child process) --------------------------------------------------------------------------------

class TorchRunner:
    def __init__(self, spec: dict[str, Any]) -> None:
        import torch

        from lowbit.models.llama import load_llama_gguf

        torch.set_num_threads(spec["threads"])
        self.torch = torch
        self.model = load_llama_gguf(spec["gguf"]).model

    def reset(self) -> None:
        self.cache = self.model.new_cache()

    def _run(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(ids.reshape(1, -1)), self.cache)[0, -1].numpy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._run(ids)

    def step(self, token: int) -> np.ndarray:
        return self._run(np.array([token], np.int64))


class CacheRunner:
    """Anything with `new_cache()` and `logits(ids, cache)`: the numpy runtime and `OrtDecoder`."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def reset(self) -> None:
        self.cache = self.model.new_cache()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self.model.logits(ids, self.cache)[-1]

    def step(self, token: int) -> np.ndarray:
        return self.model.logits(np.array([token], np.int64), self.cache)[-1]


class LlamaCppRunner:
    def __init__(self, spec: dict[str, Any]) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=spec["gguf"], n_ctx=spec["context"], n_batch=512, n_threads=spec["threads"],
                         n_threads_batch=spec["threads"], verbose=False)

    def reset(self) -> None:
        self.llm.reset()  # the next eval drops the cache past n_tokens = 0

    def _last(self) -> np.ndarray:
        # The context's logits of the batch's last token: llama-cpp-python 0.3.36 no longer copies them into
        # `scores` unless logits_all (which would compute every prompt position).
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).copy()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.llm.eval([int(i) for i in ids])  # logits of the last token only (the others compute all t)
        return self._last()

    def step(self, token: int) -> np.ndarray:
        self.llm.eval([int(token)])
        return self._last()


def _tvm_runner(spec: dict[str, Any]) -> Runner:
    """The artifact's TVM decode kernels (`lowbit.runtime.decoder_tvm`; the artifact must have been quantized with
    TVM installed and not `--target none`)."""
    from lowbit.runtime.decoder_tvm import TvmDecoder

    return TvmDecoder(spec["artifact"], threads=spec["threads"])


def make_runner(name: str, spec: dict[str, Any]) -> Runner:
    if name == "torch FP32":
        return TorchRunner(spec)
    if name == "numpy runtime":
        from lowbit.runtime.decoder import DecoderModel

        return CacheRunner(DecoderModel(spec["artifact"]))
    if name == "llama.cpp":
        return LlamaCppRunner(spec)
    if name == "lowbit TVM":
        return _tvm_runner(spec)
    from lowbit.codegen.onnx.decoder import OrtDecoder

    return CacheRunner(OrtDecoder(spec["onnx"][name], threads=spec["threads"]))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from the parent through
    fork and exec, so every runner would report at least the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    runner = make_runner(name, spec)
    load_s = time.perf_counter() - t0
    prompt, forced = np.array(spec["prompt"], np.int64), spec["forced"]
    runner.reset()  # warm-up: one prefill and a few steps
    runner.prefill(prompt)
    for token in forced[:4]:
        runner.step(token)
    prefill_ms, decode_s, argmax = [], [], []
    for _ in range(spec["repeats"]):
        runner.reset()
        t = time.perf_counter()
        last = runner.prefill(prompt)
        prefill_ms.append(1e3 * (time.perf_counter() - t))
        argmax = [int(np.argmax(last))]
        t = time.perf_counter()
        for token in forced:
            argmax.append(int(np.argmax(runner.step(token))))
        decode_s.append(time.perf_counter() - t)
    return {"load_s": load_s, "prefill_ms": prefill_ms, "decode_s": decode_s, "steps": len(forced),
            "argmax": argmax, "peak_rss_mb": peak_rss_mb()}


# -- preparation and the parent ------------------------------------------------------------------------------------

def prepare(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Token ids, the GGUF, and the ONNX files the chosen runners need (made once, before any timing)."""
    from lowbit.models.smollm2 import smollm2_135m_path
    from lowbit.models.zoo import get_zoo_entry
    from lowbit.pipeline.decoder import leading_tokens
    from lowbit.runtime.bpe_tokenizer import BpeTokenizer
    from lowbit.runtime.decoder import read_decoder_artifact

    zoo = get_zoo_entry("zoo:smollm2_135m").decoder
    tokenizer = BpeTokenizer(read_decoder_artifact(args.artifact).vocabulary)
    ids = leading_tokens(tokenizer, zoo.evaluation["lee"](), args.prompt_tokens + args.new_tokens)
    args.work.mkdir(parents=True, exist_ok=True)
    fp32 = args.work / "fp32.onnx"
    onnx: dict[str, str] = {"ORT FP32": str(fp32)}
    if any(n.startswith("ORT") for n in names) and not fp32.exists():
        log("exporting the FP32 model")
        _export_fp32(fp32)
    for level in (0, 4):
        path = args.work / f"ort_rtn4_acc{level}.onnx"
        onnx[f"ORT MatMulNBits RTN acc{level}"] = str(path)
        if f"ORT MatMulNBits RTN acc{level}" in names and not path.exists():
            log(f"onnxruntime MatMulNBitsQuantizer, accuracy_level {level}")
            _ort_quantize(fp32, path, level)
        # acc0 is the artifact's own checked decoder.onnx when it has one.
        own = args.artifact / "decoder.onnx"
        path = own if level == 0 and own.exists() else args.work / f"lowbit_acc{level}.onnx"
        onnx[f"lowbit ONNX acc{level}"] = str(path)
        if f"lowbit ONNX acc{level}" in names and not path.exists():
            from lowbit.pipeline.decoder_onnx import export_artifact_onnx

            log(f"exporting the artifact with accuracy_level {level}")
            export_artifact_onnx(args.artifact, path, accuracy_level=level)
    return {"gguf": str(smollm2_135m_path()), "artifact": str(args.artifact), "onnx": onnx, "threads": args.threads,
            "repeats": args.repeats, "context": args.prompt_tokens + args.new_tokens + 8,
            "prompt": ids[:args.prompt_tokens].tolist(), "forced": ids[args.prompt_tokens:].tolist()}


def _export_fp32(path: Path) -> None:
    import dataclasses

    from lowbit.codegen.onnx.decoder import decoder_onnx, save_decoder_onnx
    from lowbit.models.smollm2 import smollm2_135m

    model = smollm2_135m().model
    weights = {n: p.detach().numpy() for n, p in model.named_parameters()}
    save_decoder_onnx(decoder_onnx(dataclasses.asdict(model.config), weights, doc="SmolLM2-135M FP32"), path)


def _ort_quantize(fp32: Path, path: Path, accuracy_level: int) -> None:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=128, is_symmetric=False,
                                     accuracy_level=accuracy_level)
    quantizer.process()
    quantizer.model.save_model_to_file(str(path), False)


def run_runner(name: str, spec_path: Path, threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--spec", str(spec_path)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return {"error": reason}
    return json.loads(proc.stdout.strip().splitlines()[-1])


class TimingLock:
    """The shared CPU-timing lock: wait while the file exists, hold it while timing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __enter__(self) -> TimingLock:
        if self.path is not None:
            while self.path.exists():
                log(f"waiting for {self.path} to go")
                time.sleep(30)
            self.path.write_text(f"bench_smollm2_decode.py pid {os.getpid()}\n")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def write_report(args: argparse.Namespace, results: dict[str, dict[str, Any]], spec: dict[str, Any],
                 started: float) -> None:
    import onnxruntime
    from sections import cpu_info, lowbit_revision, write_section

    base = results.get("torch FP32", {})
    ort4 = results.get("ORT MatMulNBits RTN acc4", {})

    def tps(r: dict[str, Any]) -> float:
        return r["steps"] / min(r["decode_s"])

    lines = ["## SmolLM2-135M: decode speed at batch 1 against the peers (issue #14)", "",
             f"- Command: `python benchmarks/bench_smollm2_decode.py {' '.join(args.argv)}`",
             f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu_info()[0]}, {os.cpu_count()} "
             f"CPUs; lowbit {lowbit_revision()}; onnxruntime {onnxruntime.__version__}; {args.threads} threads "
             f"each; {time.perf_counter() - started:.0f} s in all",
             f"- Same ids for every runner: a prefill of {len(spec['prompt'])} tokens of the Lee news text, then "
             f"{len(spec['forced'])} one-token steps fed the text's next tokens. Prefill ms: median of "
             f"{args.repeats}; decode tokens/s: the fastest of {args.repeats} runs of all steps. Peak RSS: the "
             "runner's own process, loading included. Agreement: argmax equal to FP32 torch's, over the prefill's "
             "last position and every step.",
             f"- Load average (1 min) when timing began: {args.load_before:.1f}, when it ended: "
             f"{os.getloadavg()[0]:.1f}, on {os.cpu_count()} CPUs. Other work that ignores the timing lock (a job "
             "started before it) shows here; above about 2 the figures are contended, their ratios rough.",
             f"- lowbit's artifact: `{args.artifact}`. Every runner but llama.cpp computes the logits of all "
             "prompt positions in prefill (llama.cpp only the last).", "",
             "| runner | weights | prefill ms | decode tok/s | × torch FP32 | × ORT RTN acc4 | peak RSS MB | "
             "agreement |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {WEIGHTS[name]} | — | — | — | — | — | not run: {r['error']} |")
            continue
        agree = (np.mean(np.array(r["argmax"]) == np.array(base["argmax"])) if "argmax" in base else float("nan"))
        ratio = f"{tps(r) / tps(base):.2f}" if "steps" in base else "—"
        vs_ort = f"{tps(r) / tps(ort4):.2f}" if "steps" in ort4 else "—"
        lines.append(f"| {name} | {WEIGHTS[name]} | {float(np.median(r['prefill_ms'])):.0f} | {tps(r):.1f} | "
                     f"{ratio} | {vs_ort} | {r['peak_rss_mb']:.0f} | {agree:.2f} |")
    write_section(args.out, "smollm2_decode", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, help="a decoder artifact of zoo:smollm2_135m (lowbit quantize)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lowbit_bench_decode"), help="exported ONNX files")
    parser.add_argument("--runners", default=",".join(RUNNERS))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="32-token prompt, 8 steps, 1 repeat (no BENCHMARKS.md)")
    parser.add_argument("--prepare-only", action="store_true", help="make the ONNX files, time nothing")
    parser.add_argument("--lock", default="/work/logs/TIMING", help="the CPU-timing lock file; '' for none")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, json.loads(args.spec.read_text()))))
        return
    if args.artifact is None:
        parser.error("--artifact DIR is needed: make one with `lowbit quantize zoo:smollm2_135m -o DIR`")
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats = 32, 8, 1
    args.argv = argv
    names = [n.strip() for n in args.runners.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        parser.error(f"unknown runners {unknown}; choose from {list(RUNNERS)}")
    started = time.perf_counter()
    spec = prepare(args, names)
    spec_path = args.work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    if args.prepare_only:
        return
    results: dict[str, dict[str, Any]] = {}
    with TimingLock(Path(args.lock) if args.lock else None):
        args.load_before = os.getloadavg()[0]
        for name in names:
            log(f"running {name}")
            results[name] = run_runner(name, spec_path, args.threads)
            r = results[name]
            log(f"  {name}: " + (r["error"] if "error" in r else
                                 f"prefill {np.median(r['prefill_ms']):.0f} ms, "
                                 f"{r['steps'] / min(r['decode_s']):.1f} tok/s, {r['peak_rss_mb']:.0f} MB"))
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    if not args.quick:
        write_report(args, results, spec, started)


if __name__ == "__main__":
    main()
