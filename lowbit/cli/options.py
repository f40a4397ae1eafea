"""Options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def tuning_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--tune-trials and --tuning-cache, shared by `compile` and `quantize`."""
    fn = click.option("--tuning-cache", type=click.Path(path_type=Path, file_okay=False),
                      help="Where tuning records live (default $LOWBIT_CACHE or ~/.cache/lowbit); shared by every "
                           "model compiled for the same target.")(fn)
    return click.option("--tune-trials", type=click.IntRange(min=0),
                        help="Tune the layer kernels with MetaSchedule for N more trials (0: only reuse the records "
                             "in the cache); each layer keeps the faster of its tuned and hand-written kernels.")(fn)
