"""lowbit: a post-training quantization compiler.

    import lowbit
    artifact = lowbit.quantize("zoo:small_cnn")   # or a .pt2 with calib=an (N, C, H, W) array or folder
    artifact.save("out/")

`quantize` and `Artifact` are imported on first use: `import lowbit` alone must stay light,
since the runtime (`lowbit.runtime`, numpy and TVM only) lives in this package too.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Artifact", "QuantConfig", "quantize"]

_LAZY = {"quantize": "lowbit.pipeline", "Artifact": "lowbit.pipeline", "QuantConfig": "lowbit.quantizer.config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
