"""Figures of an evaluation or a detection: ROC and precision-recall curves, score histograms per
class, one panel per image (input | B' | mask | heat map), the mask grid.

Each figure is a function that returns PNG bytes (``*_png``); ``plot_*`` writes the same bytes to a
file atomically, and report.py embeds them in report.html, so the page and the PNGs are the same
figures. matplotlib runs headless (Agg).
"""
from __future__ import annotations

import io
import os
from typing import Optional

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from a2b_dist.files import write_atomic


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _known(result: dict) -> tuple[np.ndarray, np.ndarray]:
    labels = result["label"]
    known = labels >= 0
    return known, (labels[known] > 0).astype(int)


def _curves(result: dict, score: str) -> list[tuple[str, np.ndarray, bool]]:
    curves = [(f"score {k}", v, k == score) for k, v in result["scores"].items()]
    return curves + [(f"reference {k}", v, False) for k, v in result["references"].items()]


def _curves_png(result: dict, score: str, kind: str) -> bytes:
    """ROC (``kind="roc"``) or precision-recall curves of every score and reference, the area in
    the legend; the chosen score drawn bold, references dashed."""
    plt = _pyplot()
    known, y = _known(result)
    fig, ax = plt.subplots(figsize=(5, 5))
    if 0 < y.sum() < y.size:
        for name, values, main in _curves(result, score):
            if kind == "roc":
                fpr, tpr, _ = roc_curve(y, values[known])
                xs, ys, area = fpr, tpr, f"AUROC {roc_auc_score(y, values[known]):.3f}"
            else:
                precision, recall, _ = precision_recall_curve(y, values[known])
                xs, ys, area = recall, precision, f"AUPR {average_precision_score(y, values[known]):.3f}"
            ax.plot(xs, ys, lw=2.5 if main else 1.2, ls="-" if name.startswith("score") else "--",
                    label=f"{name}: {area}")
        if kind == "pr":
            ax.axhline(y.mean(), color="grey", lw=0.8, ls=":")     # a detector at chance: the prevalence
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC ({y.size} images)")
    else:
        ax.set(xlabel="recall (sensitivity)", ylabel="precision", title=f"precision-recall ({y.size} images)")
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    if 0 < y.sum() < y.size:
        ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    else:   # one class (or none): no curve, and no empty legend for matplotlib to warn about
        ax.text(0.5, 0.5, f"undefined: {int(y.sum())} anomalous and {int(y.size - y.sum())} healthy images;\n"
                "a curve needs both classes", ha="center", va="center", fontsize=9)
    return _png(fig)


def roc_png(result: dict, score: str) -> bytes:
    return _curves_png(result, score, "roc")


def pr_png(result: dict, score: str) -> bytes:
    return _curves_png(result, score, "pr")


def histogram_png(result: dict, score: str, threshold: Optional[float]) -> bytes:
    """The chosen score's distribution per class (healthy, anomalous; unlabelled when present), the
    threshold drawn."""
    plt = _pyplot()
    values, labels = result["scores"][score], result["label"]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    groups = [("healthy", labels == 0, "tab:blue"), ("anomalous", labels > 0, "tab:red"),
              ("unlabelled", labels < 0, "tab:grey")]
    finite = values[np.isfinite(values)]
    bins = np.linspace(finite.min(), finite.max(), 41) if finite.size and finite.min() < finite.max() else 20
    for name, sel, colour in groups:
        if sel.any():
            ax.hist(values[sel], bins=bins, alpha=0.55, color=colour, label=f"{name} ({int(sel.sum())})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="black", lw=1.2, ls="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel=f"score ({score})", ylabel="images", title="scores per class")
    ax.legend(fontsize=8)
    return _png(fig)


def _display(img: np.ndarray) -> tuple[np.ndarray, Optional[str]]:
    """(C, H, W) in [-1, 1] -> an imshow array in [0, 1] and its colour map."""
    u = np.clip((img + 1) / 2, 0, 1)
    return (u[0], "gray") if u.shape[0] == 1 else (u.transpose(1, 2, 0), None)


def map_scale_label(scale: Optional[dict]) -> str:
    """The colour bar's words for a run's map scale {"percentile": p, "value": v}."""
    if not scale or not scale.get("value"):
        return "|x - B'| (0 to 1)"
    return f"|x - B'|, 0 to {scale['value']:.3g} (the {scale['percentile']:g}th percentile of this set's maps)"


def panel_png(key: str, label: Optional[int], score: float, arrays: dict, scale: Optional[dict] = None) -> bytes:
    """input | healthy translation B' | mask M | difference map over the input (ground truth outlined).

    ``scale`` ({"percentile": p, "value": v}): the heat map runs from 0 to v, the same for every panel
    of a run, so that healthy panels stay dark and anomalies light up; without it, 0 to 1."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(10, 2.9))
    x, cmap = _display(arrays["x"])
    b, _ = _display(arrays["b_prime"])
    axes[0].imshow(x, cmap=cmap, vmin=0, vmax=1)
    axes[1].imshow(b, cmap=cmap, vmin=0, vmax=1)
    axes[2].imshow(arrays["mask"], cmap="viridis", vmin=0, vmax=1)
    axes[3].imshow(x, cmap=cmap, vmin=0, vmax=1)
    # One colour scale for every panel of a run (|x - B'| in the [-1, 1] image units), so panels compare.
    vmax = scale["value"] if scale and scale.get("value") else 1.0
    heat = axes[3].imshow(arrays["diff"], cmap="inferno", alpha=0.55, vmin=0, vmax=vmax)
    bar = fig.colorbar(heat, ax=axes[3], fraction=0.046, pad=0.04)
    bar.set_label(map_scale_label(scale), fontsize=6)
    if arrays["gt"] is not None and arrays["gt"].any():
        for ax in (axes[0], axes[2], axes[3]):
            ax.contour(arrays["gt"], levels=[0.5], colors="cyan", linewidths=0.8)
    for ax, title in zip(axes, ("input", "healthy translation B'", "mask M", "|x - B'| on input")):
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{key}  " + (f"label {label}  " if label is not None else "") + f"score {score:.4g}", fontsize=9)
    return _png(fig)


def masks_png(panels: dict) -> bytes:
    """Masks on healthy and anomalous images: per class a row of inputs and a row of their masks."""
    plt = _pyplot()
    cols = max(1, max(len(panels[0]), len(panels[1])))
    fig, axes = plt.subplots(4, cols, figsize=(1.6 * cols, 6.8), squeeze=False)
    for row, (cls, name) in enumerate(((0, "healthy"), (1, "anomalous"))):
        for c in range(cols):
            ax_img, ax_mask = axes[2 * row, c], axes[2 * row + 1, c]
            ax_img.axis("off")
            ax_mask.axis("off")
            if c >= len(panels[cls]):
                continue
            _, arrays = panels[cls][c]
            x, cmap = _display(arrays["x"])
            ax_img.imshow(x, cmap=cmap, vmin=0, vmax=1)
            ax_mask.imshow(arrays["mask"], cmap="viridis", vmin=0, vmax=1)
            if arrays["gt"] is not None and arrays["gt"].any():
                ax_mask.contour(arrays["gt"], levels=[0.5], colors="red", linewidths=0.8)
        axes[2 * row, 0].set_title(f"{name}: input", fontsize=8, loc="left")
        axes[2 * row + 1, 0].set_title(f"{name}: mask M (0-1; red: ground truth)", fontsize=8, loc="left")
    return _png(fig)


def plot_roc(path: str | os.PathLike, result: dict, score: str) -> None:
    write_atomic(path, roc_png(result, score))


def plot_panel(path: str | os.PathLike, key: str, label: Optional[int], score: float, arrays: dict,
               scale: Optional[dict] = None) -> None:
    write_atomic(path, panel_png(key, label, score, arrays, scale))


def plot_masks(path: str | os.PathLike, panels: dict) -> None:
    write_atomic(path, masks_png(panels))


def safe_name(key: str) -> str:
    """A key or relative path as a file name: anything but letters, digits, - _ . becomes _."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
