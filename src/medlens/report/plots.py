"""Evaluation figures as matplotlib ``Figure`` objects (Agg canvas, no pyplot, no global state).

Each ``plot_*`` function returns a Figure; :func:`figure_png` renders one to PNG bytes.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from medlens.metrics import binary_metrics, expected_calibration_error, reliability_curve

__all__ = ["figure_png", "plot_confusion", "plot_errors", "plot_pr", "plot_reliability", "plot_roc", "select_errors"]

_DPI = 120
_OP_STYLE = {"marker": "o", "markersize": 9, "color": "#d62728", "markeredgecolor": "black", "zorder": 5}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig: Figure) -> bytes:
    """PNG bytes of ``fig`` (no metadata, so nothing but pixels ends up in the report)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _operating_point(y_true, y_prob, threshold: float) -> dict[str, float]:
    with warnings.catch_warnings():  # an undefined PPV/NPV is shown as NaN, no need to warn twice
        warnings.simplefilter("ignore")
        return binary_metrics(y_true, y_prob, threshold)


def plot_roc(y_true, y_prob, threshold: float) -> Figure:
    """ROC curve with the chance diagonal and the operating point at ``threshold`` marked."""
    y, p = np.asarray(y_true), np.asarray(y_prob, dtype=float)
    fig = _new_figure(5.2, 5.0)
    ax = fig.add_subplot()
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2, color="#1f77b4", label=f"ROC (AUC = {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance")
    m = _operating_point(y, p, threshold)
    ax.plot(1 - m["specificity"], m["sensitivity"], ls="none", **_OP_STYLE,
            label=f"threshold {threshold:.3g}: sens {m['sensitivity']:.3f}, spec {m['specificity']:.3f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title="ROC curve", aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_pr(y_true, y_prob, threshold: float) -> Figure:
    """Precision-recall curve with the prevalence baseline and the operating point marked."""
    y, p = np.asarray(y_true), np.asarray(y_prob, dtype=float)
    fig = _new_figure(5.2, 5.0)
    ax = fig.add_subplot()
    if y.sum() > 0:
        precision, recall, _ = precision_recall_curve(y, p)
        ax.step(recall, precision, where="post", lw=2, color="#1f77b4",
                label=f"PR (AP = {average_precision_score(y, p):.3f})")
        prevalence = float(y.mean())
        ax.axhline(prevalence, ls="--", lw=1, color="grey", label=f"prevalence {prevalence:.3f}")
    m = _operating_point(y, p, threshold)
    ax.plot(m["sensitivity"], m["ppv"], ls="none", **_OP_STYLE,
            label=f"threshold {threshold:.3g}: recall {m['sensitivity']:.3f}, precision {m['ppv']:.3f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="Recall (sensitivity)", ylabel="Precision (PPV)",
           title="Precision-recall curve", aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def plot_confusion(y_true, y_prob, threshold: float, class_names: Sequence[str]) -> Figure:
    """2x2 confusion matrix at ``threshold``: counts and row percentages (share of each true class)."""
    m = _operating_point(y_true, y_prob, threshold)
    counts = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig = _new_figure(5.0, 4.4)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{counts[i, j]}\n({100 * share[i, j]:.1f}%)", ha="center", va="center", fontsize=13,
                    color="white" if share[i, j] > 0.6 else "black", parse_math=False)
    names = [str(c) for c in class_names]
    ax.set_xticks([0, 1], labels=names)
    ax.set_yticks([0, 1], labels=names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"Confusion matrix at threshold {threshold:.3g}\n(percentages of each true class)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="row share")
    return fig


def plot_reliability(y_true, y_prob, n_bins: int = 15) -> Figure:
    """Reliability diagram (observed frequency vs mean predicted probability) over a per-bin count histogram."""
    rc = reliability_curve(y_true, y_prob, n_bins)
    ece = expected_calibration_error(y_true, y_prob, n_bins) if np.asarray(y_true).size else float("nan")
    fig = _new_figure(5.2, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    width = 1.0 / n_bins
    filled = rc["counts"] > 0
    top.bar(rc["bin_centers"][filled], rc["observed_frequency"][filled], width=width * 0.9, color="#1f77b4",
            alpha=0.75, edgecolor="black", label="observed frequency")
    top.plot(rc["mean_predicted"][filled], rc["observed_frequency"][filled], "o-", color="#d62728", ms=4,
             label="(mean predicted, observed)")
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    top.set(ylim=(0, 1.02), ylabel="Fraction positive", title=f"Reliability diagram (ECE = {ece:.3f}, {n_bins} bins)")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bars = bottom.bar(rc["bin_centers"], rc["counts"], width=width * 0.9, color="grey", edgecolor="black")
    bottom.bar_label(bars, labels=[str(c) if c else "" for c in rc["counts"]], fontsize=7, padding=1)
    bottom.set(xlim=(0, 1), xlabel="Predicted probability of the positive class", ylabel="Count")
    bottom.set_ylim(0, max(1, int(rc["counts"].max())) * 1.3)
    return fig


def select_errors(gallery: Sequence[dict], threshold: float, k: int = 8) -> tuple[list[dict], list[dict]]:
    """The ``k`` most confident false positives (highest prob) and false negatives (lowest prob)."""
    fps = [g for g in gallery if int(g["label"]) == 0 and float(g["prob"]) >= threshold]
    fns = [g for g in gallery if int(g["label"]) == 1 and float(g["prob"]) < threshold]
    fps.sort(key=lambda g: -float(g["prob"]))
    fns.sort(key=lambda g: float(g["prob"]))
    return fps[:k], fns[:k]


def _show_image(ax, image) -> None:
    img = np.squeeze(np.asarray(image))
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        img = img[..., :3].mean(axis=-1)
    vmax = 255 if img.dtype == np.uint8 or float(np.nanmax(img, initial=0)) > 1.0 else 1.0
    ax.imshow(img, cmap="gray", vmin=0, vmax=vmax, interpolation="lanczos" if max(img.shape) > 256 else "nearest")


def _short(name: str, width: int = 22) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot_errors(gallery: Sequence[dict], threshold: float, class_names: Sequence[str], k: int = 8) -> Figure:
    """Grid of the most confident errors: false positives on the top row, false negatives below.

    Each tile shows the image with the positive-class probability and the file name underneath.
    """
    fps, fns = select_errors(gallery, threshold, k)
    ncols = max(1, len(fps), len(fns))
    fig = _new_figure(max(6.0, 1.9 * ncols), 5.4)
    neg, pos = (str(c) for c in class_names)
    rows = [
        (fps, f"False positives: true {neg}, predicted {pos} (most confident first)"),
        (fns, f"False negatives: true {pos}, predicted {neg} (most confident first)"),
    ]
    for sub, (items, heading) in zip(fig.subfigures(2, 1), rows, strict=True):
        sub.suptitle(heading, fontsize=11, fontweight="bold", x=0.01, ha="left")
        axes = np.atleast_1d(sub.subplots(1, ncols))
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        if not items:
            axes[0].text(0.0, 0.5, "none", fontsize=11, color="grey", transform=axes[0].transAxes)
        for ax, item in zip(axes, items, strict=False):
            _show_image(ax, item["image"])
            ax.set_xlabel(f"p = {float(item['prob']):.3f}\n{_short(Path(str(item['path'])).name)}", fontsize=8,
                          parse_math=False)
    return fig
