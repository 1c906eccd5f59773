"""Tests for the self-contained HTML evaluation report (medlens.report)."""

from __future__ import annotations

import base64
import io
import warnings
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from medlens.metrics import (
    CI_METRICS,
    UndefinedMetricWarning,
    binary_metrics,
    metrics_with_ci,
    subgroup_sensitivity,
)
from medlens.report import METRIC_LABELS, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["NORMAL", "PNEUMONIA"]
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}


class _Page(HTMLParser):
    """Collects images, attributes and text, and checks that every non-void tag is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.images: list[str] = []
        self.urls: list[str] = []
        self.text: list[str] = []
        self.problems: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "action") and v]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _data(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0.0, 1.0)
    return y, p


def _gallery(y, p):
    yy, xx = np.mgrid[0:64, 0:64]
    return [
        {"image": ((xx + yy * (i % 3)) % 256).astype(np.uint8), "prob": float(p[i]), "label": int(y[i]),
         "path": f"/data/test/{CLASSES[y[i]]}/img_{i:04d}.jpeg"}
        for i in range(len(y))
    ]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    y, p = _data()
    threshold = 0.5
    metrics = metrics_with_ci(y, p, threshold, n_boot=200)
    groups = np.where(y == 1, np.where(np.arange(len(y)) % 3 == 0, "virus", "bacteria"), "normal")
    subgroups = subgroup_sensitivity(y, (p >= threshold).astype(int), groups)
    out = tmp_path_factory.mktemp("report")
    summary = {
        "seed": 0,
        "model": {"name": "resnet18", "parameters": 11_170_000.0, "input_size": [1, 224, 224]},
        "data": {"root": "/data/<chest & xray>", "splits": {"train": 5216, "val": 16, "test": 624}},
    }
    path = write_report(out, metrics=metrics, y_true=y, y_prob=p, threshold=threshold, class_names=CLASSES,
                        errors_gallery=_gallery(y, p), subgroups=subgroups, summary=summary,
                        title="Pneumonia <script>alert(1)</script> & co")
    return {"path": path, "out": out, "metrics": metrics, "y": y, "p": p, "threshold": threshold}


def test_writes_report_and_pngs(full_report):
    out = full_report["out"]
    assert full_report["path"] == out / "report.html" and full_report["path"].is_file()
    for name in ("roc", "pr", "confusion", "reliability", "errors"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC), name
        img = mpimg.imread(io.BytesIO(data), format="png")
        assert img.shape[0] >= 400 and img.shape[1] >= 400, (name, img.shape)  # legible size
        assert img[..., :3].std() > 0.05, name  # not a blank canvas
    assert not (out / "metrics.json").exists()  # the caller writes metrics.json


def test_report_is_valid_self_contained_html(full_report):
    page = _parse(full_report["path"])
    assert not page.problems and not page.stack, (page.problems, page.stack)
    assert page.tags[0] == "html" and "script" not in page.tags and "link" not in page.tags
    raw = full_report["path"].read_text(encoding="utf-8")
    assert raw.count("data:image/png;base64,") == 5 == len(page.images)
    assert "http://" not in raw and "https://" not in raw
    assert all(u.startswith("data:image/png;base64,") for u in page.urls), page.urls
    # the inline images are the PNG files written beside the report
    files = {(full_report["out"] / f"{n}.png").read_bytes() for n in ("roc", "pr", "confusion", "reliability", "errors")}
    inline = {base64.b64decode(src.split(",", 1)[1], validate=True) for src in page.images}
    assert inline == files


def test_report_content(full_report):
    page = _parse(full_report["path"])
    text = " ".join(page.text)
    assert "not for diagnostic use" in text.lower() and "research use" in text.lower()
    metrics = full_report["metrics"]
    for key in CI_METRICS:
        assert METRIC_LABELS[key] in text and key in text
        lo, hi = metrics[key]["ci_low"], metrics[key]["ci_high"]
        assert f"{metrics[key]['value']:.3f}" in text
        assert f"{lo:.3f} – {hi:.3f}" in text, key
    assert "95% CI" in text and "200 resamples" in text
    for word in ("bacteria", "virus", "normal", "resnet18", "5216", "11,170,000", "1, 224, 224"):
        assert word in text, word


def test_error_gallery_lists_the_most_confident_errors(full_report):
    text = " ".join(_parse(full_report["path"]).text)
    y, p, t = full_report["y"], full_report["p"], full_report["threshold"]
    fp = np.flatnonzero((y == 0) & (p >= t))
    fn = np.flatnonzero((y == 1) & (p < t))
    top_fp = fp[np.argsort(-p[fp])][:8]
    top_fn = fn[np.argsort(p[fn])][:8]
    assert len(top_fp) == 8 and len(top_fn) == 8
    for i in np.r_[top_fp, top_fn]:
        assert f"img_{i:04d}.jpeg" in text and f"{p[i]:.3f}" in text
    correct = np.flatnonzero((p >= t) == (y == 1))
    assert not any(f"img_{i:04d}.jpeg" in text for i in correct)  # correct predictions are not errors
    less_confident = fp[np.argsort(-p[fp])][8:]
    assert not any(f"img_{i:04d}.jpeg" in text for i in less_confident)
    assert "False positives" in text and "False negatives" in text


def test_text_is_escaped(full_report):
    raw = full_report["path"].read_text(encoding="utf-8")
    assert "<script>" not in raw
    assert "Pneumonia &lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in raw
    assert "/data/&lt;chest &amp; xray&gt;" in raw


def test_report_without_optional_parts_and_plain_metrics(tmp_path):
    y, p = _data(120, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        metrics = binary_metrics(y, p, 0.4)
    path = write_report(tmp_path, metrics=metrics, y_true=y, y_prob=p, threshold=0.4, class_names=CLASSES)
    raw = path.read_text(encoding="utf-8")
    assert raw.count("data:image/png;base64,") == 4
    assert not (tmp_path / "errors.png").exists()
    assert "Most confident errors" not in raw and "Subgroups" not in raw
    page = _parse(path)
    assert not page.problems and not page.stack
    assert f"{metrics['auc']:.3f}" in " ".join(page.text)


@pytest.mark.filterwarnings("ignore::medlens.metrics.UndefinedMetricWarning")  # tiny data: NPV often undefined
def test_gallery_without_false_negatives_and_float_images(tmp_path):
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.9, 0.1, 0.8, 0.7, 0.95])
    gallery = [{"image": np.full((32, 40), 0.5, dtype=np.float32), "prob": float(p[i]), "label": int(y[i]),
                "path": f"case_{i}.png"} for i in range(5)]
    metrics = metrics_with_ci(y, p, 0.5, n_boot=50)
    path = write_report(tmp_path, metrics=metrics, y_true=y, y_prob=p, threshold=0.5, class_names=CLASSES,
                        errors_gallery=gallery)
    text = " ".join(_parse(path).text)
    assert "case_0.png" in text and "False negatives (0 shown)" in text
    assert (tmp_path / "errors.png").read_bytes().startswith(PNG_MAGIC)


def test_class_names_must_be_two(tmp_path):
    y, p = _data(50)
    with pytest.raises(ValueError, match="class_names"):
        write_report(tmp_path, metrics={}, y_true=y, y_prob=p, threshold=0.5, class_names=["a", "b", "c"])
