"""The start of every pipeline: load the model and its data, and capture the float graph.

`quantize`, `sensitivity` and `search` all begin with `prepare(Source(...))`. An image model takes one float
array; a text model (a BERT-family directory, or a zoo text model) takes sentences, tokenized here into its
named inputs `input_ids` and `attention_mask` (see `pipeline.text`).
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import LowbitError
from ..models.zoo import ZOO_PREFIX, ZooEntry, entry_is_not_a_decoder, get_zoo_entry
from ..quantizer.graph import Graph
from ..quantizer.smooth import SmoothReport, parse_smooth, resolve_smooth, smooth
from ..runtime.text import EMBEDDING as TEXT_OUTPUT
from . import report as reports
from .data import (
    Inputs,
    check_disjoint,
    check_input_shape,
    imagenet_preprocess_for,
    is_array_file,
    load_inputs,
    split_heldout,
    validate_inputs,
)
from .progress import Progress
from .text import TextModel, read_text_data, text_model_directory, tokenize_text_data

# Calibration or held-out data: a file or folder (.npy/.npz or images), or an (N, C, H, W) float array;
# for a text model a text file (one sentence per line) or the sentences themselves.
Data = Path | str | np.ndarray | Sequence[str]


@dataclass(frozen=True)
class Source:
    """What a pipeline starts from: MODEL as the CLI names it, and its data (None: the zoo's own sets)."""

    model: str
    calib: Data | None = None
    heldout: Data | None = None
    factory: str | None = None  # MODULE:FUNCTION that builds the model of a state dict
    seed: int = 0
    seq_len: int | None = None  # a text model's static sequence length (None: 128, or less if the model's is)


@dataclass
class Prepared:
    """A captured model with its calibration and held-out data: what every command starts from."""

    source: Source
    graph: Graph
    calib: Inputs
    heldout: Inputs
    entry: ZooEntry | None
    text: TextModel | None = None  # a text model's tokenizer and sequence length, which its artifact carries
    smooth: str = "none"  # the SmoothQuant setting `graph` was smoothed with (`smooth_prepared`)

    @property
    def seq_len(self) -> int | None:
        """A text model's static sequence length; None for other models."""
        return self.text.seq_len if self.text else None


def smooth_prepared(prepared: Prepared, setting: str, progress: Progress) -> tuple[Prepared, SmoothReport | None]:
    """SmoothQuant on the prepared graph, as `setting` (--smooth: none, auto, an alpha, or default, resolved
    per graph) asks; the returned Prepared records the resolved setting. quantize, search and sensitivity all
    start from it, so a plan is searched (and its sensitivity measured) on the graph that quantize builds."""
    setting = resolve_smooth(setting, prepared.graph)
    alpha = parse_smooth(setting)
    if alpha is None:
        return replace(prepared, smooth=setting), None
    with progress.stage("smooth"):
        inputs = {k: torch.from_numpy(v) for k, v in prepared.calib.feed(list(prepared.graph.inputs)).items()}
        smoothed, report = smooth(prepared.graph, inputs, alpha)
    applied = sum(g.applied for g in report.groups)
    progress.echo("smooth", f"SmoothQuant (alpha {alpha}): {applied}/{len(report.groups)} groups of linears "
                            f"smoothed ({progress.timings['smooth']:.1f}s)")
    return replace(prepared, graph=smoothed, smooth=setting), report


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def samples(n: int, noun: str = "sample") -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def program_input_shape(program: torch.export.ExportedProgram) -> tuple[int, ...] | None:
    """The static shape of the program's first user input, if it has one."""
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            try:
                return tuple(int(s) for s in node.meta["val"].shape)
            except (KeyError, TypeError, ValueError):  # dynamic dimensions
                return None
    return None


def _as_path(data: Data | None) -> Path | None:
    return Path(data) if isinstance(data, str | Path) else None


def _read_data(data: Data, what: str, entry: ZooEntry | None, shape: tuple[int, ...] | None) -> Inputs:
    if isinstance(data, list | tuple):
        raise LowbitError(f"the {what} data: a list of sentences is for text models; this model takes an image "
                          "folder, a .npy/.npz or an (N, C, H, W) float array")
    if isinstance(data, np.ndarray):
        where = f"the {what} array"
        return Inputs(validate_inputs(data, where), f"{where} ({len(data)} samples, given in Python)")
    path = Path(data)
    preprocess = None
    if path.is_dir():
        if entry is not None and entry.preprocess is not None:
            preprocess = entry.preprocess
        elif shape is not None:
            preprocess = imagenet_preprocess_for(shape, str(path))
    return load_inputs(path, preprocess, what)


def load_data(source: Source, entry: ZooEntry | None, shape: tuple[int, ...] | None) -> tuple[Inputs, Inputs]:
    """Calibration and held-out inputs, disjoint; `shape` (when known) sizes images from folders."""
    if entry is not None:
        shape = shape or entry.input_shape
    given = {what: data for what, data in (("calibration", source.calib), ("held-out", source.heldout))
             if data is not None}
    loaded: dict[str, Inputs] = {}
    # Arrays first: a folder of images for a non-zoo model takes its size from them.
    folders_last = sorted(given.items(), key=lambda item: isinstance(item[1], str | Path)
                          and not is_array_file(Path(item[1])))
    for what, data in folders_last:
        loaded[what] = _read_data(data, what, entry, shape)
        shape = shape or (1, *loaded[what].x.shape[1:])

    seed = source.seed
    if "calibration" in loaded:
        calib = loaded["calibration"]
    elif entry is not None:
        calib = Inputs(entry.calibration(seed), f"{ZOO_PREFIX}{entry.name} calibration set, seed {seed}",
                       entry.calibration_photos(seed) if entry.calibration_photos else None)
    else:
        raise LowbitError(f"{source.model}: calibration data is needed for a model outside the zoo: "
                          "pass --calib (an image folder, .npy or .npz)")
    if "held-out" in loaded:
        heldout = loaded["held-out"]
    elif entry is not None:
        heldout = Inputs(entry.heldout(seed), f"{ZOO_PREFIX}{entry.name} held-out set, seed {seed}",
                         entry.heldout_photos(seed) if entry.heldout_photos else None)
    else:
        return split_heldout(calib)
    calib_path, heldout_path = _as_path(source.calib), _as_path(source.heldout)
    if calib_path is not None and heldout_path is not None and calib_path.resolve() == heldout_path.resolve():
        raise LowbitError(f"--calib and --eval are the same ({heldout_path}); held-out data must be disjoint "
                          "from calibration")
    check_disjoint(calib, heldout)
    return calib, heldout


def prepare(source: Source, progress: Progress) -> Prepared:
    """Load data and model, and capture the float graph (shared by quantize, sensitivity and search)."""
    from ..quantizer.capture import capture
    from ..quantizer.quantize import check_calibration_data

    seed_everything(source.seed)
    spec = source.model
    entry = get_zoo_entry(spec) if spec.startswith(ZOO_PREFIX) else None
    if entry is not None:
        entry_is_not_a_decoder(entry)
    text_dir = text_model_directory(spec, entry)
    if text_dir is not None:
        return _prepare_text(source, entry, text_dir, progress)
    if source.seq_len is not None:
        raise LowbitError(f"--seq-len {source.seq_len}: {spec} is not a text model; --seq-len applies to text "
                          "models (zoo:minilm_l6, or a Hugging Face-style directory of a BERT-family encoder)")
    # A missing model file is the first thing to say: asking for calibration data first would send a new user
    # after the wrong problem.
    if entry is None and not Path(spec).is_file():
        raise LowbitError(f"{spec}: no such file (MODEL is zoo:NAME, a .pt2, a TorchScript file, a state dict, or "
                          "a Hugging Face-style directory)")
    if entry is None and source.calib is None:
        raise LowbitError(f"{spec}: calibration data is needed for a model outside the zoo: pass --calib "
                          "(an image folder, or a preprocessed .npy/.npz of shape (N, C, H, W))")

    # Data first, so bad data fails fast. A .pt2 program is loaded first only when an image folder must
    # be resized to its input; other non-zoo models are traced with an input shaped like the data.
    program = None
    folders = [p for p in (_as_path(source.calib), _as_path(source.heldout)) if p is not None and p.is_dir()]
    if entry is None and Path(spec).suffix == ".pt2" and folders:
        program = _load(spec, None, source.factory, progress)

    with progress.stage("data"):
        calib, heldout = load_data(source, entry, program_input_shape(program) if program else None)
    _echo_data(calib, heldout, progress)

    if program is None:
        example = None if entry is not None else torch.zeros((1, *calib.x.shape[1:]))
        program = _load(spec, example, source.factory, progress)

    with progress.stage("capture"):
        graph = capture(program, entry.name if entry else Path(spec).stem)
        check_calibration_data(graph, calib.x, calib.source)
        check_input_shape(heldout.x, graph.node(graph.inputs[0]).shape, heldout.source)
    _echo_capture(graph, progress)
    return Prepared(source, graph, calib, heldout, entry)


def _prepare_text(source: Source, entry: ZooEntry | None, directory: Path, progress: Progress) -> Prepared:
    """`prepare` for a text model: sentences first (bad text fails fast), then the encoder, tokens, capture."""
    from ..models.loading import export_text_encoder
    from ..models.minilm import load_text_encoder
    from ..quantizer.capture import capture
    from ..quantizer.quantize import check_calibration_data

    spec = source.model
    if source.factory is not None:
        raise LowbitError(f"--factory builds the model of a state dict; {spec} is a text model, built from its "
                          "directory's config.json: drop --factory")
    with progress.stage("data"):
        calib_text, heldout_text = read_text_data(spec, source.calib, source.heldout, entry, source.seed)
    progress.echo("load", f"{spec} (text encoder)")
    with progress.stage("load"), _quiet_torch():
        encoder = load_text_encoder(directory, source.seq_len)
        program = export_text_encoder(encoder, spec)
    seq_len = encoder.seq_len
    progress.echo("load", f"exported program ready at seq_len {seq_len} ({progress.timings['load']:.1f}s)")
    with progress.stage("data"):
        calib, heldout = tokenize_text_data(encoder, calib_text, heldout_text,
                                            lambda message: progress.echo("data", f"warning: {message}"))
    _echo_data(calib, heldout, progress)
    with progress.stage("capture"):
        graph = capture(program, entry.name if entry else directory.resolve().name)
        graph = graph.with_output_names([TEXT_OUTPUT])
        check_calibration_data(graph, calib.data, calib.source)
        check_calibration_data(graph, heldout.data, heldout.source)
    _echo_capture(graph, progress)
    text = TextModel(directory, seq_len, encoder.model.config.vocab_size)
    return Prepared(source, graph, calib, heldout, entry, text)


def _echo_data(calib: Inputs, heldout: Inputs, progress: Progress) -> None:
    for what, inputs in (("calibration", calib), ("held-out", heldout)):
        progress.echo("data", f"{what}: {samples(len(inputs), inputs.noun)} ({inputs.describe_photos()}), "
                              f"{inputs.source}")


def _echo_capture(graph: Graph, progress: Progress) -> None:
    s = graph.summary()
    progress.echo("capture", f"{s['nodes']} nodes, {s['layers']} quantizable layers, "
                             f"{reports.fmt_count(s['macs'])} MACs, {reports.fmt_count(s['params'])} parameters "
                             f"({progress.timings['capture']:.1f}s)")


@contextmanager
def _quiet_torch() -> Iterator[None]:
    """Hide torch's tracing chatter (warnings and log lines about specialized dims) from the progress log."""
    loggers = [logging.getLogger(name) for name in ("torch._export", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _load(spec: str, example: torch.Tensor | None, factory: str | None,
          progress: Progress) -> torch.export.ExportedProgram:
    from ..models.loading import load_program

    progress.echo("load", f"{spec}{f' (--factory {factory})' if factory else ''}")
    with progress.stage("load"), _quiet_torch():
        program = load_program(spec, example, factory)
    progress.echo("load", f"exported program ready ({progress.timings['load']:.1f}s)")
    return program
