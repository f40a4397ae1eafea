"""`decoder.onnx` of a decoder artifact: exported from its stored group-wise weights and checked in ONNX Runtime
against the numpy runtime (`lowbit.codegen.onnx.decoder` documents the graph and its interface).

`DecoderArtifact.save` calls `add_checked_onnx` before the artifact directory is published, so a failed check
leaves nothing behind; `export_artifact_onnx` exports an existing artifact to a file of one's choice (the benchmark
uses it for MatMulNBits' faster `accuracy_level` 4, which the float check is not meant for).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..codegen.onnx.decoder import (
    LOGIT_TOLERANCE,
    NBITS,
    Weight,
    check_decoder_onnx,
    decoder_onnx,
    fits_matmul_nbits,
    save_decoder_onnx,
)
from ..errors import LowbitError
from ..io import write_json
from ..ir.groupwise_weights import GroupWiseWeights
from ..ir.weight_formats import stored_weights
from ..runtime.decoder import CONFIG_FILE, WEIGHTS_FILE
from ..runtime.loader import MANIFEST

ONNX_FILE = "decoder.onnx"
# Ordinary text, so the check's activations look like real ones; cut to CHECK_TOKENS tokens.
CHECK_TEXT = ("The committee met on Tuesday to discuss the new budget, and after a long debate the members agreed "
              "to postpone the vote until the next session.")
CHECK_TOKENS = 16


def artifact_weights(directory: Path) -> tuple[dict[str, Any], dict[str, Weight]]:
    """An artifact's config and its weights as stored: quantized ones in their format, the rest float32."""
    from safetensors.numpy import load_file

    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        arrays = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, ValueError) as e:
        raise LowbitError(f"{directory}: cannot read the artifact's config and weights: {e}") from e
    return config, stored_weights(arrays, str(directory / WEIGHTS_FILE))


def describe_linears(weights: dict[str, Weight]) -> dict[str, int]:
    """How many weights went to MatMulNBits (by bits and block) and how many to float MatMuls."""
    kinds: dict[str, int] = {}
    for w in weights.values():
        if isinstance(w, GroupWiseWeights):
            key = (f"MatMulNBits bits {w.bits} block_size {w.group}" if fits_matmul_nbits(w)
                   else f"float MatMul (dequantized {w.name}: MatMulNBits takes {NBITS} bits, power-of-two blocks, "
                        "8 bits only at accuracy_level 4)")
        elif not isinstance(w, np.ndarray):
            key = f"float MatMul (dequantized {w.name}: ORT has no codebook MatMul)"
        else:
            continue
        kinds[key] = kinds.get(key, 0) + 1
    return kinds


def export_artifact_onnx(directory: str | Path, path: str | Path, accuracy_level: int = 0) -> Path:
    """Write the ONNX model of the artifact in `directory` to `path` (unchecked: `add_checked_onnx` checks)."""
    directory, path = Path(directory), Path(path)
    config, weights = artifact_weights(directory)
    save_decoder_onnx(decoder_onnx(config, weights, accuracy_level, doc=f"lowbit decoder from {directory.name}"),
                      path)
    return path


def add_checked_onnx(directory: Path, tolerance: float = LOGIT_TOLERANCE) -> dict[str, Any]:
    """Export `decoder.onnx` into the unpublished artifact `directory` (its files and manifest written), check it
    against the numpy runtime on `CHECK_TEXT`, and record the check in the manifest. A LowbitError on mismatch."""
    from ..runtime.decoder import DecoderModel
    from .artifact import file_hashes

    config, weights = artifact_weights(directory)
    save_decoder_onnx(decoder_onnx(config, weights, doc="lowbit weight-quantized decoder (batch 1, KV cache)"),
                      directory / ONNX_FILE)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"] = file_hashes(directory)
    write_json(directory / MANIFEST, manifest)
    runtime = DecoderModel(directory, backend="numpy")
    ids = runtime.tokenizer.encode(CHECK_TEXT)[: min(CHECK_TOKENS, runtime.context)]
    check = check_decoder_onnx(directory / ONNX_FILE, runtime.logits, ids, tolerance)
    manifest["onnx"] = {"file": ONNX_FILE, "linears": describe_linears(weights),
                        "interface": "input_ids [1, t], past_key_values.{i}.key/value [1, kv_heads, past, head_dim] "
                                     "-> logits [1, t, vocab], present.{i}.key/value",
                        "check_against_numpy_runtime": check}
    write_json(directory / MANIFEST, manifest)
    return manifest["onnx"]
