"""The trust part of the report: uncertainty and referral, explanations and their faithfulness.

Figures are built here from the dictionaries of :mod:`medlens.trust`; :func:`trust_sections` returns the
HTML (the caller embeds the PNGs it is given back).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medlens.report.plots import _new_figure, _short

_METHOD_LABELS = {"softmax": "single pass", "mc": "MC dropout", "tta": "test-time augmentation",
                  "ensemble": "deep ensemble"}


def _label(method: str) -> str:
    return _METHOD_LABELS.get(method, method)


def plot_selective(selective: Mapping[str, Any]) -> Figure:
    """Accuracy (at the operating threshold) against coverage, one line per uncertainty method."""
    fig = _new_figure(5.6, 4.2)
    ax = fig.subplots()
    for method, entry in selective["methods"].items():
        curve = entry["curve"]
        ax.plot(curve["coverage"], curve["accuracy"], "o-", ms=3, label=f"{_label(method)} (gain "
                f"{100 * entry['gain']:+.1f} pts at {selective['coverage']:.0%})")
    ax.axvline(selective["coverage"], color="grey", ls=":", lw=1)
    ax.invert_xaxis()
    ax.set(xlabel="Coverage (share of images kept; the most uncertain are referred)",
           ylabel="Accuracy on the kept images", title="Selective prediction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def plot_deletion_insertion(faith: Mapping[str, Any]) -> Figure:
    """Mean deletion and insertion curves of the maps against the random pixel order."""
    c = faith["curves"]
    fig = _new_figure(8.4, 3.6)
    for ax, kind, better in zip(fig.subplots(1, 2), ("deletion", "insertion"), ("lower", "higher"), strict=True):
        ax.plot(c["fractions"], c[kind], "-", color="#d62728", label=f"{faith['method']} "
                f"(AUC {faith[kind + '_auc']:.3f})")
        ax.plot(c["fractions"], c[kind + "_random"], "--", color="grey",
                label=f"random order (AUC {faith[kind + '_auc_random']:.3f})")
        ax.set(xlabel=f"Share of pixels {'removed' if kind == 'deletion' else 'restored'}",
               ylabel="Probability of the shown class", ylim=(0, 1.02),
               title=f"{kind.capitalize()} ({better} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def plot_cam_gallery(gallery: Sequence[dict], class_names: Sequence[str], alpha: float = 0.4) -> Figure:
    """Rows: true positives, false positives, false negatives; each tile the image with its heat map."""
    from medlens.explain import overlay

    kinds = [k for k in ("true positive", "false positive", "false negative") if any(g["kind"] == k for g in gallery)]
    ncols = max([sum(g["kind"] == k for g in gallery) for k in kinds] + [1])
    fig = _new_figure(max(6.0, 2.0 * ncols), 2.5 * max(1, len(kinds)))
    subs = np.atleast_1d(fig.subfigures(max(1, len(kinds)), 1))
    neg, pos = (str(c) for c in class_names)
    titles = {"true positive": f"True positives ({pos} called {pos})",
              "false positive": f"False positives ({neg} called {pos})",
              "false negative": f"False negatives ({pos} called {neg})"}
    for sub, kind in zip(subs, kinds, strict=False):
        sub.suptitle(titles[kind], fontsize=10, fontweight="bold", x=0.01, ha="left")
        axes = np.atleast_1d(sub.subplots(1, ncols))
        for ax in axes:
            ax.set_axis_off()
        for ax, item in zip(axes, [g for g in gallery if g["kind"] == kind], strict=False):
            ax.set_axis_on()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(overlay(item["image"], item["cam"], alpha=alpha))
            ax.set_xlabel(f"p = {item['prob']:.3f}\n{_short(Path(str(item['path'])).name)}", fontsize=8,
                          parse_math=False)
    return fig


def _e(v: Any) -> str:
    return html.escape(str(v))


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def selective_html(selective: Mapping[str, Any], figure: str) -> str:
    cov = selective["coverage"]
    rows = []
    for method, m in selective["methods"].items():
        pol = m.get("policy") or {}
        rows.append(
            f"<tr><th>{_e(_label(method))}</th><td class='num'>{m['passes']}</td>"
            f"<td class='num'>{_pct(m['accuracy'])}</td><td class='num'>{_pct(m['accuracy_kept'])}</td>"
            f"<td class='num'>{100 * m['gain']:+.1f}</td>"
            f"<td class='num'>{100 * m.get('gain_predictive_entropy', float('nan')):+.1f}</td>"
            f"<td class='num'>{_num(m['errors_auc'])}</td>"
            f"<td class='num'>{_num(pol.get('refer_threshold'), 4)}</td><td class='num'>{_pct(pol.get('referred'))}</td>"
            f"<td class='num'>{_pct(pol.get('accuracy_not_referred'))}</td>"
            f"<td class='num'>{pol.get('errors_referred', 'n/a')} / {pol.get('errors', 'n/a')}</td></tr>")
    return (
        "<p>Uncertainty is the <b>decision entropy</b>: the entropy of the calibrated probability after shifting it "
        "in logit space so that the operating threshold sits at 0.5, i.e. how close the call is to flipping (the "
        "ordinary predictive entropy is centred on 0.5, where this model's calls are firm; its gain is shown for "
        f"comparison). <b>Gain</b>: accuracy on the "
        f"{cov:.0%} most certain images of this split minus accuracy on all of them (points). <b>Error AUROC</b>: how "
        "well the uncertainty separates errors from correct calls (0.5 = blind). The <b>referral policy</b> columns "
        "apply the threshold chosen on held-apart validation data (stored in the model card) to this split: on a "
        "shifted split the share referred can differ from the intended one.</p>"
        "<table><thead><tr><th>Method</th><th>Passes</th><th>Accuracy (all)</th>"
        f"<th>Accuracy ({cov:.0%} most certain)</th><th>Gain (pts)</th><th>Gain with predictive entropy (pts)</th>"
        "<th>Error AUROC</th>"
        "<th>Refer threshold (nats)</th><th>Referred</th><th>Accuracy not referred</th>"
        f"<th>Errors referred</th></tr></thead><tbody>{''.join(rows)}</tbody></table>{figure}")


def faithfulness_html(faith: Mapping[str, Any], figure: str) -> str:
    rho, iqr = faith.get("randomisation_spearman_median"), faith.get("randomisation_spearman_iqr")
    verdict_del = ("lower than" if faith["deletion_auc"] < faith["deletion_auc_random"] else "NOT lower than")
    if rho is None:
        verdict_rho = "n/a: every map of the randomised model was constant, so no rank correlation exists"
    elif rho < 0.5:
        verdict_rho = "the maps depend on the learned weights"
    else:
        verdict_rho = ("the maps change little when the top layers are re-initialised: they may show the image "
                       "more than the model")
    iqr_text = f" (IQR {iqr[0]:.2f} – {iqr[1]:.2f})" if iqr else ""
    return (
        f"<p>On {faith['n']} images of this split sampled with the run's seed, {_e(faith['method'])} maps of the shown "
        f"class. <b>Deletion</b> removes the most important pixels first (replaced by a blurred copy) and "
        f"<b>insertion</b> restores them onto the blurred image, in {faith['steps']} steps; the reference ranks "
        "pixels at random.</p><table><thead><tr><th></th><th>Map</th><th>Random order</th>"
        "<th>Images where the map beats random</th></tr></thead><tbody>"
        f"<tr><th>Deletion AUC (lower is better)</th><td class='num'>{faith['deletion_auc']:.3f}</td>"
        f"<td class='num'>{faith['deletion_auc_random']:.3f}</td>"
        f"<td class='num'>{_pct(faith['deletion_better_than_random'])}</td></tr>"
        f"<tr><th>Insertion AUC (higher is better)</th><td class='num'>{faith['insertion_auc']:.3f}</td>"
        f"<td class='num'>{faith['insertion_auc_random']:.3f}</td>"
        f"<td class='num'>{_pct(faith['insertion_better_than_random'])}</td></tr></tbody></table>"
        f"<p>Deletion AUC of the maps is {verdict_del} the random order's. <b>Model randomisation check</b> "
        f"({_e(faith['randomisation_layers'])}): median Spearman correlation between the maps of the trained and "
        f"the randomised model {_num(rho, 2)}{iqr_text}: {verdict_rho}.</p>{figure}")


def lung_html(lung: Mapping[str, Any]) -> str:
    skipped = f" {len(lung['skipped'])} pair(s) could not be read." if lung.get("skipped") else ""
    if lung.get("flat_maps"):
        skipped += f" {lung['flat_maps']} map(s) were all zero and are left out."
    return (
        f"<p>{_e(lung['method'])} maps of {lung['n']} chest X-rays with lung masks (<code>{_e(lung['source'])}</code>;"
        " these are other patients and other scanners than the training data, so the model's own predictions on them "
        f"are not scored here).{skipped}</p><table><tbody>"
        f"<tr><th>Map energy inside the lung fields (mean / median)</th><td class='num'>"
        f"{_pct(lung['energy_in_lungs_mean'])} / {_pct(lung['energy_in_lungs_median'])}</td></tr>"
        f"<tr><th>Lung area (what an evenly spread map would give)</th><td class='num'>{_pct(lung['lung_area_mean'])}</td></tr>"
        f"<tr><th>Ratio (energy share / area share)</th><td class='num'>{_num(lung['ratio_to_area'], 2)}</td></tr>"
        f"<tr><th>Images with more energy in the lungs than their area</th><td class='num'>"
        f"{_pct(lung['share_above_area'])}</td></tr></tbody></table>")
