"""`load(DIR)`: verify a compiled artifact (hashes, CPU features) and wrap its VM for numpy callers."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import LowbitError

if TYPE_CHECKING:  # the text modules are imported on first use: an image model's runtime needs only this file
    from .decoder import DecoderModel
    from .tokenizer import TextTokenizer

TVM_DIR = "tvm"
TVM_META = "tvm.json"
TVM_FORMAT = "lowbit-tvm-v1"
MANIFEST = "manifest.json"
DECODER_KIND = "decoder"  # manifest.json's "kind" of a weight-quantized decoder LLM (runtime/decoder.py)
# x86 instruction sets that decide whether compiled code can run here, as LLVM names them.
X86_FEATURES = ("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vnni",
                "avxvnni", "avx512bf16", "avx512fp16", "amx-int8", "amx-tile")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(directory: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """Relative POSIX path -> {sha256, bytes} for every file under `directory`, sorted by path."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    hashes = {}
    for path in files:
        rel = path.relative_to(directory).as_posix()
        if rel not in exclude:
            hashes[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return hashes


def verify_manifest(directory: Path) -> list[str]:
    """Problems found checking the files against `manifest.json` (empty when everything matches)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return [f"{directory / MANIFEST}: cannot read: {e}"]
    expected = manifest.get("files", {})
    actual = file_hashes(directory)
    problems = [f"{name}: missing" for name in sorted(set(expected) - set(actual))]
    problems += [f"{name}: not listed in the manifest" for name in sorted(set(actual) - set(expected))]
    problems += [f"{name}: sha256 mismatch" for name in sorted(set(expected) & set(actual))
                 if expected[name]["sha256"] != actual[name]["sha256"]]
    return problems


def host_features() -> list[str]:
    """The instruction sets of this machine's CPU, as LLVM reports them."""
    import tvm

    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    return [f for f in X86_FEATURES if tvm.target.codegen.target_has_features(f, host)]


class CompiledModel:
    """A compiled model: `.run(x)` returns what `model.int.onnx` returns in ONNX Runtime, bit for bit."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        import tvm
        from tvm import relax

        self.directory = directory
        self.meta = meta
        self.target = meta["target_string"]
        self.device = tvm.cuda(0) if meta["target"]["kind"] == "cuda" else tvm.cpu(0)
        if meta["target"]["kind"] == "llvm":
            use_threads(int(meta["target"].get("num-cores", 1)))
        library = tvm.runtime.load_module(str(directory / "model.so"))
        self._vm = relax.VirtualMachine(library, self.device)
        with np.load(directory / "params.npz", allow_pickle=False) as arrays:
            self._params = [tvm.runtime.tensor(arrays[f"p{i}"], self.device) for i in range(len(meta["params"]))]
        self.inputs: list[dict[str, Any]] = meta["inputs"]
        self.outputs: list[dict[str, Any]] = meta["outputs"]
        # `main` returns these after the float outputs (artifacts from before they were added have none).
        self.integer_outputs: list[dict[str, Any]] = meta.get("integer_outputs", [])
        # One device buffer per input, refilled by each call: a fresh one would cost an allocation and its page
        # faults every call; a VM is not for concurrent callers anyway. `main` is
        # bound to those buffers and the params once: passing hundreds of arguments per call costs time too.
        self._input_buffers = [tvm.runtime.empty(tuple(i["shape"]), _dtype(i).name, self.device) for i in self.inputs]
        self._vm.save_function("main", "lowbit_main_bound", *self._input_buffers, *self._params)
        self._main = self._vm["lowbit_main_bound"]
        # On the CPU, numpy views of the buffers (DLPack) copy in and out faster than Tensor.copyfrom/.numpy.
        self._on_cpu = self.device.dlpack_device_type() == tvm.cpu(0).dlpack_device_type()
        self._input_views = [np.from_dlpack(b) for b in self._input_buffers] if self._on_cpu else []
        self._tokenizer: TextTokenizer | None = None

    def _check(self, spec: dict[str, Any], x: Any) -> np.ndarray:
        x = np.asarray(x)
        want = tuple(spec["shape"])
        if x.ndim != len(want) or x.shape[1:] != want[1:] or x.shape[0] % want[0]:
            raise LowbitError(f"input {spec['name']!r}: expected shape {want} (or a multiple of batch {want[0]}), "
                              f"got {x.shape}")
        dtype = _dtype(spec)
        if np.issubdtype(dtype, np.floating):
            if not np.issubdtype(x.dtype, np.floating):
                raise LowbitError(f"input {spec['name']!r}: expected {dtype} data, got {x.dtype}")
        elif not np.issubdtype(x.dtype, np.integer):
            raise LowbitError(f"input {spec['name']!r}: expected integer ({dtype}) data, got {x.dtype}")
        elif x.size and (x.min() < np.iinfo(dtype).min or x.max() > np.iinfo(dtype).max):
            raise LowbitError(f"input {spec['name']!r}: values {x.min()}..{x.max()} do not fit {dtype}")
        elif x.size and "range" in spec and not spec["range"][0] <= x.min() <= x.max() <= spec["range"][1]:
            lo, hi = spec["range"]
            raise LowbitError(f"input {spec['name']!r}: values {x.min()}..{x.max()} outside [{lo}, {hi}] (token ids "
                              "of another tokenizer?); the model only takes ids in that range")
        return np.ascontiguousarray(x, dtype=dtype)

    def run(self, x: np.ndarray | None = None, **named: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """One input positionally (or all by name); one output as an array, several as a dict by name.

        A batch larger than the compiled one runs in chunks of the compiled batch size.
        """
        floats = self._run_all(self._named(x, named), self.outputs)
        return next(iter(floats.values())) if len(floats) == 1 else floats

    def run_integers(self, x: np.ndarray | None = None, **named: np.ndarray) -> dict[str, np.ndarray]:
        """The integer outputs before the final dequantize, by name: what the backends must match bit for bit.

        (Float32 outputs cannot show it: above 2^24 distinct int32 values round to one float.)"""
        if not self.integer_outputs:
            raise LowbitError(f"{self.directory}: compiled without integer outputs (an older lowbit); recompile "
                              "with `lowbit compile DIR --force`")
        return self._run_all(self._named(x, named), self.integer_outputs)

    def encode(self, texts: Sequence[str], warn: Callable[[str], None] | None = None) -> np.ndarray:
        """A text model's embeddings of `texts`, float32 [len(texts), hidden].

        Tokenized with the artifact's tokenizer.json and padded to the compiled sequence length; a
        sentence longer than that is cut, and `warn` (default: warnings.warn) hears how many were."""
        from .text import encode_texts, text_tokenizer

        if self._tokenizer is None:
            recorded = (read_manifest(self.directory.parent).get("text") or {}).get("seq_len")
            self._tokenizer = text_tokenizer(self.directory.parent, self.inputs, recorded)
        output = self._embedding_output()

        def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            return self._run_all({"input_ids": ids, "attention_mask": mask}, [output])[output["name"]]

        return encode_texts(run, self._tokenizer, texts, int(self.inputs[0]["shape"][0]), warn)

    def _embedding_output(self) -> dict[str, Any]:
        from .text import EMBEDDING

        if len(self.outputs) == 1:
            return self.outputs[0]
        named = [o for o in self.outputs if o["name"] == EMBEDDING]
        if not named:
            raise LowbitError(f"{self.directory.parent}: {len(self.outputs)} outputs and none named {EMBEDDING!r}; "
                              "encode() needs the embedding output")
        return named[0]

    def _named(self, x: np.ndarray | None, named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if x is not None:
            if len(self.inputs) != 1 or named:
                raise LowbitError(f"this model takes inputs {[i['name'] for i in self.inputs]}: pass them by name")
            named = {self.inputs[0]["name"]: x}
        missing = [i["name"] for i in self.inputs if i["name"] not in named]
        extra = sorted(set(named) - {i["name"] for i in self.inputs})
        if missing or extra:
            raise LowbitError(f"inputs: missing {missing}, unexpected {extra}")
        return named

    def _run_all(self, named: dict[str, np.ndarray], wanted: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """The `wanted` outputs (of those `main` returns: float outputs, then integer ones), batch by batch."""
        arrays = [self._check(spec, named[spec["name"]]) for spec in self.inputs]
        batch = self.inputs[0]["shape"][0]
        chunks = arrays[0].shape[0] // batch
        returned = [spec["name"] for spec in [*self.outputs, *self.integer_outputs]]
        picked = [returned.index(spec["name"]) for spec in wanted]
        results: list[list[np.ndarray]] = [[] for _ in wanted]
        for c in range(chunks):
            self._fill_inputs([a[c * batch:(c + 1) * batch] for a in arrays])
            out = self._main()
            outs = [out] if len(returned) == 1 else out
            for k, index in enumerate(picked):  # copy out only what was asked for
                o = outs[index]
                results[k].append(np.from_dlpack(o).copy() if self._on_cpu else o.numpy())
        return {spec["name"]: np.concatenate(r) for spec, r in zip(wanted, results, strict=True)}

    def _fill_inputs(self, arrays: list[np.ndarray]) -> None:
        if self._on_cpu:
            for view, a in zip(self._input_views, arrays, strict=True):
                np.copyto(view, a)
        else:
            for buffer, a in zip(self._input_buffers, arrays, strict=True):
                buffer.copyfrom(a)

    def benchmark(self, x: np.ndarray | None = None, repeats: int = 200, warmup: int = 20) -> dict[str, float]:
        """Latency of one call at the compiled batch size (the model alone: inputs already on the device),
        in ms (median, mean, min, p90)."""
        rng = np.random.default_rng(0)
        arrays = [example_input(spec, rng) for spec in self.inputs]
        if x is not None:
            arrays[0] = self._check(self.inputs[0], x)[:self.inputs[0]["shape"][0]]
        self._fill_inputs(arrays)
        t = time_calls_ms(self._main, repeats, warmup, sync=self.device.sync)
        return {"median_ms": float(np.median(t)), "mean_ms": float(t.mean()), "min_ms": float(t.min()),
                "p90_ms": float(np.percentile(t, 90)), "runs": repeats}


def _dtype(spec: dict[str, Any]) -> np.dtype:
    """An input's dtype (float32 for artifacts from before tvm.json recorded integer inputs)."""
    return np.dtype(spec.get("dtype", "float32"))


def example_input(spec: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Timing data for an input of tvm.json: standard normal floats, or ones for integers (a valid token id, and
    a mask of all tokens)."""
    dtype = _dtype(spec)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(spec["shape"]).astype(dtype)
    return np.ones(spec["shape"], dtype)


def time_calls_ms(fn: Callable[[], object], repeats: int, warmup: int = 0,
                  sync: Callable[[], object] | None = None) -> np.ndarray:
    """Wall-clock milliseconds of each of `repeats` calls of `fn`, after `warmup` untimed ones.

    `sync` waits for the device to finish, so asynchronous work is inside the timing. The one timing
    loop of lowbit (it lives here because the runtime must import nothing else of lowbit).
    """
    for _ in range(warmup):
        fn()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times[i] = (time.perf_counter() - start) * 1e3
    return times


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """Median wall-clock milliseconds of a call of `fn` (see `time_calls_ms`)."""
    return float(np.median(time_calls_ms(fn, repeats, warmup)))


def _read_meta(tvm_dir: Path) -> dict[str, Any]:
    path = tvm_dir / TVM_META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise LowbitError(f"{tvm_dir.parent}: no compiled model ({TVM_DIR}/{TVM_META} is missing); "
                          f"run `lowbit compile {tvm_dir.parent}` first") from None
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: cannot read: {e}") from e
    needed = ("format", "target", "target_string", "required_features", "inputs", "outputs", "params", "files")
    if not isinstance(meta, dict) or meta.get("format") != TVM_FORMAT or any(k not in meta for k in needed):
        raise LowbitError(f"{path}: not a {TVM_FORMAT} description (recompile with `lowbit compile`)")
    return meta


def read_manifest(directory: Path) -> dict[str, Any]:
    """DIR/manifest.json, or {} when there is none (a model compiled on its own)."""
    path = directory / MANIFEST
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path}: cannot read: {e}") from e
    if not isinstance(manifest, dict):
        raise LowbitError(f"{path}: not a lowbit manifest (expected a JSON object)")
    return manifest


def _verify(directory: Path, meta: dict[str, Any]) -> None:
    tvm_dir = directory / TVM_DIR
    manifest = directory / MANIFEST
    if manifest.exists():
        content = read_manifest(directory)
        try:
            files = content["files"]
            listed = files[f"{TVM_DIR}/{TVM_META}"]["sha256"]
            # A text model's tokenizer.json is part of the model: other ids would be other inputs.
            tokenizer_name = (content.get("text") or {}).get("tokenizer")
            tokenizer_hash = None if tokenizer_name is None else files[tokenizer_name]["sha256"]
        except (KeyError, TypeError, AttributeError) as e:
            raise LowbitError(f"{manifest}: does not list {e} of the compiled model; recompile the artifact") from e
        if listed != sha256_file(tvm_dir / TVM_META):
            raise LowbitError(f"{tvm_dir / TVM_META}: sha256 does not match {manifest}; the artifact was modified")
        if tokenizer_name is not None:
            tokenizer = directory / tokenizer_name
            if not tokenizer.is_file() or sha256_file(tokenizer) != tokenizer_hash:
                raise LowbitError(f"{tokenizer}: missing, or its sha256 does not match {manifest}; the artifact was "
                                  "modified or damaged")
    for name, digest in meta["files"].items():
        path = tvm_dir / name
        if not path.is_file():
            raise LowbitError(f"{path}: missing from the compiled artifact")
        if sha256_file(path) != digest:
            raise LowbitError(f"{path}: sha256 does not match {TVM_META}; the artifact was modified or damaged")


_USER_THREADS = os.environ.get("TVM_NUM_THREADS")  # a user's setting always wins


def available_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def use_threads(threads: int) -> None:
    """Size TVM's CPU thread pool: `threads` (the target's cores), at most the CPUs this process may use.

    Left alone, TVM takes half the logical CPUs, assuming the other half are hyper-threads; on a machine
    without SMT that idles half the cores. TVM reads the count from $TVM_NUM_THREADS when it (re)builds its pool.
    """
    import tvm

    if _USER_THREADS:
        return
    threads = max(1, min(threads, available_cpus()))
    os.environ["TVM_NUM_THREADS"] = str(threads)
    tvm.get_global_func("runtime.config_threadpool")(1, threads)


def _check_device(meta: dict[str, Any]) -> None:
    import tvm

    target = meta["target_string"]
    if meta["target"]["kind"] == "cuda":
        if not tvm.cuda(0).exist:
            raise LowbitError(f"this artifact was compiled for {target!r}, but no CUDA GPU is visible here")
        return
    missing = sorted(set(meta["required_features"]) - set(host_features()))
    if missing:
        raise LowbitError(f"this artifact was compiled for {target!r}, which uses {', '.join(missing)}, and this "
                          f"CPU lacks them; recompile for this machine: lowbit compile DIR --target "
                          "'llvm -mcpu=native' --force")


def read_verified_meta(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    """DIR/tvm/tvm.json, after checking the files' hashes against it and the manifest (`verify`)."""
    directory = Path(directory)
    meta = _read_meta(directory / TVM_DIR)
    if verify:
        _verify(directory, meta)
    return meta


def load(directory: str | Path, verify: bool = True, backend: str = "auto") -> CompiledModel | DecoderModel:
    """Load DIR (a `lowbit quantize`/`lowbit compile` output) for running; checks hashes and the CPU first.

    A decoder LLM's artifact gives a `DecoderModel` (`.generate(prompt, max_new_tokens=N)`), whose files are
    always checked against the manifest; `backend` picks its engine: "tvm" (the artifact's compiled kernels),
    "numpy", or "auto" (tvm where the artifact has its library and TVM runs here)."""
    directory = Path(directory)
    if read_manifest(directory).get("kind") == DECODER_KIND:
        from .decoder import DecoderModel  # on use: a CNN's deployment needs only this file

        return DecoderModel(directory, backend)
    meta = read_verified_meta(directory, verify)
    _check_device(meta)
    return CompiledModel(directory / TVM_DIR, meta)
