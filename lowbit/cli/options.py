"""What the commands share: error handling, common options, and parsing of option text."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import LowbitError
from ..runtime.tokenizer import DEFAULT_SEQ_LEN, MIN_SEQ_LEN

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Report `LowbitError` as `error: ...` (exit 2) and Ctrl-C as exit 130, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return fn(*args, **kwargs)
        except LowbitError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("\ninterrupted; nothing was written", err=True)
            ctx.exit(EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]


def tuning_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--tune-trials and --tuning-cache, shared by `compile` and `quantize`."""
    fn = click.option("--tuning-cache", type=click.Path(path_type=Path, file_okay=False),
                      help="Where tuning records live (default $LOWBIT_CACHE or ~/.cache/lowbit); shared by every "
                           "model compiled for the same target.")(fn)
    return click.option("--tune-trials", type=click.IntRange(min=0),
                        help="Tune the layer kernels with MetaSchedule for N more trials (0: only reuse the records "
                             "in the cache); each layer keeps the faster of its tuned and hand-written kernels.")(fn)


SMOOTH_HELP = ("SmoothQuant before quantizing: none, an alpha in [0, 1] (0.5 is the paper's), auto (alpha per group of "
               "linears, chosen by the W8A8 error on held-back calibration data). 1/s folds into the producer (a "
               "linear's rows, LayerNorm's gamma/beta, a per-channel GELU table), and a residual add reading the "
               "same tensor multiplies it back per channel; groups where it cannot fold are reported, not applied. "
               "default: auto for transformers (graphs that read an attention mask), none for CNNs.")


def smooth_option(extra: str = "") -> Callable[[F], F]:
    """--smooth, shared by `quantize`, `search` and `sensitivity`, so that a plan is searched on the graph that
    quantize builds; `extra` adds what one command does beyond that."""
    return click.option("--smooth", default="default", show_default=True, help=SMOOTH_HELP + extra)


def seq_len_option(extra: str = "") -> Callable[[F], F]:
    """--seq-len, shared by `quantize`, `search` and `sensitivity`; `extra` adds what one command does with it."""
    return click.option("--seq-len", type=click.IntRange(min=MIN_SEQ_LEN),
                         help=f"Text models: the sequence length (default {DEFAULT_SEQ_LEN}, or the model's maximum "
                              f"if smaller).{extra}")


def rpc_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--rpc-tracker and --rpc-key, shared by `compile`, `bench`, `search` and `quantize`: run or time on the devices
    a TVM RPC tracker knows under a key (`rpc_target` turns them into an `RpcTarget`)."""
    fn = click.option("--rpc-key", metavar="KEY",
                      help="The key the device's RPC servers registered with (python -m tvm.exec.rpc_server "
                           "--tracker HOST:PORT --key KEY); needs --rpc-tracker.")(fn)
    return click.option("--rpc-tracker", metavar="HOST:PORT",
                        help="A TVM RPC tracker: compiled code is uploaded to the devices under --rpc-key and run "
                             "and timed there (--target must then describe those devices).")(fn)


def rpc_target(tracker: str | None, key: str | None) -> Any:
    """The `RpcTarget` that --rpc-tracker and --rpc-key name, or None when neither is given."""
    if tracker is None and key is None:
        return None
    try:
        from ..codegen.tvm.remote import rpc_target as parse
    except ImportError as e:
        raise LowbitError(f"--rpc-tracker needs TVM: pip install 'lowbit[tvm]' ({e})") from None
    return parse(tracker, key)


def model_and_data_options(fn: Any) -> Any:
    """MODEL, -o, --calib, --eval, --factory, --seed and --force, shared by `sensitivity` and `search`."""
    for decorator in reversed([
        click.argument("model"),
        click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
                     help="Directory to create (must not exist unless --force)."),
        click.option("--calib", type=click.Path(path_type=Path), help="Calibration data (as for `lowbit quantize`)."),
        click.option("--eval", "eval_path", type=click.Path(path_type=Path),
                     help="Held-out data for measuring plans (as for `lowbit quantize`)."),
        click.option("--factory", metavar="MODULE:FUNCTION", help="Builds the model for a state-dict MODEL."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seeds data and random draws."),
        click.option("--force", is_flag=True, help="Replace an existing output directory."),
    ]):
        fn = decorator(fn)
    return fn


def bit_list(text: str, option: str, allowed: tuple[int, ...]) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        bits = ()
    if not bits or any(b not in allowed for b in bits):
        raise LowbitError(f"{option} {text!r}: expected comma-separated bit-widths from {list(allowed)}")
    return bits


def fraction(text: str, option: str) -> float:
    s = text.strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise LowbitError(f"{option} {text!r}: expected a percentage such as 1% (or a fraction such as 0.01)") from None
    if not 0 <= value < 1:
        raise LowbitError(f"{option} {text!r}: must be between 0% and 100%")
    return value
