"""Self-contained HTML evaluation report.

:func:`write_report` writes ``report.html`` (inline CSS, every figure an inline base64 PNG, no external
references, so the single file can be mailed or archived) plus the figures as separate PNG files. The caller
writes ``metrics.json``. All text that reaches the HTML goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from medlens.metrics import CI_METRICS
from medlens.report import trust as rt
from medlens.report.plots import (
    figure_png,
    plot_confusion,
    plot_errors,
    plot_pr,
    plot_reliability,
    plot_roc,
    select_errors,
)

__all__ = ["METRIC_LABELS", "write_report"]

METRIC_LABELS: dict[str, str] = {
    "auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity (recall, TPR)",
    "specificity": "Specificity (TNR)",
    "ppv": "PPV (precision)",
    "npv": "NPV",
    "f1": "F1 score",
    "ece": "Expected calibration error",
    "brier": "Brier score",
}
_LOWER_IS_BETTER = {"ece", "brier"}
_ERRORS_PER_KIND = 8

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       color: #1d2330; background: #f6f7f9; line-height: 1.45; }
main { max-width: 1150px; margin: 0 auto; padding: 1.5rem 2rem 3rem; background: #fff; }
h1 { margin: 0 0 .3rem; font-size: 1.7rem; }
h2 { margin-top: 2.2rem; border-bottom: 2px solid #e3e6ea; padding-bottom: .25rem; font-size: 1.3rem; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 .4rem; }
.meta { color: #5b6472; font-size: .9rem; }
.warning { background: #fff4e5; border-left: 5px solid #e08600; padding: .7rem 1rem; margin: 1rem 0;
           font-weight: 600; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .92rem; }
th, td { border: 1px solid #d8dce2; padding: .3rem .65rem; text-align: left; vertical-align: top; }
th { background: #eef1f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font-size: .85em; color: #5b6472; }
.figs { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; flex: 1 1 420px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e6ea; }
figcaption { font-size: .85rem; color: #5b6472; }
.note { font-size: .85rem; color: #5b6472; }
"""


# ------------------------------------------------------------------------------------------- formatting
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _fmt(value: Any, digits: int | None = 3) -> str:
    """Escaped display text for one value: floats to ``digits`` decimals (``None``: general format),
    NaN/None as 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        if digits is None:
            return f"{int(value):,}" if value.is_integer() and abs(value) < 1e15 else f"{value:.6g}"
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.3g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _e(value)


def _td(value: Any, digits: int | None = 3) -> str:
    cls = ' class="num"' if _is_number(value) else ""
    return f"<td{cls}>{_fmt(value, digits)}</td>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _figure(png: bytes, alt: str, caption: str) -> str:
    return f"<figure>{_img(png, alt)}<figcaption>{_e(caption)}</figcaption></figure>"


# ------------------------------------------------------------------------------------------- sections
def _metrics_table(metrics: Mapping[str, Any]) -> str:
    alpha = metrics.get("bootstrap", {}).get("alpha", 0.05) if isinstance(metrics.get("bootstrap"), Mapping) else 0.05
    level = f"{100 * (1 - float(alpha)):g}%"
    rows = []
    for key in list(CI_METRICS) + [k for k in metrics if k not in CI_METRICS and isinstance(metrics[k], Mapping)
                                   and "value" in metrics[k]]:
        if key not in metrics:
            continue
        entry = metrics[key]
        value, lo, hi = (entry.get("value"), entry.get("ci_low"), entry.get("ci_high")) \
            if isinstance(entry, Mapping) else (entry, None, None)
        ci = "n/a" if lo is None or hi is None or math.isnan(lo) or math.isnan(hi) else f"{lo:.3f} – {hi:.3f}"
        label = METRIC_LABELS.get(key, key) + (" (lower is better)" if key in _LOWER_IS_BETTER else "")
        rows.append(f"<tr><th>{_e(label)} <code>{_e(key)}</code></th>{_td(value)}<td class=\"num\">{_e(ci)}</td></tr>")
    boot = metrics.get("bootstrap")
    note = ""
    if isinstance(boot, Mapping):
        how = "stratified by class" if boot.get("stratified", True) else "not stratified"
        resamples = boot.get("resamples", boot.get("n_boot", "?"))
        if boot.get("unit") == "patient":
            unit = (f"resampling patients ({boot.get('n_units', '?')} patients, each with all of their images: "
                    "images of one patient are not independent)")
        else:
            unit = (f"resampling images ({boot.get('n_units', '?')} images; no patient ids were known, so images "
                    "of one patient, if any, count as independent and the intervals may be too narrow)")
        note = (f'<p class="note">{_e(level)} confidence intervals: {_e(boot.get("method", "percentile"))} bootstrap '
                f'{_e(unit)}, {_e(resamples)} resamples, {_e(how)}, seed {_e(boot.get("seed", "?"))}; '
                "the threshold is held fixed.</p>")
    return (f"<table><thead><tr><th>Metric</th><th>Value</th><th>{_e(level)} CI</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{note}")


def _counts_table(metrics: Mapping[str, Any], threshold: float, class_names: Sequence[str]) -> str:
    neg, pos = class_names
    items = [
        ("Threshold (predict positive when p ≥ threshold)", float(threshold)),
        ("Samples", metrics.get("n")), (f"True {pos} (positives)", metrics.get("n_pos")),
        (f"True {neg} (negatives)", metrics.get("n_neg")),
        (f"True positives ({pos} called {pos})", metrics.get("tp")),
        (f"False positives ({neg} called {pos})", metrics.get("fp")),
        (f"True negatives ({neg} called {neg})", metrics.get("tn")),
        (f"False negatives ({pos} called {neg})", metrics.get("fn")),
    ]
    rows = "".join(f"<tr><th>{_e(k)}</th>{_td(v, None)}</tr>" for k, v in items if v is not None)
    return f"<table><tbody>{rows}</tbody></table>"


def _errors_section(gallery: Sequence[dict], threshold: float, png: bytes | None, class_names: Sequence[str]) -> str:
    fps, fns = select_errors(gallery, threshold, _ERRORS_PER_KIND)
    parts = [f"<p>The {_ERRORS_PER_KIND} most confident false positives and false negatives among "
             f"{len(gallery)} samples provided; p is the predicted probability of {_e(class_names[1])}.</p>"]
    if png is not None:
        parts.append(_figure(png, "most confident errors", "Top row: false positives; bottom row: false negatives."))
    for kind, items in (("False positives", fps), ("False negatives", fns)):
        parts.append(f"<h3>{_e(kind)} ({len(items)} shown)</h3>")
        if not items:
            parts.append("<p>None.</p>")
            continue
        rows = "".join(
            f"<tr>{_td(float(g['prob']))}<td>{_e(class_names[int(g['label'])])}</td><td>{_e(g['path'])}</td></tr>"
            for g in items
        )
        parts.append(f"<table><thead><tr><th>p</th><th>True class</th><th>File</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table>")
    return "".join(parts)


def _subgroup_table(subgroups: Mapping[Any, Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for stats in subgroups.values():
        columns += [c for c in stats if c not in columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in ["group", *columns])
    rows = "".join(
        f"<tr><th>{_e(group)}</th>{''.join(_td(stats.get(c)) for c in columns)}</tr>"
        for group, stats in subgroups.items()
    )
    return (f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
            '<p class="note">Sensitivity per subgroup at the operating threshold; ci_low/ci_high are Wilson 95% '
            "intervals of the sensitivity. Small groups give wide intervals.</p>")


def _kv_table(data: Mapping[Any, Any]) -> str:
    """Key/value table; nested mappings become nested tables, lists are joined."""
    rows = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            cell = f"<td>{_kv_table(value) if value else 'n/a'}</td>"
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            cell = "<td>" + "".join(_kv_table(v) if isinstance(v, Mapping) else _fmt(v, None) for v in value) + "</td>"
        elif isinstance(value, (list, tuple, set)):
            cell = f"<td>{', '.join(_fmt(v, None) for v in value)}</td>"
        else:
            cell = _td(value, None)
        rows.append(f"<tr><th>{_e(key)}</th>{cell}</tr>")
    return f"<table><tbody>{''.join(rows)}</tbody></table>"


def _summary_section(summary: Mapping[str, Any]) -> str:
    scalars = {k: v for k, v in summary.items() if not isinstance(v, Mapping)}
    parts = [_kv_table(scalars)] if scalars else []
    for key, value in summary.items():
        if isinstance(value, Mapping):
            parts.append(f"<h3>{_e(str(key).replace('_', ' ').capitalize())}</h3>{_kv_table(value)}")
    return "".join(parts)


# ------------------------------------------------------------------------------------------- entry point
def write_report(
    out_dir: Path,
    *,
    metrics: dict,
    y_true,
    y_prob,
    threshold: float,
    class_names: list[str],
    errors_gallery: list[dict] | None = None,
    subgroups: dict | None = None,
    summary: dict | None = None,
    title: str = "medlens evaluation report",
    y_prob_uncalibrated=None,
    trust: dict | None = None,
) -> Path:
    """Write ``out_dir/report.html`` and ``roc.png``, ``pr.png``, ``confusion.png``, ``reliability.png`` (and
    ``errors.png`` when ``errors_gallery`` is given); return the path of ``report.html``.

    ``metrics`` is the output of :func:`medlens.metrics.metrics_with_ci` (plain :func:`binary_metrics` output
    also works, shown without intervals). ``class_names`` is ``[negative, positive]``. ``errors_gallery``
    items are ``{"image": HxW uint8 (or float in [0, 1]), "prob": float, "label": int, "path": str}``; they
    may include correct predictions, the errors are selected here. ``subgroups`` is the output of
    :func:`medlens.metrics.subgroup_sensitivity`; ``summary`` is free-form (nested dicts become sections).
    ``y_prob_uncalibrated`` (before temperature scaling) adds a second reliability diagram beside the first.
    ``trust`` holds the outputs of :mod:`medlens.trust` under ``selective``, ``faithfulness``, ``cam_gallery``
    and ``lung_energy`` (any may be missing) and adds the uncertainty and explanation sections.
    """
    if len(class_names) != 2:
        raise ValueError(f"class_names must be [negative, positive], got {class_names!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y_true).astype(int)
    p = np.asarray(y_prob, dtype=float)
    boot = metrics.get("bootstrap")
    n_bins = int(boot.get("ece_bins", 15)) if isinstance(boot, Mapping) else 15

    figures = {
        "roc": plot_roc(y, p, threshold),
        "pr": plot_pr(y, p, threshold),
        "confusion": plot_confusion(y, p, threshold, class_names),
        "reliability": plot_reliability(y, p, n_bins),
    }
    if y_prob_uncalibrated is not None:
        figures["reliability_uncalibrated"] = plot_reliability(y, np.asarray(y_prob_uncalibrated, dtype=float), n_bins)
    if errors_gallery is not None:
        figures["errors"] = plot_errors(errors_gallery, threshold, class_names, _ERRORS_PER_KIND)
    trust = trust or {}
    if trust.get("selective"):
        figures["selective"] = rt.plot_selective(trust["selective"])
    if trust.get("faithfulness"):
        figures["deletion_insertion"] = rt.plot_deletion_insertion(trust["faithfulness"])
    if trust.get("cam_gallery"):
        figures["cam_gallery"] = rt.plot_cam_gallery(trust["cam_gallery"], class_names)
    pngs: dict[str, bytes] = {}
    for name, fig in figures.items():
        pngs[name] = figure_png(fig)
        (out_dir / f"{name}.png").write_bytes(pngs[name])

    from medlens import __version__

    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"<header><h1>{_e(title)}</h1>",
        f'<p class="meta">Generated {_e(generated)} by medlens {_e(__version__)} · classes: '
        f"{_e(class_names[0])} (negative) vs {_e(class_names[1])} (positive) · {len(y)} samples · "
        f"threshold {_e(f'{threshold:.4g}')}</p>",
        '<p class="warning">Research use only. Not for diagnostic use: this model and report are not a medical '
        "device and must not be used to make clinical decisions.</p></header>",
        "<h2>Metrics</h2>", _metrics_table(metrics),
        "<h2>Operating point</h2>", _counts_table(metrics, threshold, class_names),
        '<h2>Discrimination</h2><div class="figs">',
        _figure(pngs["roc"], "ROC curve", "ROC curve; the red dot is the operating point."),
        _figure(pngs["pr"], "Precision-recall curve", "Precision-recall curve; the red dot is the operating point."),
        '</div><h2>Confusion matrix and calibration</h2><div class="figs">',
        _figure(pngs["confusion"], "Confusion matrix",
                "Counts at the operating threshold; percentages are of each true class (row)."),
        _figure(pngs["reliability"], "Reliability diagram",
                f"Calibration{' after temperature scaling' if 'reliability_uncalibrated' in pngs else ''} in "
                f"{n_bins} equal-width bins of the predicted probability; bin counts below."),
    ]
    if "reliability_uncalibrated" in pngs:
        body.append(_figure(pngs["reliability_uncalibrated"], "Reliability diagram before scaling",
                            "The same split before temperature scaling (temperature 1)."))
    body.append("</div>")
    if trust.get("selective"):
        body += ["<h2>Uncertainty and referral</h2>", rt.selective_html(
            trust["selective"], _figure(pngs["selective"], "Selective prediction",
                                        "Accuracy at the operating threshold as the most uncertain images are "
                                        "referred; dotted line: the referral policy's target coverage."))]
    if trust.get("cam_gallery") or trust.get("faithfulness") or trust.get("lung_energy"):
        body.append("<h2>Explanations</h2>")
    if trust.get("cam_gallery"):
        body += ["<h3>Where the model looked</h3>", _figure(
            pngs["cam_gallery"], "heat maps", "Most confident true positives, false positives and false negatives; "
            "the heat map explains the class shown at the operating threshold.")]
    if trust.get("faithfulness"):
        body += ["<h3>Are the maps faithful to the model?</h3>", rt.faithfulness_html(
            trust["faithfulness"], _figure(pngs["deletion_insertion"], "deletion and insertion curves",
                                           "Mean curves over the sampled images."))]
    if trust.get("lung_energy"):
        body += ["<h3>Do the maps fall on the lungs?</h3>", rt.lung_html(trust["lung_energy"])]
    if errors_gallery is not None:
        body += ["<h2>Most confident errors</h2>",
                 _errors_section(errors_gallery, threshold, pngs.get("errors"), class_names)]
    if subgroups:
        body += ["<h2>Subgroups</h2>", _subgroup_table(subgroups)]
    if summary:
        body += ["<h2>Data and model</h2>", _summary_section(summary)]

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><main>\n{chr(10).join(body)}\n</main></body></html>\n"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
