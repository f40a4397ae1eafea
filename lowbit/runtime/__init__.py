"""The thin runtime: load a compiled lowbit artifact and run it with numpy in and out.

Imports only numpy and the TVM runtime (never torch), so a deployment needs just
`pip install apache-tvm numpy` and this package's runtime files. A decoder LLM's weight-quantized artifact
runs with numpy alone (`DecoderModel`, plus `safetensors` and `tokenizers`).
"""

from typing import Any

from .loader import CompiledModel, load

__all__ = ["CompiledModel", "DecoderModel", "load"]


def __getattr__(name: str) -> Any:
    if name == "DecoderModel":  # imported on use: a CNN's deployment needs only loader.py
        from .decoder import DecoderModel

        return DecoderModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
