"""Weight-only quantization of a decoder LLM, and the artifact directory it writes.

`quantize_decoder_model(model, config)` loads a Llama decoder (zoo:NAME or a .gguf file); `quantize_decoder`
rounds the linears of its blocks group-wise or by vector quantization (`lowbit.quantizer.weight_only`: RTN, or
GPTQ's sequential walk on calibration text) and the token embedding (tied to the LM head in SmolLM2) to
`EMBEDDING_FORMAT`, and measures perplexity before and after on the first windows of each evaluation text.
`DecoderArtifact.save(DIR)` writes, atomically:

- ``config.json``: the `LlamaConfig`;
- ``weights.safetensors``: every quantized weight as its format's `to_tensors` stores it (`GroupWiseWeights`,
  or `VQWeights` for vq2/vq3), under ``<parameter name>.``, and the float tensors (the RMSNorm gains) under
  their parameter names;
- ``vocabulary.json``: the tokenizer's `Vocabulary`, from which the runtime rebuilds the tokenizer;
- ``decoder.onnx``: the same model for ONNX Runtime, group-wise linears as com.microsoft MatMulNBits
  (`lowbit.pipeline.decoder_onnx`), checked against the numpy runtime before anything is published;
- ``report.json`` and ``report.md``: sizes (bits per weight counted with scales, zero points and codebooks),
  perplexity with intervals, stage times;
- ``manifest.json``: format, version, what the weights are, each file's sha256, and the ONNX check's figures.

`load_decoder_artifact(DIR)` checks the manifest and the tensors and rebuilds the float model with the dequantized
weights: the reference the kernels are checked against, and what `lowbit eval DIR` scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LowbitError
from ..io import atomic_directory, write_json
from ..ir.weight_formats import QuantizedWeights, n_weights
from ..models.llama import LlamaDecoder, LoadedDecoder, decoder_logits_fn, load_llama_gguf, smoothing_folds
from ..models.llama_config import LlamaConfig
from ..models.zoo import ZOO_PREFIX, ZooDecoder, get_zoo_entry, zoo_names
from ..quantizer.activation_quant import quantize_linear_inputs
from ..quantizer.weight_only import WeightOnlyConfig, quantize_weights
from ..quantizer.weight_smoothing import SmoothChoice, smoothing_summary
from ..runtime.bpe_tokenizer import BpeTokenizer, Vocabulary
from ..runtime.decoder import (
    CONFIG_FILE,
    DECODER_KIND,
    DECODER_VERSION,
    VOCABULARY_FILE,
    WEIGHTS_FILE,
    is_decoder_artifact,
    read_decoder_artifact,
)
from ..text.files import read_text
from ..text.perplexity import DEFAULT_WINDOW, PerplexityResult, perplexity
from .artifact import ARTIFACT_FORMAT, MANIFEST, file_hashes
from .decoder_onnx import add_checked_onnx
from .progress import Progress

REPORT_JSON, REPORT_MD = "report.json", "report.md"
# The embedding table is also the LM head; 8 bits in groups of 32 keep it as close as the GGUF's own Q8_0.
EMBEDDING_FORMAT = WeightOnlyConfig(bits=8, group=32, rounding="rtn")
EMBEDDING = "embed_tokens.weight"
CALIBRATION_WINDOWS = 32  # of DEFAULT_WINDOW tokens: ~16k tokens, as GPTQ's 128 x 2048 scaled to 2 cores
REPORT_WINDOWS = 8  # per evaluation text in the report; `lowbit eval` or the benchmark scores whole texts
PAIRED_SAMPLES = 2000
# TVM logits against the numpy runtime, relative to the largest |logit|: both are float32 with sums in other
# orders; measured on SmolLM2-135M int4 (38 positions): 2e-6. Tiny random models land near 1e-6.
TVM_TOLERANCE = 1e-4
GGUF_SUFFIX = ".gguf"
DEFAULT_TEXTS_FROM = "zoo:smollm2_135m"  # a user's .gguf is calibrated and reported on this zoo model's texts


@dataclass(frozen=True)
class DecoderArtifact:
    """A weight-quantized decoder: its config, tokenizer vocabulary, quantized weights, float tensors, report."""

    config: LlamaConfig
    vocabulary: Vocabulary
    weights: dict[str, QuantizedWeights]  # parameter name (e.g. "layers.0.mlp.up_proj.weight") -> format
    tensors: dict[str, np.ndarray]  # the parameters kept in float32
    quant: WeightOnlyConfig
    report: dict[str, Any]

    def save(self, directory: str | Path, force: bool = False, target: str | None = None, onnx: bool = True,
             progress: Progress | None = None) -> Path:
        """Write the artifact directory (nothing is left behind on failure); returns its path. With a TVM
        `target` (e.g. "llvm -mcpu=native"), also the decode kernels (`decoder_tvm`), and with `onnx`, also
        `decoder.onnx`: each refused (LowbitError, nothing written) unless it agrees with the numpy runtime."""
        from safetensors.numpy import save_file

        progress = progress or Progress()
        directory = Path(directory)
        with atomic_directory(directory, force) as tmp:
            config = dataclasses.asdict(self.config)
            write_json(tmp / CONFIG_FILE, config)
            write_json(tmp / VOCABULARY_FILE, dataclasses.asdict(self.vocabulary))
            arrays = {name: np.ascontiguousarray(t, np.float32) for name, t in self.tensors.items()}
            for name, weights in self.weights.items():
                arrays.update(weights.to_tensors(f"{name}."))
            save_file(arrays, str(tmp / WEIGHTS_FILE))
            report = dict(self.report)
            tvm = target is not None and self._build_tvm(tmp, config, target, progress)
            if tvm:  # the check loads the artifact, which needs a manifest: written again after the report
                self._write_manifest(tmp)
                with progress.stage("tvm check"):
                    progress.echo("tvm check", "TVM logits against the numpy runtime")
                    tvm["check"] = check_tvm_decoder(tmp)
                    progress.echo("tvm check", f"max |difference| {tvm['check']['max_abs_diff']:.2e}, "
                                  f"{tvm['check']['relative']:.2e} of max |logit|")
                report["tvm"] = tvm
            write_json(tmp / REPORT_JSON, report)
            (tmp / REPORT_MD).write_text(report_markdown(report))
            self._write_manifest(tmp)
            if onnx and self.quant.activation_bits:
                progress.echo("onnx", "decoder.onnx is not written for W8A8: the export has no per-token int8 "
                              "activations (the artifact runs on the numpy runtime)")
            elif onnx:
                with progress.stage("onnx"):
                    check = add_checked_onnx(tmp)["check_against_numpy_runtime"]
                progress.echo("onnx", f"decoder.onnx: ONNX Runtime's logits within {check['max_abs_diff']:.2g} of the "
                              f"numpy runtime's on {check['tokens']} tokens (largest |logit| "
                              f"{check['max_abs_logit']:.3g}; {progress.timings['onnx']:.1f}s)")
        return directory

    def _write_manifest(self, directory: Path) -> None:
        write_json(directory / MANIFEST, {"format": ARTIFACT_FORMAT, "version": DECODER_VERSION, "kind": DECODER_KIND,
                                          "weights": dataclasses.asdict(self.quant), "files": file_hashes(directory)})

    def _build_tvm(self, tmp: Path, config: dict[str, Any], target: str, progress: Progress) -> dict[str, Any]:
        """Compile the decode kernels into `tmp` if the formats have them; what the report records ({} if not)."""
        from ..codegen.tvm.decoder import build_decoder_library, supports

        why = "W8A8 has no TVM kernels (per-token int8 activations)" if self.quant.activation_bits else \
            supports(config, self.weights)
        if why:
            progress.echo("tvm", f"no TVM decode kernels: {why}; the artifact runs on the numpy runtime")
            return {}
        with progress.stage("tvm"):
            progress.echo("tvm", f"compiling the decode and prefill kernels for {target}")
            meta = build_decoder_library(tmp, config, self.weights, self.tensors, target)
        return {"target": meta["target_string"], "compile_s": meta["compile_s"], "chunk": meta["shapes"]["chunk"]}


def check_tvm_decoder(directory: Path, tolerance: float = TVM_TOLERANCE) -> dict[str, float]:
    """Run the artifact's TVM kernels and its numpy runtime on the same tokens (a prefill of one chunk and a few
    more, then decode steps) and raise LowbitError unless their logits agree: max |tvm - numpy| <= tolerance *
    max |numpy logits| at every position checked. Returns the largest differences."""
    from ..runtime.decoder import DecoderModel
    from ..runtime.decoder_tvm import TvmDecoder

    numpy_model = DecoderModel(directory, backend="numpy")  # checks the files against the manifest
    runner = TvmDecoder(directory)
    vocab = int(numpy_model.config["vocab_size"])
    length = min(runner.chunk + 5, numpy_model.context - 3)
    ids = np.random.default_rng(0).integers(0, vocab, length)
    cache = numpy_model.new_cache()
    pairs = [(runner.prefill(ids), numpy_model.logits(ids, cache)[-1])]
    for token in ids[:3]:
        pairs.append((runner.step(int(token)), numpy_model.logits(np.array([token]), cache)[-1]))
    diff = max(float(np.abs(a - b).max()) for a, b in pairs)
    scale = max(float(np.abs(b).max()) for _, b in pairs)
    if not diff <= tolerance * scale:  # also refuses NaN
        raise LowbitError(f"{directory}: the TVM decode kernels disagree with the numpy runtime: max |difference| "
                          f"{diff:.3g} against max |logit| {scale:.3g} (tolerance {tolerance:g} of it); the artifact "
                          "was not written; `--target none` writes it without the TVM kernels (numpy runtime)")
    return {"max_abs_diff": diff, "relative": diff / scale, "tolerance": tolerance, "tokens": length + 3}


def load_decoder_artifact(directory: str | Path) -> LoadedDecoder:
    """The float model (dequantized weights, eval mode) and tokenizer of a decoder artifact, after checking it."""
    files = read_decoder_artifact(directory)
    where = Path(directory) / WEIGHTS_FILE
    try:
        config = LlamaConfig(**files.config)
    except TypeError as e:
        raise LowbitError(f"{Path(directory) / CONFIG_FILE}: not a Llama config: {e}") from e
    model = LlamaDecoder(config)
    if files.activation_bits:  # W8A8: the linears quantize their inputs per token, as the runtime's do
        quantize_linear_inputs(model, [name.removesuffix(".weight") for name, w in files.weights.items()
                                       if name != EMBEDDING and not isinstance(w, np.ndarray)])
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = files.parameters.get(name)
            if value is None:
                raise LowbitError(f"{where}: no tensor for the parameter {name!r}; the file is incomplete")
            if tuple(value.shape) != tuple(param.shape):
                raise LowbitError(f"{where}: {name} is {list(value.shape)}, the model needs {list(param.shape)}")
            param.copy_(torch.from_numpy(value))
    return LoadedDecoder(model.eval(), BpeTokenizer(files.vocabulary))


def calibration_windows(tokenizer: BpeTokenizer, text: str, windows: int = CALIBRATION_WINDOWS,
                        window: int = DEFAULT_WINDOW) -> list[torch.Tensor]:
    """Consecutive windows of `window` tokens of `text` (at most `windows`; a shorter last one is dropped unless
    it is the only one), as int64 [1, t] inputs."""
    ids = tokenizer.encode(text)
    if len(ids) < 2:
        raise LowbitError(f"the calibration text has {len(ids)} token(s); give at least a few sentences "
                          f"(GPTQ is calibrated on up to {windows} windows of {window} tokens)")
    starts = range(0, max(len(ids) - window, 0) + 1, window)
    return [torch.from_numpy(ids[s:s + window].copy())[None, :] for s in list(starts)[:windows]]


def quantize_decoder(loaded: LoadedDecoder, config: WeightOnlyConfig, calibration_text: str,
                     evaluation: dict[str, str], *, model_name: str, report_windows: int = REPORT_WINDOWS,
                     progress: Progress | None = None) -> DecoderArtifact:
    """Round `loaded.model`'s block linears by `config` and its embedding by `EMBEDDING_FORMAT` (in place), and
    report perplexity before and after on the first `report_windows` windows of each `evaluation` text."""
    progress = progress or Progress()
    model, tokenizer = loaded
    window = min(DEFAULT_WINDOW, model.config.context_length)
    texts = {name: leading_tokens(tokenizer, text, report_windows * window) for name, text in evaluation.items()}
    with progress.stage("perplexity (float)"), progress.steps_of("perplexity (float)") as log:
        before = {name: perplexity(decoder_logits_fn(model), ids, window, report_windows, log=log)
                  for name, ids in texts.items()}
    smoothing: dict[str, SmoothChoice] = {}
    with progress.stage("quantize"), progress.steps_of("quantize") as log:
        weights = round_decoder(model, tokenizer, config, calibration_text, window, log, smoothing)
    with progress.stage("perplexity (quantized)"), progress.steps_of("perplexity (quantized)") as log:
        after = {name: perplexity(decoder_logits_fn(model), ids, window, report_windows, log=log)
                 for name, ids in texts.items()}
    tensors = {name: p.detach().numpy().copy() for name, p in model.named_parameters() if name not in weights}
    report = decoder_report(model_name, config, weights, tensors, before, after, progress)
    if smoothing:
        report["smoothing"] = smoothing_summary(smoothing)
    return DecoderArtifact(model.config, tokenizer.vocab, weights, tensors, config, report)


def leading_tokens(tokenizer: BpeTokenizer, text: str, n: int) -> np.ndarray:
    """The first `n` token ids of `text` (all of them if it has fewer), without tokenizing a long text whole: a
    prefix of it is tokenized, doubled until it holds more than `n` tokens, so the cut never reaches them."""
    chars = 8 * n
    while True:
        ids = tokenizer.encode(text[:chars])
        if chars >= len(text):
            return ids
        if len(ids) > n + 64:  # the last tokens may be cut mid-word; the first n are those of the whole text
            return ids[:n]
        chars *= 2


def round_decoder(model: LlamaDecoder, tokenizer: BpeTokenizer, config: WeightOnlyConfig, calibration_text: str,
                  window: int = DEFAULT_WINDOW, log: Callable[[str], object] = lambda _: None,
                  smoothing: dict[str, SmoothChoice] | None = None) -> dict[str, QuantizedWeights]:
    """Round the block linears by `config` (GPTQ calibrated on `calibration_text`) and the embedding by
    `EMBEDDING_FORMAT`, writing the dequantized weights into `model`; parameter name -> its stored weights."""
    calibrated = config.rounding != "rtn" or config.smooth
    samples = calibration_windows(tokenizer, calibration_text, window=window) if calibrated else []
    if samples:
        log(f"calibration: {len(samples)} windows, {sum(s.shape[1] for s in samples)} tokens")
    linears = quantize_weights(model, list(model.layers), config, samples, log=log, folds=smoothing_folds,
                               smoothing=smoothing)
    weights = {f"{name}.weight": w for name, w in linears.items()}
    embedding = EMBEDDING_FORMAT.round(model.embed_tokens.weight.detach(), None)
    with torch.no_grad():  # tied: the LM head reads the same (now rounded) table
        model.embed_tokens.weight.copy_(torch.from_numpy(embedding.dequantize()))
    weights[EMBEDDING] = embedding
    return weights


def paired_ratio(before: PerplexityResult, after: PerplexityResult, samples: int = PAIRED_SAMPLES,
                 seed: int = 0) -> tuple[float, tuple[float, float]]:
    """after / before perplexity on the same windows, with a paired percentile bootstrap interval over windows."""
    nll_b, nll_a = np.array(before.window_nll), np.array(after.window_nll)
    tokens = np.array(before.window_tokens)
    ratio = float(np.exp((nll_a.sum() - nll_b.sum()) / tokens.sum()))
    if len(tokens) == 1:
        return ratio, (ratio, ratio)
    picks = np.random.default_rng(seed).integers(0, len(tokens), size=(samples, len(tokens)))
    boot = np.exp((nll_a[picks].sum(1) - nll_b[picks].sum(1)) / tokens[picks].sum(1))
    low, high = np.quantile(boot, [0.025, 0.975])
    return ratio, (float(low), float(high))


def decoder_report(model_name: str, config: WeightOnlyConfig, weights: dict[str, QuantizedWeights],
                   tensors: dict[str, np.ndarray], before: dict[str, PerplexityResult],
                   after: dict[str, PerplexityResult], progress: Progress) -> dict[str, Any]:
    linear_values = sum(n_weights(w) for name, w in weights.items() if name != EMBEDDING)
    linear_bytes = sum(w.nbytes for name, w in weights.items() if name != EMBEDDING)
    float_bytes = sum(4 * t.size for t in tensors.values())
    total = sum(w.nbytes for w in weights.values()) + float_bytes
    perplexities = {}
    for name in before:
        ratio, interval = paired_ratio(before[name], after[name])
        perplexities[name] = {"float": before[name].as_dict(), "quantized": after[name].as_dict(),
                              "ratio": ratio, "ratio_interval": list(interval)}
    return {
        "model": model_name,
        "weights": config.describe(),
        "embedding": f"{EMBEDDING_FORMAT.describe()} (tied LM head)",
        "linear_bits_per_weight": 8 * linear_bytes / linear_values,
        "model_bytes": total,
        "float_bytes": float_bytes,
        "perplexity": perplexities,
        "float_ops": float_ops(config),
        "timings_s": dict(progress.timings),
    }


def float_ops(config: WeightOnlyConfig) -> str:
    """Which ops of the quantized decoder compute in float (the report says so; issue #14)."""
    common = "RMSNorm, rotary embedding, attention over the KV cache (Q K^T, softmax, A V), SiLU and the residual adds"
    if config.activation_bits:
        return (f"{common}, the LM head (float activations against its int8 g32 table), and each block linear's "
                "per-token activation scale and per-group weight scales applied to its exact integer sums")
    return f"{common}, and every linear's activations (weights dequantized from their stored integers or codebooks)"


def report_markdown(report: dict[str, Any]) -> str:
    kind = "" if report["weights"].startswith("W8A8") else "weight-only "
    lines = [f"# {report['model']}: {kind}{report['weights']}", "",
             f"- block linears: {report['linear_bits_per_weight']:.3f} bits per weight (scales, zero points and "
             "codebooks included)",
             f"- token embedding: {report['embedding']}",
             f"- model size: {report['model_bytes'] / 1e6:.1f} MB ({report['float_bytes'] / 1e3:.0f} kB float32)",
             "", "| text | windows | tokens | float PPL | quantized PPL | ratio (paired 95% interval) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, p in report["perplexity"].items():
        f, q = p["float"], p["quantized"]
        low, high = p["ratio_interval"]
        lines.append(f"| {name} | {f['windows']} | {f['tokens']} | {f['perplexity']:.3f} | {q['perplexity']:.3f} | "
                     f"{p['ratio']:.4f} [{low:.4f}, {high:.4f}] |")
    if "tvm" in report:
        t = report["tvm"]
        lines += ["", f"TVM decode kernels for `{t['target']}`: compiled in {t['compile_s']:.0f} s, prefill in "
                  f"chunks of {t['chunk']} tokens; logits within {t['check']['relative']:.1e} of the numpy runtime's "
                  f"(relative to max |logit|, {t['check']['tokens']} positions; refused above "
                  f"{t['check']['tolerance']:g})."]
    if "float_ops" in report:
        lines += ["", f"Computed in float32: {report['float_ops']}."]
    lines += ["", "Perplexity on the first windows of each text only; `lowbit eval DIR --text FILE` scores a "
              "whole text.", "", "Stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in
                                                          report["timings_s"].items()), ""]
    return "\n".join(lines)


def load_decoder(model: str) -> LoadedDecoder:
    """A decoder LLM in float32: ``zoo:NAME`` of a decoder, a Llama-architecture .gguf file, or a decoder artifact
    directory (its dequantized weights)."""
    if model.startswith(ZOO_PREFIX):
        return _zoo_decoder(model).load()
    path = Path(model)
    if path.is_dir():
        return load_decoder_artifact(path)
    if path.exists() and path.suffix.lower() != GGUF_SUFFIX:
        raise LowbitError(f"{path}: not a {GGUF_SUFFIX} file; a decoder MODEL is zoo:NAME of a decoder, a GGUF "
                          "checkpoint or a decoder artifact directory")
    return load_llama_gguf(path)


def is_decoder(model: str) -> bool:
    """Whether MODEL names a decoder LLM (the weight-only path) rather than a model for the integer pipeline."""
    if model.startswith(ZOO_PREFIX):
        return get_zoo_entry(model).decoder is not None
    path = Path(model)
    return path.suffix.lower() == GGUF_SUFFIX or (path.is_dir() and is_decoder_artifact(path))


def quantize_decoder_model(model: str, config: WeightOnlyConfig, calib: Path | None = None, *,
                           report_windows: int = REPORT_WINDOWS, progress: Progress | None = None) -> DecoderArtifact:
    """`quantize_decoder` on MODEL (zoo:NAME or a .gguf), calibrated on `calib` (a UTF-8 text file) or the zoo's
    calibration text, and reported on the zoo's evaluation texts (a .gguf uses zoo:smollm2_135m's texts)."""
    progress = progress or Progress()
    zoo = _zoo_decoder(model if model.startswith(ZOO_PREFIX) else DEFAULT_TEXTS_FROM)
    if Path(model).is_dir():
        raise LowbitError(f"{model}: is a folder; quantize a zoo decoder or a {GGUF_SUFFIX} file")
    calibration = calibration_text(model, calib)
    with progress.stage("load"):
        progress.echo("load", f"loading {model}")
        loaded = load_decoder(model)
        evaluation = {name: text() for name, text in zoo.evaluation.items()}
    return quantize_decoder(loaded, config, calibration, evaluation, model_name=model,
                            report_windows=report_windows, progress=progress)


def calibration_text(model: str, calib: Path | None) -> str:
    """The text a decoder is calibrated on: the file `calib`, else the zoo's calibration text (for a .gguf, that of
    DEFAULT_TEXTS_FROM)."""
    if calib is not None:
        return read_text(calib, "calibration")
    return _zoo_decoder(model if model.startswith(ZOO_PREFIX) else DEFAULT_TEXTS_FROM).calibration()


def _zoo_decoder(model: str) -> ZooDecoder:
    entry = get_zoo_entry(model)
    if entry.decoder is None:
        raise LowbitError(f"{model} is not a decoder LLM (zoo decoders: "
                          f"{', '.join(ZOO_PREFIX + n for n in zoo_names() if get_zoo_entry(n).decoder)})")
    return entry.decoder
