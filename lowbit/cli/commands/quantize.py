"""`lowbit quantize MODEL -o DIR`: load, capture, quantize, export, evaluate, compile and check, into one DIR.

The work is `lowbit.pipeline.quantize`; this module only turns options into its arguments.
"""

from __future__ import annotations

from pathlib import Path

import click

from ...codegen.onnx import ONNX_WEIGHTS
from ...errors import LowbitError
from ...io import check_output_dir
from ...pipeline.checks import tvm_available
from ...pipeline.decoder import is_decoder, quantize_decoder_model
from ...pipeline.decoder_search import read_decoder_plan
from ...pipeline.progress import Progress
from ...pipeline.quantize import quantize
from ...quantizer.config import CALIB_METHODS, ROUNDINGS, QuantConfig
from ...quantizer.vq import VQ_PRESETS
from ...quantizer.weight_only import WeightOnlyConfig
from ..options import (
    fraction,
    rpc_options,
    rpc_target,
    seq_len_option,
    smooth_option,
    tuning_options,
    user_errors,
)

# Option defaults follow the quantizer's own, so the CLI never silently overrides them.
DEFAULTS = QuantConfig()
W8A8 = "w8a8"
DECODER_WEIGHTS = ("int8", "int4", "int3", "int2", *VQ_PRESETS, W8A8)
DEFAULT_DECODER_WEIGHTS, DEFAULT_DECODER_GROUP = "int4", 128
# Options of the integer pipeline that mean nothing for a weight-only decoder (--target builds its decode kernels).
DECODER_IGNORES = ("eval_path", "seq_len", "factory", "bits", "max_drop", "calib_method",
                   "output_aware_ranges", "tune_trials", "tuning_cache", "rpc_tracker", "rpc_key",
                   "onnx_weights", "allow_mismatch")


@click.command("quantize")
@click.argument("model")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
              help="Artifact directory to create (must not exist unless --force).")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Calibration data: an image folder, or a preprocessed (N, C, H, W) float .npy/.npz; for a text "
                   "model a .txt file, one sentence per line. Default for zoo models: the zoo's calibration set.")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path),
              help="Held-out data for the report (same formats). Default: the zoo's held-out set, "
                   "else the last 20% of the calibration data.")
@seq_len_option(" Static per artifact: inputs are [batch, SEQ_LEN], and longer sentences are truncated with a "
                "warning.")
@click.option("--factory", metavar="MODULE:FUNCTION",
              help="Builds the model for a state-dict MODEL (.safetensors/.pt).")
@click.option("--bits", type=int, default=DEFAULTS.bits, show_default=True,
              help="Weight bit-width of every layer, unless --plan gives one per layer: 8, 4, or 7 (int8 on the "
                   "7-bit grid [-63, 63]: on CPUs without VNNI, TVM's GEMMs then run the exact u8 x s8 byte-pair "
                   "instruction, faster than int8's int16 pairs).")
@click.option("--weights", "weight_format", type=click.Choice(DECODER_WEIGHTS),
              help="Decoder LLMs: group-wise weight-only integers of this width (asymmetric, one scale and zero "
                   "point per group; default int4), or vector quantization at about 3 or 2 bits per weight (vq3: "
                   "vectors of 4 weights, a 256-entry codebook and a 16-entry residual one; vq2: no residual): "
                   "activations stay float32. w8a8: int8 weights (per output channel unless --group) and int8 "
                   "activations quantized per token at run time, SmoothQuant-smoothed (--smooth).")
@click.option("--group", type=click.IntRange(min=0),
              help="Decoder LLMs: input columns per scale and zero point (32, 64, 128; 0: one per output channel). "
                   "Default 128.")
@click.option("--zero-point", type=click.Choice(("int", "float")),
              help="Decoder LLMs: per group an integer zero point with a float32 scale (int, the default), or a "
                   "float16 minimum and scale as GGUF's Q4_1 (float; lossless at --group 32 on SmolLM2, whose "
                   "released weights are Q4_1, but worse than int at group 128: BENCHMARKS.md smollm2_weights).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path),
              help="A bit plan (plan.json from `lowbit search`): weight bits per layer.")
@click.option("--max-drop", help="Keep activation tensors at 16 bits where they pay: the plan with the fewest extra "
                                 "BOPs whose measured top-1 agreement is at most this much (e.g. 0.5%) below the "
                                 "plan with every such tensor at 16 bits (a search, as `lowbit search "
                                 "--wide-activations` runs).")
@click.option("--calib-method", type=click.Choice(CALIB_METHODS), default=DEFAULTS.calib_method, show_default=True,
              help="How activation ranges are chosen; auto: the method with the least output error on a "
                   "validation split of the calibration data.")
@click.option("--rounding", type=click.Choice(ROUNDINGS), default=DEFAULTS.rounding, show_default=True,
              help="Weight rounding; auto: GPTQ on the layers where it lowers the error on the validation split "
                   "(and only if the whole model gains), round-to-nearest elsewhere. Decoder LLMs: gptq is GPTQ with "
                   "act-order, the best measured on SmolLM2, and also what auto picks.")
@click.option("--output-aware-ranges", is_flag=True,
              help="With --calib-method auto: refine each 8-bit activation's range by the error at the network "
                   "output, kept only if the validation split agrees (slow: minutes on MobileNetV2).")
@smooth_option(" Decoder LLMs: auto (default) or none: SmoothQuant+ before the weight rounding, alpha per group "
               "of linears by the rounding's output error.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds numpy/torch and the zoo data; the same seed gives the same model.int.onnx.")
@click.option("--target", help='Compile with TVM for this target, e.g. "llvm -mcpu=native" (the default when TVM is '
                               'installed); "none" skips compiling. Decoder LLMs: the decode kernels (int2/3/4/8 '
                               'and VQ linears; W8A8 runs on numpy).')
@tuning_options
@rpc_options
@click.option("--onnx-weights", type=click.Choice(ONNX_WEIGHTS), default="auto", show_default=True,
              help="How model.onnx stores weights for ONNX Runtime. int8: its fast u8 x s8 kernels, exact on x86 "
                   "CPUs with VNNI and on ARM, but they may saturate on older x86 CPUs; safe: weights above 64 in "
                   "magnitude as uint8, exact everywhere and about half as fast; auto: int8 if this CPU is exact "
                   "with it. Pick safe when model.onnx will run on x86 CPUs without VNNI.")
@click.option("--force", is_flag=True, help="Replace an existing output directory (once the new one is done).")
@click.option("--allow-mismatch", is_flag=True,
              help="Keep the artifact even when a check fails (a backend differing from the reference executor, or "
                   "a float tensor in model.int.onnx), for debugging; report.md then says so at the top.")
@user_errors
def quantize_command(model: str, output: Path, calib: Path | None, eval_path: Path | None, seq_len: int | None,
                     factory: str | None, bits: int, weight_format: str | None, group: int | None,
                     zero_point: str | None, plan_path: Path | None, max_drop: str | None,
                     calib_method: str, rounding: str, output_aware_ranges: bool, smooth: str, seed: int,
                     target: str | None,
                     tune_trials: int | None, tuning_cache: Path | None, rpc_tracker: str | None,
                     rpc_key: str | None, onnx_weights: str, force: bool, allow_mismatch: bool) -> None:
    """Quantize MODEL to integers and write an artifact directory.

    MODEL is zoo:NAME, a torch.export program (.pt2), a TorchScript file, a
    state dict (.safetensors or .pt) with --factory, or a Hugging Face-style
    directory (config.json, model.safetensors, tokenizer.json) of a BERT-family
    text encoder. A decoder LLM (zoo:smollm2_135m, or a Llama .gguf file) is
    quantized weight-only instead: --weights, --group, --rounding, --calib.
    """
    if is_decoder(model):
        check_output_dir(output, force)
        config = decoder_config(weight_format, group, rounding, smooth, plan_path, zero_point == "float")
        _refuse_encoder_options(click.get_current_context(), config.describe())
        target = resolve_target(target)  # TVM decode kernels, checked against the numpy runtime
        progress = Progress()
        quantize_decoder_model(model, config, calib, progress=progress).save(output, force, target,
                                                                             progress=progress)
        return
    if weight_format is not None or group is not None or zero_point is not None:
        raise LowbitError(f"--weights, --group and --zero-point are for decoder LLMs (zoo:smollm2_135m, a .gguf "
                          f"file); {model} is quantized to integers by --bits / --plan")
    config = QuantConfig(bits=bits, calib_method=calib_method, rounding=rounding,
                         output_aware_ranges=output_aware_ranges, smooth=smooth, seed=seed)
    drop = fraction(max_drop, "--max-drop") if max_drop is not None else None
    target = resolve_target(target)
    if tune_trials is not None and target is None:
        raise LowbitError("--tune-trials needs a compile target (TVM installed, and not --target none)")
    rpc = rpc_target(rpc_tracker, rpc_key)
    if rpc is not None and target is None:
        raise LowbitError("--rpc-tracker checks and times the compiled model remotely: it needs a compile target "
                          "(TVM installed, and not --target none)")
    if rpc is not None:
        from ...codegen.tvm.remote import require_devices

        require_devices(rpc)
    check_output_dir(output, force)  # fail before the slow part, not after it
    progress = Progress()
    artifact = quantize(model, calib, config, heldout=eval_path, factory=factory, plan=plan_path,
                        max_drop=drop, progress=progress, seq_len=seq_len)
    artifact.save(output, target=target, tune_trials=tune_trials, tuning_cache=tuning_cache,
                  onnx_weights=onnx_weights, force=force, allow_mismatch=allow_mismatch, progress=progress, rpc=rpc)


def decoder_config(weight_format: str | None, group: int | None, rounding: str,
                   smooth: str = DEFAULTS.smooth, plan_path: Path | None = None,
                   float_minimum: bool = False) -> WeightOnlyConfig:
    """The weight-only config of a decoder from the CLI's options. GPTQ runs with act-order: plain GPTQ measured
    worse than round-to-nearest on SmolLM2 (BENCHMARKS.md smollm2_weights); auto is `WeightOnlyConfig`'s default,
    the best setting measured there. --smooth: auto (the default) searches alpha per fold, none turns smoothing
    off (VQ: smoothing is not applied, it was not measured with codebooks)."""
    weight_format = weight_format or DEFAULT_DECODER_WEIGHTS
    if weight_format in VQ_PRESETS:
        if group is not None or plan_path is not None or float_minimum:
            raise LowbitError(f"--group, --plan and --zero-point are for group-wise integer weights; --weights "
                              f"{weight_format} has codebooks instead of groups: leave them out")
        if rounding == "auto":
            return WeightOnlyConfig(vq=VQ_PRESETS[weight_format])
        return WeightOnlyConfig(vq=VQ_PRESETS[weight_format], rounding="rtn" if rounding == "nearest" else "gptq",
                                act_order=rounding == "gptq")
    w8a8 = weight_format == W8A8
    if w8a8 and (plan_path is not None or float_minimum):
        raise LowbitError("--weights w8a8 has uniform int8 weights with integer zero points: leave out --plan and "
                          "--zero-point float")
    bits = 8 if w8a8 else int(weight_format.removeprefix("int"))
    plan: dict[str, int] = {}
    if plan_path is not None:  # a mixed plan from `lowbit search`; --weights sets the linears it does not name
        searched = read_decoder_plan(plan_path)
        if group is not None and group != searched.group:
            raise LowbitError(f"--group {group}: {plan_path} was searched for group {searched.group}; drop --group "
                              "or search again with it")
        group, plan = searched.group, searched.bits
    group = (0 if w8a8 else DEFAULT_DECODER_GROUP) if group is None else group
    if smooth not in (DEFAULTS.smooth, "auto", "none"):
        raise LowbitError(f"--smooth {smooth}: a decoder's smoothing searches alpha per group of linears; give "
                          "auto or none")
    extra: dict = {"smooth": smooth != "none"}  # on by default: it lowered INT4 perplexity (smollm2_weights)
    extra["plan"] = tuple(plan.items())
    extra["float_minimum"] = float_minimum
    extra["activation_bits"] = 8 if w8a8 else 0
    if rounding == "auto":
        return WeightOnlyConfig(bits=bits, group=group, **extra)
    return WeightOnlyConfig(bits=bits, group=group, rounding="rtn" if rounding == "nearest" else "gptq",
                            act_order=rounding == "gptq", **extra)


def _refuse_encoder_options(ctx: click.Context, what: str) -> None:
    """A decoder is quantized weight-only: options of the integer pipeline would be silently ignored."""
    from click.core import ParameterSource

    ignored = [f"--{name.replace('_', '-')}" for name in DECODER_IGNORES
               if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)]
    if ignored:
        raise LowbitError(f"{', '.join(ignored)}: not used for a decoder LLM, which is quantized weight-only "
                          f"({what}); drop {'it' if len(ignored) == 1 else 'them'}")


def resolve_target(target: str | None) -> str | None:
    """The TVM target to compile for: the native CPU by default when TVM is installed, none with "none"."""
    if target is not None and target.strip().lower() == "none":
        return None
    if not tvm_available():
        if target is not None:
            raise LowbitError(f"--target {target!r}: TVM is not installed (pip install 'lowbit[tvm]'), or pass "
                              "--target none")
        return None
    from ...codegen.tvm.target import DEFAULT_TARGET, parse_target

    parse_target(target or DEFAULT_TARGET)  # a bad target fails before the slow part
    return target or DEFAULT_TARGET
