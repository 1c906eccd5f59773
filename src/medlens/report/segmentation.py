"""The segmentation report (``RUN/eval/SPLIT/report.html``) and mask overlays.

Overlay colours: green = lung in both the prediction and the reference, red = predicted but not in the reference
(false positive), blue = in the reference but missed (false negative), yellow = the reference's "ignore" region.
A prediction without a reference (``medlens segment``) is drawn as a red outline filled lightly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medlens.report.html import _CSS, _e, _fmt
from medlens.seg.data import FOREGROUND, IGNORE

_COLOURS = {"tp": (40, 200, 80), "fp": (230, 40, 40), "fn": (40, 110, 240), "ignore": (240, 210, 40)}


def _grey_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=-1).astype(np.float32)


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


def overlay(image: np.ndarray, pred: np.ndarray, ref: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """uint8 RGB: ``image`` (grey, uint8 or float in [0, 1]) with the predicted mask, against ``ref`` if given."""
    rgb = _grey_rgb(image)
    p = np.asarray(pred) == FOREGROUND
    if ref is None:
        regions = {"fp": p}
    else:
        r = np.asarray(ref)
        ignore = r == IGNORE
        regions = {"tp": p & (r == FOREGROUND), "fp": p & (r != FOREGROUND) & ~ignore,
                   "fn": ~p & (r == FOREGROUND), "ignore": ignore}
    for name, where in regions.items():
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.array(_COLOURS[name], dtype=np.float32)
    if ref is None:
        rgb[_outline(p)] = _COLOURS["fp"]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def save_overlay(path: Path, image: np.ndarray, pred: np.ndarray, ref: np.ndarray | None = None) -> Path:
    Image.fromarray(overlay(image, pred, ref)).save(path)
    return path


def _ci(m: dict) -> str:
    return f"{_fmt(m['value'], 4)} <span class=note>({_fmt(m['ci_low'], 4)}-{_fmt(m['ci_high'], 4)})</span>"


def write_segmentation_report(path: Path, result: dict[str, Any], card) -> Path:
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td class=num>{_ci(m['mean'])}</td><td class=num>{_ci(m['median'])}</td>"
        f"<td class=num>{m['n']}</td><td class=num>{m['n_missing']}</td></tr>"
        for name, m in result["metrics"].items())
    boot = result["bootstrap"]
    sub = ""
    for col, groups in result["subgroups"].items():
        sub += (f"<h3>By {_e(col)}</h3><table><tr><th>{_e(col)}</th><th>n</th><th>mean Dice</th></tr>"
                + "".join(f"<tr><td>{_e(g)}</td><td class=num>{v['n']}</td><td class=num>{_fmt(v['dice_mean'], 4)}"
                          "</td></tr>" for g, v in groups.items()) + "</table>")
    gallery = ""
    for kind, title in (("worst", "Worst images (lowest Dice)"), ("best", "Best images")):
        figs = "".join(
            f"<figure><img src=\"{_e(g['overlay'])}\" alt=\"{_e(Path(g['image']).name)}\"><figcaption>"
            f"{_e(Path(g['image']).name)}: Dice {_fmt(g['dice'], 3)}, HD95 {_fmt(g['hd95'], 1)}</figcaption></figure>"
            for g in result["gallery"].get(kind, []))
        gallery += f"<h2>{title}</h2><div class=figs>{figs}</div>"
    body = (
        f"<h1>Segmentation: {_e(card.model_id)} on {_e(result['split'])}</h1>"
        f"<p>{result['n']} images of {result['n_patients']} patients from <code>{_e(result['data'])}</code>; "
        f"post-processing <code>{_e(result['postprocess'])}</code> (chosen on validation). Distances in "
        f"{_e(result['units']['distances'])}.</p>"
        "<table><tr><th>metric</th><th>mean (95% CI)</th><th>median (95% CI)</th><th>n</th><th>missing</th></tr>"
        f"{rows}</table>"
        f"<p class=note>Intervals: percentile bootstrap, {boot['resamples']} resamples of {boot['n_units']} "
        f"{_e(boot['unit'])}s{' (each with all of its images)' if boot['unit'] == 'patient' else ''}. A missing "
        "distance is an image with an empty prediction (no surface to measure). The reference's ignore region "
        "counts in no metric.</p>"
        f"{sub}{gallery}"
        "<p class=note>Overlay colours: green = lung in both, red = predicted only (false positive), blue = missed "
        "(false negative), yellow = ignore region.</p>")
    html = ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>medlens segmentation report</title><style>{_CSS}</style></head><body>{body}</body></html>\n")
    path.write_text(html, encoding="utf-8")
    return path
