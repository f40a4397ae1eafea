"""The pipeline as a library, with no command line in it: what every `lowbit` command calls.

    from lowbit.pipeline import quantize
    artifact = quantize("zoo:small_cnn")          # load, capture, calibrate, quantize
    artifact.save("out/", target=None)            # export, evaluate, check, report (atomically)

`prepare` (model and data), `evaluate`, `checks` (compile-and-check, the integer comparisons),
`sensitivity`, `search` and `bench` are the other pieces. Progress goes through a `Progress`.
"""

from .prepare import Prepared, Source, prepare
from .progress import Progress
from .quantize import Artifact, quantize

__all__ = ["Artifact", "Prepared", "Progress", "Source", "prepare", "quantize"]
