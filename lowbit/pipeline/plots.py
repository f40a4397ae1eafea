"""PNG plots for the sensitivity and search reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..sensitivity.artifact import Sensitivity, weight_key


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sensitivity_bars(sens: Sensitivity, path: Path) -> None:
    """Per-layer Hessian trace per parameter, with 95% confidence intervals, and Ω at each bit-width."""
    plt = _pyplot()
    names = [layer.name for layer in sens.layers]
    x = np.arange(len(names))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.22 * len(names)), 8), sharex=True)
    per_param = np.array([layer.trace / layer.params for layer in sens.layers])
    err = np.array([layer.trace_half_width / layer.params for layer in sens.layers])
    top.bar(x, per_param, yerr=err, capsize=2, color="tab:blue", ecolor="black")
    top.set_yscale("log")
    top.set_ylabel("Tr(H) / n (95% CI)")
    top.set_title(f"{sens.model}: Hessian trace per parameter (top-{sens.head_classes} classes exact + "
                  f"{sens.trace_draws} Hutchinson draws, {sens.samples} samples)")
    width = 0.8 / len(sens.bits)
    for k, b in enumerate(sens.bits):
        bottom.bar(x + (k - (len(sens.bits) - 1) / 2) * width, [layer.omega(b) for layer in sens.layers], width,
                   label=f"{b}-bit")
    bottom.set_yscale("log")
    bottom.set_ylabel("Ω(b) = Tr(H)/n · ‖ΔW‖²")
    bottom.legend(ncol=len(sens.bits), loc="upper right")
    bottom.set_xticks(x, names, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cross_term_heatmap(sens: Sensitivity, bits: int, path: Path) -> None:
    """Inter-layer terms at one bit-width, normalised as δ_iᵀHδ_j / sqrt(δ_iᵀHδ_i · δ_jᵀHδ_j)."""
    plt = _pyplot()
    names = [layer.name for layer in sens.layers]
    where = {k: i for i, k in enumerate(sens.keys)}
    idx = [where[weight_key(n, bits)] for n in names]
    block = sens.cross[np.ix_(idx, idx)]
    diag = np.sqrt(np.clip(np.diag(block), 1e-30, None))
    corr = block / np.outer(diag, diag)
    fig, ax = plt.subplots(figsize=(9, 8))
    image = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_title(f"{sens.model}: inter-layer Hessian terms at {bits}-bit weights (normalised)")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
    ax.set_yticks(range(len(names)), names, fontsize=5)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_plot(points: list[dict[str, Any]], metric: str, path: Path, title: str) -> None:
    """Measured fidelity (top-1 agreement, or embedding cosine) against the budget metric, for every plan
    measured; the chosen one marked."""
    from ..search.fidelity import TOP1, fidelity_of_record

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    fidelity = fidelity_of_record(points[0]["measured"]) if points else TOP1
    scale = 100 if fidelity is TOP1 else 1
    xs = [p["costs"][metric] for p in points]
    ys = [scale * p["measured"]["score"] for p in points]
    ax.scatter(xs, ys, color="tab:blue", label="plans measured")
    intervals = [p["measured"].get("score_interval") for p in points]
    if all(i and None not in i for i in intervals):  # bootstrap 95% intervals as error bars
        below = [y - scale * low for y, (low, _) in zip(ys, intervals, strict=True)]
        above = [scale * high - y for y, (_, high) in zip(ys, intervals, strict=True)]
        ax.errorbar(xs, ys, yerr=[below, above], fmt="none", ecolor="tab:blue", alpha=0.35, capsize=2)
    order = np.argsort(xs)
    best = -np.inf
    front = []
    for i in order:  # the Pareto front: no cheaper plan agrees better
        if ys[i] > best:
            front.append(i)
            best = ys[i]
    ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:blue", alpha=0.6, label="Pareto front")
    chosen = [i for i, p in enumerate(points) if p.get("chosen")]
    if chosen:
        ax.scatter([xs[i] for i in chosen], [ys[i] for i in chosen], s=160, facecolors="none", edgecolors="tab:red",
                   linewidths=2, label="chosen plan")
    ax.set_xlabel({"size": "weight size (bytes)", "bops": "BOPs", "latency": "latency (ms)"}[metric])
    ax.set_ylabel("top-1 agreement with FP32 (%), bootstrap 95% interval" if fidelity is TOP1
                  else "mean embedding cosine with FP32, bootstrap 95% interval")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
