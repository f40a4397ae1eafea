"""Turn whatever the user points at into a `torch.export` program.

Accepted: `zoo:NAME`, a `.pt2` export, a TorchScript archive, a state dict
(`.safetensors`, or `.pt` read with `weights_only=True`) plus a `module:function`
factory, or a Hugging Face-style directory of a BERT-family text encoder. Every
path is validated first, and every failure names the file and what to do about it.
"""

from __future__ import annotations

import importlib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import LowbitError

if TYPE_CHECKING:
    from .minilm import TextEncoder

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _export(
    module: nn.Module, example: torch.Tensor, where: str
) -> torch.export.ExportedProgram:
    module.eval()
    try:
        return torch.export.export(module, (example,))
    except Exception as e:  # torch raises many types here; all mean "could not trace"
        raise LowbitError(
            f"{where}: torch.export could not trace the model with an input of shape "
            f"{tuple(example.shape)}: {e}"
        ) from e


def export_text_encoder(encoder: TextEncoder, where: str) -> torch.export.ExportedProgram:
    """A text encoder as a program of `input_ids` and `attention_mask`, int64 [batch, seq_len], at its seq_len."""
    # Traced at batch 2: at batch 1 torch.export specializes size-1 dimensions, and the capture must see a batch.
    example = encoder.example_inputs(batch=2)
    try:
        return torch.export.export(encoder.model.eval(), example)
    except Exception as e:  # torch raises many types here; all mean "could not trace"
        raise LowbitError(f"{where}: torch.export could not trace the text encoder at seq_len "
                          f"{encoder.seq_len}: {e}") from e


def _load_factory(spec: str) -> Callable[[], nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise LowbitError(
            f"--factory {spec!r}: expected the form 'package.module:function'"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise LowbitError(f"--factory {spec!r}: cannot import it ({e})") from e
    if not callable(fn):
        raise LowbitError(f"--factory {spec!r} is not callable")
    return fn


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise LowbitError(
                f"{path}: not a valid safetensors file (corrupt or truncated?): {e}"
            ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        # "Unsupported operand": not a pickle at all (random or damaged bytes), so not a refusal.
        pickled_objects = "Weights only load failed" in text or "Unsupported global" in text
        if pickled_objects and "Unsupported operand" not in text:
            raise LowbitError(
                f"{path}: refused to load: the file holds pickled Python objects, not just tensors, and "
                "unpickling untrusted files can run arbitrary code. Save a plain state dict instead "
                "(torch.save(model.state_dict(), ...) or safetensors)."
            ) from e
        raise LowbitError(
            f"{path}: cannot read the checkpoint (corrupt or truncated?): {text.splitlines()[0]}"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        raise LowbitError(
            f"{path}: expected a state dict (a mapping of names to tensors)"
        )
    return obj


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _starts_like_zip(path: Path) -> bool:
    """A zip local-file header: TorchScript (and torch.save) archives start with one, even when truncated."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_program(
    spec: str, example: torch.Tensor | None, factory: str | None = None
) -> torch.export.ExportedProgram:
    """Load MODEL as an exported program. `example` is a batch-1 input for formats that need tracing."""
    if spec.startswith("zoo:"):
        from . import get_zoo_entry
        from .zoo import entry_is_not_a_decoder

        entry = get_zoo_entry(spec[4:])
        entry_is_not_a_decoder(entry)
        if entry.text is not None:
            from .minilm import load_text_encoder

            return export_text_encoder(load_text_encoder(entry.text.directory()), spec)
        shape = entry.input_shape if example is None else tuple(example.shape)
        return _export(entry.build(), torch.zeros(shape), spec)

    path = Path(spec)
    if path.is_dir():
        from .minilm import load_text_encoder

        return export_text_encoder(load_text_encoder(path), spec)
    if not path.is_file():
        raise LowbitError(
            f"{spec}: no such file (MODEL is zoo:NAME, a .pt2, a TorchScript file, a state dict, or a "
            "Hugging Face-style directory)"
        )
    if path.suffix == ".pt2":
        try:
            return torch.export.load(str(path))
        except Exception as e:
            raise LowbitError(
                f"{path}: cannot load the torch.export program (corrupt or truncated?): {e}"
            ) from e
    if example is None:
        raise LowbitError(
            f"{path}: calibration data is needed to know the input shape (--calib)"
        )
    if _is_torchscript(path):
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
            from torch._export.converter import TS2EPConverter

            return TS2EPConverter(scripted.eval(), (example,)).convert()
        except Exception as e:
            raise LowbitError(
                f"{path}: cannot convert the TorchScript model: {e}"
            ) from e
    if path.suffix not in STATE_DICT_SUFFIXES:
        if _starts_like_zip(path):
            raise LowbitError(
                f"{path}: a zip archive that cannot be opened as TorchScript (corrupt or truncated?); "
                "save the model again with torch.jit.save"
            )
        raise LowbitError(
            f"{path}: unknown model format {path.suffix!r}; expected .pt2, TorchScript, "
            f"or a state dict ({', '.join(STATE_DICT_SUFFIXES)}) with --factory (a TorchScript "
            "file is a zip archive; this file is not one)"
        )
    state = _read_state_dict(path)
    if factory is None:
        raise LowbitError(
            f"{path} is a state dict: pass --factory module:function that builds the model"
        )
    model = _load_factory(factory)()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LowbitError(
            f"{path}: the state dict does not match the model from {factory}: {e}"
        ) from e
    return _export(model, example, str(path))
